//! The commands, one module per family, and what they share: the `--pool` argument and control
//! requests that go to a running server or to the pool opened here.

pub mod import;
pub mod maint;
pub mod pool;
pub mod serve;
pub mod volume;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ingot_engine::{Pool, PoolOptions};

use crate::control::{self, Request};

pub const DEFAULT_POOL: &str = "./ingot-data";

#[derive(clap::Args, Clone)]
pub struct PoolArg {
    /// Pool directory.
    #[arg(long, default_value = DEFAULT_POOL)]
    pub pool: PathBuf,
}

/// Run a control request: through the server's socket when one holds the pool, otherwise by
/// opening the pool here.
pub fn request(dir: &Path, req: Request) -> Result<serde_json::Value> {
    if let Some(r) = control::call(dir, &req) {
        return r;
    }
    // Requests that only look open the pool without writing to it (a pool whose host file
    // system is full still answers them).
    let read_only = matches!(req, Request::VolumeList | Request::Stats | Request::Check);
    if !read_only {
        crate::store::refuse_local_write(dir)?;
    }
    let o = PoolOptions {
        read_only,
        ..PoolOptions::default()
    };
    let pool = Pool::open(dir, &o).with_context(|| format!("opening pool {}", dir.display()))?;
    let r = control::execute(&pool, &req);
    pool.shutdown()?;
    r
}
