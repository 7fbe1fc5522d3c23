//! The segment store: where sealed segments and checkpoints live, and where checkpoints, the
//! cleaner and recovery read them back. Every operation names a whole segment (written once per
//! use), carries the epoch of the pool's owner, and completes through a callback, so a store
//! that is a network away (Ceph: RADOS objects, or S3 through radosgw) fits behind the same
//! calls as today's local devices ([`LocalStore`]).
//!
//! The shards' appends and their hot reads stay on the local log's I/O queues (`io::IoQueue`):
//! the log is the write-back tier, and a segment is handed to the store when it is sealed.
//!
//! Fencing: [`SegmentStore::fence`] makes the store refuse writes and deletes from older
//! epochs, so that a previous owner that still runs cannot overwrite what a new one relies on.

mod local;

pub(crate) use local::LocalStore;

use crate::error::Result;
use crate::io::AlignedBuf;

/// A store operation's completion; it may run on another thread.
pub(crate) type Done<T> = Box<dyn FnOnce(Result<T>) + Send>;

/// A range of a segment to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub segment: u32,
    /// Byte offset in the segment (a multiple of 4 KiB).
    pub offset: u64,
}

pub(crate) trait SegmentStore: Send + Sync {
    /// Store a whole segment (its header and contents, `data.len()` bytes from its start) as
    /// written once under `epoch`: a checkpoint's segments go this way.
    fn put(&self, epoch: u64, segment: u32, data: AlignedBuf, done: Done<()>);

    /// A log segment filled by the local log was sealed under `epoch`: it is complete and is
    /// never written again in this use.
    fn sealed(&self, epoch: u64, segment: u32);

    /// Read `buf.len()` bytes at `at`. On success every byte of the buffer that comes back was
    /// written by the read (callers may pass an uninitialised one).
    fn read(&self, epoch: u64, at: Range, buf: AlignedBuf, done: Done<AlignedBuf>);

    /// Drop the contents of `segments` (freed: their space goes back to the device).
    fn delete(&self, epoch: u64, segments: &[u32], done: Done<()>);

    /// From now on refuse writes and deletes from epochs before `epoch`.
    fn fence(&self, epoch: u64);
}

/// Run a store operation and wait for its completion (for callers on threads that may block:
/// checkpoints, the cleaner, recovery).
pub(crate) use crate::api::wait;

/// Read a range, waiting for it.
pub(crate) fn read_now(
    store: &dyn SegmentStore,
    epoch: u64,
    at: Range,
    len: usize,
) -> Result<AlignedBuf> {
    // SAFETY: a successful read writes every byte (`SegmentStore::read`); after a failure the
    // buffer is dropped unread.
    let buf = unsafe { AlignedBuf::new_uninit(len) };
    wait(|done| store.read(epoch, at, buf, done))
}
