//! A `qemu-nbd` server for `usermm bench`'s NBD column: an image file in the bench's
//! directory exported on a Unix socket, started here and stopped by its pid (also on
//! Ctrl-C, through the undo registry).

use super::util::{self, Registered, Undo};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running qemu-nbd.
#[derive(Debug)]
pub struct NbdServer {
    child: Child,
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
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-x", "swap", "--cache=none", "-k"])
            .arg(&socket)
            .arg(&image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start qemu-nbd: {e}"))?;
        undo.push(util::register(Undo::Kill(child.id() as i32)));
        undo.push(util::register(Undo::RemoveFile(socket.clone())));
        let mut s = NbdServer {
            child,
            image,
            socket,
            undo,
        };
        let t = Instant::now();
        while !s.socket.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                return Err(format!("qemu-nbd exited at start ({st})"));
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err("qemu-nbd did not open its socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(s)
    }

    /// The swap spec that reaches this server.
    pub fn spec(&self) -> String {
        format!("nbd+unix:///swap?socket={}", self.socket.display())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.image);
        for u in &self.undo {
            u.forget();
        }
    }
}
