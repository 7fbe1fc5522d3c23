//! A replica batch: the device bytes a pool wrote between two syncs, as one write-once object
//! of the pool's log in an object store (issue 23, `replica`). Replaying a store's batches in
//! order onto empty devices of the listed sizes gives the devices as they were at the last
//! sync each batch covers: every flushed byte of the pool, on another node.
//!
//! ```text
//! | ReplicaBatch header (32 B) | device sizes (8 B each) | extents (24 B each) | data ... |
//! ```

use crate::error::{Error, Result};
use crate::format::{Get, Put};

pub const REPLICA_MAGIC: [u8; 4] = *b"IRPB";
pub const REPLICA_VERSION: u16 = 1;
/// Bytes of a [`ReplicaBatch`] header.
pub const REPLICA_HEADER_BYTES: usize = 32;
/// Bytes of one [`ReplicaExtent`].
pub const REPLICA_EXTENT_BYTES: usize = 24;
/// Devices a batch may list (a pool has a few).
pub const REPLICA_MAX_DEVICES: usize = 256;

/// What an extent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// `len` bytes follow in the batch's data, in extent order.
    Data = 0,
    /// The range was discarded: it reads as zeroes.
    Zero = 1,
}

/// One range of one device.
///
/// | offset | size | field | meaning |
/// |---:|---:|---|---|
/// | 0 | 2 | `dev` | device index, below the batch's device count |
/// | 2 | 1 | `kind` | 0 data, 1 zero ([`ExtentKind`]) |
/// | 3 | 1 | reserved | 0 |
/// | 4 | 4 | `len` | bytes of the range |
/// | 8 | 8 | `offset` | byte offset in the device; `offset + len` within its size |
/// | 16 | 4 | `crc` | CRC-32 of the range's data (0 for zero extents) |
/// | 20 | 4 | reserved | 0 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaExtent {
    pub dev: u16,
    pub kind: ExtentKind,
    pub len: u32,
    pub offset: u64,
    pub crc: u32,
}

/// The header of a batch.
///
/// | offset | size | field | meaning |
/// |---:|---:|---|---|
/// | 0 | 4 | `magic` | `IRPB` |
/// | 4 | 2 | `version` | 1 |
/// | 6 | 2 | `devices` | number of device sizes that follow the header (1..=256) |
/// | 8 | 4 | `extents` | number of extents after the sizes |
/// | 12 | 4 | reserved | 0 |
/// | 16 | 8 | `data_bytes` | bytes of data after the extents (the sum of data extents' `len`) |
/// | 24 | 4 | `table_crc` | CRC-32 of the header's bytes 0..24, the sizes and the extents |
/// | 28 | 4 | reserved | 0 |
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaBatch {
    /// Each device's size in bytes.
    pub sizes: Vec<u64>,
    pub extents: Vec<ReplicaExtent>,
}

fn bad(what: &'static str) -> Error {
    Error::Corrupt { what }
}

impl ReplicaBatch {
    /// The batch's bytes with `data` (the data extents' bytes, in order) after its table.
    pub fn encode(&self, data: &[&[u8]]) -> Vec<u8> {
        let table =
            REPLICA_HEADER_BYTES + 8 * self.sizes.len() + REPLICA_EXTENT_BYTES * self.extents.len();
        let data_bytes: usize = data.iter().map(|d| d.len()).sum();
        let mut out = vec![0u8; table + data_bytes];
        {
            let mut p = Put::new(&mut out[..table]);
            p.bytes(&REPLICA_MAGIC)
                .u16(REPLICA_VERSION)
                .u16(self.sizes.len() as u16)
                .u32(self.extents.len() as u32)
                .u32(0)
                .u64(data_bytes as u64)
                .skip(8);
            for &s in &self.sizes {
                p.u64(s);
            }
            for e in &self.extents {
                p.u16(e.dev)
                    .bytes(&[e.kind as u8, 0])
                    .u32(e.len)
                    .u64(e.offset)
                    .u32(e.crc)
                    .u32(0);
            }
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&out[..24]);
        h.update(&out[REPLICA_HEADER_BYTES..table]);
        let crc = h.finalize();
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        let mut at = table;
        for d in data {
            out[at..at + d.len()].copy_from_slice(d);
            at += d.len();
        }
        out
    }

    /// Bytes of the table (header, sizes, extents) of the batch that `prefix` starts, from
    /// its first [`REPLICA_HEADER_BYTES`]: how much of a stored batch to read to list its
    /// extents without its data ([`ReplicaBatch::decode_table`]).
    pub fn table_bytes(prefix: &[u8]) -> Result<usize> {
        let mut g = Get::new(prefix, "replica batch");
        if g.array::<4>()? != REPLICA_MAGIC {
            return Err(bad("replica batch magic"));
        }
        if g.u16()? != REPLICA_VERSION {
            return Err(bad("replica batch version"));
        }
        let devices = usize::from(g.u16()?);
        let extents = g.u32()? as usize;
        if devices == 0 || devices > REPLICA_MAX_DEVICES {
            return Err(bad("replica batch device count"));
        }
        extents
            .checked_mul(REPLICA_EXTENT_BYTES)
            .and_then(|e| e.checked_add(REPLICA_HEADER_BYTES + 8 * devices))
            .filter(|&t| t <= 1 << 30)
            .ok_or(bad("replica batch extent count"))
    }

    /// Parse and check a stored batch's table only: `head` holds at least its
    /// [`ReplicaBatch::table_bytes`], `total` is the whole object's length. Returns the batch
    /// and where each data extent's bytes start in the object, for range reads of its data
    /// (which the engine checks block by block when it reads them: the extents' CRCs cover
    /// whole extents and are not checked here).
    pub fn decode_table(head: &[u8], total: u64) -> Result<(ReplicaBatch, Vec<Option<u64>>)> {
        let table = Self::table_bytes(head)?;
        let head = head.get(..table).ok_or(bad("replica batch table"))?;
        let (batch, at) = Self::parse(head, table, Some(total))?;
        Ok((batch, at.into_iter().map(|a| a.map(|a| a as u64)).collect()))
    }

    /// Parse and check a batch: its table, every extent against the device sizes, and each
    /// data extent's CRC. Returns the batch and the byte offset of each data extent's bytes
    /// (`None` for zero extents).
    pub fn decode(buf: &[u8]) -> Result<(ReplicaBatch, Vec<Option<usize>>)> {
        let table = Self::table_bytes(buf)?;
        Self::parse(buf, table, None)
    }

    /// The table of `buf`, and with `total` `None` the data that follows it in `buf`, checked
    /// whole; with `total`, `buf` is the table alone and the data is `total - table` bytes of
    /// a stored object.
    fn parse(
        buf: &[u8],
        table: usize,
        total: Option<u64>,
    ) -> Result<(ReplicaBatch, Vec<Option<usize>>)> {
        // Magic, version and counts were checked by `table_bytes`, which gave `table`.
        let mut g = Get::new(buf, "replica batch");
        g.skip(6)?;
        let devices = usize::from(g.u16()?);
        let extents = g.u32()? as usize;
        g.skip(4)?;
        let data_bytes = g.u64()?;
        let crc = g.u32()?;
        g.skip(4)?;
        if table > buf.len() {
            return Err(bad("replica batch extent count"));
        }
        let len = total.unwrap_or(buf.len() as u64);
        if len.checked_sub(table as u64) != Some(data_bytes) {
            return Err(bad("replica batch length"));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&buf[..24]);
        h.update(&buf[REPLICA_HEADER_BYTES..table]);
        if h.finalize() != crc {
            return Err(bad("replica batch table CRC"));
        }
        let sizes = (0..devices).map(|_| g.u64()).collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(extents);
        let mut at_data = Vec::with_capacity(extents);
        let mut at = table;
        for _ in 0..extents {
            let dev = g.u16()?;
            let kind = match g.array::<2>()?[0] {
                0 => ExtentKind::Data,
                1 => ExtentKind::Zero,
                _ => return Err(bad("replica extent kind")),
            };
            let len = g.u32()?;
            let offset = g.u64()?;
            let crc = g.u32()?;
            g.skip(4)?;
            let size = *sizes
                .get(usize::from(dev))
                .ok_or(bad("replica extent device"))?;
            if len == 0 {
                return Err(bad("replica extent of no bytes"));
            }
            if offset
                .checked_add(u64::from(len))
                .is_none_or(|end| end > size)
            {
                return Err(bad("replica extent past its device"));
            }
            if kind == ExtentKind::Data {
                let end = at + len as usize;
                if total.is_none() {
                    let bytes = buf.get(at..end).ok_or(bad("replica extent data"))?;
                    if crc32fast::hash(bytes) != crc {
                        return Err(bad("replica extent CRC"));
                    }
                }
                at_data.push(Some(at));
                at = end;
            } else {
                at_data.push(None);
            }
            out.push(ReplicaExtent {
                dev,
                kind,
                len,
                offset,
                crc,
            });
        }
        if at as u64 != len {
            return Err(bad("replica batch data length"));
        }
        Ok((
            ReplicaBatch {
                sizes,
                extents: out,
            },
            at_data,
        ))
    }
}

pub const REPLICA_COMMIT_MAGIC: [u8; 4] = *b"IRPC";
/// Bytes of a [`ReplicaCommit`] header.
pub const REPLICA_COMMIT_BYTES: usize = 32;

/// One sync of a pool on an object store: the record appended to the store's log (write-once,
/// numbered) once the sync's batches are stored. Replaying the log replays each commit's
/// batches in order; batches no commit names (a sync that failed half-way) are never read.
///
/// | offset | size | field | meaning |
/// |---:|---:|---|---|
/// | 0 | 4 | `magic` | `IRPC` |
/// | 4 | 2 | `version` | 1 |
/// | 6 | 2 | `kind` | 0: one [`ReplicaBatch`] follows the header; 1: the batches are objects; 2: a base is whole |
/// | 8 | 8 | `epoch` | kind 1: the epoch in the batch objects' names |
/// | 16 | 8 | `first` | kind 1: the number of the first batch object; kind 2: the log number the base starts at |
/// | 24 | 4 | `count` | kind 1: batch objects `first..first + count`, replayed in that order |
/// | 28 | 4 | `crc` | CRC-32 of bytes 0..28 |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaCommit {
    /// A small sync's one batch, in the record itself.
    Inline(Vec<u8>),
    Objects {
        epoch: u64,
        first: u64,
        count: u32,
    },
    /// Replaying the log from `start` onto empty devices gives the pool: what came before
    /// is no longer needed.
    Base {
        start: u64,
    },
}

impl ReplicaCommit {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, epoch, first, count, tail): (u16, u64, u64, u32, &[u8]) = match self {
            ReplicaCommit::Inline(b) => (0, 0, 0, 0, b),
            &ReplicaCommit::Objects {
                epoch,
                first,
                count,
            } => (1, epoch, first, count, &[]),
            &ReplicaCommit::Base { start } => (2, 0, start, 0, &[]),
        };
        let mut out = vec![0u8; REPLICA_COMMIT_BYTES + tail.len()];
        Put::new(&mut out[..28])
            .bytes(&REPLICA_COMMIT_MAGIC)
            .u16(REPLICA_VERSION)
            .u16(kind)
            .u64(epoch)
            .u64(first)
            .u32(count);
        let crc = crc32fast::hash(&out[..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out[REPLICA_COMMIT_BYTES..].copy_from_slice(tail);
        out
    }

    /// Parse a commit record (an inline batch is checked when it is applied).
    pub fn decode(buf: &[u8]) -> Result<ReplicaCommit> {
        let mut g = Get::new(buf, "replica commit");
        if g.array::<4>()? != REPLICA_COMMIT_MAGIC {
            return Err(bad("replica commit magic"));
        }
        if g.u16()? != REPLICA_VERSION {
            return Err(bad("replica commit version"));
        }
        let kind = g.u16()?;
        let epoch = g.u64()?;
        let first = g.u64()?;
        let count = g.u32()?;
        let crc = g.u32()?;
        if crc32fast::hash(&buf[..28]) != crc {
            return Err(bad("replica commit CRC"));
        }
        match kind {
            0 => Ok(ReplicaCommit::Inline(buf[REPLICA_COMMIT_BYTES..].to_vec())),
            1 if buf.len() == REPLICA_COMMIT_BYTES => Ok(ReplicaCommit::Objects {
                epoch,
                first,
                count,
            }),
            2 if buf.len() == REPLICA_COMMIT_BYTES => Ok(ReplicaCommit::Base { start: first }),
            _ => Err(bad("replica commit kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_round_trips_and_any_flipped_byte_is_refused() {
        let a = vec![7u8; 4096];
        let b: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let batch = ReplicaBatch {
            sizes: vec![1 << 30, 1 << 20],
            extents: vec![
                ReplicaExtent {
                    dev: 0,
                    kind: ExtentKind::Data,
                    len: 4096,
                    offset: 8192,
                    crc: crc32fast::hash(&a),
                },
                ReplicaExtent {
                    dev: 1,
                    kind: ExtentKind::Zero,
                    len: 1 << 16,
                    offset: 0,
                    crc: 0,
                },
                ReplicaExtent {
                    dev: 0,
                    kind: ExtentKind::Data,
                    len: 8192,
                    offset: 1 << 29,
                    crc: crc32fast::hash(&b),
                },
            ],
        };
        let bytes = batch.encode(&[&a, &b]);
        let (back, at) = ReplicaBatch::decode(&bytes).unwrap();
        assert_eq!(back, batch);
        let first = at[0].unwrap();
        assert_eq!(&bytes[first..first + 4096], &a[..]);
        assert_eq!(at[1], None);
        for i in (0..bytes.len()).step_by(97) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(ReplicaBatch::decode(&bad).is_err(), "byte {i}");
        }
        assert!(ReplicaBatch::decode(&bytes[..bytes.len() - 1]).is_err());
        // The table alone, as a store's range read gives it, with the object's length.
        let table = ReplicaBatch::table_bytes(&bytes[..REPLICA_HEADER_BYTES]).unwrap();
        assert_eq!(table, REPLICA_HEADER_BYTES + 16 + 3 * REPLICA_EXTENT_BYTES);
        let (head, at_head) =
            ReplicaBatch::decode_table(&bytes[..table], bytes.len() as u64).unwrap();
        assert_eq!(head, batch);
        assert_eq!(
            at_head,
            at.iter().map(|a| a.map(|a| a as u64)).collect::<Vec<_>>()
        );
        assert!(ReplicaBatch::decode_table(&bytes[..table - 1], bytes.len() as u64).is_err());
        assert!(ReplicaBatch::decode_table(&bytes[..table], bytes.len() as u64 - 1).is_err());
        // Every byte but the header's last reserved word, which no CRC covers.
        for i in (0..table).filter(|i| !(28..32).contains(i)) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(
                ReplicaBatch::decode_table(&bad[..table], bytes.len() as u64).is_err(),
                "table byte {i}"
            );
        }
        // An extent of no bytes is refused (a cold map would lose the range it starts).
        let mut empty = batch.clone();
        empty.extents[1].len = 0;
        assert!(ReplicaBatch::decode(&empty.encode(&[&a, &b])).is_err());
        // An extent past its device is refused even with a correct CRC.
        let mut past = batch.clone();
        past.extents[1].offset = 1 << 20;
        assert!(ReplicaBatch::decode(&past.encode(&[&a, &b])).is_err());
    }

    #[test]
    fn commits_round_trip_and_a_flipped_byte_is_refused() {
        for c in [
            ReplicaCommit::Inline(vec![1, 2, 3]),
            ReplicaCommit::Objects {
                epoch: 7,
                first: 1 << 40,
                count: 12,
            },
            ReplicaCommit::Base { start: 77 },
        ] {
            let bytes = c.encode();
            assert_eq!(ReplicaCommit::decode(&bytes).unwrap(), c);
            for i in 0..REPLICA_COMMIT_BYTES {
                let mut bad = bytes.clone();
                bad[i] ^= 1;
                assert!(ReplicaCommit::decode(&bad).is_err(), "byte {i}");
            }
        }
    }
}
