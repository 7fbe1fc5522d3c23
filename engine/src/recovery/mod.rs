//! Recovery at open: superblocks, the newest checkpoint, and replay of the log chains after it.

mod checkpoint;
mod replay;
mod scan;
mod superblock;

pub(crate) use checkpoint::load_checkpoint;
pub(crate) use replay::{replay, Rebuild, Replayed, HOLD_ENTRIES};
pub(crate) use scan::*;
pub(crate) use superblock::read_superblocks;
