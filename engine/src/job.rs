//! A client request split across shards: counts its parts and runs the completion once.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::Mutex;

use crate::api::{Completion, Reply};
use crate::counters::{Op, Stages};
use crate::error::Error;
use crate::health::Health;
use crate::write_back::EarlyWrites;

pub(crate) struct Job {
    remaining: AtomicUsize,
    /// Read data, assembled by the parts.
    data: Mutex<ReadData>,
    read_len: usize,
    error: Mutex<Option<Error>>,
    done: Mutex<Option<Answer>>,
    is_read: bool,
    /// A read whose pieces may be handed on as they are ([`Reply::Pieces`]).
    pieces: bool,
    /// FUA: the completion goes through the flusher before it runs.
    fua: Option<Sender<FlushMsg>>,
    /// A write acknowledged before it was stored (write-back): what to release, or report,
    /// once its parts are done.
    write_back: Mutex<Option<WriteBack>>,
    early: bool,
    timing: Option<Timing>,
}

/// When a request was submitted and what kind it is, for the stage times (see `Stages`,
/// which the workers pass in: a reference per request would be a count both workers touch).
pub(crate) struct Timing {
    pub since: Instant,
    pub op: Op,
}

/// An early-acknowledged write still being stored.
pub(crate) struct WriteBack {
    pub health: Arc<Health>,
    pub early: Arc<EarlyWrites>,
    /// For the message if it is lost (a reference, not a copy of the name per write).
    pub volume: Arc<crate::map::VolumeState>,
    pub offset: u64,
    pub len: u64,
}

impl WriteBack {
    /// Its records applied (`Ok`) or failed: the client was told it succeeded, so a failure
    /// stops the pool; no later flush may then report the data durable.
    fn finish(self, result: Result<(), &Error>) {
        // The fault first: a flush that sees the counters drop must also see the pool halted.
        if let Err(e) = result {
            self.health.set_fault(format!(
                "a write acknowledged before it was stored ({} bytes at offset {} of volume {}) \
                 could not be stored: {e}",
                self.len, self.offset, self.volume.name
            ));
        }
        self.early.mark(self.volume.id, self.offset, self.len, true);
        self.early.done(self.len);
    }
}

/// A read's data as the parts deliver it. A read served by one piece (a 4 KiB read from the
/// cache or from one device read) is handed on as that piece, without a copy: the 4 KiB copy
/// out of cold cache memory was ~18% of a cached random-read profile.
enum ReadData {
    /// Nothing delivered yet: unwritten ranges read as zeroes.
    Empty,
    /// One piece covering the whole request.
    Whole(Bytes),
    /// Pieces as delivered (offset in the request, bytes), copied into one buffer when the
    /// request completes: the gaps between them (holes) are zeroed then, not the whole buffer
    /// first (zeroing 1 MiB before copying over it was ~7% of a cached 1 MiB read profile).
    Pieces(Vec<(usize, Bytes)>),
}

/// A request's completion that runs even when it is dropped unanswered: when an engine thread
/// fails, the requests it held are answered with an error instead of leaving their clients
/// waiting forever.
pub(crate) struct Answer(Option<Completion>);

impl Answer {
    pub fn new(done: Completion) -> Self {
        Answer(Some(done))
    }

    pub fn send(mut self, r: crate::error::Result<Reply>) {
        if let Some(done) = self.0.take() {
            done(r);
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(Error::ShutDown));
        }
    }
}

/// Zeroes for reads of holes, shared (its pages are never written).
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

pub(crate) fn zeroes(len: usize) -> Bytes {
    match ZEROES.get(..len) {
        Some(z) => Bytes::from_static(z),
        None => Bytes::from(vec![0u8; len]),
    }
}

thread_local! {
    /// On a shard's thread (see [`take_local_flushes`]): flushes of FUA writes completed
    /// there, which that shard syncs before it may sleep.
    static LOCAL_FLUSHES: RefCell<Option<Vec<(Answer, Instant)>>> = const { RefCell::new(None) };
}

/// Queue `answer` for this thread's shard, or give it back when this is not a shard's thread.
fn flush_here(answer: Answer, since: Instant) -> Option<Answer> {
    LOCAL_FLUSHES.with(|l| match l.borrow_mut().as_mut() {
        Some(queue) => {
            queue.push((answer, since));
            None
        }
        None => Some(answer),
    })
}

/// The flushes of FUA writes completed on this thread since the last call; from the first
/// call on, this thread takes them (a shard's).
pub(crate) fn take_local_flushes() -> Vec<(Answer, Instant)> {
    LOCAL_FLUSHES.with(|l| std::mem::take(l.borrow_mut().get_or_insert_with(Vec::new)))
}

/// Work for the flusher thread.
pub(crate) enum FlushMsg {
    /// A client's flush (or FUA write): covers writes acknowledged early too. With when it
    /// was asked for.
    Flush(Answer, Instant),
    Stop,
}

impl Job {
    pub fn new(
        parts: usize,
        read_len: Option<usize>,
        fua: Option<Sender<FlushMsg>>,
        done: Completion,
        timing: Option<Timing>,
    ) -> Arc<Job> {
        Job::make(
            parts,
            read_len,
            false,
            fua,
            Some(Answer::new(done)),
            None,
            timing,
        )
    }

    /// A read of `len` bytes answered with [`Reply::Pieces`] when it has several.
    pub fn new_read_pieces(
        parts: usize,
        len: usize,
        done: Completion,
        timing: Option<Timing>,
    ) -> Arc<Job> {
        Job::make(
            parts,
            Some(len),
            true,
            None,
            Some(Answer::new(done)),
            None,
            timing,
        )
    }

    /// A write acknowledged already (`EarlyWrites::admits` took its bytes): no
    /// completion left to run, only `wb` to finish.
    pub fn new_write_back(parts: usize, wb: WriteBack, timing: Option<Timing>) -> Arc<Job> {
        Job::make(parts, None, false, None, None, Some(wb), timing)
    }

    /// A shard took one of this request's parts.
    pub fn picked(&self, stages: &Stages) {
        if let Some(t) = &self.timing {
            stages.picked(t.op, t.since);
        }
    }

    fn make(
        parts: usize,
        read_len: Option<usize>,
        pieces: bool,
        fua: Option<Sender<FlushMsg>>,
        done: Option<Answer>,
        wb: Option<WriteBack>,
        timing: Option<Timing>,
    ) -> Arc<Job> {
        Arc::new(Job {
            remaining: AtomicUsize::new(parts),
            data: Mutex::new(ReadData::Empty),
            read_len: read_len.unwrap_or(0),
            error: Mutex::new(None),
            done: Mutex::new(done),
            is_read: read_len.is_some(),
            pieces,
            fua,
            early: wb.is_some(),
            write_back: Mutex::new(wb),
            timing,
        })
    }

    /// Acknowledged before it is stored: reads must wait for it (see `Shard::read_try`).
    pub fn is_write_back(&self) -> bool {
        self.early
    }

    /// Deliver read data for bytes `at..at + bytes.len()` of the request.
    pub fn fill(&self, at: usize, bytes: Bytes) {
        let mut d = self.data.lock();
        match &mut *d {
            ReadData::Empty if at == 0 && bytes.len() == self.read_len => {
                *d = ReadData::Whole(bytes);
            }
            ReadData::Empty => *d = ReadData::Pieces(vec![(at, bytes)]),
            ReadData::Whole(w) => {
                let w = std::mem::take(w);
                *d = ReadData::Pieces(vec![(0, w), (at, bytes)]);
            }
            ReadData::Pieces(p) => p.push((at, bytes)),
        }
    }

    /// The pieces in request order, the gaps between them (holes) as shared zeroes, the last
    /// cut at `read_len`; `Err` gives them back, in delivery order, when two overlap.
    fn in_order(&self, pieces: Vec<(usize, Bytes)>) -> Result<Vec<Bytes>, Vec<(usize, Bytes)>> {
        let n = self.read_len;
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        order.sort_by_key(|&i| pieces[i].0);
        if order
            .windows(2)
            .any(|w| pieces[w[0]].0 + pieces[w[0]].1.len() > pieces[w[1]].0)
        {
            return Err(pieces);
        }
        let mut slots: Vec<Option<(usize, Bytes)>> = pieces.into_iter().map(Some).collect();
        let mut out = Vec::with_capacity(slots.len() + 1);
        let mut pos = 0;
        for (at, b) in order.into_iter().filter_map(|i| slots[i].take()) {
            if at >= n {
                break;
            }
            if at > pos {
                out.push(zeroes(at - pos));
            }
            let b = if at + b.len() > n {
                b.slice(..n - at)
            } else {
                b
            };
            pos = at + b.len();
            out.push(b);
        }
        if pos < n {
            out.push(zeroes(n - pos));
        }
        Ok(out)
    }

    /// The pieces in one buffer of `read_len` bytes; what no piece covers reads as zeroes (a
    /// later piece wins where two overlap, as copies in delivery order would).
    fn assemble(&self, pieces: Vec<(usize, Bytes)>) -> Bytes {
        let n = self.read_len;
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        order.sort_by_key(|&i| pieces[i].0);
        let overlap = order
            .windows(2)
            .any(|w| pieces[w[0]].0 + pieces[w[0]].1.len() > pieces[w[1]].0);
        let mut out = Vec::with_capacity(n);
        if overlap {
            // Not seen in practice; keep the simple form.
            out.resize(n, 0);
            for (at, b) in &pieces {
                if let Some(dst) = out.get_mut(*at..at + b.len()) {
                    dst.copy_from_slice(b);
                }
            }
            return Bytes::from(out);
        }
        for (at, b) in order.iter().map(|&i| &pieces[i]) {
            if *at > out.len() {
                out.resize((*at).min(n), 0);
            }
            let room = n.saturating_sub(out.len());
            out.extend_from_slice(&b[..b.len().min(room)]);
        }
        out.resize(n, 0);
        Bytes::from(out)
    }

    /// One part finished; the last one completes the request (its total time goes to
    /// `stages`, when the caller has them).
    pub fn part_done(&self, result: Result<(), Error>, stages: Option<&Stages>) {
        if let Err(e) = result {
            let mut slot = self.error.lock();
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let (Some(t), Some(s)) = (&self.timing, stages) {
            s.done(t.op, t.since);
        }
        if let Some(wb) = self.write_back.lock().take() {
            let e = self.error.lock().take();
            wb.finish(e.as_ref().map_or(Ok(()), Err));
            return;
        }
        let Some(done) = self.done.lock().take() else {
            return;
        };
        if let Some(e) = self.error.lock().take() {
            return done.send(Err(e));
        }
        if self.is_read {
            let data = match std::mem::replace(&mut *self.data.lock(), ReadData::Empty) {
                ReadData::Empty => zeroes(self.read_len),
                ReadData::Whole(b) => b,
                ReadData::Pieces(p) if self.pieces => match self.in_order(p) {
                    Ok(pieces) => return done.send(Ok(Reply::Pieces(pieces))),
                    Err(p) => self.assemble(p),
                },
                ReadData::Pieces(p) => self.assemble(p),
            };
            return done.send(Ok(Reply::Data(data)));
        }
        match &self.fua {
            Some(flusher) => {
                // On a shard's thread, that shard syncs (see `shard/flush.rs`).
                let Some(done) = flush_here(done, Instant::now()) else {
                    return;
                };
                let msg = FlushMsg::Flush(done, Instant::now());
                if let Err(crossbeam_channel::SendError(FlushMsg::Flush(done, _))) =
                    flusher.send(msg)
                {
                    done.send(Err(Error::ShutDown));
                }
            }
            None => done.send(Ok(Reply::Done)),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Dropped with parts unfinished (an engine thread failed): the write is lost.
        if let Some(wb) = self.write_back.get_mut().take() {
            wb.finish(Err(&Error::ShutDown));
        }
    }
}
