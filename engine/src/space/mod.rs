//! Space: the block table, segment states and usage, segment numbering across devices, and
//! the host file system under a thin pool.

mod blocks;
mod geometry;
mod host;
mod table;

pub(crate) use blocks::BlockTable;
pub(crate) use geometry::Geometry;
pub(crate) use host::HostRoom;
pub(crate) use table::*;
