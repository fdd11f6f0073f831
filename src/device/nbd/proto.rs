//! The NBD wire protocol, without sockets: constants, the request header, the
//! fixed-newstyle handshake (`NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_GO`, with a
//! fallback to `NBD_OPT_EXPORT_NAME`) and the parser of simple and structured
//! replies.
//!
//! Owns: the byte layout and every check of what a server sends. Written from the
//! protocol description (NetworkBlockDevice `doc/proto.md`), not from any
//! implementation.
//!
//! Keeps docs/design.md invariant 2 on the transmission path: the reply parser
//! allocates nothing. It reads headers into stack arrays, payloads straight into
//! the buffer of the request they answer (handed out by a [`Table`]), and error
//! messages into a caller-provided scratch buffer; a length that does not fit is a
//! protocol error, never an allocation. A server cannot make it panic, loop or
//! allocate: every length is checked before it is used, and everything that is
//! wrong is a [`ProtoError`] naming what was wrong (after which the connection
//! cannot be trusted and is dropped). The handshake runs at connect time only and
//! may allocate error messages; it also bounds every length it reads.
//!
//! No locks here: the [`Table`] implementation decides who may touch a request.

use std::fmt;
use std::io::{self, Read, Write};

/// `NBDMAGIC`, first word of every handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle handshake, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Second word of the oldstyle handshake (unsupported).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const C_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const C_NO_ZEROES: u32 = 2;

/// Option: enter transmission (old way, no error reporting).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: select an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: ask for structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: accepted / done.
pub const REP_ACK: u32 = 1;
/// Option reply: an information item.
pub const REP_INFO: u32 = 3;
/// Bit set in every option error reply.
pub const REP_ERR_BIT: u32 = 1 << 31;
/// Option error: the option is unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;

/// Info item: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: flags are valid.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` (one content chunk per read) is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see one consistent export.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes (no payload).
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: don't fragment the read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Chunk type: nothing (final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type bit: an error chunk.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: error.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT + 1;
/// Chunk type: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Content chunks one read reply may be split into (they are tracked in a fixed array).
pub const MAX_READ_CHUNKS: usize = 16;
/// Size of the scratch buffer the reply parser needs (error chunk payloads).
pub const SCRATCH_LEN: usize = 8192;
/// Largest option reply the handshake accepts.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most option replies the handshake reads for one option.
pub const MAX_OPTION_REPLIES: usize = 64;
/// Longest export name (the protocol's string limit).
pub const MAX_EXPORT_NAME: usize = 4096;

/// Encodes a request header.
pub fn encode_request(
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Something a server did that the protocol forbids (or that this client cannot
/// accept). Plain data, so building one allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A reply started with neither the simple nor the structured magic.
    BadReplyMagic(u32),
    /// A reply named a handle (cookie) no request in flight has: a reply to a
    /// request never sent, a second reply, or garbage.
    UnknownHandle(u64),
    /// A structured chunk arrived although structured replies were not negotiated.
    StructuredNotNegotiated,
    /// A simple reply answered a read although structured replies were negotiated.
    SimpleReplyToRead,
    /// A chunk is longer than its type allows.
    ChunkTooLong {
        /// Chunk type.
        kind: u16,
        /// Length the server announced.
        len: u32,
    },
    /// A chunk is shorter than its type requires (or `NONE` with a payload).
    ChunkTooShort {
        /// Chunk type.
        kind: u16,
        /// Length the server announced.
        len: u32,
    },
    /// A content chunk lies outside the request's range.
    ChunkOutOfRange {
        /// Offset of the chunk.
        offset: u64,
        /// Bytes it covers.
        len: u64,
    },
    /// A content chunk overlaps an earlier one of the same reply.
    ChunkOverlap {
        /// Offset of the chunk.
        offset: u64,
    },
    /// A read reply came in more content chunks than this client tracks.
    TooManyChunks,
    /// A chunk of a non-error type this client does not know or did not ask for.
    UnexpectedChunkType(u16),
    /// A content chunk answered a request that is not a read.
    ContentForNonRead(u16),
    /// An `NBD_REPLY_TYPE_NONE` chunk without the DONE flag.
    NoneWithoutDone,
    /// A read reply finished successfully without covering the whole range.
    IncompleteRead {
        /// Bytes covered.
        got: u32,
        /// Bytes requested.
        want: u32,
    },
    /// An error chunk's message length exceeds the chunk.
    BadErrorMessageLength {
        /// Message length announced.
        msg: u16,
        /// Chunk length.
        len: u32,
    },
    /// Data arrived although no request was in flight (garbage after the handshake).
    Unsolicited,
    /// The connection ended in the middle of a reply (a short read).
    Truncated,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NBD protocol violation by the server: ")?;
        match *self {
            ProtoError::BadReplyMagic(m) => write!(f, "reply with wrong magic {m:#010x}"),
            ProtoError::UnknownHandle(h) => write!(
                f,
                "reply with unknown handle {h:#018x} (no such request in flight)"
            ),
            ProtoError::StructuredNotNegotiated => {
                write!(
                    f,
                    "structured reply although structured replies were not negotiated"
                )
            }
            ProtoError::SimpleReplyToRead => {
                write!(
                    f,
                    "simple reply to a read after structured replies were negotiated"
                )
            }
            ProtoError::ChunkTooLong { kind, len } => {
                write!(f, "oversized reply chunk (type {kind}, length {len})")
            }
            ProtoError::ChunkTooShort { kind, len } => {
                write!(f, "reply chunk of type {kind} has invalid length {len}")
            }
            ProtoError::ChunkOutOfRange { offset, len } => write!(
                f,
                "read reply chunk at offset {offset} length {len} outside the request"
            ),
            ProtoError::ChunkOverlap { offset } => {
                write!(
                    f,
                    "read reply chunk at offset {offset} overlaps an earlier chunk"
                )
            }
            ProtoError::TooManyChunks => write!(
                f,
                "read reply split into more than {MAX_READ_CHUNKS} chunks"
            ),
            ProtoError::UnexpectedChunkType(t) => write!(f, "unexpected reply chunk type {t}"),
            ProtoError::ContentForNonRead(c) => {
                write!(f, "data chunk in the reply to command {c} (not a read)")
            }
            ProtoError::NoneWithoutDone => write!(f, "NONE chunk without the DONE flag"),
            ProtoError::IncompleteRead { got, want } => write!(
                f,
                "read reply claimed success after {got} of {want} bytes (short read)"
            ),
            ProtoError::BadErrorMessageLength { msg, len } => write!(
                f,
                "error chunk message length {msg} exceeds chunk length {len}"
            ),
            ProtoError::Unsolicited => {
                write!(
                    f,
                    "data sent with no request in flight (garbage after the handshake)"
                )
            }
            ProtoError::Truncated => {
                write!(f, "connection closed in the middle of a reply (short read)")
            }
        }
    }
}

impl std::error::Error for ProtoError {}

/// Why reading a reply failed.
#[derive(Debug)]
pub enum ReplyError {
    /// The socket failed or closed (including in the middle of a reply).
    Io(io::Error),
    /// The server broke the protocol.
    Proto(ProtoError),
}

impl From<io::Error> for ReplyError {
    fn from(e: io::Error) -> Self {
        ReplyError::Io(e)
    }
}
impl From<ProtoError> for ReplyError {
    fn from(e: ProtoError) -> Self {
        ReplyError::Proto(e)
    }
}

/// The byte stream replies come from.
pub trait Source {
    /// Fills `buf` completely, or fails (`UnexpectedEof` when the stream ends).
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

impl Source for &[u8] {
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<()> {
        Read::read_exact(self, buf)
    }
}

/// What the parser tracks about one read's structured reply: the byte ranges
/// (relative to the request) its content chunks covered and the first error.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplyState {
    ranges: [(u32, u32); MAX_READ_CHUNKS],
    n: u8,
    covered: u32,
    err: u32,
}

impl ReplyState {
    /// Forgets everything (a new request).
    pub fn reset(&mut self) {
        self.n = 0;
        self.covered = 0;
        self.err = 0;
    }

    fn add(&mut self, start: u32, end: u32, offset: u64) -> Result<(), ProtoError> {
        for &(s, e) in &self.ranges[..self.n as usize] {
            if start < e && s < end {
                return Err(ProtoError::ChunkOverlap { offset });
            }
        }
        if self.n as usize == MAX_READ_CHUNKS {
            return Err(ProtoError::TooManyChunks);
        }
        self.ranges[self.n as usize] = (start, end);
        self.n += 1;
        self.covered += end - start;
        Ok(())
    }
}

/// A request in flight, claimed by the parser while it handles one reply message.
#[derive(Debug)]
pub struct Claim<'a> {
    /// The command (`CMD_*`).
    pub cmd: u16,
    /// Offset of the request.
    pub offset: u64,
    /// For a read: where the data goes, exactly the request's length. Empty otherwise.
    pub buf: &'a mut [u8],
    /// Reassembly state of a structured reply.
    pub st: &'a mut ReplyState,
}

/// The table of requests in flight, as the parser sees it.
pub trait Table {
    /// Claims the request with handle `cookie` for one reply message; `None` if no
    /// request with that handle is waiting for a reply.
    fn claim(&self, cookie: u64) -> Option<Claim<'_>>;
    /// Ends a claim: `None` leaves the request waiting for more chunks, `Some(Ok)`
    /// completes it, `Some(Err(errno))` fails it with an NBD error code.
    fn release(&self, cookie: u64, done: Option<Result<(), u32>>);
}

/// Error code recorded for a request whose reply was cut by a failure.
pub const ERR_LINK: u32 = u32::MAX;
/// Error code recorded for a request whose reply broke the protocol.
pub const ERR_PROTO: u32 = u32::MAX - 1;

/// An error code from the server as recorded for its request: 0 (an error chunk
/// must carry a non-zero error) and values that collide with this client's own
/// markers become EIO.
fn server_error(e: u32) -> u32 {
    if e == 0 || e >= ERR_PROTO {
        5
    } else {
        e
    }
}

/// Reads one reply message (a simple reply or one structured chunk) and delivers
/// it to its request. Returns the handle of the request it completed, if it did.
///
/// On any error the claimed request (if any) has been released as failed, and the
/// stream is out of sync: the caller must drop the connection.
pub fn read_reply<S: Source, T: Table>(
    src: &mut S,
    structured: bool,
    table: &T,
    scratch: &mut [u8],
) -> Result<Option<u64>, ReplyError> {
    let mut magic = [0u8; 4];
    src.read_full(&mut magic)?;
    let r = match be32(&magic) {
        SIMPLE_REPLY_MAGIC => read_simple(src, structured, table),
        STRUCTURED_REPLY_MAGIC if structured => read_chunk(src, table, scratch),
        STRUCTURED_REPLY_MAGIC => Err(ProtoError::StructuredNotNegotiated.into()),
        m => Err(ProtoError::BadReplyMagic(m).into()),
    };
    // The stream ending inside a message is a short read, not a clean close.
    r.map_err(|e| match e {
        ReplyError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            ReplyError::Proto(ProtoError::Truncated)
        }
        e => e,
    })
}

fn read_simple<S: Source, T: Table>(
    src: &mut S,
    structured: bool,
    table: &T,
) -> Result<Option<u64>, ReplyError> {
    let mut h = [0u8; 12];
    src.read_full(&mut h)?;
    let error = be32(&h[0..4]);
    let cookie = be64(&h[4..12]);
    let c = table
        .claim(cookie)
        .ok_or(ProtoError::UnknownHandle(cookie))?;
    if c.cmd == CMD_READ && structured {
        table.release(cookie, Some(Err(ERR_PROTO)));
        return Err(ProtoError::SimpleReplyToRead.into());
    }
    if error != 0 {
        // No payload follows an error (the protocol forbids it for simple replies).
        table.release(cookie, Some(Err(server_error(error))));
        return Ok(Some(cookie));
    }
    if c.cmd == CMD_READ {
        if let Err(e) = src.read_full(c.buf) {
            table.release(cookie, Some(Err(ERR_LINK)));
            return Err(e.into());
        }
    }
    table.release(cookie, Some(Ok(())));
    Ok(Some(cookie))
}

fn read_chunk<S: Source, T: Table>(
    src: &mut S,
    table: &T,
    scratch: &mut [u8],
) -> Result<Option<u64>, ReplyError> {
    let mut h = [0u8; 16];
    src.read_full(&mut h)?;
    let flags = be16(&h[0..2]);
    let kind = be16(&h[2..4]);
    let cookie = be64(&h[4..12]);
    let len = be32(&h[12..16]);
    let mut c = table
        .claim(cookie)
        .ok_or(ProtoError::UnknownHandle(cookie))?;
    let done = flags & REPLY_FLAG_DONE != 0;
    let res = chunk_body(src, &mut c, kind, len, done, scratch);
    let want = c.buf.len() as u32;
    let (covered, err) = (c.st.covered, c.st.err);
    let is_read = c.cmd == CMD_READ;
    if let Err((e, code)) = res {
        table.release(cookie, Some(Err(code)));
        return Err(e);
    }
    if !done {
        table.release(cookie, None);
        return Ok(None);
    }
    if err != 0 {
        table.release(cookie, Some(Err(err)));
    } else if is_read && covered != want {
        table.release(cookie, Some(Err(ERR_PROTO)));
        return Err(ProtoError::IncompleteRead { got: covered, want }.into());
    } else {
        table.release(cookie, Some(Ok(())));
    }
    Ok(Some(cookie))
}

/// Reads the payload of one structured chunk into its request. On failure returns
/// the error and the code the request fails with.
fn chunk_body<S: Source>(
    src: &mut S,
    c: &mut Claim<'_>,
    kind: u16,
    len: u32,
    done: bool,
    scratch: &mut [u8],
) -> Result<(), (ReplyError, u32)> {
    let proto = |e: ProtoError| (ReplyError::Proto(e), ERR_PROTO);
    let link = |e: io::Error| (ReplyError::Io(e), ERR_LINK);
    let req_len = c.buf.len() as u64;
    match kind {
        REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(proto(ProtoError::ChunkTooShort { kind, len }));
            }
            if !done {
                return Err(proto(ProtoError::NoneWithoutDone));
            }
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            if c.cmd != CMD_READ {
                return Err(proto(ProtoError::ContentForNonRead(c.cmd)));
            }
            let hole = kind == REPLY_TYPE_OFFSET_HOLE;
            if (hole && len != 12) || (!hole && len < 9) {
                return Err(proto(ProtoError::ChunkTooShort { kind, len }));
            }
            if !hole && u64::from(len) - 8 > req_len {
                return Err(proto(ProtoError::ChunkTooLong { kind, len }));
            }
            let mut p = [0u8; 12];
            let plen = if hole { 12 } else { 8 };
            src.read_full(&mut p[..plen]).map_err(link)?;
            let offset = be64(&p[0..8]);
            let n = if hole {
                u64::from(be32(&p[8..12]))
            } else {
                u64::from(len) - 8
            };
            let rel = offset.wrapping_sub(c.offset);
            if n == 0 || offset < c.offset || rel > req_len || n > req_len - rel {
                return Err(proto(ProtoError::ChunkOutOfRange { offset, len: n }));
            }
            let (start, end) = (rel as usize, (rel + n) as usize);
            c.st.add(start as u32, end as u32, offset).map_err(proto)?;
            if hole {
                c.buf[start..end].fill(0);
            } else {
                src.read_full(&mut c.buf[start..end]).map_err(link)?;
            }
        }
        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
            // Error chunks: error, message length, message, then type-specific fields.
            if len < 6 {
                return Err(proto(ProtoError::ChunkTooShort { kind, len }));
            }
            if len as usize > scratch.len() {
                return Err(proto(ProtoError::ChunkTooLong { kind, len }));
            }
            let p = &mut scratch[..len as usize];
            src.read_full(p).map_err(link)?;
            let error = be32(&p[0..4]);
            let msg = be16(&p[4..6]);
            if u32::from(msg) > len - 6 {
                return Err(proto(ProtoError::BadErrorMessageLength { msg, len }));
            }
            if kind == REPLY_TYPE_ERROR_OFFSET && len - 6 - u32::from(msg) != 8 {
                return Err(proto(ProtoError::ChunkTooShort { kind, len }));
            }
            if c.st.err == 0 {
                c.st.err = server_error(error);
            }
        }
        k => return Err(proto(ProtoError::UnexpectedChunkType(k))),
    }
    Ok(())
}

/// What the handshake agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes (from `NBD_INFO_EXPORT`, or the `EXPORT_NAME` reply).
    pub size: u64,
    /// Transmission flags (`TF_*`).
    pub flags: u16,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Minimum block size (1 when the server gave none).
    pub min_block: u32,
    /// Preferred block size (4096 when the server gave none).
    pub pref_block: u32,
    /// Maximum payload (32 MiB when the server gave none).
    pub max_block: u32,
    /// Whether `NBD_OPT_GO` was used (false: the `NBD_OPT_EXPORT_NAME` fallback).
    pub used_go: bool,
}

impl Negotiated {
    /// Checks that a swap device of `page`-sized requests can use this export.
    pub fn check(&self, page: u32) -> Result<(), String> {
        if self.flags & TF_READ_ONLY != 0 {
            return Err("the export is read-only".into());
        }
        if !self.min_block.is_power_of_two() || self.min_block > page {
            return Err(format!(
                "the export's minimum block size {} does not divide a page of {page} bytes",
                self.min_block
            ));
        }
        if self.max_block < page {
            return Err(format!(
                "the export's maximum payload {} is smaller than a page of {page} bytes",
                self.max_block
            ));
        }
        if self.size < u64::from(page) {
            return Err(format!(
                "the export has {} bytes, less than one page",
                self.size
            ));
        }
        Ok(())
    }
}

fn hs_err(stage: &str, what: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("NBD handshake failed ({stage}): {what}"),
    )
}

fn hs_read<S: Read>(s: &mut S, buf: &mut [u8], stage: &str) -> io::Result<()> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => hs_err(stage, "the server closed the connection"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("NBD handshake timed out ({stage})"),
        ),
        _ => io::Error::new(e.kind(), format!("NBD handshake failed ({stage}): {e}")),
    })
}

fn rep_name(t: u32) -> &'static str {
    match t {
        REP_ACK => "ACK",
        2 => "SERVER",
        REP_INFO => "INFO",
        4 => "META_CONTEXT",
        REP_ERR_UNSUP => "ERR_UNSUP",
        0x8000_0002 => "ERR_POLICY",
        0x8000_0003 => "ERR_INVALID",
        0x8000_0004 => "ERR_PLATFORM",
        0x8000_0005 => "ERR_TLS_REQD",
        0x8000_0006 => "ERR_UNKNOWN (no such export)",
        0x8000_0007 => "ERR_SHUTDOWN",
        0x8000_0008 => "ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "ERR_TOO_BIG",
        t if t & REP_ERR_BIT != 0 => "error",
        _ => "unknown reply type",
    }
}

fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8], stage: &str) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
    s.write_all(&h)
        .and_then(|_| s.write_all(data))
        .and_then(|_| s.flush())
        .map_err(|e| io::Error::new(e.kind(), format!("NBD handshake failed ({stage}): {e}")))
}

/// One option reply: its type and the first bytes of its data (`keep` of them;
/// the rest is read and dropped).
struct OptReply {
    kind: u32,
    len: u32,
    keep: usize,
}

fn read_option_reply<S: Read>(
    s: &mut S,
    opt: u32,
    buf: &mut [u8],
    stage: &str,
) -> io::Result<OptReply> {
    let mut h = [0u8; 20];
    hs_read(s, &mut h, stage)?;
    let magic = be64(&h[0..8]);
    if magic != OPT_REPLY_MAGIC {
        return Err(hs_err(
            stage,
            format_args!("option reply with wrong magic {magic:#018x}"),
        ));
    }
    let ropt = be32(&h[8..12]);
    if ropt != opt {
        return Err(hs_err(
            stage,
            format_args!("reply names option {ropt}, expected {opt}"),
        ));
    }
    let kind = be32(&h[12..16]);
    let len = be32(&h[16..20]);
    if len > MAX_OPTION_REPLY {
        return Err(hs_err(
            stage,
            format_args!(
                "oversized option reply ({len} bytes, at most {MAX_OPTION_REPLY} accepted)"
            ),
        ));
    }
    let keep = (len as usize).min(buf.len());
    hs_read(s, &mut buf[..keep], stage)?;
    let mut rest = len as usize - keep;
    let mut sink = [0u8; 512];
    while rest > 0 {
        let n = rest.min(sink.len());
        hs_read(s, &mut sink[..n], stage)?;
        rest -= n;
    }
    Ok(OptReply { kind, len, keep })
}

fn server_message(buf: &[u8]) -> String {
    let t = String::from_utf8_lossy(&buf[..buf.len().min(300)]);
    let t = t.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!(": {t}")
    }
}

/// Runs the fixed-newstyle handshake on a fresh connection: asks for structured
/// replies (if `want_structured`), then `NBD_OPT_GO` for `export` with a request
/// for block-size constraints, falling back to `NBD_OPT_EXPORT_NAME` for servers
/// without `NBD_OPT_GO`. The size comes from the GO reply (servers may report 0
/// elsewhere). Errors say which step failed and what the server sent.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    export: &str,
    want_structured: bool,
) -> io::Result<Negotiated> {
    if export.len() > MAX_EXPORT_NAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NBD export name longer than 4096 bytes",
        ));
    }
    let mut h = [0u8; 18];
    hs_read(s, &mut h, "greeting")?;
    let magic = be64(&h[0..8]);
    if magic != NBDMAGIC {
        return Err(hs_err(
            "greeting",
            format_args!("wrong magic {magic:#018x}: not an NBD server"),
        ));
    }
    let second = be64(&h[8..16]);
    if second == CLISERV_MAGIC {
        return Err(hs_err(
            "greeting",
            "oldstyle server (not supported; use newstyle)",
        ));
    }
    if second != IHAVEOPT {
        return Err(hs_err(
            "greeting",
            format_args!("wrong newstyle magic {second:#018x}"),
        ));
    }
    let hflags = be16(&h[16..18]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(hs_err(
            "greeting",
            "the server does not speak fixed newstyle",
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = C_FIXED_NEWSTYLE | if no_zeroes { C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes())?;

    let mut buf = [0u8; 4096];
    let mut structured = false;
    if want_structured {
        let stage = "NBD_OPT_STRUCTURED_REPLY";
        send_option(s, OPT_STRUCTURED_REPLY, &[], stage)?;
        let r = read_option_reply(s, OPT_STRUCTURED_REPLY, &mut buf, stage)?;
        match r.kind {
            REP_ACK if r.len == 0 => structured = true,
            REP_ACK => return Err(hs_err(stage, "ACK with a payload")),
            k if k & REP_ERR_BIT != 0 => {} // not supported: simple replies
            k => return Err(hs_err(stage, format_args!("unexpected reply type {k:#x}"))),
        }
    }

    // NBD_OPT_GO: name length, name, one information request (block size).
    let stage = "NBD_OPT_GO";
    let mut data = [0u8; 4 + MAX_EXPORT_NAME + 4];
    let nl = export.len();
    data[0..4].copy_from_slice(&(nl as u32).to_be_bytes());
    data[4..4 + nl].copy_from_slice(export.as_bytes());
    data[4 + nl..6 + nl].copy_from_slice(&1u16.to_be_bytes());
    data[6 + nl..8 + nl].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data[..8 + nl], stage)?;
    let mut export_info: Option<(u64, u16)> = None;
    let mut blocks: Option<(u32, u32, u32)> = None;
    let mut replies = 0;
    loop {
        replies += 1;
        if replies > MAX_OPTION_REPLIES {
            return Err(hs_err(stage, "too many option replies"));
        }
        let r = read_option_reply(s, OPT_GO, &mut buf, stage)?;
        let d = &buf[..r.keep];
        match r.kind {
            REP_INFO => {
                if r.len < 2 {
                    return Err(hs_err(stage, "INFO reply without an info type"));
                }
                match be16(&d[0..2]) {
                    INFO_EXPORT => {
                        if r.len != 12 {
                            return Err(hs_err(
                                stage,
                                format_args!("NBD_INFO_EXPORT of length {} (expected 12)", r.len),
                            ));
                        }
                        export_info = Some((be64(&d[2..10]), be16(&d[10..12])));
                    }
                    INFO_BLOCK_SIZE => {
                        if r.len != 14 {
                            return Err(hs_err(
                                stage,
                                format_args!(
                                    "NBD_INFO_BLOCK_SIZE of length {} (expected 14)",
                                    r.len
                                ),
                            ));
                        }
                        blocks = Some((be32(&d[2..6]), be32(&d[6..10]), be32(&d[10..14])));
                    }
                    _ => {} // name, description, …: not needed
                }
            }
            REP_ACK => {
                if r.len != 0 {
                    return Err(hs_err(stage, "ACK with a payload"));
                }
                let Some((size, flags)) = export_info else {
                    return Err(hs_err(stage, "the server never sent NBD_INFO_EXPORT"));
                };
                let (min, pref, max) = blocks.unwrap_or((0, 0, 0));
                return Ok(Negotiated {
                    size,
                    flags,
                    structured,
                    min_block: if min == 0 { 1 } else { min },
                    pref_block: if pref == 0 { 4096 } else { pref },
                    max_block: if max == 0 { 32 << 20 } else { max },
                    used_go: true,
                });
            }
            REP_ERR_UNSUP if export_info.is_none() => break, // old server: EXPORT_NAME
            k if k & REP_ERR_BIT != 0 => {
                return Err(hs_err(
                    stage,
                    format_args!(
                        "the server refused export {export:?} with {}{}",
                        rep_name(k),
                        server_message(d)
                    ),
                ));
            }
            k => {
                return Err(hs_err(
                    stage,
                    format_args!("unexpected reply type {k:#x} ({})", rep_name(k)),
                ))
            }
        }
    }

    // NBD_OPT_EXPORT_NAME: no error reporting, the server closes on a bad name.
    let stage = "NBD_OPT_EXPORT_NAME";
    send_option(s, OPT_EXPORT_NAME, export.as_bytes(), stage)?;
    let mut r = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { 134 };
    hs_read(s, &mut r[..n], stage).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{e} (does export {export:?} exist on the server?)"),
        )
    })?;
    Ok(Negotiated {
        size: be64(&r[0..8]),
        flags: be16(&r[8..10]),
        structured,
        min_block: 1,
        pref_block: 4096,
        max_block: 32 << 20,
        used_go: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A table with one read (handle 1, offset 8192, 4096 bytes) and one write (handle 2).
    struct T {
        buf: RefCell<Vec<u8>>,
        st: RefCell<ReplyState>,
        claimed: RefCell<Vec<u64>>,
        done: RefCell<Vec<(u64, Result<(), u32>)>>,
    }
    impl T {
        fn new() -> T {
            T {
                buf: RefCell::new(vec![0xAA; 4096]),
                st: RefCell::new(ReplyState::default()),
                claimed: RefCell::new(vec![]),
                done: RefCell::new(vec![]),
            }
        }
    }
    impl Table for T {
        fn claim(&self, cookie: u64) -> Option<Claim<'_>> {
            if !(cookie == 1 || cookie == 2) || self.done.borrow().iter().any(|d| d.0 == cookie) {
                return None;
            }
            self.claimed.borrow_mut().push(cookie);
            // SAFETY: test-only; the parser holds at most one claim at a time and
            // drops it before `release`, so these borrows never overlap.
            let (buf, st) = unsafe { (&mut *self.buf.as_ptr(), &mut *(self.st.as_ptr())) };
            Some(Claim {
                cmd: if cookie == 1 { CMD_READ } else { CMD_WRITE },
                offset: if cookie == 1 { 8192 } else { 0 },
                buf: if cookie == 1 { &mut buf[..] } else { &mut [] },
                st,
            })
        }
        fn release(&self, cookie: u64, done: Option<Result<(), u32>>) {
            if let Some(d) = done {
                self.done.borrow_mut().push((cookie, d));
            }
        }
    }

    fn simple(err: u32, cookie: u64) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(err.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v
    }
    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend((payload.len() as u32).to_be_bytes());
        v.extend(payload);
        v
    }
    fn run(bytes: &[u8], structured: bool, t: &T) -> Result<Option<u64>, ReplyError> {
        let mut src = bytes;
        let mut scratch = [0u8; SCRATCH_LEN];
        read_reply(&mut src, structured, t, &mut scratch)
    }

    #[test]
    fn simple_read_and_write() {
        let t = T::new();
        let mut b = simple(0, 1);
        b.extend(vec![7u8; 4096]);
        assert_eq!(run(&b, false, &t).unwrap(), Some(1));
        assert!(t.buf.borrow().iter().all(|&x| x == 7));
        assert_eq!(run(&simple(5, 2), false, &t).unwrap(), Some(2));
        assert_eq!(t.done.borrow()[1], (2, Err(5)));
    }

    #[test]
    fn structured_data_and_hole() {
        let t = T::new();
        let mut p = (8192u64).to_be_bytes().to_vec();
        p.extend(vec![3u8; 1024]);
        assert_eq!(
            run(&chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &p), true, &t).unwrap(),
            None
        );
        let mut h = (8192u64 + 1024).to_be_bytes().to_vec();
        h.extend(3072u32.to_be_bytes());
        assert_eq!(
            run(
                &chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &h),
                true,
                &t
            )
            .unwrap(),
            Some(1)
        );
        let b = t.buf.borrow();
        assert!(b[..1024].iter().all(|&x| x == 3) && b[1024..].iter().all(|&x| x == 0));
        assert_eq!(t.done.borrow()[0], (1, Ok(())));
    }

    #[test]
    fn broken_replies_are_errors() {
        let proto = |r: Result<Option<u64>, ReplyError>| match r {
            Err(ReplyError::Proto(p)) => p,
            other => panic!("expected a protocol error, got {other:?}"),
        };
        let t = T::new();
        assert_eq!(
            proto(run(&[0xde, 0xad, 0xbe, 0xef, 0, 0], false, &t)),
            ProtoError::BadReplyMagic(0xdeadbeef)
        );
        assert_eq!(
            proto(run(&simple(0, 99), false, &t)),
            ProtoError::UnknownHandle(99)
        );
        assert_eq!(
            proto(run(&chunk(1, 0, 2, &[]), false, &t)),
            ProtoError::StructuredNotNegotiated
        );
        assert_eq!(
            proto(run(&simple(0, 1), true, &t)),
            ProtoError::SimpleReplyToRead
        );
        // Short read: header fine, payload cut.
        let t = T::new();
        let mut b = simple(0, 1);
        b.extend(vec![7u8; 100]);
        assert_eq!(proto(run(&b, false, &t)), ProtoError::Truncated);
        assert_eq!(t.done.borrow()[0], (1, Err(ERR_LINK)));
        // Oversized data chunk.
        let t = T::new();
        let mut hdr = chunk(1, REPLY_TYPE_OFFSET_DATA, 1, &[]);
        hdr[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            proto(run(&hdr, true, &t)),
            ProtoError::ChunkTooLong { .. }
        ));
        // Oversized error chunk.
        let t = T::new();
        let mut hdr = chunk(1, REPLY_TYPE_ERROR, 2, &[]);
        hdr[16..20].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert!(matches!(
            proto(run(&hdr, true, &t)),
            ProtoError::ChunkTooLong { .. }
        ));
        // Done without all data.
        let t = T::new();
        let mut p = (8192u64).to_be_bytes().to_vec();
        p.extend(vec![3u8; 1024]);
        assert!(matches!(
            proto(run(&chunk(1, REPLY_TYPE_OFFSET_DATA, 1, &p), true, &t)),
            ProtoError::IncompleteRead {
                got: 1024,
                want: 4096
            }
        ));
        // Overlap.
        let t = T::new();
        run(&chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &p), true, &t).unwrap();
        assert!(matches!(
            proto(run(&chunk(1, REPLY_TYPE_OFFSET_DATA, 1, &p), true, &t)),
            ProtoError::ChunkOverlap { .. }
        ));
        // Out of range.
        let t = T::new();
        let mut q = (0u64).to_be_bytes().to_vec();
        q.extend([1u8; 16]);
        assert!(matches!(
            proto(run(&chunk(1, REPLY_TYPE_OFFSET_DATA, 1, &q), true, &t)),
            ProtoError::ChunkOutOfRange { .. }
        ));
        // Data chunk for a write.
        let t = T::new();
        assert!(matches!(
            proto(run(&chunk(1, REPLY_TYPE_OFFSET_DATA, 2, &p), true, &t)),
            ProtoError::ContentForNonRead(CMD_WRITE)
        ));
    }

    #[test]
    fn error_chunk_fails_the_request() {
        let t = T::new();
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend(3u16.to_be_bytes());
        p.extend(b"bad");
        assert_eq!(
            run(&chunk(1, REPLY_TYPE_ERROR, 1, &p), true, &t).unwrap(),
            Some(1)
        );
        assert_eq!(t.done.borrow()[0], (1, Err(5)));
    }

    /// Random bytes never panic the parser (the fuzz target does this at scale).
    #[test]
    fn random_input_never_panics() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let t = T::new();
            let n = (next() % 64) as usize;
            let mut b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            // Bias towards valid magics and handles so deeper paths run.
            if next() % 2 == 0 && b.len() >= 16 {
                b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                b[8..16].copy_from_slice(&(1 + next() % 2).to_be_bytes());
            }
            let _ = run(&b, next() % 2 == 0, &t);
        }
    }

    /// A scripted server side for handshake tests.
    struct Script {
        input: std::io::Cursor<Vec<u8>>,
        out: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.out.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    fn opt_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(opt.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        v
    }
    fn greeting() -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend(IHAVEOPT.to_be_bytes());
        v.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v
    }

    #[test]
    fn handshake_takes_size_from_go() {
        let mut srv = greeting();
        srv.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend((1u64 << 30).to_be_bytes());
        info.extend((TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN).to_be_bytes());
        srv.extend(opt_reply(OPT_GO, REP_INFO, &info));
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        bs.extend(512u32.to_be_bytes());
        bs.extend(4096u32.to_be_bytes());
        bs.extend((1u32 << 20).to_be_bytes());
        srv.extend(opt_reply(OPT_GO, REP_INFO, &bs));
        srv.extend(opt_reply(OPT_GO, REP_ACK, &[]));
        let mut s = Script {
            input: std::io::Cursor::new(srv),
            out: vec![],
        };
        let n = handshake(&mut s, "swap", true).unwrap();
        assert_eq!(n.size, 1 << 30);
        assert!(n.structured && n.used_go);
        assert_eq!(
            (n.min_block, n.pref_block, n.max_block),
            (512, 4096, 1 << 20)
        );
        assert!(n.check(4096).is_ok());
        // Client flags, then the two options.
        assert_eq!(
            &s.out[0..4],
            &(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes()
        );
    }

    #[test]
    fn handshake_errors_are_clear() {
        let msg = |srv: Vec<u8>| {
            let mut s = Script {
                input: std::io::Cursor::new(srv),
                out: vec![],
            };
            handshake(&mut s, "swap", true).unwrap_err().to_string()
        };
        assert!(msg(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).contains("not an NBD server"));
        let mut g = greeting();
        g.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        let mut bad = g.clone();
        bad.extend(opt_reply(OPT_GO, 0x8000_0006, b"no such export"));
        let m = msg(bad);
        assert!(
            m.contains("ERR_UNKNOWN") && m.contains("no such export"),
            "{m}"
        );
        let mut big = g.clone();
        let mut r = opt_reply(OPT_GO, REP_INFO, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        big.extend(r);
        assert!(msg(big).contains("oversized option reply"));
        let mut garbage = g.clone();
        garbage.extend([0x55u8; 40]);
        assert!(msg(garbage).contains("wrong magic"));
        let mut noexport = g;
        noexport.extend(opt_reply(OPT_GO, REP_ACK, &[]));
        assert!(msg(noexport).contains("NBD_INFO_EXPORT"));
    }
}
