//! The checkpoint root (format 3, docs/design/paged-metadata.md §4.4): the one record a
//! superblock points at. Everything per block or per LBA is in pages ([`super::page`]) that the
//! root reaches through [`PagePtr`]s, so the root's size depends on the volumes, the shards and
//! bounded lists, never on how much the pool holds.

use super::codec::{Get, Put};
use super::key::{log_mac, mac_eq, LogKey, MAC_BYTES};
use super::page::{get_u48, put_u48, PageArray, PagePtr};
use super::ROOT_MAGIC;
use crate::error::{Error, Result};

/// Root layout version written. Version 2 count pages hold counts (see [`ROOT_COUNTS`]);
/// version 1 roots (still read) come from builds whose count pages held liveness only, and
/// which refuse version 2 rather than take a count of 2 for a dead block. Version 3 map
/// directories carry their leaves' counts ([`ROOT_DIR_COUNTS`]), which version 2 builds would
/// take for misplaced page pointers: they refuse it.
pub const ROOT_VERSION: u16 = 3;
/// Root flag: fingerprints are keyed by the pool's secret (as `CHECKPOINT_KEYED`).
pub const ROOT_KEYED: u16 = 1;
/// Root flag: the block reference count array holds every id's count (254: the count is in
/// section 4) and the segment usage array every segment's live bytes, as they were when the
/// image was cut; `live_blocks` and `stored_bytes` are exact. An open takes them as they are,
/// reads no block-table page and recounts nothing. Without it (a version 1 root, or one whose
/// overflow did not fit), the open recounts the maps: the count array holds only whether
/// each id is live (version 1), or counts without their overflow.
pub const ROOT_COUNTS: u16 = 2;
/// Root flag: every map directory entry carries its leaf's count of set entries
/// ([`super::page::DirEntry`]): an open learns them without reading the leaves. A directory
/// of a root without it (an older build's) is rewritten whole by the next checkpoint.
pub const ROOT_DIR_COUNTS: u16 = 4;
/// Counts of 254 and more a root carries at most (13 bytes each: 832 KiB, so that a root
/// with them and its volumes fits the smallest segment, 2 MiB). Past it, the root goes
/// without [`ROOT_COUNTS`] and the next open recounts the maps.
pub const ROOT_OVERFLOW_MAX: usize = 64 << 10;
/// Largest root accepted (a root lists volumes, chains and bounded lists: 64 MiB is far
/// beyond any real one and keeps a corrupt length from allocating without bound).
pub const MAX_ROOT_BYTES: usize = 64 << 20;

const CORRUPT: Error = Error::Corrupt {
    what: "checkpoint root",
};

/// The root of one of the paged arrays: `len` entries in a tree of `height` levels of pages
/// (1: the root page is the only leaf) whose top page is `root`. 26 bytes: array u8,
/// height u8, len u64, root [`PagePtr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArrayRoot {
    pub array: PageArray,
    pub height: u8,
    pub len: u64,
    pub root: PagePtr,
}

/// A volume: what today's checkpoint keeps of it, and its leaf directory (an array of
/// [`PagePtr`]s to its map leaves, one per 2 MiB of the volume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootVolume {
    pub id: u32,
    pub name: String,
    /// `VOLUME_*` flags.
    pub flags: u16,
    pub size_bytes: u64,
    /// `DOMAIN_*`, and the domain's name for a named one.
    pub domain_kind: u8,
    pub domain_name: String,
    /// iops_limit, bandwidth_limit_bytes, burst_iops, burst_bytes (0: none).
    pub qos: [u64; 4],
    /// Entries that are not holes, and leaf pages present.
    pub mapped: u64,
    pub leaves: u64,
    /// The leaf directory: levels of its page tree (0: no page) and its top page.
    pub dir_height: u8,
    pub dir_root: PagePtr,
}

/// Where replay of one log chain resumes (as in today's checkpoint: 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootChain {
    pub segment: u32,
    pub offset: u32,
    pub next_segment: u32,
    /// `CHAIN_DATA` or `CHAIN_MOVES`.
    pub kind: u32,
    pub shard_seq: u64,
}

/// A tree being reaped after its volume was deleted: its top page, height, and how far the
/// reaper got (leaf index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    pub top: u64,
    pub height: u8,
    pub cursor: u64,
}

/// The saved dedup index run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootIndex {
    pub root: PagePtr,
    pub entries: u64,
    pub sample_bits: u8,
    pub saved_at_seq: u64,
}

/// The checkpoint root record.
///
/// | off | size | field |
/// |----:|----:|---|
/// | 0 | 4 | magic `ICKR` |
/// | 4 | 2 | version ([`ROOT_VERSION`]) |
/// | 6 | 2 | flags ([`ROOT_KEYED`], [`ROOT_COUNTS`], [`ROOT_DIR_COUNTS`]) |
/// | 8 | 8 | seq_end: records below it are in the checkpoint |
/// | 16 | 8 | epoch: records after it carry it |
/// | 24 | 8 | generation: of the superblocks that point at it |
/// | 32 | 8 | next_stamp: page stamps below it are taken |
/// | 40 | 8 | next_block_id |
/// | 48 | 8 | next_page_id |
/// | 56 | 4 | next_volume_id |
/// | 60 | 4 | section_count |
/// | 64 | 8 | live_blocks |
/// | 72 | 8 | stored_bytes |
/// | 80 | 4 | bytes: the whole root, this header included |
/// | 84 | 4 | crc: CRC-32 of the whole root with this field and the MAC zero |
/// | 88 | 16 | mac: [`log_mac`] of the whole root with this field zero (the superblock's CRC names the root; the MAC makes sure the pool wrote it) |
///
/// Sections follow, each `tag u16, reserved u16, len u32` then `len` bytes; each tag at most
/// once, an unknown tag refuses the root (a newer build's section may change what the pages
/// mean):
/// 1. arrays: count u32, then [`ArrayRoot`]s (array u8, height u8, len u64, root 16 B);
/// 2. volumes: count u32, then per volume id u32, name_len u16, flags u16, size_bytes u64,
///    domain_kind u8, domain_name_len u8, 4 × QoS u64, mapped u64, leaves u64, dir_height u8,
///    dir_root 16 B, name bytes, domain name bytes (the directory holds one entry per 2 MiB
///    of `size_bytes`);
/// 3. chains: count u32, then [`RootChain`]s (24 B);
/// 4. overflowing reference counts: count u32, then (array u8: block or page refs, id u64,
///    refs u32) for counts of 254 and more (every such id with [`ROOT_COUNTS`]);
/// 5. dead block ids whose usage is not yet taken off their segments: count u32, ids u64;
/// 6. orphans: count u32, then (top u48, height u8, cursor u64);
/// 7. reference count deltas of pages not loaded yet: count u32, then (array u8, id u64,
///    delta i32);
/// 8. metadata segments written by this checkpoint and the previous one: count u32, u32 each;
/// 9. the dedup index run: root 16 B, entries u64, sample_bits u8, saved_at_seq u64;
/// 10. block ids in use with no map reference when the image was cut (dedup references
///     pinned and not yet logged; their counts leave the pins out): count u32, ids u64. An
///     open holds them, so that replay finds their blocks stored.
///
/// Sections 1-8 are always there, 9 and 10 when they hold something.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointRoot {
    pub flags: u16,
    pub seq_end: u64,
    pub epoch: u64,
    pub generation: u64,
    pub next_stamp: u64,
    pub next_block_id: u64,
    pub next_page_id: u64,
    pub next_volume_id: u32,
    pub live_blocks: u64,
    pub stored_bytes: u64,
    pub arrays: Vec<ArrayRoot>,
    pub volumes: Vec<RootVolume>,
    pub chains: Vec<RootChain>,
    /// (array, id, refs).
    pub overflow: Vec<(PageArray, u64, u32)>,
    pub dead: Vec<u64>,
    pub orphans: Vec<Orphan>,
    /// (array, id, delta).
    pub deltas: Vec<(PageArray, u64, i32)>,
    pub segments: Vec<u32>,
    pub index: Option<RootIndex>,
    pub held: Vec<u64>,
}

const HEADER_BYTES: usize = 104;
const CRC_AT: usize = 84;
const MAC_AT: usize = 88;
const MAC_DOMAIN: &[u8] = b"ingot checkpoint root v1";
const SECTIONS: u32 = 10;

fn array_of(v: u8) -> Result<PageArray> {
    PageArray::from_u32(u32::from(v)).ok_or(CORRUPT)
}

/// Appends little-endian fields to a growing vector.
struct Out(Vec<u8>);

impl Out {
    fn with<const N: usize>(&mut self, f: impl FnOnce(&mut Put<'_>)) {
        let mut b = [0u8; N];
        f(&mut Put::new(&mut b));
        self.0.extend_from_slice(&b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("a root list beyond 4 G entries"));
    }
    fn ptr(&mut self, p: &PagePtr) {
        self.with::<16>(|w| p.put(w));
    }
    fn u48(&mut self, v: u64) {
        self.with::<6>(|w| put_u48(w, v));
    }
}

impl CheckpointRoot {
    /// The encoded root, sealed under the pool's key.
    pub fn encode(&self, key: &LogKey) -> Vec<u8> {
        let mut o = Out(vec![0u8; HEADER_BYTES]);
        let section = |o: &mut Out, tag: u16, f: &dyn Fn(&mut Out)| {
            let at = o.0.len();
            o.0.extend_from_slice(&tag.to_le_bytes());
            o.0.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            f(o);
            let len = (o.0.len() - at - 8) as u32;
            o.0[at + 4..at + 8].copy_from_slice(&len.to_le_bytes());
        };
        section(&mut o, 1, &|o| {
            o.count(self.arrays.len());
            for a in &self.arrays {
                o.u8(a.array as u32 as u8);
                o.u8(a.height);
                o.u64(a.len);
                o.ptr(&a.root);
            }
        });
        section(&mut o, 2, &|o| {
            o.count(self.volumes.len());
            for v in &self.volumes {
                o.u32(v.id);
                let name_len = u16::try_from(v.name.len()).expect("volume names are short");
                o.0.extend_from_slice(&name_len.to_le_bytes());
                o.0.extend_from_slice(&v.flags.to_le_bytes());
                o.u64(v.size_bytes);
                o.u8(v.domain_kind);
                o.u8(u8::try_from(v.domain_name.len()).expect("domain names are short"));
                for q in v.qos {
                    o.u64(q);
                }
                o.u64(v.mapped);
                o.u64(v.leaves);
                o.u8(v.dir_height);
                o.ptr(&v.dir_root);
                o.0.extend_from_slice(v.name.as_bytes());
                o.0.extend_from_slice(v.domain_name.as_bytes());
            }
        });
        section(&mut o, 3, &|o| {
            o.count(self.chains.len());
            for c in &self.chains {
                o.u32(c.segment);
                o.u32(c.offset);
                o.u32(c.next_segment);
                o.u32(c.kind);
                o.u64(c.shard_seq);
            }
        });
        section(&mut o, 4, &|o| {
            o.count(self.overflow.len());
            for &(a, id, refs) in &self.overflow {
                o.u8(a as u32 as u8);
                o.u64(id);
                o.u32(refs);
            }
        });
        section(&mut o, 5, &|o| {
            o.count(self.dead.len());
            for &id in &self.dead {
                o.u64(id);
            }
        });
        section(&mut o, 6, &|o| {
            o.count(self.orphans.len());
            for r in &self.orphans {
                o.u48(r.top);
                o.u8(r.height);
                o.u64(r.cursor);
            }
        });
        section(&mut o, 7, &|o| {
            o.count(self.deltas.len());
            for &(a, id, d) in &self.deltas {
                o.u8(a as u32 as u8);
                o.u64(id);
                o.0.extend_from_slice(&d.to_le_bytes());
            }
        });
        section(&mut o, 8, &|o| {
            o.count(self.segments.len());
            for &s in &self.segments {
                o.u32(s);
            }
        });
        if let Some(ix) = &self.index {
            section(&mut o, 9, &|o| {
                o.ptr(&ix.root);
                o.u64(ix.entries);
                o.u8(ix.sample_bits);
                o.u64(ix.saved_at_seq);
            });
        }
        if !self.held.is_empty() {
            section(&mut o, 10, &|o| {
                o.count(self.held.len());
                for &id in &self.held {
                    o.u64(id);
                }
            });
        }
        let sections = 8 + u32::from(self.index.is_some()) + u32::from(!self.held.is_empty());
        let bytes = u32::try_from(o.0.len()).expect("a root beyond 4 GiB");
        Put::new(&mut o.0[..HEADER_BYTES])
            .bytes(&ROOT_MAGIC)
            .u16(ROOT_VERSION)
            .u16(self.flags)
            .u64(self.seq_end)
            .u64(self.epoch)
            .u64(self.generation)
            .u64(self.next_stamp)
            .u64(self.next_block_id)
            .u64(self.next_page_id)
            .u32(self.next_volume_id)
            .u32(sections)
            .u64(self.live_blocks)
            .u64(self.stored_bytes)
            .u32(bytes);
        let crc = super::codec::crc_with_zeroed_field(&o.0, CRC_AT);
        o.0[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        let mac = log_mac(key, MAC_DOMAIN, &[&o.0]);
        o.0[MAC_AT..MAC_AT + MAC_BYTES].copy_from_slice(&mac);
        o.0
    }

    /// Decode a root read through a superblock, sealed under `key`. Any inconsistency is
    /// `Corrupt`: lengths, counts and strings are checked before anything is allocated for
    /// them.
    pub fn decode(buf: &[u8], key: &LogKey) -> Result<CheckpointRoot> {
        if buf.len() < HEADER_BYTES || buf[..4] != ROOT_MAGIC {
            return Err(CORRUPT);
        }
        let mut unsealed = buf.to_vec();
        unsealed[MAC_AT..MAC_AT + MAC_BYTES].fill(0);
        if !mac_eq(
            &log_mac(key, MAC_DOMAIN, &[&unsealed]),
            &buf[MAC_AT..MAC_AT + MAC_BYTES],
        ) {
            return Err(Error::Corrupt {
                what: "checkpoint root seal",
            });
        }
        let mut g = Get::new(buf, "checkpoint root");
        g.skip(4)?;
        if !(1..=ROOT_VERSION).contains(&g.u16()?) {
            return Err(Error::Corrupt {
                what: "checkpoint root version",
            });
        }
        let mut r = CheckpointRoot {
            flags: g.u16()?,
            seq_end: g.u64()?,
            epoch: g.u64()?,
            generation: g.u64()?,
            next_stamp: g.u64()?,
            next_block_id: g.u64()?,
            next_page_id: g.u64()?,
            next_volume_id: g.u32()?,
            ..CheckpointRoot::default()
        };
        let sections = g.u32()?;
        r.live_blocks = g.u64()?;
        r.stored_bytes = g.u64()?;
        let bytes = g.u32()? as usize;
        if bytes != buf.len() || bytes > MAX_ROOT_BYTES {
            return Err(CORRUPT);
        }
        let crc = g.u32()?;
        g.skip(MAC_BYTES)?;
        if crc != super::codec::crc_with_zeroed_field(&unsealed, CRC_AT) {
            return Err(Error::Corrupt {
                what: "checkpoint root checksum",
            });
        }
        let mut seen = 0u32;
        for _ in 0..sections {
            let tag = g.u16()?;
            g.skip(2)?;
            let len = g.u32()? as usize;
            let body = g.bytes(len)?;
            if tag == 0 || u32::from(tag) > SECTIONS || seen & 1 << tag != 0 {
                return Err(CORRUPT);
            }
            seen |= 1 << tag;
            let mut s = Get::new(body, "checkpoint root section");
            r.section(tag, &mut s)?;
            if s.remaining() != 0 {
                return Err(CORRUPT);
            }
        }
        // Sections 1-8 are always there.
        if seen & 0x1fe != 0x1fe || g.remaining() != 0 {
            return Err(CORRUPT);
        }
        Ok(r)
    }

    /// Seal arbitrary bytes as a root would be (length, CRC, MAC), so that a fuzzer reaches the
    /// parser behind the seal.
    #[doc(hidden)]
    pub fn seal_for_fuzzing(buf: &mut [u8], key: &LogKey) {
        if buf.len() < HEADER_BYTES {
            return;
        }
        let len = buf.len() as u32;
        buf[80..84].copy_from_slice(&len.to_le_bytes());
        buf[MAC_AT..MAC_AT + MAC_BYTES].fill(0);
        let crc = super::codec::crc_with_zeroed_field(buf, CRC_AT);
        buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        let mac = log_mac(key, MAC_DOMAIN, &[buf]);
        buf[MAC_AT..MAC_AT + MAC_BYTES].copy_from_slice(&mac);
    }

    fn section(&mut self, tag: u16, s: &mut Get<'_>) -> Result<()> {
        // Each entry takes at least this many bytes: a count beyond what the section holds is
        // refused before anything is reserved for it.
        let count = |s: &mut Get<'_>, min: usize| -> Result<usize> {
            let n = s.u32()? as usize;
            if n.saturating_mul(min) > s.remaining() {
                return Err(CORRUPT);
            }
            Ok(n)
        };
        match tag {
            1 => {
                let n = count(s, 26)?;
                for _ in 0..n {
                    let array = array_of(s.array::<1>()?[0])?;
                    let height = s.array::<1>()?[0];
                    self.arrays.push(ArrayRoot {
                        array,
                        height,
                        len: s.u64()?,
                        root: PagePtr::get(s)?,
                    });
                }
            }
            2 => {
                let n = count(s, 83)?;
                for _ in 0..n {
                    let id = s.u32()?;
                    let name_len = s.u16()? as usize;
                    let flags = s.u16()?;
                    let size_bytes = s.u64()?;
                    let [domain_kind, domain_len] = s.array()?;
                    let mut qos = [0u64; 4];
                    for q in &mut qos {
                        *q = s.u64()?;
                    }
                    let mapped = s.u64()?;
                    let leaves = s.u64()?;
                    let dir_height = s.array::<1>()?[0];
                    let dir_root = PagePtr::get(s)?;
                    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| CORRUPT);
                    let name = text(s.bytes(name_len)?)?;
                    let domain_name = text(s.bytes(usize::from(domain_len))?)?;
                    self.volumes.push(RootVolume {
                        id,
                        name,
                        flags,
                        size_bytes,
                        domain_kind,
                        domain_name,
                        qos,
                        mapped,
                        leaves,
                        dir_height,
                        dir_root,
                    });
                }
            }
            3 => {
                let n = count(s, 24)?;
                for _ in 0..n {
                    self.chains.push(RootChain {
                        segment: s.u32()?,
                        offset: s.u32()?,
                        next_segment: s.u32()?,
                        kind: s.u32()?,
                        shard_seq: s.u64()?,
                    });
                }
            }
            4 => {
                let n = count(s, 13)?;
                for _ in 0..n {
                    let a = array_of(s.array::<1>()?[0])?;
                    self.overflow.push((a, s.u64()?, s.u32()?));
                }
            }
            5 => {
                let n = count(s, 8)?;
                for _ in 0..n {
                    self.dead.push(s.u64()?);
                }
            }
            10 => {
                let n = count(s, 8)?;
                for _ in 0..n {
                    self.held.push(s.u64()?);
                }
            }
            6 => {
                let n = count(s, 15)?;
                for _ in 0..n {
                    self.orphans.push(Orphan {
                        top: get_u48(s)?,
                        height: s.array::<1>()?[0],
                        cursor: s.u64()?,
                    });
                }
            }
            7 => {
                let n = count(s, 13)?;
                for _ in 0..n {
                    let a = array_of(s.array::<1>()?[0])?;
                    let id = s.u64()?;
                    let d = i32::from_le_bytes(s.array()?);
                    self.deltas.push((a, id, d));
                }
            }
            8 => {
                let n = count(s, 4)?;
                for _ in 0..n {
                    self.segments.push(s.u32()?);
                }
            }
            9 => {
                self.index = Some(RootIndex {
                    root: PagePtr::get(s)?,
                    entries: s.u64()?,
                    sample_bits: s.array::<1>()?[0],
                    saved_at_seq: s.u64()?,
                });
            }
            _ => return Err(CORRUPT),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: LogKey = LogKey([4; 32]);

    fn sample() -> CheckpointRoot {
        let ptr = |s: u32| PagePtr {
            segment: s,
            offset: 4096 * s,
            stamp: 1 << 40 | u64::from(s),
        };
        CheckpointRoot {
            flags: ROOT_KEYED,
            seq_end: 1000,
            epoch: 3,
            generation: 17,
            next_stamp: 1 << 40 | 99,
            next_block_id: 123_456,
            next_page_id: 789,
            next_volume_id: 4,
            live_blocks: 100_000,
            stored_bytes: 400 << 20,
            arrays: vec![
                ArrayRoot {
                    array: PageArray::BlockTable,
                    height: 2,
                    len: 123_456,
                    root: ptr(5),
                },
                ArrayRoot {
                    array: PageArray::BlockRefs,
                    height: 1,
                    len: 123_456,
                    root: PagePtr::ABSENT,
                },
            ],
            volumes: vec![RootVolume {
                id: 1,
                name: "pg-data".into(),
                flags: 1,
                size_bytes: 10 << 30,
                domain_kind: 2,
                domain_name: "tenant-a".into(),
                qos: [1000, 0, 0, 1 << 20],
                mapped: 2_000_000,
                leaves: 4000,
                dir_height: 2,
                dir_root: ptr(6),
            }],
            chains: vec![RootChain {
                segment: 7,
                offset: 8192,
                next_segment: 8,
                kind: 1,
                shard_seq: 55,
            }],
            overflow: vec![
                (PageArray::BlockRefs, 42, 300),
                (PageArray::PageRefs, 9, 254),
            ],
            dead: vec![1, 2, 3],
            orphans: vec![Orphan {
                top: 77,
                height: 2,
                cursor: 10,
            }],
            deltas: vec![(PageArray::BlockRefs, 5, -2)],
            segments: vec![11, 12],
            index: Some(RootIndex {
                root: ptr(13),
                entries: 5000,
                sample_bits: 2,
                saved_at_seq: 900,
            }),
            held: vec![77, 4_000_000],
        }
    }

    #[test]
    fn a_root_round_trips_with_and_without_its_index() {
        let r = sample();
        assert_eq!(CheckpointRoot::decode(&r.encode(&KEY), &KEY).unwrap(), r);
        let r = CheckpointRoot { index: None, ..r };
        assert_eq!(CheckpointRoot::decode(&r.encode(&KEY), &KEY).unwrap(), r);
        let r = CheckpointRoot {
            held: Vec::new(),
            ..r
        };
        assert_eq!(CheckpointRoot::decode(&r.encode(&KEY), &KEY).unwrap(), r);
        let empty = CheckpointRoot::default();
        assert_eq!(
            CheckpointRoot::decode(&empty.encode(&KEY), &KEY).unwrap(),
            empty
        );
    }

    /// Every single-bit flip and every truncation of a root is refused (the CRC, or the
    /// lengths before it), never a panic or a different root.
    #[test]
    fn a_damaged_or_cut_root_is_refused() {
        let b = sample().encode(&KEY);
        for i in 0..b.len() * 8 {
            let mut d = b.clone();
            d[i / 8] ^= 1 << (i % 8);
            assert!(CheckpointRoot::decode(&d, &KEY).is_err(), "bit {i} flipped");
        }
        for n in 0..b.len() {
            assert!(CheckpointRoot::decode(&b[..n], &KEY).is_err(), "cut at {n}");
        }
    }

    /// A root whose counts lie is refused before anything is allocated for them, even sealed
    /// (as a bug would write it); and a root sealed under another key is refused at once.
    #[test]
    fn a_sealed_root_with_lying_counts_is_refused() {
        let mut b = CheckpointRoot::default().encode(&KEY);
        // Section 5 (dead ids) claims 2^32 - 1 ids in an empty body.
        let at = HEADER_BYTES + (0..4).map(|_| 8 + 4).sum::<usize>();
        assert_eq!(u16::from_le_bytes([b[at], b[at + 1]]), 5);
        b[at + 8..at + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        b[MAC_AT..MAC_AT + MAC_BYTES].fill(0);
        let crc = super::super::codec::crc_with_zeroed_field(&b, CRC_AT);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        let mac = log_mac(&KEY, MAC_DOMAIN, &[&b]);
        b[MAC_AT..MAC_AT + MAC_BYTES].copy_from_slice(&mac);
        assert!(CheckpointRoot::decode(&b, &KEY).is_err());
        let good = CheckpointRoot::default().encode(&KEY);
        assert!(CheckpointRoot::decode(&good, &LogKey([5; 32])).is_err());
    }

    /// Roots of layout 1 (an older build's) still read; one of a later layout is refused.
    #[test]
    fn roots_of_known_layouts_read_and_a_later_one_is_refused() {
        let with = |version: u16| {
            let mut b = sample().encode(&KEY);
            b[4..6].copy_from_slice(&version.to_le_bytes());
            b[MAC_AT..MAC_AT + MAC_BYTES].fill(0);
            let crc = super::super::codec::crc_with_zeroed_field(&b, CRC_AT);
            b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            let mac = log_mac(&KEY, MAC_DOMAIN, &[&b]);
            b[MAC_AT..MAC_AT + MAC_BYTES].copy_from_slice(&mac);
            CheckpointRoot::decode(&b, &KEY)
        };
        assert_eq!(with(1).unwrap(), sample());
        assert_eq!(with(ROOT_VERSION).unwrap(), sample());
        assert!(matches!(
            with(ROOT_VERSION + 1),
            Err(Error::Corrupt {
                what: "checkpoint root version"
            })
        ));
    }
}
