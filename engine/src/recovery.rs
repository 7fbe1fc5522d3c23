//! Replay of the records written after the last checkpoint.
//!
//! Each shard's chain is read from its checkpoint position: records must carry the
//! checkpoint's epoch, this segment's number and the next per-shard sequence number. The chain
//! continues into the reserved next segment when its header is valid. The first record that
//! fails these checks ends the chain (a torn tail). A record whose header is valid but whose
//! payload checksum fails ends it too, unless a later record of the chain says it had been
//! flushed (`durable_shard_seq`): then it is corruption, applied so that reads of the block
//! report it, never silently dropped.

use crate::error::{Error, Result};
use crate::format::{
    DataEntry, RecordHeader, RecordKind, SegmentHeader, SegmentKind, TrimEntry, IO_ALIGN,
    NO_SEGMENT, SEGMENT_HEADER_BYTES,
};
use crate::io::{AlignedBuf, Devices};
use crate::pool::Geometry;
use crate::shard::ShardPosition;

pub(crate) enum Entry {
    Data(DataEntry),
    Trim(TrimEntry),
}

pub(crate) struct ReplayRecord {
    pub seq: u64,
    pub shard: u16,
    pub segment: u32,
    /// Byte offset of the record in its segment.
    pub offset: u32,
    pub entries: Vec<Entry>,
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
            let Some(h) = RecordHeader::decode(&segbuf[rel..rel + IO_ALIGN]) else {
                break;
            };
            if h.epoch != epoch
                || h.segment != seg
                || h.shard != shard
                || h.shard_seq != expect
                || off + u64::from(h.record_bytes) > seg_bytes
            {
                break;
            }
            let buf = &segbuf[rel..rel + h.record_bytes as usize];
            if !h.verify(&buf[..h.header_bytes as usize]) {
                break 'chain;
            }
            let eb = h.entry_bytes();
            let mut entries = Vec::with_capacity(h.entry_count as usize);
            let mut payload_ok = true;
            for i in 0..h.entry_count as usize {
                let at = RecordHeader::BYTES + i * eb;
                let raw = &buf[at..at + eb];
                match h.kind {
                    RecordKind::Data => {
                        let e = DataEntry::decode(raw)?;
                        if e.block_id != 0 {
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
            Some(sh)
                if sh.kind == SegmentKind::Data
                    && sh.segment == next
                    && sh.epoch == epoch
                    && sh.shard == shard
                    && &sh.pool_uuid == pool_uuid =>
            {
                seg = next;
                next = sh.next_segment;
                off = SEGMENT_HEADER_BYTES;
            }
            _ => break,
        }
    }
    // Where the chain stopped, a record that does not decode, verify or follow on is a torn
    // tail, unless a later record of the chain says it had been flushed: then it is corruption
    // of a durable record whose entries are unknown, and opening would silently lose it and
    // every flushed record after it.
    let (gseg, goff, gnext) = scanned
        .last()
        .map_or((start.segment, u64::from(start.offset), start.next), |s| {
            (s.rec.segment, s.end, s.next)
        });
    if later_record_says_flushed(
        dev,
        geo,
        pool_uuid,
        epoch,
        shard,
        (gseg, goff, gnext),
        expect,
    ) {
        return Err(Error::Corrupt {
            what: "a flushed log record is unreadable (bad record header), records after it were flushed too",
        });
    }
    // A bad payload at or below what a later record declares flushed is corruption (kept);
    // above it, a torn tail (the chain ends there).
    let durable = scanned.iter().map(|s| s.durable).max().unwrap_or(0);
    let mut records = Vec::with_capacity(scanned.len());
    let mut end = start;
    for s in scanned {
        if !s.payload_ok && s.shard_seq >= durable {
            break;
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

/// Whether a record of this chain after the stop at `from` (segment, offset, that segment's
/// next) declares record `expect` flushed (`durable_shard_seq > expect`). Searches the rest of
/// the segment and the chain's next segment, 4 KiB-aligned, for valid record headers.
fn later_record_says_flushed(
    dev: &dyn Devices,
    geo: &Geometry,
    pool_uuid: &[u8; 16],
    epoch: u64,
    shard: u16,
    from: (u32, u64, u32),
    expect: u64,
) -> bool {
    const CHUNK: u64 = 1 << 20;
    let (seg, off, next) = from;
    let seg_bytes = geo.segment_bytes;
    let mut places = Vec::new();
    if seg != NO_SEGMENT && seg < geo.total_segments {
        places.push((seg, off));
    }
    if next != NO_SEGMENT && next < geo.total_segments {
        let (d, base) = geo.locate(next);
        let mut hdr = AlignedBuf::new(IO_ALIGN);
        if dev.read_at(d, &mut hdr, base).is_ok() {
            if let Some(sh) = SegmentHeader::decode(&hdr) {
                if sh.kind == SegmentKind::Data
                    && sh.segment == next
                    && sh.epoch == epoch
                    && sh.shard == shard
                    && &sh.pool_uuid == pool_uuid
                {
                    places.push((next, SEGMENT_HEADER_BYTES));
                }
            }
        }
    }
    for (s, from) in places {
        let (d, base) = geo.locate(s);
        let mut pos = from;
        while pos + IO_ALIGN as u64 <= seg_bytes {
            let n = (seg_bytes - pos).min(CHUNK) / IO_ALIGN as u64 * IO_ALIGN as u64;
            let mut buf = AlignedBuf::new(n as usize);
            if dev.read_at(d, &mut buf, base + pos).is_err() {
                break;
            }
            for i in (0..n as usize).step_by(IO_ALIGN) {
                let Some(h) = RecordHeader::decode(&buf[i..]) else {
                    continue;
                };
                let at = pos + i as u64;
                if h.epoch != epoch
                    || h.shard != shard
                    || h.segment != s
                    || h.shard_seq <= expect
                    || h.durable_shard_seq <= expect
                    || at + u64::from(h.record_bytes) > seg_bytes
                {
                    continue;
                }
                let mut area = AlignedBuf::new(h.header_bytes as usize);
                if dev.read_at(d, &mut area, base + at).is_ok() && h.verify(&area) {
                    return true;
                }
            }
            pos += n;
        }
    }
    false
}
