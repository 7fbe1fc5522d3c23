//! Every on-disk structure, in one place. All integers are little-endian. Each structure starts
//! with a magic and carries a format version and a CRC-32 (IEEE, `crc32fast`) of its own bytes,
//! so a torn, misdirected or foreign write is recognised before anything trusts it.
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
//! ([`CheckpointHeader`] + sections, see `checkpoint.rs`).

use crate::error::{Error, Result};

/// Current on-disk format version (superblock, segment, record, checkpoint).
pub const FORMAT_VERSION: u32 = 1;
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

/// Little-endian writer over a fixed buffer; panics only on programmer error (sizes are constant).
pub struct Put<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Put<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Put { buf, pos: 0 }
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn skip(&mut self, n: usize) -> &mut Self {
        self.pos += n;
        self
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
}

/// Little-endian reader over untrusted bytes: every read is bounds-checked and fails with
/// [`Error::Corrupt`] instead of panicking.
pub struct Get<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Get<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Get { buf, pos: 0, what }
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(Error::Corrupt { what: self.what })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn skip(&mut self, n: usize) -> Result<()> {
        self.bytes(n).map(|_| ())
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

fn crc_with_zeroed_field(bytes: &[u8], crc_at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..crc_at]);
    h.update(&[0u8; 4]);
    h.update(&bytes[crc_at + 4..]);
    h.finalize()
}

/// Superblock: identifies the device and points at the newest checkpoint. 128 bytes used of a
/// 4 KiB slot; a commit writes the slot not holding the current generation, syncs, then the
/// other slot, so a torn write always leaves one slot pointing at a checkpoint that exists.
///
/// | off | size | field | why |
/// |----:|----:|---|---|
/// | 0 | 8 | magic `INGOTSB1` | refuse foreign files |
/// | 8 | 4 | version | refuse newer formats |
/// | 12 | 2 | device_index | position of this device in the pool |
/// | 14 | 2 | device_count | all devices must be present |
/// | 16 | 16 | pool_uuid | devices of one pool belong together |
/// | 32 | 16 | device_uuid | tells devices apart |
/// | 48 | 8 | generation | highest valid copy wins |
/// | 56 | 8 | segment_bytes | segment size, a power of two |
/// | 64 | 4 | first_segment | pool-wide number of this device's first segment |
/// | 68 | 4 | segment_count | segments on this device |
/// | 72 | 4 | total_segments | segments in the pool |
/// | 76 | 4 | checkpoint_segment | first metadata segment of the checkpoint, or `NO_SEGMENT` |
/// | 80 | 8 | checkpoint_seq | records with a lower sequence number are in the checkpoint |
/// | 88 | 8 | checkpoint_bytes | blob length |
/// | 96 | 4 | checkpoint_crc | CRC-32 of the blob |
/// | 100 | 4 | reserved | |
/// | 104 | 8 | created_unix | creation time |
/// | 112 | 12 | reserved | |
/// | 124 | 4 | crc | CRC-32 of bytes 0..128 with this field zero |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub device_index: u16,
    pub device_count: u16,
    pub pool_uuid: [u8; 16],
    pub device_uuid: [u8; 16],
    pub generation: u64,
    pub segment_bytes: u64,
    pub first_segment: u32,
    pub segment_count: u32,
    pub total_segments: u32,
    pub checkpoint_segment: u32,
    pub checkpoint_seq: u64,
    pub checkpoint_bytes: u64,
    pub checkpoint_crc: u32,
    pub created_unix: u64,
}

impl Superblock {
    pub const BYTES: usize = 128;
    const CRC_AT: usize = 124;

    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..Self::BYTES];
        out.fill(0);
        Put::new(out)
            .bytes(&SUPERBLOCK_MAGIC)
            .u32(FORMAT_VERSION)
            .u16(self.device_index)
            .u16(self.device_count)
            .bytes(&self.pool_uuid)
            .bytes(&self.device_uuid)
            .u64(self.generation)
            .u64(self.segment_bytes)
            .u32(self.first_segment)
            .u32(self.segment_count)
            .u32(self.total_segments)
            .u32(self.checkpoint_segment)
            .u64(self.checkpoint_seq)
            .u64(self.checkpoint_bytes)
            .u32(self.checkpoint_crc)
            .u32(0)
            .u64(self.created_unix);
        let crc = crc_with_zeroed_field(out, Self::CRC_AT);
        out[Self::CRC_AT..Self::CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode one slot. `Ok(None)` means the slot holds no superblock of ours (wrong magic);
    /// a bad checksum or version is an error so the caller can say why it refused the device.
    pub fn decode(buf: &[u8]) -> Result<Option<Superblock>, SuperblockFault> {
        if buf.len() < Self::BYTES || buf[..8] != SUPERBLOCK_MAGIC {
            return Ok(None);
        }
        let b = &buf[..Self::BYTES];
        let stored = u32::from_le_bytes([b[124], b[125], b[126], b[127]]);
        if stored != crc_with_zeroed_field(b, Self::CRC_AT) {
            return Err(SuperblockFault::Checksum);
        }
        let parse = || -> Result<(u32, Superblock)> {
            let mut g = Get::new(b, "superblock");
            g.skip(8)?;
            let version = g.u32()?;
            let sb = Superblock {
                device_index: g.u16()?,
                device_count: g.u16()?,
                pool_uuid: g.array()?,
                device_uuid: g.array()?,
                generation: g.u64()?,
                segment_bytes: g.u64()?,
                first_segment: g.u32()?,
                segment_count: g.u32()?,
                total_segments: g.u32()?,
                checkpoint_segment: g.u32()?,
                checkpoint_seq: g.u64()?,
                checkpoint_bytes: g.u64()?,
                checkpoint_crc: g.u32()?,
                created_unix: {
                    g.skip(4)?;
                    g.u64()?
                },
            };
            Ok((version, sb))
        };
        let (version, sb) = parse().map_err(|_| SuperblockFault::Checksum)?;
        if version != FORMAT_VERSION {
            return Err(SuperblockFault::Version(version));
        }
        Ok(Some(sb))
    }
}

/// Why a superblock slot was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockFault {
    Checksum,
    Version(u32),
}

/// Kinds of segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum SegmentKind {
    Data = 1,
    Checkpoint = 2,
}

/// First 64 bytes of the first 4 KiB block of every segment in use.
///
/// | off | size | field | why |
/// |----:|----:|---|---|
/// | 0 | 4 | magic `ISEG` | |
/// | 4 | 2 | version | |
/// | 6 | 2 | kind | 1 data, 2 checkpoint |
/// | 8 | 4 | segment | detects misdirected writes |
/// | 12 | 2 | shard | data: the writing shard |
/// | 14 | 2 | reserved | |
/// | 16 | 16 | pool_uuid | rejects segments of another pool |
/// | 32 | 8 | epoch | open count of the pool when written; older epochs are stale |
/// | 40 | 4 | next_segment | the segment this chain continues in (reserved when this one opened) |
/// | 44 | 16 | reserved | |
/// | 60 | 4 | crc | CRC-32 of bytes 0..64 with this field zero |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub kind: SegmentKind,
    pub segment: u32,
    pub shard: u16,
    pub pool_uuid: [u8; 16],
    pub epoch: u64,
    pub next_segment: u32,
}

impl SegmentHeader {
    pub const BYTES: usize = 64;
    const CRC_AT: usize = 60;

    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..Self::BYTES];
        out.fill(0);
        Put::new(out)
            .bytes(&SEGMENT_MAGIC)
            .u16(FORMAT_VERSION as u16)
            .u16(self.kind as u16)
            .u32(self.segment)
            .u16(self.shard)
            .u16(0)
            .bytes(&self.pool_uuid)
            .u64(self.epoch)
            .u32(self.next_segment);
        let crc = crc_with_zeroed_field(out, Self::CRC_AT);
        out[Self::CRC_AT..Self::CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode and validate; `None` for anything that is not a valid header of our format.
    pub fn decode(buf: &[u8]) -> Option<SegmentHeader> {
        let b = buf.get(..Self::BYTES)?;
        if b[..4] != SEGMENT_MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        if stored != crc_with_zeroed_field(b, Self::CRC_AT) {
            return None;
        }
        let mut g = Get::new(b, "segment header");
        g.skip(4).ok()?;
        if u32::from(g.u16().ok()?) != FORMAT_VERSION {
            return None;
        }
        let kind = match g.u16().ok()? {
            1 => SegmentKind::Data,
            2 => SegmentKind::Checkpoint,
            _ => return None,
        };
        let segment = g.u32().ok()?;
        let shard = g.u16().ok()?;
        g.skip(2).ok()?;
        Some(SegmentHeader {
            kind,
            segment,
            shard,
            pool_uuid: g.array().ok()?,
            epoch: g.u64().ok()?,
            next_segment: g.u32().ok()?,
        })
    }
}

/// Kinds of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RecordKind {
    /// Entries are [`DataEntry`]; payloads follow the header area.
    Data = 1,
    /// Entries are [`TrimEntry`] (trim and write-zeroes); no payload.
    Trim = 2,
    /// Entries are [`DataEntry`] written by the cleaner: a live block copied out of a segment
    /// being cleaned. `volume` is `u32::MAX` and `lba` holds the block's previous location
    /// (`segment << 32 | offset`): the move applies only if the block is still live there.
    Move = 3,
}

/// Header of a record: one write to the log, covering up to [`MAX_RECORD_ENTRIES`] entries.
///
/// | off | size | field | why |
/// |----:|----:|---|---|
/// | 0 | 4 | magic `IREC` | |
/// | 4 | 2 | version | |
/// | 6 | 2 | kind | [`RecordKind`] |
/// | 8 | 8 | seq | pool-wide order; replay sorts by it |
/// | 16 | 8 | shard_seq | per-shard, per-epoch counter: replay of a chain stops at the first gap |
/// | 24 | 8 | epoch | records of older epochs are stale |
/// | 32 | 4 | segment | detects misdirected writes |
/// | 36 | 4 | entry_count | |
/// | 40 | 4 | record_bytes | header area + payloads, a multiple of 4 KiB |
/// | 44 | 4 | header_bytes | header + entries, padded to 4 KiB |
/// | 48 | 8 | durable_shard_seq | records of this shard up to here were flushed: a bad payload at or below it is corruption, not a torn tail |
/// | 56 | 2 | shard | |
/// | 58 | 2 | reserved | |
/// | 60 | 4 | crc | CRC-32 of the header (this field zero) and all entries |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub seq: u64,
    pub shard_seq: u64,
    pub epoch: u64,
    pub segment: u32,
    pub entry_count: u32,
    pub record_bytes: u32,
    pub header_bytes: u32,
    pub durable_shard_seq: u64,
    pub shard: u16,
}

impl RecordHeader {
    pub const BYTES: usize = 64;
    const CRC_AT: usize = 60;

    /// Size of the header area for `entries` entries of `entry_bytes` each.
    pub fn header_area(entries: usize, entry_bytes: usize) -> usize {
        (Self::BYTES + entries * entry_bytes).next_multiple_of(IO_ALIGN)
    }

    /// Encode into `area` (the header area, entries already placed after the header) and seal
    /// it with the CRC over header and entries.
    pub fn encode_and_seal(&self, area: &mut [u8], entry_bytes: usize) {
        let end = Self::BYTES + self.entry_count as usize * entry_bytes;
        Put::new(&mut area[..Self::BYTES])
            .bytes(&RECORD_MAGIC)
            .u16(FORMAT_VERSION as u16)
            .u16(self.kind as u16)
            .u64(self.seq)
            .u64(self.shard_seq)
            .u64(self.epoch)
            .u32(self.segment)
            .u32(self.entry_count)
            .u32(self.record_bytes)
            .u32(self.header_bytes)
            .u64(self.durable_shard_seq)
            .u16(self.shard)
            .u16(0)
            .u32(0);
        let crc = crc_with_zeroed_field(&area[..end], Self::CRC_AT);
        area[Self::CRC_AT..Self::CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode the fixed header from the first block of a record; does not check the CRC (which
    /// needs all entries): call [`RecordHeader::verify`] once the whole header area is read.
    pub fn decode(buf: &[u8]) -> Option<RecordHeader> {
        let b = buf.get(..Self::BYTES)?;
        if b[..4] != RECORD_MAGIC {
            return None;
        }
        let mut g = Get::new(b, "record header");
        g.skip(4).ok()?;
        if u32::from(g.u16().ok()?) != FORMAT_VERSION {
            return None;
        }
        let kind = match g.u16().ok()? {
            1 => RecordKind::Data,
            2 => RecordKind::Trim,
            3 => RecordKind::Move,
            _ => return None,
        };
        let h = RecordHeader {
            kind,
            seq: g.u64().ok()?,
            shard_seq: g.u64().ok()?,
            epoch: g.u64().ok()?,
            segment: g.u32().ok()?,
            entry_count: g.u32().ok()?,
            record_bytes: g.u32().ok()?,
            header_bytes: g.u32().ok()?,
            durable_shard_seq: g.u64().ok()?,
            shard: g.u16().ok()?,
        };
        let eb = h.entry_bytes();
        if h.entry_count as usize > MAX_RECORD_ENTRIES
            || h.header_bytes as usize != Self::header_area(h.entry_count as usize, eb)
            || h.record_bytes < h.header_bytes
            || h.record_bytes as usize % IO_ALIGN != 0
        {
            return None;
        }
        Some(h)
    }

    pub fn entry_bytes(&self) -> usize {
        match self.kind {
            RecordKind::Data | RecordKind::Move => DataEntry::BYTES,
            RecordKind::Trim => TrimEntry::BYTES,
        }
    }

    /// Check the CRC over the header and its entries (`area` is the whole header area).
    pub fn verify(&self, area: &[u8]) -> bool {
        let end = Self::BYTES + self.entry_count as usize * self.entry_bytes();
        match area.get(..end) {
            Some(b) => {
                let stored = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
                stored == crc_with_zeroed_field(b, Self::CRC_AT)
            }
            None => false,
        }
    }
}

/// One block written by a data record.
///
/// | off | size | field | why |
/// |----:|----:|---|---|
/// | 0 | 4 | volume | volume id |
/// | 4 | 2 | flags | bit 0 [`FLAG_LZ4`]: payload is LZ4-compressed; bit 1 [`FLAG_REF`]: a dedup reference to the existing block `block_id`, no payload; bits 8–11: index of this block in its group; bits 12–15: blocks in the group − 1 (a group is one payload holding several blocks) |
/// | 6 | 2 | reserved | |
/// | 8 | 8 | lba | 4 KiB block number in the volume |
/// | 16 | 8 | block_id | id in the block table; the map points at it, not at a location, so GC and dedup move blocks without touching maps |
/// | 24 | 16 | fingerprint | XXH3-128 of the 4 KiB plaintext (rebuilds the dedup index); zero in move entries |
/// | 40 | 4 | payload_offset | from the record start; the members of a group share one payload |
/// | 44 | 4 | stored_len | payload bytes (the whole group's) |
/// | 48 | 4 | payload_crc | CRC-32 of the stored payload, kept apart from the payload |
/// | 52 | 4 | reserved | |
///
/// Payloads follow the header area: uncompressed 4 KiB payloads first, each 4 KiB-aligned,
/// then compressed payloads packed byte-tight, the record padded to 4 KiB at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataEntry {
    pub volume: u32,
    pub flags: u16,
    pub lba: u64,
    pub block_id: u64,
    pub fingerprint: [u8; 16],
    pub payload_offset: u32,
    pub stored_len: u32,
    pub payload_crc: u32,
}

impl DataEntry {
    pub const BYTES: usize = 56;

    pub fn encode(&self, out: &mut [u8]) {
        Put::new(&mut out[..Self::BYTES])
            .u32(self.volume)
            .u16(self.flags)
            .u16(0)
            .u64(self.lba)
            .u64(self.block_id)
            .bytes(&self.fingerprint)
            .u32(self.payload_offset)
            .u32(self.stored_len)
            .u32(self.payload_crc)
            .u32(0);
    }

    pub fn decode(b: &[u8]) -> Result<DataEntry> {
        let mut g = Get::new(b, "data entry");
        let volume = g.u32()?;
        let flags = g.u16()?;
        g.skip(2)?;
        Ok(DataEntry {
            volume,
            flags,
            lba: g.u64()?,
            block_id: g.u64()?,
            fingerprint: g.array()?,
            payload_offset: g.u32()?,
            stored_len: g.u32()?,
            payload_crc: g.u32()?,
        })
    }
}

/// A range made to read as zeroes (trim, write-zeroes).
///
/// | off | size | field |
/// |----:|----:|---|
/// | 0 | 4 | volume |
/// | 4 | 4 | reserved |
/// | 8 | 8 | lba (first 4 KiB block) |
/// | 16 | 8 | count (blocks) |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimEntry {
    pub volume: u32,
    pub lba: u64,
    pub count: u64,
}

impl TrimEntry {
    pub const BYTES: usize = 24;

    pub fn encode(&self, out: &mut [u8]) {
        Put::new(&mut out[..Self::BYTES])
            .u32(self.volume)
            .u32(0)
            .u64(self.lba)
            .u64(self.count);
    }

    pub fn decode(b: &[u8]) -> Result<TrimEntry> {
        let mut g = Get::new(b, "trim entry");
        let volume = g.u32()?;
        g.skip(4)?;
        Ok(TrimEntry {
            volume,
            lba: g.u64()?,
            count: g.u64()?,
        })
    }
}

/// Start of a checkpoint blob. The sections that follow are, in order:
/// 1. `volume_count` volumes: id u32, name_len u16, flags u16 ([`VOLUME_NO_DEDUP`],
///    [`VOLUME_NO_COMPRESSION`], [`VOLUME_READ_ONLY`]), size_bytes u64, page_count u32, name bytes, then
///    `page_count` × (page_index u64, 512 × block_id u64).
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
///    data.
///
/// | off | size | field |
/// |----:|----:|---|
/// | 0 | 4 | magic `ICKP` |
/// | 4 | 4 | version: 1, or [`CHECKPOINT_VERSION_MOVE_CHAINS`] when a move chain follows the data chains |
/// | 8 | 8 | seq_end (records below it are included) |
/// | 16 | 8 | epoch (records after this checkpoint carry it) |
/// | 24 | 8 | next_block_id |
/// | 32 | 4 | next_volume_id |
/// | 36 | 4 | volume_count |
/// | 40 | 8 | block_count |
/// | 48 | 4 | shard_count |
/// | 52 | 8 | index_count |
/// | 60 | 1 | index_sample_bits (the index keeps 1 in 2^n fingerprints) |
/// | 61 | 1 | flags: [`CHECKPOINT_LZ4`] |
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
/// Checkpoint version of pools with a move chain (binaries that predate it refuse it: they
/// would replay it as a data shard's chain).
pub const CHECKPOINT_VERSION_MOVE_CHAINS: u32 = 2;
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
        if version != FORMAT_VERSION && version != CHECKPOINT_VERSION_MOVE_CHAINS {
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

const _: () = assert!(RecordHeader::BYTES + MAX_RECORD_ENTRIES * DataEntry::BYTES <= 4 * IO_ALIGN);
const _: () = assert!(Superblock::BYTES <= IO_ALIGN);

/// Fuzzing entry point: decode a checkpoint blob (the CRC is not checked, so the fuzzer reaches
/// the parser). Returns whether it decoded.
#[doc(hidden)]
pub fn fuzz_decode_checkpoint(blob: &[u8]) -> bool {
    crate::checkpoint::decode(blob, 1 << 20).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_checksum() {
        let sb = Superblock {
            device_index: 0,
            device_count: 1,
            pool_uuid: [7; 16],
            device_uuid: [9; 16],
            generation: 42,
            segment_bytes: 8 << 20,
            first_segment: 0,
            segment_count: 100,
            total_segments: 100,
            checkpoint_segment: 3,
            checkpoint_seq: 77,
            checkpoint_bytes: 1234,
            checkpoint_crc: 0xdead_beef,
            created_unix: 1,
        };
        let mut buf = vec![0u8; 4096];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
        buf[50] ^= 1;
        assert_eq!(Superblock::decode(&buf), Err(SuperblockFault::Checksum));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Ok(None));
    }

    #[test]
    fn record_header_round_trip() {
        let h = RecordHeader {
            kind: RecordKind::Data,
            seq: 5,
            shard_seq: 2,
            epoch: 1,
            segment: 3,
            entry_count: 2,
            record_bytes: 4096 * 3,
            header_bytes: 4096,
            durable_shard_seq: 1,
            shard: 1,
        };
        let mut area = vec![0u8; 4096];
        for i in 0..2 {
            DataEntry {
                volume: 1,
                flags: 0,
                lba: i,
                block_id: 10 + i,
                fingerprint: [1; 16],
                payload_offset: 4096 * (1 + i as u32),
                stored_len: 4096,
                payload_crc: 99,
            }
            .encode(&mut area[64 + i as usize * DataEntry::BYTES..]);
        }
        h.encode_and_seal(&mut area, DataEntry::BYTES);
        let d = RecordHeader::decode(&area).unwrap();
        assert_eq!(d, h);
        assert!(d.verify(&area));
        area[64 + 8] ^= 0x10;
        assert!(!d.verify(&area));
    }
}
