//! Metadata pages a shard needs, read through its own queue (design milestones 15 and 16): a
//! read whose map or block-table leaves are evicted waits, parked, while the shard goes on
//! with its other requests, and runs again once the pages are in; a completed record whose
//! apply needs evicted leaves waits at the head of the apply order the same way. Before, the
//! shard's thread waited for each such page in a blocking read, and every request it held
//! waited with it.
//!
//! A record starts reading its leaves already when it is written (`prefetch_newest`), while
//! the reads in flight stay under an eighth of the shard's share of the cache. A record that
//! needs more than half of that share reads them at its apply, as before, and so does one
//! whose pages went again before its apply, with the [`CALM_RECORDS`] after it.
//!
//! A page read here only brings a leaf in: whatever is still evicted when the request runs
//! again (a small cache may give a leaf back before then, or a page may fail to read or
//! check) is waited for again, at most [`MAX_PARKS`] times for a read and [`HEAD_PARKS`] for
//! a record, then read the blocking way, which reports a page that does not read or check.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Apply, Shard};
use crate::cache::IdMap;
use crate::format::{PagePtr, PAGE_BYTES};
use crate::io::{AlignedBuf, IoDone, IoOp, OpKind};
use crate::job::Job;
use crate::map::{MapLeaf, VolumeState};

/// Times a request waits for pages before what is still evicted is read in a blocking read:
/// a read waits for its map leaves, then for the block-table leaves of the ids they hold, and
/// twice more should a leaf go again meanwhile (a cache small for the requests in flight);
/// progress never depends on the cache's budget.
pub(crate) const MAX_PARKS: u8 = 4;

/// Times the head of the apply order waits for pages: its map leaves, then the block-table
/// leaves of the blocks they name. Missing pages after that were pushed out before the apply
/// could use them (the cache is small for the records in flight): the head reads them itself,
/// and so do the next [`CALM_RECORDS`] records, whose waits would be lost the same way.
const HEAD_PARKS: u8 = 2;

/// Records applied the blocking way after a head's pages were pushed out before its apply.
const CALM_RECORDS: u32 = 256;

/// Page reads one request (or one record's apply) starts at most per wait: a trim over a
/// large evicted range reads the rest the blocking way (design milestone 20 moves that off
/// the shard).
const MAX_PAGE_READS: usize = 256;

/// What a page read brings in.
pub(crate) enum PageFor {
    Map { leaf: Arc<MapLeaf>, idx: u64 },
    Table { leaf: usize, entries: usize },
}

pub(crate) struct PageRead {
    at: PagePtr,
    what: PageFor,
}

/// A read waiting for page reads (by tag).
pub(crate) struct ParkedRead {
    vol: Arc<VolumeState>,
    offset: u64,
    len: usize,
    at: usize,
    job: Arc<Job>,
    waits: Vec<u64>,
    tries: u8,
}

#[derive(Default)]
pub(crate) struct Fetches {
    /// Page reads in flight, by tag.
    reads: IdMap<PageRead>,
    /// The tag of the read in flight for each page (one read per page, whoever waits).
    loading: HashMap<PagePtr, u64>,
    parked: Vec<ParkedRead>,
    /// What the head of the apply order waits for, and how many times it waited.
    head: Vec<u64>,
    head_tries: u8,
    /// Records left to apply without waiting (see [`CALM_RECORDS`]).
    calm: u32,
    /// The head was just found with every leaf its apply uses in RAM: the apply need not
    /// look again (`take_head_clean`).
    head_clean: bool,
}

impl Fetches {
    fn pending(&self, waits: &[u64]) -> bool {
        waits.iter().any(|t| self.reads.contains_key(t))
    }

    /// Page reads in flight (a queue may hold some back from its count, as the fault
    /// injector's delayed reads are).
    pub(crate) fn reading(&self) -> bool {
        !self.reads.is_empty()
    }

    /// The queue failed: its page reads will not complete.
    pub(crate) fn forget_reads(&mut self) {
        self.reads.clear();
        self.loading.clear();
    }
}

impl Shard {
    /// Read the page at `at` through this shard's queue, unless a read of it is in flight:
    /// the tag to wait for.
    pub(crate) fn fetch_page(&mut self, at: PagePtr, what: PageFor) -> u64 {
        if let Some(&tag) = self.fetches.loading.get(&at) {
            return tag;
        }
        let (dev, base) = self.ctx.geo.locate(at.segment);
        let tag = self.tag();
        self.queue.push(IoOp {
            kind: OpKind::Read,
            dev,
            offset: base + u64::from(at.offset),
            len: PAGE_BYTES,
            // SAFETY: a read fills the whole buffer before anything looks at it, and a failed
            // one is dropped unread.
            buf: unsafe { AlignedBuf::new_uninit(PAGE_BYTES) },
            tag,
        });
        self.fetches.loading.insert(at, tag);
        self.fetches.reads.insert(tag, PageRead { at, what });
        tag
    }

    /// The page read of completion `d`, if it is one: its leaf taken in while it is still
    /// evicted where it was read (a page that failed or does not check is left to the
    /// blocking read that follows, which reports it). Otherwise `d` back.
    pub(crate) fn page_done(&mut self, d: IoDone) -> Option<IoDone> {
        let Some(pr) = self.fetches.reads.remove(&d.tag) else {
            return Some(d);
        };
        self.fetches.loading.remove(&pr.at);
        if d.result.is_err() {
            return None;
        }
        let meta = &self.ctx.meta;
        match pr.what {
            PageFor::Map { leaf, idx } => {
                if let Ok(ids) = meta.parse_map_leaf(&d.buf, idx, pr.at) {
                    if leaf.take_prefetched(ids, pr.at) {
                        meta.took_ahead(1, 1);
                    }
                }
            }
            PageFor::Table { leaf, entries } => {
                if let Ok(e) = meta.parse_table_leaf(&d.buf, leaf, pr.at, entries) {
                    self.ctx
                        .space
                        .lock()
                        .blocks
                        .take_one(leaf, pr.at, entries, e);
                }
            }
        }
        None
    }

    /// Park a read until the page reads `waits` complete.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn park_read(
        &mut self,
        vol: Arc<VolumeState>,
        offset: u64,
        len: usize,
        at: usize,
        job: Arc<Job>,
        waits: Vec<u64>,
        tries: u8,
    ) {
        self.fetches.parked.push(ParkedRead {
            vol,
            offset,
            len,
            at,
            job,
            waits,
            tries: tries + 1,
        });
    }

    /// Run again the parked reads whose pages all came in, in the order they parked.
    pub(crate) fn resume_parked(&mut self) {
        if self.fetches.parked.is_empty() {
            return;
        }
        let parked = std::mem::take(&mut self.fetches.parked);
        for p in parked {
            if self.fetches.pending(&p.waits) {
                self.fetches.parked.push(p);
            } else {
                self.read_try(p.vol, p.offset, p.len, p.at, p.job, p.tries);
            }
        }
    }

    /// At stop: fail the reads still parked.
    pub(crate) fn fail_parked(&mut self) {
        for p in std::mem::take(&mut self.fetches.parked) {
            p.job
                .part_done(Err(crate::error::Error::ShutDown), Some(&self.env.stages));
        }
    }

    /// The page reads a read of `first..=last` of `vol` must wait for before its look-ups:
    /// the evicted map leaves of the range (none when nothing was ever evicted).
    pub(crate) fn read_map_pages(&mut self, vol: &VolumeState, first: u64, last: u64) -> Vec<u64> {
        let evicted = vol.maps[self.id].lock().evicted_in(first, last);
        evicted
            .into_iter()
            .take(MAX_PAGE_READS)
            .map(|(idx, leaf, at)| self.fetch_page(at, PageFor::Map { leaf, idx }))
            .collect()
    }

    /// Whether the completed record at the head of the apply order may apply now: its
    /// evicted map and block-table leaves are in, it waited for them [`HEAD_PARKS`] times, or
    /// they are more than half the shard's share of the cache (the apply reads what is left). Otherwise their page reads are started (or still in
    /// flight) and it waits.
    pub(crate) fn head_ready(&mut self) -> bool {
        if self.fetches.pending(&self.fetches.head) {
            return false;
        }
        self.fetches.head.clear();
        if !self.ctx.meta.evicted_any() {
            self.fetches.head_tries = 0;
            return true;
        }
        if self.fetches.calm > 0 {
            self.fetches.calm -= 1;
            self.fetches.head_tries = 0;
            return true;
        }
        let pages = match self.inflight.front() {
            Some(rec) => self.apply_pages(&rec.applies),
            None => Vec::new(),
        };
        if pages.is_empty() {
            self.fetches.head_tries = 0;
            self.fetches.head_clean = true;
            return true;
        }
        if self.fetches.head_tries >= HEAD_PARKS {
            self.fetches.calm = CALM_RECORDS;
            self.fetches.head_tries = 0;
            return true;
        }
        // More leaves than this shard's half of the cache holds would push each other out
        // before the apply uses them: the apply reads them itself, as it did before these
        // waits (all of them before the space lock, then again under it any that went).
        if pages.len() > self.cache_share() / 2 {
            self.fetches.head_tries = 0;
            return true;
        }
        self.fetches.head = pages
            .into_iter()
            .map(|(at, what)| self.fetch_page(at, what))
            .collect();
        self.fetches.head_tries += 1;
        false
    }

    /// Start reading the evicted leaves the newest record's apply will use while the record
    /// is written: its apply then waits only for what is still missing (the block-table
    /// leaves of the blocks a leaf read now names, a leaf given back meanwhile).
    pub(crate) fn prefetch_newest(&mut self) {
        // Only while what is being read stays well within this shard's share of the cache:
        // leaves read for records far behind the head would push out those the head needs (a
        // small cache under random writes ran at 0.4x of reading them at the apply).
        let limit = self.cache_share() / 8;
        if self.fetches.reads.len() >= limit || self.fetches.calm > 0 {
            return;
        }
        let pages = match self.inflight.back() {
            Some(rec) => self.apply_pages(&rec.applies),
            None => return,
        };
        if self.fetches.reads.len() + pages.len() > limit {
            return;
        }
        for (at, what) in pages {
            self.fetch_page(at, what);
        }
    }

    /// Reap until the page reads `tags` are in (or the queue has nothing left in flight:
    /// whatever is still evicted is then looked up as such by the caller).
    pub(crate) fn wait_for_pages(&mut self, tags: &[u64]) {
        while self.fetches.pending(tags) && self.queue.in_flight() > 0 {
            if let Err(e) = self.queue.submit(1) {
                self.fail_all_inflight(e);
                break;
            }
            self.reap();
        }
    }

    /// The leaves of the metadata cache per shard (map and block-table leaves alike).
    pub(crate) fn cache_share(&self) -> usize {
        self.ctx.meta.budget_leaves() / self.ctx.shards().max(1)
    }

    /// Whether the record about to apply was found with its leaves in RAM (see `head_ready`);
    /// cleared.
    pub(crate) fn take_head_clean(&mut self) -> bool {
        std::mem::take(&mut self.fetches.head_clean)
    }

    /// The evicted leaves an apply of `applies` uses: the map leaves of its blocks (for a trim,
    /// the leaves of its range this shard owns) and the block-table leaves of the blocks it
    /// places, shares, moves and replaces (those the maps hold now; one whose map leaf is
    /// evicted is known once that leaf is in).
    fn apply_pages(&self, applies: &[Apply]) -> Vec<(PagePtr, PageFor)> {
        let me = self.id;
        let mut out: Vec<(PagePtr, PageFor)> = Vec::new();
        let mut seen: HashSet<PagePtr> = HashSet::new();
        let mut ids = Vec::new();
        for a in applies {
            if out.len() >= MAX_PAGE_READS {
                break;
            }
            let (vol, lba, id) = match a {
                Apply::Block { vol, lba, id, .. } | Apply::Ref { vol, lba, id, .. } => {
                    (vol, *lba, *id)
                }
                Apply::Hole { vol, lba } => (vol, *lba, 0),
                Apply::Trim { vol, lba, count } => {
                    if *count > 0 {
                        let m = vol.maps[me].lock();
                        for (idx, leaf, at) in m.evicted_in(*lba, lba + count - 1) {
                            if seen.insert(at) {
                                out.push((at, PageFor::Map { leaf, idx }));
                            }
                        }
                    }
                    continue;
                }
                Apply::Move { id, .. } => {
                    ids.push(*id);
                    continue;
                }
                Apply::Absorbed { .. } => continue,
            };
            if id != 0 {
                ids.push(id);
            }
            if lba < vol.blocks() {
                let m = vol.maps[me].lock();
                match m.get_shared_resident(lba) {
                    Some((old, _)) if old != 0 => ids.push(old),
                    Some(_) => {}
                    None => {
                        for (idx, leaf, at) in m.evicted_in(lba, lba) {
                            if seen.insert(at) {
                                out.push((at, PageFor::Map { leaf, idx }));
                            }
                        }
                    }
                }
            }
        }
        let room = MAX_PAGE_READS.saturating_sub(out.len());
        if room > 0 && !ids.is_empty() {
            let ask = self
                .ctx
                .space
                .lock()
                .blocks
                .evicted_of(&mut ids.into_iter(), room);
            if let Some(ask) = ask {
                for (leaf, at, entries) in ask.leaves {
                    out.push((at, PageFor::Table { leaf, entries }));
                }
            }
        }
        out.truncate(MAX_PAGE_READS);
        out
    }
}
