//! What the iSCSI target serves: the [`LuBackend`] and [`LuSource`] traits.
//!
//! SCSI command execution only talks to these traits, so it runs against an in-memory logical
//! unit in tests and the fuzzer ([`crate::testing::MemLu`]) and against the engine through the
//! implementations in `engine_backend.rs`.

use std::sync::Arc;

use ingot_engine::{Completion, Extent, Reply, Request, Result};

/// The storage behind one logical unit.
pub trait LuBackend: Send + Sync + 'static {
    /// Volume name: the target is `iqn.2026-11.io.ingot:<name>`, and the unit serial number
    /// and NAA designator derive from it.
    fn name(&self) -> &str;
    /// Size in bytes (a multiple of 512).
    fn size_bytes(&self) -> u64;
    /// True when writes fail (reported as WP in MODE SENSE).
    fn read_only(&self) -> bool {
        false
    }
    /// Start a request; `done` runs exactly once, possibly on another thread or inside this
    /// call. The SCSI layer has already checked the range against [`LuBackend::size_bytes`].
    fn submit(&self, req: Request, done: Completion);
    /// Run a request and wait for its reply.
    fn call(&self, req: Request) -> Result<Reply> {
        ingot_engine::wait_reply(|done| self.submit(req, done))
    }
    /// Allocation status of `offset..offset+len` (blocking, metadata only), for GET LBA STATUS.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// False once the volume behind this handle is gone: a volume deleted and created again
    /// under the same name must get a fresh logical unit (fresh reservations and unit
    /// attentions), not the old one's state.
    fn is_live(&self) -> bool {
        true
    }
}

/// The set of volumes a target offers, looked up at login time.
pub trait LuSource: Send + Sync + 'static {
    /// The volume called `name`, if it exists now.
    fn lookup(&self, name: &str) -> Option<Arc<dyn LuBackend>>;
    /// Names of every volume now (SendTargets discovery).
    fn names(&self) -> Vec<String>;
}

/// A fixed list of logical units.
pub struct StaticLus {
    lus: Vec<Arc<dyn LuBackend>>,
}

impl StaticLus {
    pub fn new(lus: Vec<Arc<dyn LuBackend>>) -> Self {
        StaticLus { lus }
    }
}

impl LuSource for StaticLus {
    fn lookup(&self, name: &str) -> Option<Arc<dyn LuBackend>> {
        self.lus.iter().find(|l| l.name() == name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.lus.iter().map(|l| l.name().to_string()).collect()
    }
}
