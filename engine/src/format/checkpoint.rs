//! The checkpoint blob's header and the constants of its sections (encoded by `crate::checkpoint`).

use super::codec::{Get, Put};
use super::CHECKPOINT_MAGIC;
use crate::error::{Error, Result};
// Only the doc comments name these (intra-doc links).
#[cfg(doc)]
use super::{DataEntry, FORMAT_VERSION, VOLUME_NO_COMPRESSION, VOLUME_NO_DEDUP, VOLUME_READ_ONLY};

/// Start of a checkpoint blob. The sections that follow are, in order:
/// 1. `volume_count` volumes: id u32, name_len u16, flags u16 ([`VOLUME_NO_DEDUP`],
///    [`VOLUME_NO_COMPRESSION`], [`VOLUME_READ_ONLY`]), size_bytes u64, page_count u32, name bytes,
///    in version 3 (and only there) its dedup domain: kind u8 ([`DOMAIN_SHARED`],
///    [`DOMAIN_PRIVATE`], [`DOMAIN_NAMED`]), domain_name_len u8, domain name bytes (named
///    domains only), then `page_count` × (page_index u64, 512 × block_id u64).
/// 2. `block_count` blocks: block_id u64, segment u32, offset u32, stored_len u32, crc u32,
///    flags u32 (as in [`DataEntry`]), reserved u32 (32 bytes). Reference counts are not
///    stored: they are rebuilt from the maps, which also checks them.
/// 3. `shard_count` log chains: segment u32, offset u32, next_segment u32, kind u32
///    ([`CHAIN_DATA`], then [`CHAIN_MOVES`]; zero = data before version 2), shard_seq u64: where
///    replay of each chain resumes. Records of chain `i` carry shard number `i`. Data chains
///    come first, one per data shard (a shard's map pages are `page % data chains`); the move
///    chain holds the cleaner's Move records, so that moved (cold) blocks fill segments of
///    their own.
/// 4. `index_count` dedup index entries: key u64 (low 64 bits of the fingerprint), block_id
///    u64. Hints only (a hit is verified byte for byte), so a stale entry costs a read, not
///    data. Keys of a checkpoint without [`CHECKPOINT_KEYED`] are unkeyed XXH3 fingerprints
///    (written before keyed fingerprints): the index, and the fingerprints of the log replayed
///    after it, are not used.
/// 5. With [`CHECKPOINT_QOS`] only: `volume_count` × QoS limits, in the order of section 1:
///    iops_limit u64, bandwidth_limit_bytes u64, burst_iops u64, burst_bytes u64 (32 bytes; 0 =
///    no limit, or a burst of one second's worth). Last, so that binaries that predate it,
///    which stop reading after section 4, open the pool without limits.
///
/// | off | size | field |
/// |----:|----:|---|
/// | 0 | 4 | magic `ICKP` |
/// | 4 | 4 | version: [`CHECKPOINT_VERSION_PLAIN`], or [`CHECKPOINT_VERSION_MOVE_CHAINS`] when a move chain follows the data chains, or [`CHECKPOINT_VERSION_DOMAINS`] when a volume is outside the shared dedup domain |
/// | 8 | 8 | seq_end (records below it are included) |
/// | 16 | 8 | epoch (records after this checkpoint carry it) |
/// | 24 | 8 | next_block_id |
/// | 32 | 4 | next_volume_id |
/// | 36 | 4 | volume_count |
/// | 40 | 8 | block_count |
/// | 48 | 4 | shard_count |
/// | 52 | 8 | index_count |
/// | 60 | 1 | index_sample_bits (the index keeps 1 in 2^n fingerprints) |
/// | 61 | 1 | flags: [`CHECKPOINT_LZ4`], [`CHECKPOINT_KEYED`], [`CHECKPOINT_QOS`] |
/// | 62 | 2 | reserved |
///
/// With [`CHECKPOINT_LZ4`], the sections after the header are stored as a sequence of frames,
/// each `compressed_len` u32 then an LZ4 block whose first 4 bytes give its decompressed length
/// (at most [`CHECKPOINT_FRAME_BYTES`]); the frames' output, concatenated, is the sections.
/// Block ids in id order, map pages and constant fields shrink the blob to about half, which
/// halves what each checkpoint writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointHeader {
    pub seq: u64,
    pub epoch: u64,
    pub next_block_id: u64,
    pub next_volume_id: u32,
    pub volume_count: u32,
    pub block_count: u64,
    pub shard_count: u32,
    pub index_count: u64,
    pub index_sample_bits: u8,
    pub flags: u8,
    pub version: u32,
}

/// Checkpoint flag: the sections after the header are LZ4 frames.
pub const CHECKPOINT_LZ4: u8 = 1;
/// Checkpoint flag: fingerprints (index keys, and those of the log after it) are keyed by the
/// pool's secret (`reduce::FingerprintKey`). Binaries that predate it ignore it, and write
/// checkpoints without it, whose index the next keyed binary then drops.
pub const CHECKPOINT_KEYED: u8 = 2;
/// Checkpoint flag: section 5 (per-volume QoS limits) follows the dedup index. Written only
/// when some volume has a limit. Binaries that predate it ignore the flag and the section (their
/// volumes are unlimited, and their next checkpoint drops the limits): a limit is a policy, not
/// data, so no version bump shuts them out.
pub const CHECKPOINT_QOS: u8 = 4;
/// Checkpoint version without a move chain (checkpoint versions are their own, apart from
/// [`FORMAT_VERSION`]).
pub const CHECKPOINT_VERSION_PLAIN: u32 = 1;
/// Checkpoint version of pools with a move chain (binaries that predate it refuse it: they
/// would replay it as a data shard's chain).
pub const CHECKPOINT_VERSION_MOVE_CHAINS: u32 = 2;
/// Checkpoint version with a dedup domain per volume (move chains optional), written when a
/// volume is outside the shared domain: binaries that predate domains refuse it rather than
/// deduplicate across them.
pub const CHECKPOINT_VERSION_DOMAINS: u32 = 3;
/// Dedup domain kinds in a version 3 checkpoint's volume section.
pub const DOMAIN_SHARED: u8 = 0;
pub const DOMAIN_PRIVATE: u8 = 1;
pub const DOMAIN_NAMED: u8 = 2;
/// Checkpoint chain kind: a data shard's log.
pub const CHAIN_DATA: u32 = 0;
/// Checkpoint chain kind: the cleaner's move log.
pub const CHAIN_MOVES: u32 = 1;
/// Largest decompressed size of one checkpoint frame.
pub const CHECKPOINT_FRAME_BYTES: usize = 4 << 20;

impl CheckpointHeader {
    pub const BYTES: usize = 64;

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; Self::BYTES];
        Put::new(&mut b)
            .bytes(&CHECKPOINT_MAGIC)
            .u32(self.version)
            .u64(self.seq)
            .u64(self.epoch)
            .u64(self.next_block_id)
            .u32(self.next_volume_id)
            .u32(self.volume_count)
            .u64(self.block_count)
            .u32(self.shard_count)
            .u64(self.index_count)
            .bytes(&[self.index_sample_bits, self.flags]);
        out.extend_from_slice(&b);
    }

    pub fn decode(g: &mut Get<'_>) -> Result<CheckpointHeader> {
        if g.array::<4>()? != CHECKPOINT_MAGIC {
            return Err(Error::Corrupt {
                what: "checkpoint magic",
            });
        }
        let version = g.u32()?;
        if !(CHECKPOINT_VERSION_PLAIN..=CHECKPOINT_VERSION_DOMAINS).contains(&version) {
            return Err(Error::Corrupt {
                what: "checkpoint version",
            });
        }
        let h = CheckpointHeader {
            version,
            seq: g.u64()?,
            epoch: g.u64()?,
            next_block_id: g.u64()?,
            next_volume_id: g.u32()?,
            volume_count: g.u32()?,
            block_count: g.u64()?,
            shard_count: g.u32()?,
            index_count: g.u64()?,
            index_sample_bits: g.array::<1>()?[0],
            flags: g.array::<1>()?[0],
        };
        g.skip(2)?;
        Ok(h)
    }
}
