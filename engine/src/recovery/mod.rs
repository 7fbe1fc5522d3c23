//! Recovery at open: superblocks, the newest checkpoint, and replay of the log chains after it.

mod checkpoint;
mod scan;
mod superblock;

pub(crate) use checkpoint::read_checkpoint;
pub(crate) use scan::*;
pub(crate) use superblock::read_superblocks;
