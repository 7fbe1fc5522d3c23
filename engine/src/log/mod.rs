//! The log: each worker's chain of segments, and how a record is laid out and sealed into it.

mod chain;
mod record;

pub(crate) use chain::*;
pub(crate) use record::Layout;
