//! Reading the checkpoint a superblock points at.

use crate::space::Geometry;

use crate::checkpoint::{self, Image};
use crate::error::{Error, Result};
use crate::format::{SegmentHeader, SegmentKind, Superblock, NO_SEGMENT, SEGMENT_HEADER_BYTES};
use crate::space::BlockEntry;
use crate::store::{self, Range, SegmentStore};

/// Read and verify the checkpoint the superblock points at; returns it and its segments.
pub(crate) fn read_checkpoint(
    store: &dyn SegmentStore,
    geo: &Geometry,
    sb: &Superblock,
) -> Result<(Image, Vec<u32>)> {
    let per_seg = geo.segment_bytes - SEGMENT_HEADER_BYTES;
    let len = sb.checkpoint_bytes;
    if len > u64::from(geo.total_segments) * per_seg {
        return Err(Error::Corrupt {
            what: "checkpoint length",
        });
    }
    let mut blob = Vec::with_capacity(len as usize);
    let mut segs = Vec::new();
    let mut seg = sb.checkpoint_segment;
    while (blob.len() as u64) < len {
        if seg == NO_SEGMENT || seg >= geo.total_segments || segs.contains(&seg) {
            return Err(Error::Corrupt {
                what: "checkpoint segment chain",
            });
        }
        let want = (len - blob.len() as u64).min(per_seg) as usize;
        // Before the new epoch is known: recovery reads as epoch 0 (reads are never fenced).
        let at = Range {
            segment: seg,
            offset: 0,
        };
        let buf = store::read_now(store, 0, at, SEGMENT_HEADER_BYTES as usize + want)?;
        let h =
            SegmentHeader::decode_authentic(&buf, sb.log_key.as_ref()).ok_or(Error::Corrupt {
                what: "checkpoint segment header",
            })?;
        if h.kind != SegmentKind::Checkpoint || h.segment != seg || h.pool_uuid != sb.pool_uuid {
            return Err(Error::Corrupt {
                what: "checkpoint segment header",
            });
        }
        blob.extend_from_slice(
            &buf[SEGMENT_HEADER_BYTES as usize..SEGMENT_HEADER_BYTES as usize + want],
        );
        segs.push(seg);
        seg = h.next_segment;
    }
    if crc32fast::hash(&blob) != sb.checkpoint_crc {
        return Err(Error::Corrupt {
            what: "checkpoint checksum",
        });
    }
    // Block ids outnumber the pool's 4 KiB slots: compressed blocks share payloads (8 blocks of
    // a repeated byte take ~140 bytes), and ids freed since a checkpoint are reused only after
    // it. A slot per 8 bytes bounds both; more is corruption, refused before the allocation.
    let max_blocks = u64::from(geo.total_segments) * geo.segment_bytes / 8 + 1;
    let image = checkpoint::decode(&blob, max_blocks)?;
    Ok((image, segs))
}

/// The checkpoint the superblocks `sbs` point at (`newest` is the one with the highest
/// generation), or an empty image for a pool that never wrote one. A commit that stopped
/// between its two slot writes left the previous checkpoint in every device's other slot
/// (`older`), with everything its replay needs (nothing is freed before both slots point at
/// the new one): when the newest is damaged, the pool opens from that one, and `sbs` and
/// `newest` become its superblocks.
pub(crate) fn load_checkpoint(
    store: &dyn SegmentStore,
    geo: &Geometry,
    sbs: &mut Vec<Superblock>,
    older: &[Option<Superblock>],
    newest: &mut Superblock,
) -> Result<(Image, Vec<u32>)> {
    if newest.checkpoint_segment == NO_SEGMENT {
        let image = Image {
            seq: 1,
            epoch: 0,
            next_volume_id: 1,
            volumes: Vec::new(),
            blocks: vec![BlockEntry::default()].into(),
            refs: crate::space::RefCounts::with_len(1),
            shards: Vec::new(),
            data_chains: 0,
            index: Vec::new(),
            index_sample_bits: 0,
            // Whoever wrote a log without a checkpoint, its fingerprints are not trusted to
            // be keyed: nothing is lost but dedup candidates.
            keyed_fingerprints: false,
        };
        return Ok((image, Vec::new()));
    }
    match read_checkpoint(store, geo, newest) {
        Err(e @ Error::Corrupt { .. }) => {
            // Per device, the previous generation: in its other slot, or in both slots when the
            // commit failed before it wrote this device (its segments were freed then, and may
            // have been reused, which is why the newest reads as damaged).
            let is_prev = |p: &Superblock| {
                p.generation + 1 == newest.generation
                    && p.checkpoint_segment != NO_SEGMENT
                    && p.log_key == newest.log_key
            };
            let prev: Option<Vec<Superblock>> = sbs
                .iter()
                .zip(older)
                .map(|(cur, o)| {
                    if is_prev(cur) {
                        Some(cur.clone())
                    } else {
                        o.clone().filter(is_prev)
                    }
                })
                .collect();
            let Some(prev) = prev else {
                return Err(e);
            };
            let c = read_checkpoint(store, geo, &prev[0]).map_err(|_| e)?;
            tracing::warn!(
                target: "ingot_engine::recovery",
                damaged = newest.generation,
                used = prev[0].generation,
                "the newest checkpoint is damaged; opened from the previous one, replaying the \
                 log since"
            );
            *newest = prev[0].clone();
            *sbs = prev;
            Ok(c)
        }
        r => r,
    }
}
