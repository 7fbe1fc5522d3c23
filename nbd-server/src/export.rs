//! What the NBD front end serves: the [`Export`] and [`ExportSource`] traits.
//!
//! The server only talks to these traits, so it can be tested against an in-memory export and
//! run against the engine through the implementations in `engine_export.rs`.

use std::os::fd::RawFd;
use std::sync::Arc;

use ingot_engine::{Completion, Extent, Request, Result};

/// One block device the server can expose.
pub trait Export: Send + Sync + 'static {
    /// Canonical export name.
    fn name(&self) -> &str;
    /// Size in bytes (a multiple of 512).
    fn size_bytes(&self) -> u64;
    /// True when writes must be refused with `EPERM`.
    fn read_only(&self) -> bool {
        false
    }
    /// Human-readable description sent for `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String {
        format!("ingot volume {}", self.name())
    }
    /// Start a request; `done` runs exactly once, possibly on another thread. The server has
    /// already checked the range against [`Export::size_bytes`] and the alignment.
    fn submit(&self, req: Request, done: Completion);
    /// Allocation status of `offset..offset+len` (blocking, metadata only).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// The same as a hint that never blocks (it may run on the engine thread completing a
    /// read): it may report a hole the read's data contradicts, so callers check the data.
    fn holes_hint(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.block_status(offset, len)
    }
    /// Reads on the calling thread's own device queue, for one connection's reader thread
    /// (see `ingot_engine::Reader`). `None`: reads go through [`Export::submit`].
    fn reader(&self) -> Option<Box<dyn ExportReader>> {
        None
    }
}

/// Reads a connection's thread submits and reaps itself (see [`Export::reader`]). The
/// connection must reap while reads are in flight: the engine waits for them before it
/// frees space.
pub trait ExportReader: Send {
    /// Start a read; `done` runs once, on the thread that reaps it (or on an engine thread
    /// when the export hands the read on).
    fn read(&mut self, offset: u64, len: u32, done: Completion);
    /// Run the completions that are ready, without blocking.
    fn poll(&mut self);
    /// Run completions, waiting for at least one when any read is in flight.
    fn wait(&mut self);
    /// Reads submitted here and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Polls readable when a completion waits to be reaped.
    fn fd(&self) -> RawFd;
}

/// The set of exports a server offers.
pub trait ExportSource: Send + Sync + 'static {
    /// The export called `name` (never empty: the server resolves "" through
    /// [`ExportSource::default_name`]).
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Names and sizes of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, u64)>;
    /// The export a client gets when it asks for the empty name.
    fn default_name(&self) -> Option<String>;
}

/// A fixed list of exports; the first one is the default.
pub struct StaticExports {
    exports: Vec<Arc<dyn Export>>,
    default_name: Option<String>,
}

impl StaticExports {
    pub fn new(exports: Vec<Arc<dyn Export>>) -> Self {
        let default_name = exports.first().map(|e| e.name().to_string());
        StaticExports {
            exports,
            default_name,
        }
    }

    /// Make `name` the default export instead of the first one.
    pub fn with_default(mut self, name: impl Into<String>) -> Self {
        self.default_name = Some(name.into());
        self
    }
}

impl ExportSource for StaticExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.iter().find(|e| e.name() == name).cloned()
    }

    fn list(&self) -> Vec<(String, u64)> {
        self.exports
            .iter()
            .map(|e| (e.name().to_string(), e.size_bytes()))
            .collect()
    }

    fn default_name(&self) -> Option<String> {
        self.default_name.clone()
    }
}
