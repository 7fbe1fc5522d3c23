//! Test support: an in-memory export, a server on a unix socket, and a raw NBD client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::Sender;
use ingot_engine::{check_range, Completion, Error, Extent, Reply, Request, Result};
use ingot_nbd::proto::*;
use ingot_nbd::{Export, ExportSource, NbdServer, ServerConfig, StaticExports};
use parking_lot::{Mutex, RwLock};

const BLOCK: u64 = 4096;

type Job = Box<dyn FnOnce() + Send>;

/// A RAM-backed export that completes requests on worker threads, tracking which 4 KiB blocks
/// hold data so block status reports holes.
pub struct MemExport {
    name: String,
    size: u64,
    read_only: bool,
    data: RwLock<Vec<u8>>,
    allocated: Mutex<Vec<bool>>,
    jobs: Sender<Job>,
    /// Delay every completion by this many milliseconds.
    pub delay_ms: AtomicU64,
    /// Fail every read and write with an I/O error.
    pub fail_io: AtomicBool,
    /// Number of requests submitted.
    pub submitted: AtomicU64,
}

impl MemExport {
    pub fn new(name: &str, size: u64) -> Arc<MemExport> {
        Self::build(name, size, false)
    }

    pub fn read_only(name: &str, size: u64) -> Arc<MemExport> {
        Self::build(name, size, true)
    }

    fn build(name: &str, size: u64, read_only: bool) -> Arc<MemExport> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        for _ in 0..3 {
            let rx = rx.clone();
            thread::spawn(move || {
                for job in rx {
                    job();
                }
            });
        }
        Arc::new(MemExport {
            name: name.to_string(),
            size,
            read_only,
            data: RwLock::new(vec![0; size as usize]),
            allocated: Mutex::new(vec![false; size.div_ceil(BLOCK) as usize]),
            jobs: tx,
            delay_ms: AtomicU64::new(0),
            fail_io: AtomicBool::new(false),
            submitted: AtomicU64::new(0),
        })
    }

    pub fn contents(&self, offset: u64, len: u64) -> Vec<u8> {
        self.data.read()[offset as usize..(offset + len) as usize].to_vec()
    }

    fn execute(&self, req: Request) -> Result<Reply> {
        let io_err = || Error::Io {
            device: 0,
            offset: 0,
            source: std::io::Error::other("injected failure"),
        };
        match req {
            Request::Read { offset, len } => {
                check_range(
                    offset,
                    len as u64,
                    self.size,
                    ingot_engine::MAX_REQUEST_BYTES,
                )?;
                if self.fail_io.load(Ordering::Relaxed) {
                    return Err(io_err());
                }
                Ok(Reply::Data(self.contents(offset, len as u64).into()))
            }
            Request::Write { offset, data, .. } => {
                check_range(offset, data.len() as u64, self.size, u64::MAX)?;
                if self.fail_io.load(Ordering::Relaxed) {
                    return Err(io_err());
                }
                let end = offset + data.len() as u64;
                self.data.write()[offset as usize..end as usize].copy_from_slice(&data);
                let mut a = self.allocated.lock();
                for b in offset / BLOCK..end.div_ceil(BLOCK) {
                    a[b as usize] = true;
                }
                Ok(Reply::Done)
            }
            Request::WriteZeroes { offset, len, .. } | Request::Trim { offset, len, .. } => {
                check_range(offset, len, self.size, ingot_engine::MAX_REQUEST_BYTES)?;
                let end = offset + len;
                self.data.write()[offset as usize..end as usize].fill(0);
                let mut a = self.allocated.lock();
                for b in offset.div_ceil(BLOCK)..end / BLOCK {
                    a[b as usize] = false;
                }
                Ok(Reply::Done)
            }
            Request::Flush => Ok(Reply::Done),
        }
    }
}

impl Export for MemExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, req: Request, done: Completion) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
        let delay = self.delay_ms.load(Ordering::Relaxed);
        let res = self.execute(req);
        let _ = self.jobs.send(Box::new(move || {
            if delay > 0 {
                thread::sleep(Duration::from_millis(delay));
            }
            done(res)
        }));
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size, u64::MAX)?;
        let a = self.allocated.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let next = ((pos / BLOCK + 1) * BLOCK).min(end);
            let hole = !a[(pos / BLOCK) as usize];
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += next - pos,
                _ => out.push(Extent {
                    len: next - pos,
                    hole,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

/// A server on a fresh unix socket.
pub struct TestServer {
    pub server: NbdServer,
    pub socket: PathBuf,
    pub exports: Vec<Arc<MemExport>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Exports "vol0" (1 MiB, default) and "vol1" (2 MiB).
    pub fn start() -> TestServer {
        Self::with(
            vec![
                MemExport::new("vol0", 1 << 20),
                MemExport::new("vol1", 2 << 20),
            ],
            ServerConfig::default(),
        )
    }

    pub fn with(exports: Vec<Arc<MemExport>>, cfg: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let list: Vec<Arc<dyn Export>> = exports
            .iter()
            .map(|e| e.clone() as Arc<dyn Export>)
            .collect();
        let source: Arc<dyn ExportSource> = Arc::new(StaticExports::new(list));
        let server = NbdServer::new(source, cfg);
        server
            .listen(&ingot_nbd::ListenAddr::Unix(socket.clone()))
            .unwrap();
        TestServer {
            server,
            socket,
            exports,
            _dir: dir,
        }
    }

    pub fn raw(&self) -> Raw<UnixStream> {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    /// Wait until the server has no connections left.
    pub fn wait_idle(&self) {
        for _ in 0..500 {
            if self.server.connection_count() == 0 {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "server still has {} connections",
            self.server.connection_count()
        );
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// An option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A structured reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn error(&self) -> u32 {
        assert!(self.kind & 0x8000 != 0, "not an error chunk: {self:?}");
        u32::from_be_bytes(self.payload[0..4].try_into().unwrap())
    }
}

/// A raw NBD client speaking bytes.
pub struct Raw<S> {
    pub s: S,
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Data of NBD_OPT_{LIST,SET}_META_CONTEXT.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

impl<S: Read + Write> Raw<S> {
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// True when the server closed the connection (EOF or reset) before sending anything.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Read the greeting, check it, and answer with `client_flags`; returns the server flags.
    pub fn greet(&mut self, client_flags: u32) -> u16 {
        let g = self.read_n(18);
        assert_eq!(be64(&g[0..]), NBDMAGIC);
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        self.s.write_all(&client_flags.to_be_bytes()).unwrap();
        be16(&g[16..])
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    pub fn option_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be64(&h), OPT_REPLY_MAGIC);
        let len = be32(&h[16..]) as usize;
        OptReply {
            option: be32(&h[8..]),
            kind: be32(&h[12..]),
            data: self.read_n(len),
        }
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn option_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.option_reply();
            let fin = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            v.push(r);
            if fin {
                return v;
            }
        }
    }

    /// Greet and enter transmission on `name` with NBD_OPT_GO; returns transmission flags.
    pub fn go(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        self.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        if structured {
            self.send_option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_reply().kind, REP_ACK);
        }
        if meta {
            self.send_option(
                OPT_SET_META_CONTEXT,
                &meta_data(name, &[META_BASE_ALLOCATION]),
            );
            let r = self.option_replies();
            assert_eq!(r[0].kind, REP_META_CONTEXT, "{r:?}");
        }
        self.send_option(OPT_GO, &info_data(name, &[INFO_BLOCK_SIZE]));
        let replies = self.option_replies();
        assert_eq!(replies.last().unwrap().kind, REP_ACK, "{replies:?}");
        let export = replies
            .iter()
            .find(|r| r.kind == REP_INFO && be16(&r.data) == INFO_EXPORT)
            .expect("NBD_INFO_EXPORT");
        (be64(&export.data[2..]), be16(&export.data[10..]))
    }

    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        let h = RequestHeader {
            magic: REQUEST_MAGIC,
            flags,
            command: cmd,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&h.encode()).unwrap();
    }

    pub fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        self.request(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
    }

    /// A simple reply: (error, cookie).
    pub fn simple(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "expected a simple reply");
        (be32(&h[4..]), be64(&h[8..]))
    }

    pub fn chunk(&mut self) -> Chunk {
        let h = self.read_n(20);
        assert_eq!(
            be32(&h),
            STRUCTURED_REPLY_MAGIC,
            "expected a structured chunk"
        );
        let len = be32(&h[16..]) as usize;
        Chunk {
            flags: be16(&h[4..]),
            kind: be16(&h[6..]),
            cookie: be64(&h[8..]),
            payload: self.read_n(len),
        }
    }

    pub fn disconnect(&mut self) {
        self.request(0, CMD_DISC, 0, 0, 0);
    }
}
