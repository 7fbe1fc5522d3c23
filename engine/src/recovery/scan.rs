//! Replay of the records written after the last checkpoint.
//!
//! Each shard's chain is walked from its checkpoint position, record by record: a record must
//! lie exactly where the previous one ended, carry the checkpoint's epoch, this segment's
//! number, this shard and the next per-shard sequence number, and verify its MAC under the
//! pool's key, the nonce of the segment's current use and its own offset ([`RecordSeal`]).
//! Replay never searches for records: whatever lies past the end of the chain (payloads,
//! stale data of earlier uses, bytes a client crafted to look like records, exact copies of
//! genuine records) is never read as metadata. A record whose write failed is not a gap: the
//! shard writes a `Void` record over its header, which replay steps over. The chain continues
//! into the reserved next segment when that segment's header verifies.
//!
//! Where the expected record is missing or does not verify, the chain ends there (a torn write
//! at a power cut, or the end of the log): nothing after it was flushed, since a flush waits
//! for every record before it. One exception is checked: a header that still names the
//! expected record but fails its MAC (bit rot) while the next record, right after it, verifies
//! and declares it flushed (`durable_shard_seq`) makes the open fail with `Corrupt` instead of
//! silently losing flushed writes. A record whose payload checksum fails is dropped, unless a
//! later record says it had been flushed: then it is corruption, applied so that reads of the
//! block report it. A read error is reported with its device and offset, never taken for the
//! end of the log.
//!
//! Small records are read a window of 256 KiB at a time; after a record of 256 KiB or more,
//! the next record's header area is read on its own, and the payloads of such records are
//! read only where their checksums decide something: records no later one declares flushed
//! (read together, 8 MiB at a time), and moves, whose copy must have landed. A flushed tail
//! of large writes is then replayed from its headers, a few percent of its bytes.
//!
//! Version 1 pools (no key) are replayed once with version 1 rules (records sealed by CRC-32,
//! the same walk), then upgraded by the open's recovery checkpoint.

use crate::error::{Error, Result};
use crate::format::{
    DataEntry, LogKey, RecordHeader, RecordKind, RecordSeal, SegmentHeader, SegmentKind, TrimEntry,
    FLAG_REF, IO_ALIGN, NO_SEGMENT, SEGMENT_HEADER_BYTES,
};
use crate::io::AlignedBuf;
use crate::log::ShardPosition;
use crate::space::BlockEntry;
use crate::space::Geometry;
use crate::store::{self, Range, SegmentStore};

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
        }
    }
}

pub(crate) struct ChainScan {
    pub records: Vec<ReplayRecord>,
    /// Every segment the chain touched (to keep until the next checkpoint).
    pub segments: Vec<u32>,
    /// Just past the last record replayed (segment, offset, that segment's next, and the
    /// segment's nonce when its header verified): a new chain may continue there instead of
    /// taking a fresh segment.
    pub end: ShardPosition,
}

struct Scanned {
    rec: ReplayRecord,
    shard_seq: u64,
    durable: u64,
    /// `None`: not checked yet (the record was walked by its header alone).
    payload_ok: Option<bool>,
    end: u64,
    next: u32,
    nonce: Option<[u8; 16]>,
    /// The record's header (to check its payloads later).
    header: RecordHeader,
}

/// Bytes of a segment read at once while its records are small.
const WINDOW: usize = 256 << 10;

/// Records of at least this many bytes (a window's worth: skipping less would cost more reads
/// than it saves) are walked by their headers: the next record's header is read on its own,
/// the payloads only when they must be checked.
const LARGE_RECORD: u32 = WINDOW as u32;

/// Bytes of records whose payloads must be checked read at once, records that follow each
/// other in a segment together.
const CHECK_SPAN: u64 = 8 << 20;

/// The part of a segment the walk has read: a window of [`WINDOW`] bytes while records are
/// small, the header area of one record at a time after a large one.
struct SegReader<'a> {
    store: &'a dyn SegmentStore,
    seg: u32,
    seg_bytes: u64,
    start: u64,
    buf: AlignedBuf,
    /// Read only what is asked for (after a large record).
    exact: bool,
}

impl SegReader<'_> {
    /// `len` bytes at `off` (cut at the segment's end), reading if they are not held.
    fn at(&mut self, off: u64, len: usize) -> Result<&[u8]> {
        debug_assert!(
            off + len as u64 <= self.seg_bytes,
            "a read past the segment"
        );
        let end = (off + len as u64).min(self.seg_bytes);
        if off < self.start || end > self.start + self.buf.len() as u64 {
            let want = (end - off) as usize;
            let n = if self.exact {
                want.next_multiple_of(IO_ALIGN)
            } else {
                want.max(WINDOW)
            }
            .min((self.seg_bytes - off) as usize);
            self.buf = if n > 0 {
                read(self.store, self.seg, off, n)?
            } else {
                AlignedBuf::new(IO_ALIGN)
            };
            self.start = off;
        }
        let rel = (off - self.start) as usize;
        Ok(&self.buf[rel..(rel + (end - off) as usize).min(self.buf.len())])
    }
}

/// What a chain's records must match.
struct Expect<'a> {
    key: Option<&'a LogKey>,
    pool_uuid: &'a [u8; 16],
    epoch: u64,
    shard: u16,
}

impl Expect<'_> {
    /// The header at `off` of `seg` (its bytes from there on in `buf`) if it is record
    /// `shard_seq` of this chain and verifies.
    fn record(
        &self,
        buf: &[u8],
        seg: u32,
        off: u64,
        seg_bytes: u64,
        nonce: Option<[u8; 16]>,
        shard_seq: u64,
    ) -> Option<RecordHeader> {
        let h = self.named(buf, seg, off, seg_bytes, shard_seq)?;
        let area = buf.get(..h.header_bytes as usize)?;
        let ok = match (self.key, nonce) {
            (Some(key), Some(nonce)) => h.verify(
                area,
                Some(&RecordSeal {
                    key,
                    nonce,
                    offset: off as u32,
                }),
            ),
            (None, _) => h.verify(area, None),
            (Some(_), None) => false,
        };
        ok.then_some(h)
    }

    /// The header at `off` if its fields name record `shard_seq` of this chain, before any
    /// check of its seal.
    fn named(
        &self,
        buf: &[u8],
        seg: u32,
        off: u64,
        seg_bytes: u64,
        shard_seq: u64,
    ) -> Option<RecordHeader> {
        let version = if self.key.is_some() {
            crate::format::FORMAT_VERSION as u16
        } else {
            1
        };
        RecordHeader::decode(buf).filter(|h| {
            h.version == version
                && h.epoch == self.epoch
                && h.segment == seg
                && h.shard == self.shard
                && h.shard_seq == shard_seq
                && off + u64::from(h.record_bytes) <= seg_bytes
        })
    }

    /// The header of `seg` if it is a data segment of this pool (authentic for its version);
    /// `epoch` and `shard` when it must have been opened by this chain.
    fn segment(&self, buf: &[u8], seg: u32, opened_here: bool) -> Option<SegmentHeader> {
        SegmentHeader::decode_authentic(buf, self.key).filter(|sh| {
            sh.kind == SegmentKind::Data
                && sh.segment == seg
                && &sh.pool_uuid == self.pool_uuid
                && (!opened_here || (sh.epoch == self.epoch && sh.shard == self.shard))
        })
    }
}

/// `len` bytes at `at` of segment `seg`. Recovery reads as epoch 0: the new epoch is not known
/// yet (reads are never fenced).
fn read(store: &dyn SegmentStore, seg: u32, at: u64, len: usize) -> Result<AlignedBuf> {
    let range = Range {
        segment: seg,
        offset: at,
    };
    store::read_now(store, 0, range, len)
}

/// Read one shard's chain. `key` is the pool's log key (`None` for a version 1 pool).
pub(crate) fn scan_chain(
    store: &dyn SegmentStore,
    geo: &Geometry,
    pool_uuid: &[u8; 16],
    key: Option<&LogKey>,
    epoch: u64,
    shard: u16,
    start: ShardPosition,
) -> Result<ChainScan> {
    let want = Expect {
        key,
        pool_uuid,
        epoch,
        shard,
    };
    let mut scanned: Vec<Scanned> = Vec::new();
    let mut segments = Vec::new();
    let mut seg = start.segment;
    let mut next = start.next;
    let mut off = u64::from(start.offset);
    let mut expect = start.shard_seq;
    let seg_bytes = geo.segment_bytes;
    let mut start_nonce = None;
    if seg != NO_SEGMENT && seg < geo.total_segments {
        // The start segment may have been opened in an earlier epoch (a chain continues past a
        // reopen): only its nonce matters here.
        let first = read(store, seg, 0, IO_ALIGN)?;
        start_nonce = want.segment(&first, seg, false).map(|h| h.nonce);
    }
    let mut nonce = start_nonce;
    'chain: while seg != NO_SEGMENT && seg < geo.total_segments {
        segments.push(seg);
        // The segment's records from `off`: a window at a time while they are small (replay
        // is then bounded by the device's sequential bandwidth, not by a read per record),
        // header by header after a large one (its payloads are read only to check them).
        let mut r = SegReader {
            store,
            seg,
            seg_bytes,
            // Holds nothing yet.
            start: u64::MAX,
            buf: AlignedBuf::new(0),
            exact: false,
        };
        if key.is_some() && nonce.is_none() {
            // The segment's header does not verify: nothing in it can. A header that rotted
            // under records that were written is corruption, not an empty chain.
            if off + IO_ALIGN as u64 <= seg_bytes
                && want
                    .named(r.at(off, IO_ALIGN)?, seg, off, seg_bytes, expect)
                    .is_some()
            {
                return Err(Error::Corrupt {
                    what: "a log segment's header does not verify under records written after it",
                });
            }
            break 'chain;
        }
        while off + IO_ALIGN as u64 <= seg_bytes {
            let named = want.named(r.at(off, IO_ALIGN)?, seg, off, seg_bytes, expect);
            let sealed = match &named {
                Some(d) => {
                    let area = r.at(off, (d.header_bytes as usize).max(IO_ALIGN))?;
                    want.record(area, seg, off, seg_bytes, nonce, expect)
                }
                None => None,
            };
            let Some(h) = sealed else {
                // Not the expected record: the end of this segment's records (the chain goes
                // on in the next segment if it was opened), or a torn write. A damaged header
                // of a record that the next one declares flushed is corruption.
                if let Some(d) = named {
                    let after = off + u64::from(d.record_bytes);
                    if after + IO_ALIGN as u64 <= seg_bytes {
                        let next_named =
                            want.named(r.at(after, IO_ALIGN)?, seg, after, seg_bytes, expect + 1);
                        if let Some(nd) = next_named {
                            let area = r.at(after, (nd.header_bytes as usize).max(IO_ALIGN))?;
                            if let Some(n) =
                                want.record(area, seg, after, seg_bytes, nonce, expect + 1)
                            {
                                if n.durable_shard_seq > expect {
                                    return Err(Error::Corrupt {
                                        what: "a flushed log record's header does not verify",
                                    });
                                }
                            }
                        }
                    }
                    // Named but not sealed: a torn write (or bytes imitating one). Records
                    // after a torn one were never flushed; the chain ends here.
                    break 'chain;
                }
                break;
            };
            // The whole record when it is in the window already (or a move, whose payload
            // decides whether it applies), else its header area alone.
            let whole = h.kind == RecordKind::Move
                || (off >= r.start
                    && off + u64::from(h.record_bytes) <= r.start + r.buf.len() as u64);
            let buf = if whole {
                r.at(off, h.record_bytes as usize)?
            } else {
                r.at(off, h.header_bytes as usize)?
            };
            let eb = h.entry_bytes();
            let mut entries = Vec::with_capacity(h.entry_count as usize);
            let mut payload_ok = whole.then_some(true);
            for i in 0..h.entry_count as usize {
                let at = h.entries_at() + i * eb;
                let raw = &buf[at..at + eb];
                match h.kind {
                    RecordKind::Data => {
                        let e = DataEntry::decode(raw)?;
                        // Dedup references carry no payload.
                        if whole && e.block_id != 0 && e.flags & FLAG_REF == 0 {
                            payload_ok =
                                Some(payload_ok == Some(true) && payload_matches(buf, &h, &e));
                        }
                        entries.push(Entry::Data(e));
                    }
                    RecordKind::Trim => entries.push(Entry::Trim(TrimEntry::decode(raw)?)),
                    RecordKind::Move => {
                        // A move whose copy did not land (or whose source was already corrupt)
                        // is dropped: the block stays where it was, which the cleaner frees
                        // only after a checkpoint that covers the move.
                        let e = DataEntry::decode(raw)?;
                        if payload_matches(buf, &h, &e) {
                            entries.push(Entry::Move(e));
                        }
                    }
                    // A failed write's space: nothing to apply.
                    RecordKind::Void => {}
                }
            }
            // Nothing to check in a record without payloads (trims, references, voids).
            let has_payload = entries
                .iter()
                .any(|e| matches!(e, Entry::Data(d) if d.block_id != 0 && d.flags & FLAG_REF == 0));
            if !has_payload {
                payload_ok = Some(payload_ok != Some(false));
            }
            let record_bytes = h.record_bytes;
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
                end: off + u64::from(record_bytes),
                next,
                nonce,
                header: h,
            });
            // Past a large record, its successor's header is read on its own.
            r.exact = record_bytes >= LARGE_RECORD;
            expect += 1;
            off += u64::from(record_bytes);
        }
        // End of the records in this segment: follow the chain if the next one was opened.
        if next == NO_SEGMENT || next >= geo.total_segments {
            break;
        }
        let first = read(store, next, 0, IO_ALIGN)?;
        match want.segment(&first, next, true) {
            // A segment already in this chain ends it: a freed segment keeps its header until
            // it is written again (always on a prefilled pool, which is never punched), and
            // headers of this epoch's earlier uses can point back into the chain. Within the
            // replayed part no segment is used twice: none is freed before a checkpoint covers it.
            Some(sh) if !segments.contains(&next) => {
                seg = next;
                next = sh.next_segment;
                nonce = Some(sh.nonce);
                off = SEGMENT_HEADER_BYTES;
            }
            _ => break,
        }
    }
    let durable = scanned.iter().map(|s| s.durable).max().unwrap_or(0);
    // A bad payload at or below what a later record declares flushed is corruption (kept, so
    // that reads of the block report it); above it, a torn write that was never flushed
    // (dropped).
    // Payloads walked past by header are read now where they decide (records no later one
    // declares flushed: a torn write drops them), adjacent records in one read; below that,
    // a bad one is kept either way.
    check_deferred(store, &mut scanned, durable)?;
    let mut records = Vec::with_capacity(scanned.len());
    let mut end = ShardPosition {
        nonce: start_nonce,
        ..start
    };
    for s in scanned {
        if s.payload_ok == Some(false) && s.shard_seq >= durable {
            continue;
        }
        end = ShardPosition {
            segment: s.rec.segment,
            offset: s.end as u32,
            next: s.next,
            shard_seq: s.shard_seq + 1,
            nonce: s.nonce,
        };
        records.push(s.rec);
    }
    Ok(ChainScan {
        records,
        segments,
        end,
    })
}

/// Check the payloads of the records walked past by their headers whose checksums decide
/// (`shard_seq >= durable`), reading records that follow each other in a segment together,
/// up to [`CHECK_SPAN`] bytes at a time.
fn check_deferred(store: &dyn SegmentStore, scanned: &mut [Scanned], durable: u64) -> Result<()> {
    let due = |s: &Scanned| s.payload_ok.is_none() && s.shard_seq >= durable;
    let mut i = 0;
    while i < scanned.len() {
        if !due(&scanned[i]) {
            i += 1;
            continue;
        }
        let (seg, from) = (scanned[i].rec.segment, u64::from(scanned[i].rec.offset));
        let mut j = i + 1;
        while j < scanned.len()
            && due(&scanned[j])
            && scanned[j].rec.segment == seg
            && u64::from(scanned[j].rec.offset) == scanned[j - 1].end
            && scanned[j].end - from <= CHECK_SPAN
        {
            j += 1;
        }
        let buf = read(store, seg, from, (scanned[j - 1].end - from) as usize)?;
        for s in &mut scanned[i..j] {
            let at = (u64::from(s.rec.offset) - from) as usize;
            let rec = &buf[at..at + s.header.record_bytes as usize];
            let ok = s.rec.entries.iter().all(|e| match e {
                Entry::Data(d) if d.block_id != 0 && d.flags & FLAG_REF == 0 => {
                    payload_matches(rec, &s.header, d)
                }
                _ => true,
            });
            s.payload_ok = Some(ok);
        }
        i = j;
    }
    Ok(())
}

/// Whether entry `e`'s payload lies in the record's payload area and matches its CRC.
fn payload_matches(buf: &[u8], h: &RecordHeader, e: &DataEntry) -> bool {
    let p = e.payload_offset as usize;
    p >= h.header_bytes as usize
        && p.checked_add(e.stored_len as usize)
            .is_some_and(|end| end <= buf.len())
        && crc32fast::hash(&buf[p..p + e.stored_len as usize]) == e.payload_crc
}
