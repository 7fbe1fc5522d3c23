//! A client request split across shards: counts its parts and runs the completion once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use crate::api::{Completion, Reply};
use crate::error::Error;

pub(crate) struct Job {
    remaining: AtomicUsize,
    /// Read data, assembled by the parts.
    pub data: Mutex<Vec<u8>>,
    error: Mutex<Option<Error>>,
    done: Mutex<Option<Completion>>,
    is_read: bool,
    /// FUA: the completion goes through the flusher before it runs.
    fua: Option<Sender<FlushMsg>>,
}

/// Work for the flusher thread.
pub(crate) enum FlushMsg {
    Flush(Completion),
    Stop,
}

impl Job {
    pub fn new(
        parts: usize,
        read_len: Option<usize>,
        fua: Option<Sender<FlushMsg>>,
        done: Completion,
    ) -> Arc<Job> {
        Arc::new(Job {
            remaining: AtomicUsize::new(parts),
            data: Mutex::new(vec![0u8; read_len.unwrap_or(0)]),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
            is_read: read_len.is_some(),
            fua,
        })
    }

    /// Copy read data for a part into place.
    pub fn fill(&self, at: usize, bytes: &[u8]) {
        let mut d = self.data.lock();
        if let Some(dst) = d.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// One part finished; the last one completes the request.
    pub fn part_done(&self, result: Result<(), Error>) {
        if let Err(e) = result {
            let mut slot = self.error.lock();
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(done) = self.done.lock().take() else {
            return;
        };
        if let Some(e) = self.error.lock().take() {
            return done(Err(e));
        }
        if self.is_read {
            let data = std::mem::take(&mut *self.data.lock());
            return done(Ok(Reply::Data(data)));
        }
        match &self.fua {
            Some(flusher) => {
                let msg = FlushMsg::Flush(done);
                if let Err(crossbeam_channel::SendError(FlushMsg::Flush(done))) = flusher.send(msg)
                {
                    done(Err(Error::ShutDown));
                }
            }
            None => done(Ok(Reply::Done)),
        }
    }
}
