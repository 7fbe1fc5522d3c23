//! Space: the block table, segment states and usage, reserves, the host file system under a
//! thin pool, and giving freed segments back.

mod geometry;
mod give_back;
mod host;
mod reserve;
mod table;

pub(crate) use geometry::Geometry;
pub(crate) use give_back::mark_held_free;
pub(crate) use reserve::*;
pub(crate) use table::*;
