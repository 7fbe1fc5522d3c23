//! The engine behind the [`LuBackend`] traits: a [`Volume`] is a logical unit, a [`Pool`] a
//! source of them.

use std::sync::Arc;

use ingot_engine::{Completion, Extent, Pool, Reply, Request, Result, Volume};

use crate::backend::{LuBackend, LuSource};

impl LuBackend for Volume {
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
        Volume::submit(self, req, done)
    }

    fn call(&self, req: Request) -> Result<Reply> {
        Volume::call(self, req)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Volume::block_status(self, offset, len)
    }

    fn is_live(&self) -> bool {
        // A handle on a deleted volume fails even empty requests.
        Volume::call(self, Request::Read { offset: 0, len: 0 }).is_ok()
    }
}

/// Every volume of a pool, looked up at login time (volumes created while the target runs
/// are visible to new sessions).
pub struct PoolLus {
    pool: Arc<Pool>,
}

impl PoolLus {
    pub fn new(pool: Arc<Pool>) -> Self {
        PoolLus { pool }
    }
}

impl LuSource for PoolLus {
    fn lookup(&self, name: &str) -> Option<Arc<dyn LuBackend>> {
        let volume = self.pool.volume(name).ok()?;
        Some(Arc::new(volume))
    }

    fn names(&self) -> Vec<String> {
        self.pool.volumes().into_iter().map(|v| v.name).collect()
    }
}
