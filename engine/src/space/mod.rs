//! Space: the block table and reference counts, segment states and usage, segment numbering across devices, and
//! the host file system under a thin pool.

mod blocks;
mod geometry;
mod host;
mod refs;
mod table;

pub(crate) use blocks::{BlockTable, CHANGE_UNIT};
pub(crate) use geometry::Geometry;
pub(crate) use host::HostRoom;
pub(crate) use refs::RefCounts;
pub(crate) use table::*;
