//! Checkpoint blobs: a consistent image of every volume map, the block table and each shard's
//! chain position. Layout in `format::CheckpointHeader`.

use std::sync::Arc;

use crate::api::DedupDomain;
use crate::error::{Error, Result};
use crate::format::{
    CheckpointHeader, Get, Put, CHAIN_DATA, CHAIN_MOVES, CHECKPOINT_FRAME_BYTES, CHECKPOINT_KEYED,
    CHECKPOINT_LZ4, CHECKPOINT_QOS, CHECKPOINT_VERSION_DOMAINS, CHECKPOINT_VERSION_MOVE_CHAINS,
    CHECKPOINT_VERSION_PLAIN, DOMAIN_NAMED, DOMAIN_PRIVATE, DOMAIN_SHARED, MAP_PAGE_ENTRIES,
};
use crate::log::ShardPosition;
use crate::map::MapLeaf;
use crate::qos::QosLimits;
use crate::space::BlockEntry;

pub(crate) struct VolumeImage {
    pub id: u32,
    pub name: String,
    pub size_bytes: u64,
    /// `format::VOLUME_NO_DEDUP` / `VOLUME_NO_COMPRESSION`.
    pub flags: u16,
    /// Dedup domain (shared in checkpoints before version 3).
    pub domain: DedupDomain,
    /// QoS limits (none in checkpoints without `format::CHECKPOINT_QOS`).
    pub qos: QosLimits,
    /// (global page index, page) for every allocated page.
    pub pages: Vec<(u64, Arc<MapLeaf>)>,
}

pub(crate) struct Image {
    pub seq: u64,
    pub epoch: u64,
    pub next_volume_id: u32,
    pub volumes: Vec<VolumeImage>,
    /// Indexed by block id; entries whose `refs` count is 0 are free and not written.
    pub blocks: crate::space::BlockTable,
    /// Reference counts by block id. Format 2 writes only which ids are live, and a decoded
    /// blob counts 1 for each block it holds (the open recounts the maps); format 3 writes the
    /// counts, and an image read with [`Image::counts`] holds them exactly.
    pub refs: crate::space::RefCounts,
    /// What the pool accounted when the image was cut (`Some` for every image a checkpoint
    /// takes); read back from a format 3 root that stored it (`format::ROOT_COUNTS`), it is
    /// taken as it is, with `refs`, instead of being recounted.
    pub counts: Option<Counts>,
    /// Dedup pins when the image was cut (`Space::pins`): counted in `refs`, held by no map
    /// entry of the image. A format 3 checkpoint stores the counts without them.
    pub pins: Vec<(u64, u32)>,
    /// Read back: ids a format 3 root lists as in use with no reference (root section 10),
    /// which the open holds so that replay finds their blocks stored.
    pub held: Vec<u64>,
    /// Chain positions: the data shards' (`data_chains` of them), then move chains.
    pub shards: Vec<ShardPosition>,
    pub data_chains: usize,
    /// Dedup index entries (key, block id) and its sampling level.
    pub index: Vec<(u64, u64)>,
    pub index_sample_bits: u8,
    /// Fingerprints are keyed (`format::CHECKPOINT_KEYED`); false for checkpoints written
    /// before they were, whose index is then not used.
    pub keyed_fingerprints: bool,
    /// What changed since the previous image was taken (`None`: not known, write it all).
    pub changed: Option<Changed>,
    /// Read from a format 3 checkpoint: where its pages are, for the next checkpoint to
    /// write only what changed since (`None`: written whole).
    pub pages: Option<Box<super::paged::PagedState>>,
}

/// Totals and per-segment live bytes when an image was cut.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counts {
    pub live_blocks: u64,
    pub stored_bytes: u64,
    /// Live bytes per segment (`Space::seg_live`).
    pub usage: Vec<u64>,
}

/// Units (of [`crate::space::CHANGE_UNIT`] ids) of the block table and of the reference counts
/// changed since the previous image was taken: what a format 3 checkpoint rewrites of them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Changed {
    pub blocks: Vec<usize>,
    pub refs: Vec<usize>,
}

/// Fuzzing entry point: decode a checkpoint blob (the CRC is not checked, so the fuzzer reaches
/// the parser). Returns whether it decoded.
#[doc(hidden)]
pub fn fuzz_decode_checkpoint(blob: &[u8]) -> bool {
    decode(blob, 1 << 20).is_ok()
}

pub(crate) fn encode(img: &Image) -> Result<Vec<u8>> {
    let live = img.refs.live_iter().filter(|&l| l).count() as u64;
    let pages: u64 = img.volumes.iter().map(|v| v.pages.len() as u64).sum();
    // The lowest version that holds the image, so that older binaries read what they can
    // (keyed fingerprints alone do not need a new version, see `CHECKPOINT_KEYED`): binaries
    // that predate move chains would take one for a data shard, and binaries that predate
    // dedup domains would deduplicate across them; both refuse the version instead.
    let version = if img.volumes.iter().any(|v| v.domain != DedupDomain::Shared) {
        CHECKPOINT_VERSION_DOMAINS
    } else if img.shards.len() > img.data_chains {
        CHECKPOINT_VERSION_MOVE_CHAINS
    } else {
        CHECKPOINT_VERSION_PLAIN
    };
    let qos = img.volumes.iter().any(|v| v.qos != QosLimits::default());
    // Compressed frame by frame as the sections are written: the whole uncompressed image
    // was the largest buffer of a checkpoint (and of an open, which writes one).
    let estimate = crate::context::checkpoint_estimate_bytes(
        pages,
        live,
        img.volumes.len() as u64,
        img.shards.len() as u64,
    ) as usize;
    let mut packed = Vec::with_capacity(CheckpointHeader::BYTES + estimate / 2);
    CheckpointHeader {
        seq: img.seq,
        epoch: img.epoch,
        next_block_id: img.blocks.len() as u64,
        next_volume_id: img.next_volume_id,
        volume_count: img.volumes.len() as u32,
        block_count: live,
        shard_count: img.shards.len() as u32,
        index_count: img.index.len() as u64,
        index_sample_bits: img.index_sample_bits,
        flags: CHECKPOINT_LZ4
            | if img.keyed_fingerprints {
                CHECKPOINT_KEYED
            } else {
                0
            }
            | if qos { CHECKPOINT_QOS } else { 0 },
        version,
    }
    .encode(&mut packed);
    let mut out = Framer::new(packed);
    for v in &img.volumes {
        out.extend_from_slice(&v.id.to_le_bytes());
        out.extend_from_slice(&(v.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&v.flags.to_le_bytes());
        out.extend_from_slice(&v.size_bytes.to_le_bytes());
        out.extend_from_slice(&(v.pages.len() as u32).to_le_bytes());
        out.extend_from_slice(v.name.as_bytes());
        if version >= CHECKPOINT_VERSION_DOMAINS {
            let (kind, name) = match &v.domain {
                DedupDomain::Shared => (DOMAIN_SHARED, ""),
                DedupDomain::Private => (DOMAIN_PRIVATE, ""),
                DedupDomain::Named(n) => (DOMAIN_NAMED, n.as_str()),
            };
            // Names are at most 64 bytes (`DedupDomain::from_str`).
            out.extend_from_slice(&[kind, name.len() as u8]);
            out.extend_from_slice(name.as_bytes());
        }
        // A page, and below a block entry, is put together first and appended whole: field
        // by field through the framer, encoding took 8% longer than into one vector.
        let mut raw = [0u8; 8 + MAP_PAGE_ENTRIES as usize * 8];
        for (idx, page) in &v.pages {
            raw[..8].copy_from_slice(&idx.to_le_bytes());
            page.with_entries(*idx, |ids| {
                for (slot, id) in raw[8..].chunks_exact_mut(8).zip(ids.iter()) {
                    slot.copy_from_slice(&id.to_le_bytes());
                }
            })?;
            out.extend_from_slice(&raw);
        }
    }
    let mut entries = Vec::new();
    img.blocks.for_each_in(0..img.blocks.len(), &mut |id, b| {
        if img.refs.live(id as u64) {
            entries.push((id, *b));
        }
    })?;
    for (id, b) in entries {
        let mut e = [0u8; 32];
        Put::new(&mut e)
            .u64(id as u64)
            .u32(b.segment)
            .u32(b.offset)
            .u32(u32::from(b.stored_len))
            .u32(b.crc)
            .u32(u32::from(b.flags));
        out.extend_from_slice(&e);
    }
    for (i, s) in img.shards.iter().enumerate() {
        let kind = if i < img.data_chains {
            CHAIN_DATA
        } else {
            CHAIN_MOVES
        };
        out.extend_from_slice(&s.segment.to_le_bytes());
        out.extend_from_slice(&s.offset.to_le_bytes());
        out.extend_from_slice(&s.next.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&s.shard_seq.to_le_bytes());
    }
    for &(key, id) in &img.index {
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    if qos {
        for v in &img.volumes {
            let q = &v.qos;
            for x in [
                q.iops_limit,
                q.bandwidth_limit_bytes,
                q.burst_iops,
                q.burst_bytes,
            ] {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    Ok(out.finish())
}

/// Writes the sections as LZ4 frames of [`CHECKPOINT_FRAME_BYTES`] (the last one shorter),
/// each compressed as soon as it is full: a frame's worth is buffered, never the whole image.
struct Framer {
    packed: Vec<u8>,
    pending: Vec<u8>,
}

impl Framer {
    fn new(packed: Vec<u8>) -> Framer {
        Framer {
            packed,
            pending: Vec::with_capacity(CHECKPOINT_FRAME_BYTES),
        }
    }

    #[inline]
    fn extend_from_slice(&mut self, mut b: &[u8]) {
        if self.pending.len() + b.len() < CHECKPOINT_FRAME_BYTES {
            self.pending.extend_from_slice(b);
            return;
        }
        while !b.is_empty() {
            let n = b.len().min(CHECKPOINT_FRAME_BYTES - self.pending.len());
            self.pending.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.pending.len() == CHECKPOINT_FRAME_BYTES {
                self.frame();
            }
        }
    }

    fn frame(&mut self) {
        let frame = lz4_flex::compress_prepend_size(&self.pending);
        self.packed
            .extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.packed.extend_from_slice(&frame);
        self.pending.clear();
    }

    fn finish(mut self) -> Vec<u8> {
        if !self.pending.is_empty() {
            self.frame();
        }
        self.packed
    }
}

/// The sections after the header, read in order; an LZ4-framed checkpoint is decompressed a
/// frame at a time as they are read (decompressing it whole took the largest buffer of an
/// open, twice over while it grew).
struct Sections<'a> {
    /// The frames not decompressed yet (or, unframed, the sections themselves).
    frames: Get<'a>,
    framed: bool,
    /// Decompressed bytes; those before `pos` are read.
    buf: Vec<u8>,
    pos: usize,
    /// Bytes not read yet, in all.
    left: usize,
}

impl<'a> Sections<'a> {
    fn new(blob: &'a [u8], h: &CheckpointHeader) -> Result<Sections<'a>> {
        let body = &blob[CheckpointHeader::BYTES.min(blob.len())..];
        let framed = h.flags & CHECKPOINT_LZ4 != 0;
        let left = if framed {
            // Every frame leads with its decompressed length: bound each before anything is
            // allocated, and add them up for `remaining`.
            let bad = || Error::Corrupt {
                what: "checkpoint frame",
            };
            let mut total = 0usize;
            let mut g = Get::new(body, "checkpoint frame");
            while g.remaining() > 0 {
                let len = g.u32()? as usize;
                let size = Get::new(g.bytes(len)?, "checkpoint frame").u32()? as usize;
                // LZ4 expands at most 255-fold: a larger claim is corruption, refused before
                // `remaining` (which sizes allocations) believes it.
                if size > CHECKPOINT_FRAME_BYTES || size > (len - 4) * 255 + 16 {
                    return Err(bad());
                }
                total = total.checked_add(size).ok_or_else(bad)?;
            }
            total
        } else {
            body.len()
        };
        Ok(Sections {
            frames: Get::new(body, "checkpoint frame"),
            framed,
            buf: Vec::new(),
            pos: 0,
            left,
        })
    }

    fn corrupt() -> Error {
        Error::Corrupt { what: "checkpoint" }
    }

    fn bad_frame() -> Error {
        Error::Corrupt {
            what: "checkpoint frame",
        }
    }

    /// The next `n` bytes.
    fn bytes(&mut self, n: usize) -> Result<&[u8]> {
        if n > self.left {
            return Err(Self::corrupt());
        }
        if !self.framed {
            self.left -= n;
            return self.frames.bytes(n);
        }
        if self.buf.len() - self.pos < n {
            self.buf.drain(..self.pos);
            self.pos = 0;
            while self.buf.len() < n {
                let len = self.frames.u32()? as usize;
                let frame = self.frames.bytes(len)?;
                let size = Get::new(frame, "checkpoint frame").u32()? as usize;
                let out =
                    lz4_flex::decompress_size_prepended(frame).map_err(|_| Self::bad_frame())?;
                // Exactly what it claimed, so that `left` stays exact.
                if out.len() != size {
                    return Err(Self::bad_frame());
                }
                self.buf.extend_from_slice(&out);
            }
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        self.left -= n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn skip(&mut self, n: usize) -> Result<()> {
        self.bytes(n).map(|_| ())
    }
    fn remaining(&self) -> usize {
        self.left
    }
}

/// All the sections at once (tests look at them whole).
#[cfg(test)]
fn sections(blob: &[u8], h: &CheckpointHeader) -> Result<Vec<u8>> {
    let mut s = Sections::new(blob, h)?;
    let n = s.remaining();
    Ok(s.bytes(n)?.to_vec())
}

/// Decode a blob whose CRC the caller has verified; `max_blocks` bounds block ids (see
/// `read_checkpoint`). Each block the blob holds counts one reference in the image's `refs`
/// (what `encode` needs to write it again); an open drops them and counts the map entries.
pub(crate) fn decode(blob: &[u8], max_blocks: u64) -> Result<Image> {
    let h = CheckpointHeader::decode(&mut Get::new(blob, "checkpoint"))?;
    let mut g = Sections::new(blob, &h)?;
    let mut volumes = Vec::new();
    for _ in 0..h.volume_count {
        let id = g.u32()?;
        let name_len = g.u16()? as usize;
        let flags = g.u16()?;
        let size_bytes = g.u64()?;
        let page_count = g.u32()? as usize;
        let name = std::str::from_utf8(g.bytes(name_len)?)
            .map_err(|_| Error::Corrupt {
                what: "volume name",
            })?
            .to_string();
        let domain = if h.version >= CHECKPOINT_VERSION_DOMAINS {
            let [kind, len] = g.array::<2>()?;
            let dname = g.bytes(usize::from(len))?;
            let bad = || Error::Corrupt {
                what: "volume dedup domain",
            };
            match kind {
                DOMAIN_SHARED if dname.is_empty() => DedupDomain::Shared,
                DOMAIN_PRIVATE if dname.is_empty() => DedupDomain::Private,
                DOMAIN_NAMED => match std::str::from_utf8(dname).map(str::parse) {
                    Ok(Ok(d @ DedupDomain::Named(_))) => d,
                    _ => return Err(bad()),
                },
                _ => return Err(bad()),
            }
        } else {
            DedupDomain::Shared
        };
        let mut pages = Vec::with_capacity(page_count.min(g.remaining() / 4096 + 1));
        for _ in 0..page_count {
            let idx = g.u64()?;
            let raw = g.bytes(MAP_PAGE_ENTRIES as usize * 8)?;
            let mut page = [0u64; MAP_PAGE_ENTRIES as usize];
            for (slot, c) in page.iter_mut().zip(raw.chunks_exact(8)) {
                *slot = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            }
            pages.push((idx, Arc::new(MapLeaf::new(page))));
        }
        volumes.push(VolumeImage {
            id,
            name,
            size_bytes,
            flags,
            domain,
            qos: QosLimits::default(),
            pages,
        });
    }
    let next_block_id = h.next_block_id.max(1);
    // Ids stay within what the pool can reference, and each block entry takes 32 bytes of the
    // blob: anything larger is corruption, refused before it becomes an allocation.
    if next_block_id > max_blocks
        || h.block_count > max_blocks
        || h.block_count > g.remaining() as u64 / 32
    {
        return Err(Error::Corrupt {
            what: "checkpoint block id range",
        });
    }
    // Straight into the chunked table: a `Vec` converted after would hold the table twice
    // while the pool opens.
    let mut blocks = crate::space::BlockTable::default();
    blocks.grow_to(next_block_id as usize, BlockEntry::default());
    let mut refs = crate::space::RefCounts::with_len(next_block_id as usize);
    for _ in 0..h.block_count {
        let id = g.u64()?;
        let e = BlockEntry {
            segment: g.u32()?,
            offset: g.u32()?,
            stored_len: g.u32()? as u16,
            crc: g.u32()?,
            flags: g.u32()? as u16,
        };
        g.skip(4)?;
        let slot = blocks
            .get_mut(id as usize)
            .ok()
            .flatten()
            .ok_or(Error::Corrupt {
                what: "checkpoint block id",
            })?;
        *slot = e;
        if !refs.live(id) {
            refs.add(id);
        }
    }
    let mut shards = Vec::new();
    let mut data_chains = 0;
    for i in 0..h.shard_count as usize {
        let segment = g.u32()?;
        let offset = g.u32()?;
        let next = g.u32()?;
        // Reserved (zero) before version 2; data chains come first.
        let kind = g.u32()?;
        match kind {
            CHAIN_DATA if data_chains == i => data_chains += 1,
            CHAIN_MOVES if h.version >= CHECKPOINT_VERSION_MOVE_CHAINS && data_chains > 0 => {}
            _ => {
                return Err(Error::Corrupt {
                    what: "checkpoint chain kind",
                })
            }
        }
        shards.push(ShardPosition {
            segment,
            offset,
            next,
            shard_seq: g.u64()?,
            nonce: None,
        });
    }
    let mut index = Vec::with_capacity(h.index_count.min(g.remaining() as u64 / 16) as usize);
    for _ in 0..h.index_count {
        let key = g.u64()?;
        let id = g.u64()?;
        if id < next_block_id {
            index.push((key, id));
        }
    }
    if h.flags & CHECKPOINT_QOS != 0 {
        for v in &mut volumes {
            v.qos = QosLimits {
                iops_limit: g.u64()?,
                bandwidth_limit_bytes: g.u64()?,
                burst_iops: g.u64()?,
                burst_bytes: g.u64()?,
            };
        }
    }
    Ok(Image {
        seq: h.seq,
        epoch: h.epoch,
        next_volume_id: h.next_volume_id,
        volumes,
        blocks,
        refs,
        shards,
        data_chains,
        index,
        index_sample_bits: h.index_sample_bits,
        keyed_fingerprints: h.flags & CHECKPOINT_KEYED != 0,
        changed: None,
        pages: None,
        counts: None,
        pins: Vec::new(),
        held: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(data_chains: usize, chains: usize) -> Image {
        Image {
            seq: 7,
            epoch: 3,
            next_volume_id: 1,
            volumes: Vec::new(),
            blocks: vec![BlockEntry::default()].into(),
            refs: crate::space::RefCounts::with_len(1),
            shards: (0..chains as u32)
                .map(|i| ShardPosition {
                    segment: i,
                    offset: 4096,
                    next: 10 + i,
                    shard_seq: u64::from(i),
                    nonce: None,
                })
                .collect(),
            data_chains,
            index: Vec::new(),
            index_sample_bits: 0,
            keyed_fingerprints: true,
            changed: None,
            pages: None,
            counts: None,
            pins: Vec::new(),
            held: Vec::new(),
        }
    }

    fn volume(id: u32, domain: DedupDomain) -> VolumeImage {
        VolumeImage {
            id,
            name: format!("v{id}"),
            size_bytes: 1 << 20,
            flags: 0,
            domain,
            qos: QosLimits::default(),
            pages: vec![(
                0,
                Arc::new(MapLeaf::new([id.into(); MAP_PAGE_ENTRIES as usize])),
            )],
        }
    }

    /// An image of several frames, with volume pages and block entries cut by frame
    /// boundaries: written frame by frame and read back frame by frame, and the frames are the
    /// 4 MiB cuts of the whole sections, as whole-image compression made them.
    #[test]
    fn a_many_frame_image_round_trips_and_keeps_its_frames() {
        let n = 300_000u64;
        let mut img = image(2, 3);
        img.blocks = (0..n as u32)
            .map(|i| BlockEntry {
                segment: i % 97,
                offset: i.wrapping_mul(4096),
                stored_len: 4096,
                crc: i ^ 0x5a5a_5a5a,
                ..BlockEntry::default()
            })
            .collect();
        img.refs = crate::space::RefCounts::with_len(n as usize);
        for id in (1..n).filter(|id| id % 3 != 0) {
            img.refs.add(id);
        }
        let mut v = volume(1, DedupDomain::Shared);
        v.pages = (0..700u64)
            .map(|p| {
                let mut page = [0u64; MAP_PAGE_ENTRIES as usize];
                for (k, slot) in page.iter_mut().enumerate() {
                    *slot = (p * 512 + k as u64) % n;
                }
                (p * 3, Arc::new(MapLeaf::new(page)))
            })
            .collect();
        img.volumes = vec![v];
        img.index = (0..50_000u64).map(|k| (k * 7919, k % n)).collect();
        let blob = encode(&img).unwrap();
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        // The frames, decompressed and cut again in 4 MiB pieces, give the same blob.
        let mut body = Vec::new();
        let mut g = Get::new(&blob[CheckpointHeader::BYTES..], "t");
        let mut frames = 0;
        while g.remaining() > 0 {
            let len = g.u32().unwrap() as usize;
            body.extend(lz4_flex::decompress_size_prepended(g.bytes(len).unwrap()).unwrap());
            frames += 1;
        }
        assert!(frames >= 3, "{frames} frames");
        let mut again = blob[..CheckpointHeader::BYTES].to_vec();
        for chunk in body.chunks(CHECKPOINT_FRAME_BYTES) {
            let f = lz4_flex::compress_prepend_size(chunk);
            again.extend_from_slice(&(f.len() as u32).to_le_bytes());
            again.extend_from_slice(&f);
        }
        assert!(again == blob, "frames are not the 4 MiB cuts");
        assert_eq!(h.block_count, n - 1 - (n - 1) / 3);
        let back = decode(&blob, n).unwrap();
        assert_eq!(back.blocks.len(), n as usize);
        for id in 0..n {
            let live = id != 0 && id % 3 != 0;
            assert_eq!(back.refs.live(id), live, "id {id}");
            if live {
                assert_eq!(
                    back.blocks.get(id as usize),
                    img.blocks.get(id as usize),
                    "id {id}"
                );
            }
        }
        let (vb, vi) = (&back.volumes[0], &img.volumes[0]);
        assert_eq!(vb.pages.len(), vi.pages.len());
        for ((ib, pb), (ii, pi)) in vb.pages.iter().zip(&vi.pages) {
            assert_eq!((ib, &pb.ids()[..]), (ii, &pi.ids()[..]));
        }
        assert_eq!(back.index, img.index);
        // A cut anywhere is corrupt, never a panic.
        for cut in [blob.len() - 1, blob.len() / 2, CheckpointHeader::BYTES + 3] {
            assert!(decode(&blob[..cut], n).is_err(), "cut at {cut}");
        }
    }

    /// Frames that claim far more than LZ4 can expand their bytes to are refused before
    /// anything is sized by the claim: 8 bytes per frame claiming 4 MiB each, with a header
    /// asking for an index of a billion entries, once asked for gigabytes.
    #[test]
    fn frames_that_claim_more_than_they_can_hold_are_corrupt() {
        let mut blob = Vec::new();
        CheckpointHeader {
            seq: 1,
            epoch: 1,
            next_block_id: 1,
            next_volume_id: 1,
            volume_count: 0,
            block_count: 0,
            shard_count: 0,
            index_count: 1 << 30,
            index_sample_bits: 0,
            flags: CHECKPOINT_LZ4,
            version: CHECKPOINT_VERSION_PLAIN,
        }
        .encode(&mut blob);
        for _ in 0..1000 {
            blob.extend_from_slice(&4u32.to_le_bytes());
            blob.extend_from_slice(&(CHECKPOINT_FRAME_BYTES as u32).to_le_bytes());
        }
        assert!(matches!(decode(&blob, 16), Err(Error::Corrupt { .. })));
        // A real frame whose stated size is larger than what it holds: refused when read.
        let mut blob = blob[..CheckpointHeader::BYTES].to_vec();
        let mut frame = lz4_flex::compress_prepend_size(&[0u8; 64]);
        frame[..4].copy_from_slice(&100u32.to_le_bytes());
        blob.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        blob.extend_from_slice(&frame);
        assert!(decode(&blob, 16).is_err());
    }

    #[test]
    fn dedup_domains_round_trip_as_version_3() {
        let mut img = image(2, 3);
        img.blocks = vec![BlockEntry::default(); 8].into();
        img.refs = crate::space::RefCounts::with_len(8);
        img.volumes = vec![
            volume(1, DedupDomain::Shared),
            volume(2, DedupDomain::Private),
            volume(3, DedupDomain::Named("tenant-a".into())),
        ];
        img.index = vec![(0xdead_beef, 3)];
        let blob = encode(&img).unwrap();
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        assert_eq!(h.version, CHECKPOINT_VERSION_DOMAINS);
        let back = decode(&blob, 16).unwrap();
        let domains: Vec<_> = back.volumes.iter().map(|v| v.domain.clone()).collect();
        assert_eq!(
            domains,
            [
                DedupDomain::Shared,
                DedupDomain::Private,
                DedupDomain::Named("tenant-a".into())
            ]
        );
        assert_eq!(back.volumes[2].pages[0].1.ids()[0], 3);
        assert_eq!((back.data_chains, back.shards.len()), (2, 3));
        assert!(back.keyed_fingerprints);
        assert_eq!(back.index, [(0xdead_beef, 3)]);
    }

    #[test]
    fn shared_domains_keep_older_versions_and_keyed_flag() {
        // Only shared volumes: the version older binaries read, as before.
        let mut img = image(2, 2);
        img.volumes = vec![volume(1, DedupDomain::Shared)];
        let blob = encode(&img).unwrap();
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        assert_eq!(h.version, CHECKPOINT_VERSION_PLAIN);
        assert_ne!(h.flags & CHECKPOINT_KEYED, 0);
        let back = decode(&blob, 16).unwrap();
        assert!(back.keyed_fingerprints);
        assert_eq!(back.volumes[0].domain, DedupDomain::Shared);
        // A checkpoint written before keyed fingerprints: no flag, its index is not trusted.
        img.keyed_fingerprints = false;
        let back = decode(&encode(&img).unwrap(), 16).unwrap();
        assert!(!back.keyed_fingerprints);
    }

    #[test]
    fn bad_dedup_domain_is_corrupt() {
        let mut img = image(1, 1);
        img.volumes = vec![volume(1, DedupDomain::Named("abc".into()))];
        let blob = encode(&img).unwrap();
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        let raw = sections(&blob, &h).unwrap();
        // Volume section: id 4, name_len 2, flags 2, size 8, page_count 4, name "v1" 2, then
        // the domain kind at 22, its length at 23 and the name at 24.
        assert_eq!(&raw[22..27], &[DOMAIN_NAMED, 3, b'a', b'b', b'c']);
        for (at, byte) in [(22, 9u8), (24, b'/'), (24, b'.'), (23, 0)] {
            let mut bad = raw.clone();
            bad[at] = byte;
            let mut plain = blob[..CheckpointHeader::BYTES].to_vec();
            plain[61] = 0; // not LZ4-framed
            plain.extend_from_slice(&bad);
            assert!(decode(&plain, 16).is_err(), "byte {at} = {byte}");
        }
    }

    #[test]
    fn qos_limits_round_trip_in_a_trailing_section() {
        let mut img = image(2, 2);
        img.volumes = vec![
            volume(1, DedupDomain::Shared),
            volume(2, DedupDomain::Shared),
        ];
        img.index = vec![(5, 0)];
        // No limits: no flag, the blob older binaries wrote.
        let plain = encode(&img).unwrap();
        let h = CheckpointHeader::decode(&mut Get::new(&plain, "t")).unwrap();
        assert_eq!(h.flags & CHECKPOINT_QOS, 0);
        let limits = QosLimits {
            iops_limit: 1000,
            bandwidth_limit_bytes: 20 << 20,
            burst_iops: 50,
            burst_bytes: 0,
        };
        img.volumes[1].qos = limits;
        let blob = encode(&img).unwrap();
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        // Limits alone keep the version (older binaries still open the pool).
        assert_eq!(h.version, CHECKPOINT_VERSION_PLAIN);
        assert_ne!(h.flags & CHECKPOINT_QOS, 0);
        let back = decode(&blob, 16).unwrap();
        assert_eq!(back.volumes[0].qos, QosLimits::default());
        assert_eq!(back.volumes[1].qos, limits);
        assert_eq!(back.index, [(5, 0)]);
        // The section is last: a binary that stops after the index reads what it read before.
        let with = sections(&blob, &h).unwrap();
        let without = sections(&plain, &h).unwrap();
        assert_eq!(with.len(), without.len() + 2 * 32);
        assert_eq!(&with[..without.len()], &without[..]);
    }

    #[test]
    fn move_chain_round_trips_as_version_2() {
        let blob = encode(&image(2, 3)).unwrap();
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        assert_eq!(h.version, CHECKPOINT_VERSION_MOVE_CHAINS);
        let img = decode(&blob, 16).unwrap();
        assert_eq!((img.data_chains, img.shards.len()), (2, 3));
        assert_eq!(img.shards[2].next, 12);
    }

    #[test]
    fn checkpoint_without_move_chain_stays_version_1() {
        let blob = encode(&image(2, 2)).unwrap();
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        assert_eq!(h.version, CHECKPOINT_VERSION_PLAIN);
        let img = decode(&blob, 16).unwrap();
        assert_eq!((img.data_chains, img.shards.len()), (2, 2));
    }

    #[test]
    fn move_chain_in_a_version_1_checkpoint_is_corrupt() {
        // Version 1 with a chain of kind "moves": written by no binary, refused.
        let mut img = image(2, 3);
        img.data_chains = 3;
        let blob = encode(&img).unwrap();
        let mut raw = sections(
            &blob,
            &CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap(),
        )
        .unwrap();
        // The kind field of the last chain position (after the empty volume and block sections).
        let at = raw.len() - 24 + 12;
        raw[at] = CHAIN_MOVES as u8;
        let mut plain = blob[..CheckpointHeader::BYTES].to_vec();
        plain[61] = 0; // not LZ4-framed
        plain.extend_from_slice(&raw);
        assert!(matches!(
            decode(&plain, 16),
            Err(Error::Corrupt {
                what: "checkpoint chain kind"
            })
        ));
    }
}
