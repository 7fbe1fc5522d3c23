//! The superblock: two copies at the start of each device.

use super::codec::{crc_with_zeroed_field, Get, Put};
use super::key::LogKey;
use super::{FORMAT_VERSION, FORMAT_VERSION_PAGED, IO_ALIGN, SUPERBLOCK_MAGIC};
use crate::error::Result;
// Only the doc comments name these (intra-doc links).
#[cfg(doc)]
use super::DATA_START;

/// Superblock: identifies the device, holds the pool's [`LogKey`] and points at the newest
/// checkpoint. 192 bytes used of a 4 KiB slot (128 in version 1); a commit writes the slot not
/// holding the current generation, syncs, then the other slot, so a torn write always leaves
/// one slot pointing at a checkpoint that exists. Superblocks lie below [`DATA_START`], where no
/// client byte is ever written.
///
/// | off | size | field | why |
/// |----:|----:|---|---|
/// | 0 | 8 | magic `INGOTSB1` | refuse foreign files |
/// | 8 | 4 | version | refuse newer formats; 1 is upgraded at open; 3: the checkpoint is a root and pages ([`FORMAT_VERSION_PAGED`]) |
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
/// | 88 | 8 | checkpoint_bytes | blob length (version 3: the root's) |
/// | 96 | 4 | checkpoint_crc | CRC-32 of the blob (version 3: of the root) |
/// | 100 | 4 | checkpoint_offset | version 3: byte offset of the [`super::CheckpointRoot`] in `checkpoint_segment` (reserved, zero, before) |
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
    /// Version 3: where the root lies in `checkpoint_segment`.
    pub checkpoint_offset: u32,
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
            .u32(if self.version >= FORMAT_VERSION_PAGED {
                FORMAT_VERSION_PAGED
            } else {
                FORMAT_VERSION
            })
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
            .u32(self.checkpoint_offset)
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
            FORMAT_VERSION | FORMAT_VERSION_PAGED => (Self::BYTES, Self::CRC_AT),
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
                checkpoint_offset: g.u32()?,
                created_unix: g.u64()?,
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

const _: () = assert!(Superblock::BYTES <= IO_ALIGN);

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
            checkpoint_offset: 0,
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

    /// A format 3 superblock keeps its version and the root's offset; a version 2 one writes
    /// the offset field as the zero it always was.
    #[test]
    fn a_paged_superblock_keeps_its_version_and_root_offset() {
        let sb = Superblock {
            version: FORMAT_VERSION_PAGED,
            checkpoint_offset: 7 << 12,
            ..superblock()
        };
        let mut buf = vec![0u8; 4096];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
        superblock().encode(&mut buf);
        assert_eq!(&buf[100..104], &[0; 4]);
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
}
