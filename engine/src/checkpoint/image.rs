//! Checkpoint blobs: a consistent image of every volume map, the block table and each shard's
//! chain position. Layout in `format::CheckpointHeader`.

use std::sync::Arc;

use crate::api::DedupDomain;
use crate::error::{Error, Result};
use crate::format::{
    CheckpointHeader, Get, CHAIN_DATA, CHAIN_MOVES, CHECKPOINT_FRAME_BYTES, CHECKPOINT_KEYED,
    CHECKPOINT_LZ4, CHECKPOINT_QOS, CHECKPOINT_VERSION_DOMAINS, CHECKPOINT_VERSION_MOVE_CHAINS,
    CHECKPOINT_VERSION_PLAIN, DOMAIN_NAMED, DOMAIN_PRIVATE, DOMAIN_SHARED, MAP_PAGE_ENTRIES,
};
use crate::log::ShardPosition;
use crate::map::MapPage;
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
    pub pages: Vec<(u64, Arc<MapPage>)>,
}

pub(crate) struct Image {
    pub seq: u64,
    pub epoch: u64,
    pub next_volume_id: u32,
    pub volumes: Vec<VolumeImage>,
    /// Indexed by block id; entries whose `refs` count is 0 are free and not written.
    pub blocks: crate::space::BlockTable,
    /// Reference counts by block id, as the pool held them; only whether a block is live is
    /// written. A decoded image counts 1 for each block it holds (opening counts the map
    /// entries instead).
    pub refs: crate::space::RefCounts,
    /// Chain positions: the data shards' (`data_chains` of them), then move chains.
    pub shards: Vec<ShardPosition>,
    pub data_chains: usize,
    /// Dedup index entries (key, block id) and its sampling level.
    pub index: Vec<(u64, u64)>,
    pub index_sample_bits: u8,
    /// Fingerprints are keyed (`format::CHECKPOINT_KEYED`); false for checkpoints written
    /// before they were, whose index is then not used.
    pub keyed_fingerprints: bool,
}

/// Fuzzing entry point: decode a checkpoint blob (the CRC is not checked, so the fuzzer reaches
/// the parser). Returns whether it decoded.
#[doc(hidden)]
pub fn fuzz_decode_checkpoint(blob: &[u8]) -> bool {
    decode(blob, 1 << 20).is_ok()
}

pub(crate) fn encode(img: &Image) -> Vec<u8> {
    let live = (0..img.blocks.len() as u64)
        .filter(|&id| img.refs.live(id))
        .count() as u64;
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
    let mut out = Vec::with_capacity(crate::context::checkpoint_estimate_bytes(
        pages,
        live,
        img.volumes.len() as u64,
        img.shards.len() as u64,
    ) as usize);
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
    .encode(&mut out);
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
        for (idx, page) in &v.pages {
            out.extend_from_slice(&idx.to_le_bytes());
            for id in page.iter() {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    for (id, b) in img.blocks.iter().enumerate() {
        if !img.refs.live(id as u64) {
            continue;
        }
        out.extend_from_slice(&(id as u64).to_le_bytes());
        out.extend_from_slice(&b.segment.to_le_bytes());
        out.extend_from_slice(&b.offset.to_le_bytes());
        out.extend_from_slice(&u32::from(b.stored_len).to_le_bytes());
        out.extend_from_slice(&b.crc.to_le_bytes());
        out.extend_from_slice(&u32::from(b.flags).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
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
    let body = &out[CheckpointHeader::BYTES..];
    let mut packed = Vec::with_capacity(CheckpointHeader::BYTES + body.len() / 2);
    packed.extend_from_slice(&out[..CheckpointHeader::BYTES]);
    for chunk in body.chunks(CHECKPOINT_FRAME_BYTES) {
        let frame = lz4_flex::compress_prepend_size(chunk);
        packed.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        packed.extend_from_slice(&frame);
    }
    packed
}

/// The sections after the header, decompressed when the checkpoint is LZ4-framed.
fn sections(blob: &[u8], h: &CheckpointHeader) -> Result<Vec<u8>> {
    let body = &blob[CheckpointHeader::BYTES.min(blob.len())..];
    if h.flags & CHECKPOINT_LZ4 == 0 {
        return Ok(body.to_vec());
    }
    let bad = || Error::Corrupt {
        what: "checkpoint frame",
    };
    let mut out = Vec::new();
    let mut g = Get::new(body, "checkpoint frame");
    while g.remaining() > 0 {
        let len = g.u32()? as usize;
        let frame = g.bytes(len)?;
        // The decompressed length leads the frame: bound it before anything is allocated.
        let size = frame
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(bad)?;
        if size > CHECKPOINT_FRAME_BYTES {
            return Err(bad());
        }
        out.extend(lz4_flex::decompress_size_prepended(frame).map_err(|_| bad())?);
    }
    Ok(out)
}

/// Decode a blob whose CRC the caller has verified; `max_blocks` bounds block ids (see
/// `read_checkpoint`). Reference counts are left at zero: the caller rebuilds them from the
/// maps.
pub(crate) fn decode(blob: &[u8], max_blocks: u64) -> Result<Image> {
    let h = CheckpointHeader::decode(&mut Get::new(blob, "checkpoint"))?;
    let body = sections(blob, &h)?;
    let mut g = Get::new(&body, "checkpoint");
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
            pages.push((idx, Arc::new(page)));
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
            generation: 0,
        };
        g.skip(4)?;
        let slot = blocks.get_mut(id as usize).ok_or(Error::Corrupt {
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
            pages: vec![(0, Arc::new([id.into(); MAP_PAGE_ENTRIES as usize]))],
        }
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
        let blob = encode(&img);
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
        assert_eq!(back.volumes[2].pages[0].1[0], 3);
        assert_eq!((back.data_chains, back.shards.len()), (2, 3));
        assert!(back.keyed_fingerprints);
        assert_eq!(back.index, [(0xdead_beef, 3)]);
    }

    #[test]
    fn shared_domains_keep_older_versions_and_keyed_flag() {
        // Only shared volumes: the version older binaries read, as before.
        let mut img = image(2, 2);
        img.volumes = vec![volume(1, DedupDomain::Shared)];
        let blob = encode(&img);
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        assert_eq!(h.version, CHECKPOINT_VERSION_PLAIN);
        assert_ne!(h.flags & CHECKPOINT_KEYED, 0);
        let back = decode(&blob, 16).unwrap();
        assert!(back.keyed_fingerprints);
        assert_eq!(back.volumes[0].domain, DedupDomain::Shared);
        // A checkpoint written before keyed fingerprints: no flag, its index is not trusted.
        img.keyed_fingerprints = false;
        let back = decode(&encode(&img), 16).unwrap();
        assert!(!back.keyed_fingerprints);
    }

    #[test]
    fn bad_dedup_domain_is_corrupt() {
        let mut img = image(1, 1);
        img.volumes = vec![volume(1, DedupDomain::Named("abc".into()))];
        let blob = encode(&img);
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
        let plain = encode(&img);
        let h = CheckpointHeader::decode(&mut Get::new(&plain, "t")).unwrap();
        assert_eq!(h.flags & CHECKPOINT_QOS, 0);
        let limits = QosLimits {
            iops_limit: 1000,
            bandwidth_limit_bytes: 20 << 20,
            burst_iops: 50,
            burst_bytes: 0,
        };
        img.volumes[1].qos = limits;
        let blob = encode(&img);
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
        let blob = encode(&image(2, 3));
        let h = CheckpointHeader::decode(&mut Get::new(&blob, "t")).unwrap();
        assert_eq!(h.version, CHECKPOINT_VERSION_MOVE_CHAINS);
        let img = decode(&blob, 16).unwrap();
        assert_eq!((img.data_chains, img.shards.len()), (2, 3));
        assert_eq!(img.shards[2].next, 12);
    }

    #[test]
    fn checkpoint_without_move_chain_stays_version_1() {
        let blob = encode(&image(2, 2));
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
        let blob = encode(&img);
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
