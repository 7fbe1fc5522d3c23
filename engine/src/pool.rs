//! Temporary API skeleton; replaced by the real pool.
use std::path::Path;
use std::sync::Arc;

use crate::api::*;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoKind {
    #[default]
    Auto,
    Uring,
    Sync,
}

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size_bytes: u64,
    pub segment_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct PoolOptions {
    pub io: IoKind,
}

pub struct Pool {}

impl Pool {
    pub fn create(_dir: &Path, _c: &CreateOptions, _o: &PoolOptions) -> Result<Arc<Pool>> {
        Err(Error::ShutDown)
    }
    pub fn open(_dir: &Path, _o: &PoolOptions) -> Result<Arc<Pool>> {
        Err(Error::ShutDown)
    }
    pub fn volume(&self, name: &str) -> Result<Volume> {
        Err(Error::VolumeNotFound(name.into()))
    }
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        Vec::new()
    }
    pub fn create_volume(&self, _name: &str, _size: u64) -> Result<()> {
        Err(Error::ShutDown)
    }
}

#[derive(Clone)]
pub struct Volume {}

impl Volume {
    pub fn name(&self) -> &str {
        ""
    }
    pub fn size_bytes(&self) -> u64 {
        0
    }
    pub fn submit(&self, _req: Request, done: Completion) {
        done(Err(Error::ShutDown))
    }
    pub fn block_status(&self, _offset: u64, _len: u64) -> Result<Vec<Extent>> {
        Err(Error::ShutDown)
    }
}
