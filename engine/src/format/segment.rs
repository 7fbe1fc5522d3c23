//! The header at the start of every segment in use.

use super::codec::{crc_with_zeroed_field, Get, Put};
use super::key::{log_mac, mac_eq, LogKey};
use super::{FORMAT_VERSION, SEGMENT_MAGIC};

/// Kinds of segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum SegmentKind {
    Data = 1,
    Checkpoint = 2,
    /// Format 3's metadata pages (written by the checkpointer once; no chain).
    Meta = 3,
}

/// First 80 bytes of the first 4 KiB block of every segment in use (64 in version 1).
///
/// | off | size | field | why |
/// |----:|----:|---|---|
/// | 0 | 4 | magic `ISEG` | |
/// | 4 | 2 | version | |
/// | 6 | 2 | kind | 1 data, 2 checkpoint, 3 metadata pages (format 3) |
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
            3 => SegmentKind::Meta,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
