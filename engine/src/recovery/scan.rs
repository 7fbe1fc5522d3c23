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
//! A first walk ([`survey_chain`]) decides where each chain ends and which torn records it
//! drops, holding the records only while they are few; a longer chain is walked again
//! ([`ChainRecords`]) as its records are applied, with the same rules but no payload checks,
//! and up to the record the first walk stopped after.
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

/// A record the walk verified.
struct Walked {
    rec: ReplayRecord,
    header: RecordHeader,
    /// `None`: not checked yet (walked by its header alone, or a second walk, which does not
    /// check).
    payload_ok: Option<bool>,
    /// Just past it.
    after: ShardPosition,
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
    /// After a large record: read only what is asked for, at least this many bytes (the last
    /// record's header area: the next one's is likely as large, and is then one read).
    exact: Option<usize>,
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
            let n = if let Some(least) = self.exact {
                want.max(least).next_multiple_of(IO_ALIGN)
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

/// One chain's walk from its checkpoint position, a record at a time (the rules in the module
/// doc).
pub(crate) struct ChainWalk<'a> {
    store: &'a dyn SegmentStore,
    want: Expect<'a>,
    total_segments: u32,
    seg_bytes: u64,
    seg: u32,
    next: u32,
    off: u64,
    expect: u64,
    nonce: Option<[u8; 16]>,
    /// The first segment's nonce (where an empty chain ends).
    start_nonce: Option<[u8; 16]>,
    /// Every segment the chain touched (to keep until the next checkpoint).
    segments: Vec<u32>,
    /// `None` while entering `seg`.
    reader: Option<SegReader<'a>>,
    done: bool,
    /// Check the payloads of data records read whole (a second walk does not: the first did).
    check: bool,
}

/// What a walk found at its position.
enum Step {
    Record(Box<Walked>),
    /// The end of this segment's records: the chain may go on in the next one.
    SegmentEnd,
    /// The end of the chain (a torn write, or bytes that are not its next record).
    ChainEnd,
}

/// The log every walk reads: where, and what its records must match.
#[derive(Clone, Copy)]
pub(crate) struct LogSource<'a> {
    pub store: &'a dyn SegmentStore,
    pub geo: &'a Geometry,
    pub pool_uuid: &'a [u8; 16],
    /// The pool's log key (`None` for a version 1 pool).
    pub key: Option<&'a LogKey>,
    /// The checkpoint's epoch, which its chains' records carry.
    pub epoch: u64,
}

impl<'a> ChainWalk<'a> {
    /// A walk of chain `shard` from `start`.
    fn new(
        src: LogSource<'a>,
        shard: u16,
        start: ShardPosition,
        check: bool,
    ) -> Result<ChainWalk<'a>> {
        let LogSource {
            store,
            geo,
            pool_uuid,
            key,
            epoch,
        } = src;
        let want = Expect {
            key,
            pool_uuid,
            epoch,
            shard,
        };
        let mut start_nonce = None;
        if start.segment != NO_SEGMENT && start.segment < geo.total_segments {
            // The start segment may have been opened in an earlier epoch (a chain continues
            // past a reopen): only its nonce matters here.
            let first = read(store, start.segment, 0, IO_ALIGN)?;
            start_nonce = want.segment(&first, start.segment, false).map(|h| h.nonce);
        }
        Ok(ChainWalk {
            store,
            want,
            total_segments: geo.total_segments,
            seg_bytes: geo.segment_bytes,
            seg: start.segment,
            next: start.next,
            off: u64::from(start.offset),
            expect: start.shard_seq,
            nonce: start_nonce,
            start_nonce,
            segments: Vec::new(),
            reader: None,
            done: false,
            check,
        })
    }

    /// The chain's next record, `None` at its end.
    fn next_record(&mut self) -> Result<Option<Box<Walked>>> {
        let seg_bytes = self.seg_bytes;
        loop {
            if self.done {
                return Ok(None);
            }
            if self.reader.is_none() {
                if self.seg == NO_SEGMENT || self.seg >= self.total_segments {
                    self.done = true;
                    continue;
                }
                self.segments.push(self.seg);
                // The segment's records from `off`: a window at a time while they are small
                // (replay is then bounded by the device's sequential bandwidth, not by a read
                // per record), header by header after a large one (its payloads are read only
                // to check them).
                let mut r = SegReader {
                    store: self.store,
                    seg: self.seg,
                    seg_bytes,
                    // Holds nothing yet.
                    start: u64::MAX,
                    buf: AlignedBuf::new(0),
                    exact: None,
                };
                if self.want.key.is_some() && self.nonce.is_none() {
                    // The segment's header does not verify: nothing in it can. A header that
                    // rotted under records that were written is corruption, not an empty chain.
                    if self.off + IO_ALIGN as u64 <= seg_bytes
                        && self
                            .want
                            .named(
                                r.at(self.off, IO_ALIGN)?,
                                self.seg,
                                self.off,
                                seg_bytes,
                                self.expect,
                            )
                            .is_some()
                    {
                        return Err(Error::Corrupt {
                            what: "a log segment's header does not verify under records written after it",
                        });
                    }
                    self.done = true;
                    continue;
                }
                self.reader = Some(r);
            }
            let step = if self.off + IO_ALIGN as u64 <= seg_bytes {
                let r = self.reader.as_mut().expect("entered above");
                step(r, &self.want, self.off, self.nonce, self.expect, self.check)?
            } else {
                Step::SegmentEnd
            };
            match step {
                Step::Record(mut w) => {
                    // Past a large record, its successor's header is read on its own.
                    let bytes = w.header.record_bytes;
                    if let Some(r) = self.reader.as_mut() {
                        r.exact = (bytes >= LARGE_RECORD).then_some(w.header.header_bytes as usize);
                    }
                    self.expect += 1;
                    self.off += u64::from(bytes);
                    w.after = ShardPosition {
                        segment: self.seg,
                        offset: self.off as u32,
                        next: self.next,
                        shard_seq: self.expect,
                        nonce: self.nonce,
                    };
                    return Ok(Some(w));
                }
                Step::ChainEnd => self.done = true,
                Step::SegmentEnd => {
                    // Follow the chain if the next segment was opened.
                    self.reader = None;
                    let next = self.next;
                    if next == NO_SEGMENT || next >= self.total_segments {
                        self.done = true;
                        continue;
                    }
                    let first = read(self.store, next, 0, IO_ALIGN)?;
                    match self.want.segment(&first, next, true) {
                        // A segment already in this chain ends it: a freed segment keeps its
                        // header until it is written again (always on a prefilled pool, which
                        // is never punched), and headers of this epoch's earlier uses can
                        // point back into the chain. Within the replayed part no segment is
                        // used twice: none is freed before a checkpoint covers it.
                        Some(sh) if !self.segments.contains(&next) => {
                            self.seg = next;
                            self.next = sh.next_segment;
                            self.nonce = Some(sh.nonce);
                            self.off = SEGMENT_HEADER_BYTES;
                        }
                        _ => self.done = true,
                    }
                }
            }
        }
    }
}

/// The record at `off` of the segment `r` reads, if it is record `expect` of the chain.
fn step(
    r: &mut SegReader<'_>,
    want: &Expect<'_>,
    off: u64,
    nonce: Option<[u8; 16]>,
    expect: u64,
    check: bool,
) -> Result<Step> {
    let (seg, seg_bytes) = (r.seg, r.seg_bytes);
    let named = want.named(r.at(off, IO_ALIGN)?, seg, off, seg_bytes, expect);
    let sealed = match &named {
        Some(d) => {
            let area = r.at(off, (d.header_bytes as usize).max(IO_ALIGN))?;
            want.record(area, seg, off, seg_bytes, nonce, expect)
        }
        None => None,
    };
    let Some(h) = sealed else {
        // Not the expected record: the end of this segment's records (the chain goes on in
        // the next segment if it was opened), or a torn write. A damaged header of a record
        // that the next one declares flushed is corruption.
        let Some(d) = named else {
            return Ok(Step::SegmentEnd);
        };
        let after = off + u64::from(d.record_bytes);
        if after + IO_ALIGN as u64 <= seg_bytes {
            let next_named = want.named(r.at(after, IO_ALIGN)?, seg, after, seg_bytes, expect + 1);
            if let Some(nd) = next_named {
                let area = r.at(after, (nd.header_bytes as usize).max(IO_ALIGN))?;
                if let Some(n) = want.record(area, seg, after, seg_bytes, nonce, expect + 1) {
                    if n.durable_shard_seq > expect {
                        return Err(Error::Corrupt {
                            what: "a flushed log record's header does not verify",
                        });
                    }
                }
            }
        }
        // Named but not sealed: a torn write (or bytes imitating one). Records after a torn
        // one were never flushed; the chain ends here.
        return Ok(Step::ChainEnd);
    };
    // The whole record when it is in the window already (or a move, whose payload decides
    // whether it applies), else its header area alone.
    let whole = h.kind == RecordKind::Move
        || (off >= r.start && off + u64::from(h.record_bytes) <= r.start + r.buf.len() as u64);
    let buf = if whole {
        r.at(off, h.record_bytes as usize)?
    } else {
        r.at(off, h.header_bytes as usize)?
    };
    let (entries, payload_ok) = decode_entries(buf, &h, whole && check)?;
    Ok(Step::Record(Box::new(Walked {
        rec: ReplayRecord {
            seq: h.seq,
            shard: want.shard,
            segment: seg,
            offset: off as u32,
            entries,
        },
        header: h,
        payload_ok,
        // Filled in by the walk.
        after: ShardPosition {
            segment: seg,
            offset: 0,
            next: NO_SEGMENT,
            shard_seq: 0,
            nonce: None,
        },
    })))
}

/// The entries of the record whose header `h` verified, from `buf` (the header area, or the
/// whole record); with `check`, whether its payloads match (`None`: not checked). A move's
/// entries whose copy did not land (or whose source was already corrupt) are left out: the
/// block stays where it was, which the cleaner frees only after a checkpoint that covers the
/// move (moves are always read whole).
fn decode_entries(buf: &[u8], h: &RecordHeader, check: bool) -> Result<(Vec<Entry>, Option<bool>)> {
    let eb = h.entry_bytes();
    let mut entries = Vec::with_capacity(h.entry_count as usize);
    let mut payload_ok = check.then_some(true);
    let mut has_payload = false;
    for i in 0..h.entry_count as usize {
        let at = h.entries_at() + i * eb;
        let raw = &buf[at..at + eb];
        match h.kind {
            RecordKind::Data => {
                let e = DataEntry::decode(raw)?;
                // Dedup references carry no payload.
                if e.block_id != 0 && e.flags & FLAG_REF == 0 {
                    has_payload = true;
                    if check {
                        payload_ok = Some(payload_ok == Some(true) && payload_matches(buf, h, &e));
                    }
                }
                entries.push(Entry::Data(e));
            }
            RecordKind::Trim => entries.push(Entry::Trim(TrimEntry::decode(raw)?)),
            RecordKind::Move => {
                let e = DataEntry::decode(raw)?;
                if payload_matches(buf, h, &e) {
                    entries.push(Entry::Move(e));
                }
            }
            // A failed write's space: nothing to apply.
            RecordKind::Void => {}
        }
    }
    // Nothing to check in a record without payloads (trims, references, voids, moves).
    if !has_payload {
        payload_ok = Some(true);
    }
    Ok((entries, payload_ok))
}

/// A record whose fate waits on the chain's end: its payloads failed, or were not checked
/// (walked by its header), and no record so far declares it flushed.
struct Pending {
    header: RecordHeader,
    segment: u32,
    offset: u64,
    nonce: Option<[u8; 16]>,
    payload_ok: Option<bool>,
    after: ShardPosition,
}

/// What a first walk of a chain decided.
pub(crate) struct Survey {
    start: ShardPosition,
    /// The chain's records when they fit what a survey holds; `None`: walked again to apply.
    held: Option<Vec<ReplayRecord>>,
    /// Records (by shard sequence number) whose payloads failed and that no later record
    /// declares flushed: torn writes, dropped.
    dropped: Vec<u64>,
    /// The shard sequence number after the last record walked (a second walk stops there).
    walked_to: u64,
    /// Every segment the chain touched (to keep until the next checkpoint).
    pub segments: Vec<u32>,
    /// Just past the last record replayed (segment, offset, that segment's next, and the
    /// segment's nonce when its header verified): a new chain may continue there instead of
    /// taking a fresh segment.
    pub end: ShardPosition,
}

/// Walk one shard's chain, check its payloads where they decide, and hold its records if
/// they have at most `hold` entries.
///
/// A bad payload at or below what a later record declares flushed is corruption (kept, so
/// that reads of the block report it); above it, a torn write that was never flushed
/// (dropped). Payloads walked past by header are read at the end where they decide (records
/// no later one declares flushed), adjacent records in one read.
pub(crate) fn survey_chain(
    src: LogSource<'_>,
    shard: u16,
    start: ShardPosition,
    hold: usize,
) -> Result<Survey> {
    let mut walk = ChainWalk::new(src, shard, start, true)?;
    let mut end = ShardPosition {
        nonce: walk.start_nonce,
        ..start
    };
    let mut held = Some(Vec::new());
    let mut held_entries = 0;
    let mut pending: Vec<Pending> = Vec::new();
    let mut durable = 0;
    let mut walked_to = start.shard_seq;
    while let Some(w) = walk.next_record()? {
        let w = *w;
        let shard_seq = w.header.shard_seq;
        walked_to = shard_seq + 1;
        if w.header.durable_shard_seq > durable {
            durable = w.header.durable_shard_seq;
            // Records now declared flushed are applied whatever their payloads hold.
            pending.retain(|p| {
                let keep = p.header.shard_seq >= durable;
                if !keep && p.after.shard_seq > end.shard_seq {
                    end = p.after;
                }
                keep
            });
        }
        if w.payload_ok == Some(true) || shard_seq < durable {
            end = w.after;
        } else {
            pending.push(Pending {
                header: w.header.clone(),
                segment: w.rec.segment,
                offset: u64::from(w.rec.offset),
                nonce: w.after.nonce,
                payload_ok: w.payload_ok,
                after: w.after,
            });
        }
        if let Some(h) = held.as_mut() {
            held_entries += w.rec.entries.len();
            if held_entries <= hold {
                h.push(w.rec);
            } else {
                // Too many to hold: the records are walked again as they are applied.
                held = None;
            }
        }
    }
    pending.retain(|p| p.header.shard_seq >= durable);
    check_deferred(src.store, &walk.want, src.geo.segment_bytes, &mut pending)?;
    let mut dropped = Vec::new();
    for p in &pending {
        if p.payload_ok == Some(false) {
            dropped.push(p.header.shard_seq);
        } else if p.after.shard_seq > end.shard_seq {
            end = p.after;
        }
    }
    // Held records are the chain's from `start`, one shard sequence number each.
    let held = held.map(|h| {
        h.into_iter()
            .zip(start.shard_seq..)
            .filter(|(_, ss)| !dropped.contains(ss))
            .map(|(r, _)| r)
            .collect()
    });
    Ok(Survey {
        start,
        held,
        dropped,
        walked_to,
        segments: walk.segments,
        end,
    })
}

/// The records of a surveyed chain in order, those it dropped left out: held, or walked again
/// (without checking payloads again).
pub(crate) struct ChainRecords<'a> {
    held: Option<std::vec::IntoIter<ReplayRecord>>,
    walk: Option<ChainWalk<'a>>,
    dropped: Vec<u64>,
    walked_to: u64,
}

impl<'a> ChainRecords<'a> {
    pub(crate) fn new(
        src: LogSource<'a>,
        shard: u16,
        survey: &mut Survey,
    ) -> Result<ChainRecords<'a>> {
        let (held, walk) = match survey.held.take() {
            Some(h) => (Some(h.into_iter()), None),
            None => (None, Some(ChainWalk::new(src, shard, survey.start, false)?)),
        };
        Ok(ChainRecords {
            held,
            walk,
            dropped: std::mem::take(&mut survey.dropped),
            walked_to: survey.walked_to,
        })
    }

    /// Whether the records are walked again (worth a thread of their own).
    pub(crate) fn walks(&self) -> bool {
        self.walk.is_some()
    }

    pub(crate) fn next_record(&mut self) -> Result<Option<ReplayRecord>> {
        if let Some(h) = self.held.as_mut() {
            return Ok(h.next());
        }
        let Some(walk) = self.walk.as_mut() else {
            return Ok(None);
        };
        loop {
            if walk.expect >= self.walked_to {
                return Ok(None);
            }
            let Some(w) = walk.next_record()? else {
                // The first walk went further over the same bytes.
                return Err(Error::Corrupt {
                    what: "the log changed between replay's two walks",
                });
            };
            if !self.dropped.contains(&w.header.shard_seq) {
                return Ok(Some(w.rec));
            }
        }
    }
}

/// Check the payloads of the records walked past by their headers, reading records that
/// follow each other in a segment together, up to [`CHECK_SPAN`] bytes at a time. Each
/// record's header is read again with its payloads and must verify as it did.
fn check_deferred(
    store: &dyn SegmentStore,
    want: &Expect<'_>,
    seg_bytes: u64,
    pending: &mut [Pending],
) -> Result<()> {
    let due = |p: &Pending| p.payload_ok.is_none();
    let end = |p: &Pending| p.offset + u64::from(p.header.record_bytes);
    let mut i = 0;
    while i < pending.len() {
        if !due(&pending[i]) {
            i += 1;
            continue;
        }
        let (seg, from) = (pending[i].segment, pending[i].offset);
        let mut j = i + 1;
        while j < pending.len()
            && due(&pending[j])
            && pending[j].segment == seg
            && pending[j].offset == end(&pending[j - 1])
            && end(&pending[j]) - from <= CHECK_SPAN
        {
            j += 1;
        }
        let buf = read(store, seg, from, (end(&pending[j - 1]) - from) as usize)?;
        for p in &mut pending[i..j] {
            let at = (p.offset - from) as usize;
            let rec = &buf[at..at + p.header.record_bytes as usize];
            let again = want.record(rec, seg, p.offset, seg_bytes, p.nonce, p.header.shard_seq);
            if again.as_ref() != Some(&p.header) {
                return Err(Error::Corrupt {
                    what: "a log record's header changed while replay read it",
                });
            }
            p.payload_ok = decode_entries(rec, &p.header, true)?.1;
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
