//! A `qemu-nbd` server for `usermm bench`'s NBD column: an image file in the bench's
//! directory exported on a Unix socket. Started and stopped (by pid, on drop) by the
//! test kit's [`usermm_testkit::nbd`]; this wrapper adds the image file and the undo
//! registry, so Ctrl-C also kills the server and removes its files.

use super::util::{self, Registered, Undo};
use std::path::{Path, PathBuf};
use usermm_testkit::nbd::{try_qemu_nbd, Endpoint, Server};

/// A running qemu-nbd.
#[derive(Debug)]
pub struct NbdServer {
    server: Server,
    image: PathBuf,
    socket: PathBuf,
    undo: Vec<Registered>,
}

impl NbdServer {
    /// Creates a `size`-byte image in `dir` and exports it as `swap` on a socket.
    pub fn start(dir: &Path, size: u64) -> Result<NbdServer, String> {
        let pid = std::process::id();
        let image = dir.join(format!("usermm-bench-nbd-{pid}.img"));
        let socket = dir.join(format!("usermm-bench-nbd-{pid}.sock"));
        let f = std::fs::File::create(&image)
            .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
        let mut undo = vec![util::register(Undo::RemoveFile(image.clone()))];
        f.set_len(size)
            .map_err(|e| format!("cannot size {}: {e}", image.display()))?;
        drop(f);
        undo.push(util::register(Undo::RemoveFile(socket.clone())));
        let server = match try_qemu_nbd(&image, Endpoint::Unix(socket.clone()), &[]) {
            Ok(s) => s,
            Err(e) => {
                for u in &undo {
                    let _ = u.run();
                }
                return Err(e);
            }
        };
        if let Some(pid) = server.pid() {
            undo.push(util::register(Undo::Kill(pid)));
        }
        Ok(NbdServer {
            server,
            image,
            socket,
            undo,
        })
    }

    /// The swap spec that reaches this server.
    pub fn spec(&self) -> String {
        self.server.spec("")
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.server.kill();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.image);
        for u in &self.undo {
            u.forget();
        }
    }
}
