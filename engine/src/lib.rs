//! ingot engine: a log-structured block store.
//!
//! See `docs/architecture.md` for the write path and `docs/format.md` for the on-disk layout.

pub mod api;
pub mod error;
mod pool;

pub use api::{
    check_range, CheckReport, Completion, Extent, Problem, Reply, Request, Stats, VolumeInfo,
    BLOCK_BYTES, MAX_REQUEST_BYTES, SECTOR_BYTES,
};
pub use error::{Error, Result, Sense};
pub use pool::{CreateOptions, IoKind, Pool, PoolOptions, Volume};
