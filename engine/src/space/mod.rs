//! Space: the block table and reference counts, segment states and usage, segment numbering across devices, and
//! the host file system under a thin pool.

mod blocks;
mod geometry;
mod host;
mod paged_table;
mod refs;
mod table;

pub(crate) use blocks::CHANGE_UNIT;
pub(crate) use geometry::Geometry;
pub(crate) use host::HostRoom;
pub(crate) use paged_table::{BlockTable, TablePages, TABLE_LEAF};
pub(crate) use refs::RefCounts;
pub(crate) use table::*;
