//! The engine behind the [`Export`] traits: a [`Volume`] is an export, a [`Pool`] a source.

use std::os::fd::RawFd;
use std::sync::Arc;

use ingot_engine::{Completion, Extent, Pool, Reader, Request, Result, Volume};

use crate::export::{Export, ExportReader, ExportSource};

/// Device reads a connection keeps in flight on its own queue before more wait in it.
const READER_DEPTH: u32 = 64;

impl Export for Volume {
    fn name(&self) -> &str {
        Volume::name(self)
    }

    fn size_bytes(&self) -> u64 {
        Volume::size_bytes(self)
    }

    fn read_only(&self) -> bool {
        Volume::read_only(self)
    }

    fn submit(&self, req: Request, done: Completion) {
        Volume::submit_pieces(self, req, done)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Volume::block_status(self, offset, len)
    }

    fn holes_hint(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Volume::block_status_now(self, offset, len)
    }

    fn reader(&self) -> Option<Box<dyn ExportReader>> {
        // Only a queue the connection can poll beside its socket (io_uring); with the plain
        // calls, reads stay on the shards' threads rather than block the connection.
        let r = Reader::new(self, READER_DEPTH).ok()?.with_pieces();
        let fd = r.fd()?;
        Some(Box::new(ConnReader { r, fd }))
    }
}

struct ConnReader {
    r: Reader,
    fd: RawFd,
}

impl ExportReader for ConnReader {
    fn read(&mut self, offset: u64, len: u32, done: Completion) {
        self.r.read(offset, len, done)
    }
    fn poll(&mut self) {
        self.r.poll();
    }
    fn wait(&mut self) {
        self.r.wait();
    }
    fn in_flight(&self) -> usize {
        self.r.in_flight()
    }
    fn fd(&self) -> RawFd {
        self.fd
    }
}

/// Every volume of a pool, looked up at connect time (volumes created while the server runs are
/// visible to new connections).
pub struct PoolExports {
    pool: Arc<Pool>,
    default_name: Option<String>,
}

impl PoolExports {
    /// Serve the volumes of `pool`; the default export is the first volume.
    pub fn new(pool: Arc<Pool>) -> Self {
        PoolExports {
            pool,
            default_name: None,
        }
    }

    /// Serve `name` to clients that ask for the empty export name.
    pub fn with_default(mut self, name: impl Into<String>) -> Self {
        self.default_name = Some(name.into());
        self
    }
}

impl ExportSource for PoolExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        let volume = self.pool.volume(name).ok()?;
        Some(Arc::new(volume))
    }

    fn list(&self) -> Vec<(String, u64)> {
        self.pool
            .volumes()
            .into_iter()
            .map(|v| (v.name, v.size_bytes))
            .collect()
    }

    fn default_name(&self) -> Option<String> {
        self.default_name
            .clone()
            .or_else(|| self.pool.volumes().into_iter().next().map(|v| v.name))
    }
}
