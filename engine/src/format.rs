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
//! ([`CheckpointHeader`] + sections, see `checkpoint.rs`).

use crate::error::{Error, Result};

/// Current on-disk format version (superblock, segment, record, checkpoint).
pub const FORMAT_VERSION: u32 = 2;
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

/// Secret key of a pool that authenticates its log: every segment header and record carries a
/// keyed BLAKE3 MAC ([`log_mac`]) bound to where it lies and where it stands in its chain.
/// Clients choose every byte of their payloads, which land inside segments, so a checksum alone
/// cannot tell a record from a payload that imitates one (or that copies a genuine record); a
/// MAC under a key that only superblocks hold can. Random per pool, never written to a segment,
/// never reported.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LogKey(pub [u8; 32]);

impl LogKey {
    /// A fresh key from the kernel's random source.
    pub fn generate() -> std::io::Result<LogKey> {
        Ok(LogKey(random_bytes()?))
    }
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogKey(..)")
    }
}

/// `N` bytes from getrandom(2) (blocking only until the kernel's pool is first seeded).
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut out = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: the pointer and length describe the unfilled tail of `out`.
        let n = unsafe { libc::getrandom(out[got..].as_mut_ptr().cast(), N - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(out)
}

/// Bytes of a log MAC kept on disk (a truncated keyed BLAKE3 hash).
pub const MAC_BYTES: usize = 16;

/// Keyed BLAKE3 of `parts` under `domain` (which keeps MACs of different structures apart),
/// truncated to [`MAC_BYTES`].
pub fn log_mac(key: &LogKey, domain: &[u8], parts: &[&[u8]]) -> [u8; MAC_BYTES] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(domain);
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..MAC_BYTES]);
    out
}

/// Compare MACs without an early exit.
fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Superblock: identifies the device, holds the pool's [`LogKey`] and points at the newest
/// checkpoint. 192 bytes used of a 4 KiB slot (128 in version 1); a commit writes the slot not
/// holding the current generation, syncs, then the other slot, so a torn write always leaves
/// one slot pointing at a checkpoint that exists. Superblocks lie below [`DATA_START`], where no
/// client byte is ever written.
///
/// | off | size | field | why |
/// |----:|----:|---|---|
/// | 0 | 8 | magic `INGOTSB1` | refuse foreign files |
/// | 8 | 4 | version | refuse newer formats; 1 is upgraded at open |
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
/// | 112 | 16 | reserved | (version 1: CRC-32 of bytes 0..128 at 124) |
/// | 128 | 32 | log_key | the pool's [`LogKey`] (version 2) |
/// | 160 | 28 | reserved | |
/// | 188 | 4 | crc | CRC-32 of bytes 0..192 with this field zero |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Format version read ([`FORMAT_VERSION`] once written by this build).
    pub version: u32,
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
    /// `None` in a version 1 superblock (its log is sealed by CRC-32 only).
    pub log_key: Option<LogKey>,
}

impl Superblock {
    pub const BYTES: usize = 192;
    const CRC_AT: usize = 188;
    const V1_BYTES: usize = 128;
    const V1_CRC_AT: usize = 124;

    /// Encode as the current version (a version 1 superblock is upgraded by writing it with a
    /// key).
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
            .u64(self.created_unix)
            .skip(16)
            .bytes(&self.log_key.map_or([0; 32], |k| k.0));
        let crc = crc_with_zeroed_field(out, Self::CRC_AT);
        out[Self::CRC_AT..Self::CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode one slot. `Ok(None)` means the slot holds no superblock of ours (wrong magic);
    /// a bad checksum or version is an error so the caller can say why it refused the device.
    pub fn decode(buf: &[u8]) -> Result<Option<Superblock>, SuperblockFault> {
        if buf.len() < Self::V1_BYTES || buf[..8] != SUPERBLOCK_MAGIC {
            return Ok(None);
        }
        let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let (len, crc_at) = match version {
            1 => (Self::V1_BYTES, Self::V1_CRC_AT),
            FORMAT_VERSION => (Self::BYTES, Self::CRC_AT),
            v => return Err(SuperblockFault::Version(v)),
        };
        let b = buf.get(..len).ok_or(SuperblockFault::Checksum)?;
        let stored = u32::from_le_bytes([b[crc_at], b[crc_at + 1], b[crc_at + 2], b[crc_at + 3]]);
        if stored != crc_with_zeroed_field(b, crc_at) {
            return Err(SuperblockFault::Checksum);
        }
        let parse = || -> Result<Superblock> {
            let mut g = Get::new(b, "superblock");
            g.skip(12)?;
            let mut sb = Superblock {
                version,
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
                log_key: None,
            };
            if version >= 2 {
                g.skip(16)?;
                sb.log_key = Some(LogKey(g.array()?));
            }
            Ok(sb)
        };
        parse().map(Some).map_err(|_| SuperblockFault::Checksum)
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

/// First 80 bytes of the first 4 KiB block of every segment in use (64 in version 1).
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
/// | 44 | 16 | nonce | random for each use of the segment; records' MACs cover it, so a copy of a record from an earlier use never verifies in a later one (version 1: reserved) |
/// | 60 | 4 | crc | CRC-32 of bytes 0..64 with this field zero |
/// | 64 | 16 | mac | [`log_mac`] of bytes 0..64 (version 2) |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub kind: SegmentKind,
    pub segment: u32,
    pub shard: u16,
    pub pool_uuid: [u8; 16],
    pub epoch: u64,
    pub next_segment: u32,
    pub nonce: [u8; 16],
}

impl SegmentHeader {
    pub const BYTES: usize = 80;
    const CRC_AT: usize = 60;
    const MAC_AT: usize = 64;
    const MAC_DOMAIN: &'static [u8] = b"ingot segment header v2";

    /// Encode (current version) and seal with the CRC and the MAC under `key`.
    pub fn encode(&self, out: &mut [u8], key: &LogKey) {
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
            .u32(self.next_segment)
            .bytes(&self.nonce);
        let crc = crc_with_zeroed_field(&out[..Self::MAC_AT], Self::CRC_AT);
        out[Self::CRC_AT..Self::CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        let mac = log_mac(key, Self::MAC_DOMAIN, &[&out[..Self::MAC_AT]]);
        out[Self::MAC_AT..].copy_from_slice(&mac);
    }

    /// Decode a header of this pool's log version: with `key` (version 2 pools) its MAC must
    /// verify; without (a version 1 pool being upgraded) it must be a version 1 header.
    pub fn decode_authentic(buf: &[u8], key: Option<&LogKey>) -> Option<SegmentHeader> {
        let (h, version) = Self::decode_any(buf)?;
        match key {
            Some(k) => {
                let b = buf.get(..Self::BYTES)?;
                let mac = log_mac(k, Self::MAC_DOMAIN, &[&b[..Self::MAC_AT]]);
                (version == FORMAT_VERSION as u16 && mac_eq(&mac, &b[Self::MAC_AT..])).then_some(h)
            }
            None => (version == 1).then_some(h),
        }
    }

    /// Parse and check the CRC only (no MAC): for tools and fuzzing.
    pub fn decode(buf: &[u8]) -> Option<SegmentHeader> {
        Self::decode_any(buf).map(|(h, _)| h)
    }

    fn decode_any(buf: &[u8]) -> Option<(SegmentHeader, u16)> {
        let b = buf.get(..Self::MAC_AT)?;
        if b[..4] != SEGMENT_MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        if stored != crc_with_zeroed_field(b, Self::CRC_AT) {
            return None;
        }
        let mut g = Get::new(b, "segment header");
        g.skip(4).ok()?;
        let version = g.u16().ok()?;
        if version != 1 && u32::from(version) != FORMAT_VERSION {
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
        let h = SegmentHeader {
            kind,
            segment,
            shard,
            pool_uuid: g.array().ok()?,
            epoch: g.u64().ok()?,
            next_segment: g.u32().ok()?,
            nonce: if version == 1 {
                [0; 16]
            } else {
                g.array().ok()?
            },
        };
        Some((h, version))
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
    /// No entries: written over the header of a record whose write failed, with that record's
    /// `shard_seq` and `record_bytes`, so that replay steps over its space to the records
    /// after it instead of searching for them (version 2).
    Void = 4,
}

/// What seals a version 2 record: the pool's key, the nonce of the segment's current use
/// (from its [`SegmentHeader`]) and the record's byte offset in the segment. A record copied
/// anywhere else, or into a later use of the same place, does not verify.
#[derive(Debug, Clone, Copy)]
pub struct RecordSeal<'a> {
    pub key: &'a LogKey,
    pub nonce: [u8; 16],
    pub offset: u32,
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
/// | 60 | 4 | reserved | (version 1: CRC-32 of the header, this field zero, and all entries; entries then start at 64) |
/// | 64 | 16 | mac | [`log_mac`] of the [`RecordSeal`]'s nonce and offset, bytes 0..64 and all entries |
///
/// Entries follow at [`RecordHeader::BYTES`]; payloads follow the header area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub version: u16,
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
    /// Header bytes before the entries (current version).
    pub const BYTES: usize = 80;
    const V1_BYTES: usize = 64;
    const V1_CRC_AT: usize = 60;
    const FIXED: usize = 64;
    const MAC_DOMAIN: &'static [u8] = b"ingot record v2";

    /// Size of the header area for `entries` entries of `entry_bytes` each (current version).
    pub fn header_area(entries: usize, entry_bytes: usize) -> usize {
        (Self::BYTES + entries * entry_bytes).next_multiple_of(IO_ALIGN)
    }

    /// Where this record's entries start.
    pub fn entries_at(&self) -> usize {
        if self.version == 1 {
            Self::V1_BYTES
        } else {
            Self::BYTES
        }
    }

    fn entries_end(&self) -> usize {
        self.entries_at() + self.entry_count as usize * self.entry_bytes()
    }

    /// Encode into `area` (the header area, entries already placed at [`RecordHeader::BYTES`])
    /// as the current version, and seal it with the MAC over header and entries.
    pub fn encode_and_seal(&self, area: &mut [u8], entry_bytes: usize, seal: &RecordSeal<'_>) {
        let end = Self::BYTES + self.entry_count as usize * entry_bytes;
        Put::new(&mut area[..Self::FIXED])
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
        let mac = Self::mac(area, end, seal);
        area[Self::FIXED..Self::BYTES].copy_from_slice(&mac);
    }

    fn mac(area: &[u8], end: usize, seal: &RecordSeal<'_>) -> [u8; MAC_BYTES] {
        log_mac(
            seal.key,
            Self::MAC_DOMAIN,
            &[
                &seal.nonce,
                &seal.offset.to_le_bytes(),
                &area[..Self::FIXED],
                &area[Self::BYTES..end],
            ],
        )
    }

    /// Decode the fixed header from the first block of a record; does not check the seal
    /// (which needs all entries): call [`RecordHeader::verify`] once the whole header area is
    /// read.
    pub fn decode(buf: &[u8]) -> Option<RecordHeader> {
        let b = buf.get(..Self::FIXED)?;
        if b[..4] != RECORD_MAGIC {
            return None;
        }
        let mut g = Get::new(b, "record header");
        g.skip(4).ok()?;
        let version = g.u16().ok()?;
        if version != 1 && u32::from(version) != FORMAT_VERSION {
            return None;
        }
        let kind = match g.u16().ok()? {
            1 => RecordKind::Data,
            2 => RecordKind::Trim,
            3 => RecordKind::Move,
            4 if version >= 2 => RecordKind::Void,
            _ => return None,
        };
        let h = RecordHeader {
            version,
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
        if h.entry_count as usize > MAX_RECORD_ENTRIES
            || (h.kind == RecordKind::Void && h.entry_count != 0)
            || h.header_bytes as usize != h.entries_end().next_multiple_of(IO_ALIGN)
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
            RecordKind::Trim | RecordKind::Void => TrimEntry::BYTES,
        }
    }

    /// Check the seal over the header and its entries (`area` is the whole header area): the
    /// MAC under `seal` for a version 2 record, the CRC for a version 1 record read without a
    /// seal (a version 1 pool being upgraded). Any other combination fails.
    pub fn verify(&self, area: &[u8], seal: Option<&RecordSeal<'_>>) -> bool {
        let Some(b) = area.get(..self.entries_end()) else {
            return false;
        };
        match (self.version, seal) {
            (1, None) => {
                let stored = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
                stored == crc_with_zeroed_field(b, Self::V1_CRC_AT)
            }
            (v, Some(seal)) if u32::from(v) == FORMAT_VERSION => {
                mac_eq(&Self::mac(b, b.len(), seal), &b[Self::FIXED..Self::BYTES])
            }
            _ => false,
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
/// | 24 | 16 | fingerprint | low 64 bits: keyed BLAKE3 of the 4 KiB plaintext under the volume's dedup domain key; high 64 bits: that domain's tag (`reduce::FingerprintKey`; unkeyed XXH3-128 in logs before a [`CHECKPOINT_KEYED`] checkpoint). Rebuilds the dedup index; zero in move entries |
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
/// | 61 | 1 | flags: [`CHECKPOINT_LZ4`], [`CHECKPOINT_KEYED`] |
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

    fn superblock() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
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
            log_key: Some(LogKey([5; 32])),
        }
    }

    #[test]
    fn superblock_round_trip_and_checksum() {
        let sb = superblock();
        let mut buf = vec![0u8; 4096];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
        buf[50] ^= 1;
        assert_eq!(Superblock::decode(&buf), Err(SuperblockFault::Checksum));
        buf[50] ^= 1;
        buf[140] ^= 1;
        assert_eq!(Superblock::decode(&buf), Err(SuperblockFault::Checksum));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Ok(None));
        buf[8] = 9;
        assert_eq!(Superblock::decode(&buf), Err(SuperblockFault::Version(9)));
    }

    #[test]
    fn version_1_superblock_decodes_without_a_key() {
        // Version 1 layout: 128 bytes, CRC at 124.
        let mut sb = superblock();
        let mut buf = vec![0u8; 4096];
        sb.encode(&mut buf);
        buf[8..12].copy_from_slice(&1u32.to_le_bytes());
        buf[128..192].fill(0);
        let crc = crc_with_zeroed_field(&buf[..128], 124);
        buf[124..128].copy_from_slice(&crc.to_le_bytes());
        sb.version = 1;
        sb.log_key = None;
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
    }

    #[test]
    fn segment_header_needs_the_key() {
        let key = LogKey([1; 32]);
        let h = SegmentHeader {
            kind: SegmentKind::Data,
            segment: 4,
            shard: 1,
            pool_uuid: [2; 16],
            epoch: 3,
            next_segment: 9,
            nonce: [8; 16],
        };
        let mut buf = vec![0u8; 4096];
        h.encode(&mut buf, &key);
        assert_eq!(
            SegmentHeader::decode_authentic(&buf, Some(&key)),
            Some(h.clone())
        );
        assert_eq!(
            SegmentHeader::decode_authentic(&buf, Some(&LogKey([2; 32]))),
            None
        );
        assert_eq!(SegmentHeader::decode_authentic(&buf, None), None);
        // Same fields, CRC recomputed by someone without the key: refused.
        buf[40] ^= 1;
        let crc = crc_with_zeroed_field(&buf[..64], 60);
        buf[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(SegmentHeader::decode(&buf).is_some());
        assert_eq!(SegmentHeader::decode_authentic(&buf, Some(&key)), None);
    }

    #[test]
    fn record_header_round_trip_and_seal() {
        let key = LogKey([3; 32]);
        let h = RecordHeader {
            version: FORMAT_VERSION as u16,
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
            .encode(&mut area[RecordHeader::BYTES + i as usize * DataEntry::BYTES..]);
        }
        let seal = RecordSeal {
            key: &key,
            nonce: [4; 16],
            offset: 8192,
        };
        h.encode_and_seal(&mut area, DataEntry::BYTES, &seal);
        let d = RecordHeader::decode(&area).unwrap();
        assert_eq!(d, h);
        assert!(d.verify(&area, Some(&seal)));
        // Elsewhere in the segment, in another use of it, under another key, or unsealed.
        assert!(!d.verify(
            &area,
            Some(&RecordSeal {
                offset: 12288,
                ..seal
            })
        ));
        assert!(!d.verify(
            &area,
            Some(&RecordSeal {
                nonce: [5; 16],
                ..seal
            })
        ));
        let other = LogKey([4; 32]);
        assert!(!d.verify(
            &area,
            Some(&RecordSeal {
                key: &other,
                ..seal
            })
        ));
        assert!(!d.verify(&area, None));
        area[RecordHeader::BYTES + 8] ^= 0x10;
        assert!(!d.verify(&area, Some(&seal)));
    }
}
