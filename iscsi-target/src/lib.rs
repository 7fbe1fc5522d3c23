//! iSCSI target front end for the ingot engine (RFC 7143, SPC-4 / SBC-3 block commands).
//!
//! Every volume of a pool is a target `iqn.2026-11.io.ingot:<volume>` with the volume at LUN 0.
//! The target is thread based like the NBD server: one accept thread per listener, and per
//! connection a reader thread (PDU decoding, Data-Out collection, command dispatch) and a
//! writer thread that sends responses as engine completions arrive.
//!
//! The target serves a [`LuSource`] of [`LuBackend`]s: [`IscsiTarget::new`] takes a pool
//! ([`PoolLus`]), [`IscsiTarget::with_source`] anything else, such as the in-memory
//! [`testing::MemLu`]. SCSI command execution sees only the [`LuBackend`] trait.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ingot_iscsi::{IscsiTarget, TargetConfig};
//! # fn run(pool: Arc<ingot_engine::Pool>) -> Result<(), Box<dyn std::error::Error>> {
//! let target = IscsiTarget::new(pool, TargetConfig::default());
//! let addr = target.listen("0.0.0.0:3260")?;
//! println!("serving iSCSI on {addr}");
//! # Ok(()) }
//! ```

// No unwrap on data from disk or wire: fail with an error instead (tests may unwrap).
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod access;
mod backend;
mod conn;
mod engine_backend;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod login;
mod lu;
mod mem;
pub mod pdu;
mod scsi;
mod sense;
mod target;
pub mod text;
mod xcopy;

/// Helpers for tests of code that serves iSCSI: an in-memory logical unit.
pub mod testing {
    pub use crate::mem::MemLu;
}

pub use access::{InitiatorAccess, InitiatorRule, RuleError, Security};
pub use backend::{LuBackend, LuSource, StaticLus};
pub use engine_backend::PoolLus;
pub use error::{IscsiError, Result};
pub use login::ChapConfig;
pub use target::{IscsiTarget, TargetConfig, DEFAULT_PORT, IQN_PREFIX};
