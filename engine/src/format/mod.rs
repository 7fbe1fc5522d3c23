//! Every on-disk structure, in one place. All integers are little-endian. Each structure starts
//! with a magic and carries a format version and a CRC-32 (IEEE, `crc32fast`) of its own bytes,
//! so a torn, misdirected or foreign write is recognised before anything trusts it. Segment
//! headers and records also carry a MAC under the pool's secret [`LogKey`]: they share segments
//! with client payloads, and only the MAC tells them apart from a payload crafted to look like
//! them (version 2; version 1 pools are upgraded when opened).
//!
//! Device layout (each backing file or block device):
//! ```text
//! 0        4 KiB    8 KiB            1 MiB                         1 MiB + n·segment
//! | SB slot 0 | SB slot 1 | (unused) | segment | segment | ... | segment |
//! ```
//! Segments are numbered pool-wide: device 0 holds segments `0..n0`, device 1 the next, and so on.
//! A data segment is a [`SegmentHeader`] block followed by records; a record is a header area
//! ([`RecordHeader`] + entries, padded to 4 KiB) followed by 4 KiB-aligned payloads. A checkpoint
//! is a chain of metadata segments whose bytes after each header form one blob
//! ([`CheckpointHeader`] + sections, written and read by the engine's `checkpoint` module).
//!
//! One file per structure: `codec` (the little-endian `Put`/`Get` and the CRC helper), `key`
//! (the log key and its MAC), `superblock`, `segment`, `record` (header, entries, seal) and
//! `checkpoint`; everything is re-exported here, so users name `format::X` only. `page` and
//! `root` are format 3's metadata pages and checkpoint root (issue 22), written by pools
//! created with format 3 (tests only so far).
//! `docs/gen-format.py` builds `docs/format.md` from these files' doc comments.

mod checkpoint;
mod codec;
mod key;
mod page;
mod record;
mod replica;
mod root;
mod segment;
mod superblock;

pub use checkpoint::{
    CheckpointHeader, CHAIN_DATA, CHAIN_MOVES, CHECKPOINT_FRAME_BYTES, CHECKPOINT_KEYED,
    CHECKPOINT_LZ4, CHECKPOINT_QOS, CHECKPOINT_VERSION_DOMAINS, CHECKPOINT_VERSION_MOVE_CHAINS,
    CHECKPOINT_VERSION_PLAIN, DOMAIN_NAMED, DOMAIN_PRIVATE, DOMAIN_SHARED,
};
pub use codec::{Get, Put};
pub use key::{log_mac, random_bytes, LogKey, MAC_BYTES};
pub use page::{
    get_u48, put_u48, BlockLoc, DirEntry, IndexSlot, PageArray, PageFault, PageHeader, PageKind,
    PagePtr, PageWant, SegUsage, INDEX_PER_PAGE, MAP_PAGE_SLOTS, MAX_U48, PAGE_BODY_BYTES,
    PAGE_BYTES, PAGE_HEADER_BYTES, PAGE_VERSION, PTRS_PER_PAGE, REFS_PER_PAGE, USAGE_PER_PAGE,
};
pub use record::{DataEntry, RecordHeader, RecordKind, RecordSeal, TrimEntry};
pub use replica::{
    ExtentKind, ReplicaBatch, ReplicaCommit, ReplicaExtent, REPLICA_COMMIT_BYTES,
    REPLICA_COMMIT_MAGIC, REPLICA_EXTENT_BYTES, REPLICA_HEADER_BYTES, REPLICA_MAGIC,
    REPLICA_MAX_DEVICES, REPLICA_VERSION,
};
pub use root::{
    ArrayRoot, CheckpointRoot, Orphan, RootChain, RootIndex, RootVolume, MAX_ROOT_BYTES,
    ROOT_COUNTS, ROOT_DIR_COUNTS, ROOT_KEYED, ROOT_OVERFLOW_MAX, ROOT_VERSION,
};
pub use segment::{SegmentHeader, SegmentKind};
pub use superblock::{Superblock, SuperblockFault};

/// Current on-disk format version (superblock, segment, record, checkpoint).
pub const FORMAT_VERSION: u32 = 2;
/// Superblock version of a pool whose checkpoints are a [`CheckpointRoot`] and pages (issue 22):
/// what pools are created as, and what a writable open upgrades older ones to. Segments and
/// records keep version 2.
pub const FORMAT_VERSION_PAGED: u32 = 3;
/// Alignment of every device I/O (O_DIRECT) and of every on-disk structure.
pub const IO_ALIGN: usize = 4096;
/// Byte offsets of the two superblock copies; the valid one with the highest generation wins.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, 4096];
/// Where the first segment of each device starts.
pub const DATA_START: u64 = 1 << 20;
/// Bytes reserved at the start of each segment for its [`SegmentHeader`].
pub const SEGMENT_HEADER_BYTES: u64 = 4096;
/// Entries of one record are limited so that a record stays at most ~1 MiB of payload.
pub const MAX_RECORD_ENTRIES: usize = 256;
/// Marks "no segment" in segment pointers.
pub const NO_SEGMENT: u32 = u32::MAX;
/// LBAs per map page (a page is 4 KiB of 8-byte block ids).
pub const MAP_PAGE_ENTRIES: u64 = 512;

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"INGOTSB1";
pub const SEGMENT_MAGIC: [u8; 4] = *b"ISEG";
pub const RECORD_MAGIC: [u8; 4] = *b"IREC";
pub const CHECKPOINT_MAGIC: [u8; 4] = *b"ICKP";
pub const PAGE_MAGIC: [u8; 4] = *b"IPAG";
pub const ROOT_MAGIC: [u8; 4] = *b"ICKR";

/// [`DataEntry`] / block flag: the payload is LZ4 block format.
pub const FLAG_LZ4: u16 = 1 << 0;
/// [`DataEntry`] flag: the entry maps its LBA to an existing block (a dedup hit); no payload.
pub const FLAG_REF: u16 = 1 << 1;
/// Position of a block's index within its group, in block flags.
pub const GROUP_INDEX_SHIFT: u16 = 8;
/// Position of (blocks in the group − 1), in block flags.
pub const GROUP_COUNT_SHIFT: u16 = 12;
/// Checkpoint volume flag: deduplication is off for the volume.
pub const VOLUME_NO_DEDUP: u16 = 1 << 0;
/// Checkpoint volume flag: compression is off for the volume.
pub const VOLUME_NO_COMPRESSION: u16 = 1 << 1;
/// Checkpoint volume flag: the volume is a snapshot; writes, zeroes and trims are refused.
pub const VOLUME_READ_ONLY: u16 = 1 << 2;
/// Every volume flag this build knows; a pool with others is refused (a newer build's flag
/// may change what writes are allowed).
pub const VOLUME_KNOWN_FLAGS: u16 = VOLUME_NO_DEDUP | VOLUME_NO_COMPRESSION | VOLUME_READ_ONLY;
