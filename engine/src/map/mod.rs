//! Maps: each volume's LBA -> block id map (paged, one part per shard), and the volume table.

pub(crate) mod lba;
mod volume;

pub(crate) use lba::{leaf_slots, shard_of, trim_owned, LbaMap, MapLeaf, MapPage};
pub(crate) use volume::{VolumeState, VolumeTable};
