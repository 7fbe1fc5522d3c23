//! ingot engine: a log-structured block store.
//!
//! See `docs/architecture.md` for the write path and `docs/format.md` for the on-disk layout.

// No unwrap on data from disk or wire: fail with an error instead (tests may unwrap).
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
mod cache;
mod checkpoint;
mod context;
mod counters;
pub mod error;
pub mod format;
mod gc;
mod health;
pub mod io;
mod job;
mod log;
mod map;
mod meta;
mod pool;
mod qos;
mod reader;
mod recovery;
pub mod reduce;
pub mod replica;
mod shard;
mod space;
mod store;
mod volume;
mod write_back;

pub use api::{
    after_batch, check_range, wait_reply, CheckReport, Completion, DedupDomain, Extent,
    InvalidDedupDomain, LatencyBreakdown, Problem, ReplicaStats, Reply, Request, StageTimes, Stats,
    VolumeInfo, WriteBreakdown, BLOCK_BYTES, MAX_REQUEST_BYTES, SECTOR_BYTES,
};
#[doc(hidden)]
pub use checkpoint::fuzz_decode_checkpoint;
pub use error::{Error, ErrorKind, Result};
pub use gc::GcReport;
#[cfg(any(test, feature = "testing"))]
pub use io::fault::{CutMode, FaultPlan};
pub use io::IoKind;
pub use pool::{CreateOptions, Pool, PoolOptions, POOL_FILE};
pub use qos::{QosChange, QosLimits};
pub use reader::{Reader, MAX_DIRECT_READ};
pub use volume::Volume;
