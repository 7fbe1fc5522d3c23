//! Log records: the header, its data and trim entries, and the seal that authenticates them.

use super::codec::{crc_with_zeroed_field, Get, Put};
use super::key::{log_mac, mac_eq, LogKey, MAC_BYTES};
use super::{FORMAT_VERSION, IO_ALIGN, MAX_RECORD_ENTRIES, RECORD_MAGIC};
use crate::error::Result;
// Only the doc comments name these (intra-doc links).
#[cfg(doc)]
use super::{SegmentHeader, CHECKPOINT_KEYED, FLAG_LZ4, FLAG_REF};

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

const _: () = assert!(RecordHeader::BYTES + MAX_RECORD_ENTRIES * DataEntry::BYTES <= 4 * IO_ALIGN);

#[cfg(test)]
mod tests {
    use super::*;

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
