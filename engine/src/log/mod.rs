//! The log: records and the segment chains they are appended to.

mod chain;
mod record;

pub(crate) use chain::*;
pub(crate) use record::*;
