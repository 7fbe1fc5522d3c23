//! Replay of the records written after the last checkpoint.
//!
//! Each shard's chain is read from its checkpoint position: records must carry the
//! checkpoint's epoch, this segment's number and the next per-shard sequence number. The chain
//! continues into the reserved next segment when its header is valid. Where the expected record
//! is missing or unreadable (a write that failed with an error while later ones succeeded, or a
//! torn write at a power cut), replay goes on at the next valid record of the chain in the same
//! segment: unflushed writes carry no ordering promise, and the acknowledged ones after a failed
//! write must survive a process crash. A missing record that a later record declares flushed
//! (`durable_shard_seq`) makes the open fail with `Corrupt` instead of silently losing it. A
//! record whose payload checksum fails is dropped, unless a later record says it had been
//! flushed: then it is corruption, applied so that reads of the block report it.

use crate::error::{Error, Result};
use crate::format::{
    DataEntry, RecordHeader, RecordKind, SegmentHeader, SegmentKind, TrimEntry, FLAG_REF, IO_ALIGN,
    NO_SEGMENT, SEGMENT_HEADER_BYTES,
};
use crate::io::{AlignedBuf, Devices};
use crate::pool::Geometry;
use crate::shard::ShardPosition;
use crate::space::BlockEntry;

pub(crate) enum Entry {
    Data(DataEntry),
    Trim(TrimEntry),
    /// A cleaner move: `lba` holds the old location (see `RecordKind::Move`).
    Move(DataEntry),
}

pub(crate) struct ReplayRecord {
    pub seq: u64,
    pub shard: u16,
    pub segment: u32,
    /// Byte offset of the record in its segment.
    pub offset: u32,
    pub entries: Vec<Entry>,
}

impl ReplayRecord {
    /// Where the payload of entry `d` of this record lives.
    pub fn block_entry(&self, d: &DataEntry) -> BlockEntry {
        BlockEntry {
            segment: self.segment,
            offset: self.offset + d.payload_offset,
            stored_len: d.stored_len as u16,
            flags: d.flags,
            crc: d.payload_crc,
            refs: 0,
            generation: 0,
        }
    }
}

pub(crate) struct ChainScan {
    pub records: Vec<ReplayRecord>,
    /// Every segment the chain touched (to keep until the next checkpoint).
    pub segments: Vec<u32>,
    /// Just past the last record replayed (segment, offset, that segment's next): a new chain
    /// may continue there instead of taking a fresh segment.
    pub end: ShardPosition,
}

struct Scanned {
    rec: ReplayRecord,
    shard_seq: u64,
    durable: u64,
    payload_ok: bool,
    end: u64,
    next: u32,
}

/// Read one shard's chain.
pub(crate) fn scan_chain(
    dev: &dyn Devices,
    geo: &Geometry,
    pool_uuid: &[u8; 16],
    epoch: u64,
    shard: u16,
    start: ShardPosition,
) -> Result<ChainScan> {
    let mut scanned: Vec<Scanned> = Vec::new();
    let mut segments = Vec::new();
    // First missing shard_seq of each hole skipped over.
    let mut holes: Vec<u64> = Vec::new();
    let mut seg = start.segment;
    let mut next = start.next;
    let mut off = u64::from(start.offset);
    let mut expect = start.shard_seq;
    let seg_bytes = geo.segment_bytes;
    let mut first = AlignedBuf::new(IO_ALIGN);
    'chain: while seg != NO_SEGMENT && (seg as usize) < geo.total_segments as usize {
        segments.push(seg);
        let (d, base) = geo.locate(seg);
        // The rest of the segment in one read: replay is bounded by the device's sequential
        // bandwidth, not by a read per record.
        let seg_start = off.min(seg_bytes);
        let mut segbuf = AlignedBuf::new((seg_bytes - seg_start) as usize);
        let seg_len = (seg_bytes - seg_start) as usize;
        if seg_len > 0
            && dev
                .read_at(d, &mut segbuf[..seg_len], base + seg_start)
                .is_err()
        {
            break 'chain;
        }
        while off + IO_ALIGN as u64 <= seg_bytes {
            let rel = (off - seg_start) as usize;
            let mut rec = RecordHeader::decode(&segbuf[rel..rel + IO_ALIGN]).filter(|h| {
                h.epoch == epoch
                    && h.segment == seg
                    && h.shard == shard
                    && h.shard_seq == expect
                    && off + u64::from(h.record_bytes) <= seg_bytes
            });
            let mut buf: &[u8] = &[];
            if let Some(h) = &rec {
                buf = &segbuf[rel..rel + h.record_bytes as usize];
                if !h.verify(&buf[..h.header_bytes as usize]) {
                    rec = None;
                }
            }
            let Some(h) = rec else {
                // Not the expected record: a hole left by a failed write (later records were
                // acknowledged after it), a torn or reordered write at a power cut, or the end
                // of this segment's records. Go on at the next valid record of the chain in this
                // segment, if any; holes that a later record declares flushed are refused below.
                match find_next_record(dev, geo, seg, off + IO_ALIGN as u64, epoch, shard, expect) {
                    Some((at, seq)) => {
                        holes.push(expect);
                        off = at;
                        expect = seq;
                        continue;
                    }
                    None => break,
                }
            };
            let eb = h.entry_bytes();
            let mut entries = Vec::with_capacity(h.entry_count as usize);
            let mut payload_ok = true;
            for i in 0..h.entry_count as usize {
                let at = RecordHeader::BYTES + i * eb;
                let raw = &buf[at..at + eb];
                match h.kind {
                    RecordKind::Data => {
                        let e = DataEntry::decode(raw)?;
                        // Dedup references carry no payload.
                        if e.block_id != 0 && e.flags & FLAG_REF == 0 {
                            let p = e.payload_offset as usize;
                            let ok = p >= h.header_bytes as usize
                                && p + e.stored_len as usize <= buf.len()
                                && crc32fast::hash(&buf[p..p + e.stored_len as usize])
                                    == e.payload_crc;
                            payload_ok &= ok;
                        }
                        entries.push(Entry::Data(e));
                    }
                    RecordKind::Trim => entries.push(Entry::Trim(TrimEntry::decode(raw)?)),
                    RecordKind::Move => {
                        // A move whose copy did not land (or whose source was already corrupt)
                        // is dropped: the block stays where it was, which the cleaner frees
                        // only after a checkpoint that covers the move.
                        let e = DataEntry::decode(raw)?;
                        let p = e.payload_offset as usize;
                        let ok = p >= h.header_bytes as usize
                            && p + e.stored_len as usize <= buf.len()
                            && crc32fast::hash(&buf[p..p + e.stored_len as usize]) == e.payload_crc;
                        if ok {
                            entries.push(Entry::Move(e));
                        }
                    }
                }
            }
            scanned.push(Scanned {
                rec: ReplayRecord {
                    seq: h.seq,
                    shard,
                    segment: seg,
                    offset: off as u32,
                    entries,
                },
                shard_seq: h.shard_seq,
                durable: h.durable_shard_seq,
                payload_ok,
                end: off + u64::from(h.record_bytes),
                next,
            });
            expect += 1;
            off += u64::from(h.record_bytes);
        }
        // End of the records in this segment: follow the chain if the next one was opened.
        if next == NO_SEGMENT {
            break;
        }
        let (nd, nbase) = geo.locate(next);
        if dev.read_at(nd, &mut first, nbase).is_err() {
            break;
        }
        match SegmentHeader::decode(&first) {
            // A segment already in this chain ends it: a freed segment keeps its header until
            // it is written again (always on a prefilled pool, which is never punched), and
            // headers of this epoch's earlier uses can point back into the chain. Within the
            // replayed part no segment is used twice: none is freed before a checkpoint covers it.
            Some(sh)
                if sh.kind == SegmentKind::Data
                    && sh.segment == next
                    && sh.epoch == epoch
                    && sh.shard == shard
                    && &sh.pool_uuid == pool_uuid
                    && !segments.contains(&next) =>
            {
                seg = next;
                next = sh.next_segment;
                off = SEGMENT_HEADER_BYTES;
            }
            _ => break,
        }
    }
    let durable = scanned.iter().map(|s| s.durable).max().unwrap_or(0);
    // A missing or unreadable record that a later record declares flushed: its entries are
    // unknown, so opening would silently lose a durable write.
    if holes.iter().any(|&h| h < durable) {
        return Err(Error::Corrupt {
            what: "a flushed log record is missing or unreadable (bad record header)",
        });
    }
    // A bad payload at or below what a later record declares flushed is corruption (kept, so
    // that reads of the block report it); above it, a torn write that was never flushed
    // (dropped, like a hole).
    let mut records = Vec::with_capacity(scanned.len());
    let mut end = start;
    for s in scanned {
        if !s.payload_ok && s.shard_seq >= durable {
            continue;
        }
        end = ShardPosition {
            segment: s.rec.segment,
            offset: s.end as u32,
            next: s.next,
            shard_seq: s.shard_seq + 1,
        };
        records.push(s.rec);
    }
    Ok(ChainScan {
        records,
        segments,
        end,
    })
}

/// The first valid record of this chain in `seg` at or after byte `from` (4 KiB-aligned) with a
/// shard_seq above `expect`: (offset, shard_seq). Records of earlier uses of the segment carry
/// older epochs or lower shard_seqs and are passed over.
fn find_next_record(
    dev: &dyn Devices,
    geo: &Geometry,
    seg: u32,
    from: u64,
    epoch: u64,
    shard: u16,
    expect: u64,
) -> Option<(u64, u64)> {
    const CHUNK: u64 = 1 << 20;
    let seg_bytes = geo.segment_bytes;
    let (d, base) = geo.locate(seg);
    let mut pos = from;
    while pos + IO_ALIGN as u64 <= seg_bytes {
        let n = (seg_bytes - pos).min(CHUNK) / IO_ALIGN as u64 * IO_ALIGN as u64;
        let mut buf = AlignedBuf::new(n as usize);
        if dev.read_at(d, &mut buf, base + pos).is_err() {
            return None;
        }
        for i in (0..n as usize).step_by(IO_ALIGN) {
            let Some(h) = RecordHeader::decode(&buf[i..]) else {
                continue;
            };
            let at = pos + i as u64;
            if h.epoch != epoch
                || h.shard != shard
                || h.segment != seg
                || h.shard_seq <= expect
                || at + u64::from(h.record_bytes) > seg_bytes
            {
                continue;
            }
            let mut area = AlignedBuf::new(h.header_bytes as usize);
            if dev.read_at(d, &mut area, base + at).is_ok() && h.verify(&area) {
                return Some((at, h.shard_seq));
            }
        }
        pos += n;
    }
    None
}
