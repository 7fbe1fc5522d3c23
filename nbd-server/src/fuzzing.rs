//! Entry points for the fuzz targets in `fuzz/` (and the corpus smoke test): negotiation and
//! the request loop run over in-memory bytes against an in-memory export. Not a stable API.

use std::io::{self, Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ingot_engine::{check_range, Completion, Extent, Reply, Request, Result as EngineResult};
use parking_lot::Mutex;

use crate::error::{NbdError, Result};
use crate::export::{Export, ExportSource, StaticExports};
use crate::handshake::{negotiate, HandshakeCtx, HandshakeIo, Negotiated};
use crate::transmission::{self, Limits};

const BLOCK: u64 = 4096;
/// Size of the in-memory exports.
pub const EXPORT_BYTES: u64 = 1 << 20;

/// A small RAM export that completes every request inline and tracks allocated 4 KiB blocks.
pub struct MemExport {
    name: String,
    read_only: bool,
    state: Mutex<(Vec<u8>, Vec<bool>)>,
}

impl MemExport {
    pub fn new(name: &str, read_only: bool) -> Arc<MemExport> {
        Arc::new(MemExport {
            name: name.to_string(),
            read_only,
            state: Mutex::new((
                vec![0; EXPORT_BYTES as usize],
                vec![false; (EXPORT_BYTES / BLOCK) as usize],
            )),
        })
    }

    fn execute(&self, req: Request) -> EngineResult<Reply> {
        let mut st = self.state.lock();
        let (data, alloc) = &mut *st;
        match req {
            Request::Read { offset, len } => {
                check_range(offset, u64::from(len), EXPORT_BYTES, u64::MAX)?;
                let (a, b) = (offset as usize, (offset + u64::from(len)) as usize);
                Ok(Reply::Data(bytes::Bytes::copy_from_slice(
                    data.get(a..b).unwrap_or(&[]),
                )))
            }
            Request::Write {
                offset, data: d, ..
            } => {
                check_range(offset, d.len() as u64, EXPORT_BYTES, u64::MAX)?;
                let end = offset + d.len() as u64;
                if let Some(dst) = data.get_mut(offset as usize..end as usize) {
                    dst.copy_from_slice(&d);
                }
                for b in offset / BLOCK..end.div_ceil(BLOCK) {
                    if let Some(x) = alloc.get_mut(b as usize) {
                        *x = true;
                    }
                }
                Ok(Reply::Done)
            }
            Request::Trim { offset, len, .. } | Request::WriteZeroes { offset, len, .. } => {
                check_range(offset, len, EXPORT_BYTES, u64::MAX)?;
                let end = offset + len;
                if let Some(dst) = data.get_mut(offset as usize..end as usize) {
                    dst.fill(0);
                }
                for b in offset.div_ceil(BLOCK)..end / BLOCK {
                    if let Some(x) = alloc.get_mut(b as usize) {
                        *x = false;
                    }
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
        EXPORT_BYTES
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, req: Request, done: Completion) {
        done(self.execute(req));
    }

    fn block_status(&self, offset: u64, len: u64) -> EngineResult<Vec<Extent>> {
        check_range(offset, len, EXPORT_BYTES, u64::MAX)?;
        let st = self.state.lock();
        let mut out: Vec<Extent> = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let next = ((pos / BLOCK + 1) * BLOCK).min(end);
            let hole = !st.1.get((pos / BLOCK) as usize).copied().unwrap_or(false);
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

struct MemIo<'a> {
    r: &'a [u8],
    w: io::Sink,
}

impl HandshakeIo for MemIo<'_> {
    fn reader(&mut self) -> &mut dyn Read {
        &mut self.r
    }

    fn writer(&mut self) -> &mut dyn Write {
        &mut self.w
    }

    fn start_tls(&mut self) -> Result<Option<crate::access::Subject>> {
        Err(NbdError::Tls(io::ErrorKind::Unsupported.into()))
    }
}

fn source() -> StaticExports {
    StaticExports::new(vec![
        MemExport::new("vol0", false),
        MemExport::new("ro", true),
    ])
}

fn limits() -> Limits {
    Limits {
        max_inflight_bytes: 64 << 20,
        idle_timeout: None,
        request_timeout: None,
    }
}

/// Negotiate over `data` (client bytes) and, if the client reaches transmission, serve the
/// rest of the bytes as requests. The flags of the first byte choose the server settings
/// (bit 0: TLS available, bit 1: TLS required, bit 2: read-only, bit 3: vol0 has an access
/// list the client is not on).
pub fn session(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let src = source();
    let stopping = AtomicBool::new(false);
    // Bit 3: vol0 admits only uid 0, which this peer does not have.
    let mut access = crate::access::AccessRules::open();
    if mode & 8 != 0 {
        access.restrict("vol0", [crate::access::ClientRule::Uid(0)]);
    }
    let ctx = HandshakeCtx {
        source: &src,
        max_option_bytes: 64 << 10,
        force_read_only: mode & 4 != 0,
        stopping: &stopping,
        tls_available: mode & 1 != 0,
        tls_required: mode & 2 != 0,
        access: &access,
        peer: &crate::access::Peer::default(),
        establish: &|| true,
    };
    let mut io = MemIo {
        r: rest,
        w: io::sink(),
    };
    if let Ok(Some(neg)) = negotiate(&mut io, &ctx) {
        let _ = transmission::serve(io.r, io::sink(), None, None, neg, limits());
    }
}

/// Serve `data` as transmission-phase requests. The first byte chooses the negotiated state
/// (bit 0: structured replies, bit 1: extended headers, bit 2: base:allocation selected,
/// bit 3: read-only export).
pub fn requests(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let src = source();
    let name = if mode & 8 != 0 { "ro" } else { "vol0" };
    let Some(export) = src.lookup(name) else {
        return;
    };
    let neg = Negotiated {
        read_only: export.read_only(),
        export,
        structured: mode & 3 != 0,
        extended: mode & 2 != 0,
        meta_context: (mode & 4 != 0).then_some(crate::proto::META_BASE_ALLOCATION_ID),
    };
    let _ = transmission::serve(rest, io::sink(), None, None, neg, limits());
}
