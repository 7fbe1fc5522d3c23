//! 4 KiB-aligned heap buffers, as O_DIRECT requires, and the pools of them a ring registers.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::format::IO_ALIGN;

/// A zero-initialised, 4 KiB-aligned byte buffer whose length is a multiple of 4 KiB.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes allocated (`len` until [`AlignedBuf::truncate`]).
    cap: usize,
    /// The pool this buffer's chunks belong to (given back on drop), or `None` for the heap.
    home: Option<Arc<BufPool>>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len` bytes rounded up to a multiple of 4 KiB (at least 4 KiB).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).next_multiple_of(IO_ALIGN);
        let layout = Layout::from_size_align(len, IO_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            cap: len,
            home: None,
        }
    }

    /// Allocate without zeroing, for buffers the caller fills completely (record buffers: the
    /// zeroing showed up as ~10% of the write path).
    ///
    /// # Safety
    /// Every byte must be written through [`AlignedBuf::as_mut_ptr`] before the buffer is used
    /// as a slice (deref) or handed to a device, unless it is handed to a device read that fills
    /// all of it: the buffer is used only if the read succeeded (zeroing it first cost a memset
    /// of every byte the cleaner reads).
    pub unsafe fn new_uninit(len: usize) -> Self {
        let len = len.max(1).next_multiple_of(IO_ALIGN);
        let layout = Layout::from_size_align(len, IO_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size; the caller initialises the contents.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            cap: len,
            home: None,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Keep the first `len` bytes (a multiple of 4 KiB, at most the length): a buffer sized
    /// for the most it may hold is written as far as it was filled, without a copy.
    pub fn truncate(&mut self, len: usize) {
        assert!(
            len <= self.len && len % IO_ALIGN == 0,
            "truncating {} bytes to {len}",
            self.len
        );
        self.len = len;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Whether this buffer lies in `pool` (then a ring that registered the pool may use it as
    /// a fixed buffer).
    pub(crate) fn is_in(&self, pool: &Arc<BufPool>) -> bool {
        self.home.as_ref().is_some_and(|h| Arc::ptr_eq(h, pool))
    }
}

/// Bytes per chunk of a [`BufPool`]: a buffer takes whole chunks.
const CHUNK: usize = 64 << 10;

/// A region of memory handed out as [`AlignedBuf`]s in 64 KiB chunks, for a ring to register
/// once (`IORING_REGISTER_BUFFERS`): a write from a registered buffer skips pinning its pages
/// for each I/O (`get_user_pages`, 4% of the server's CPU under 1M writes over NBD, and fio's
/// own submission CPU per MiB halves with `--fixedbufs` here, docs/benchmarks.md). Buffers go
/// back on drop, on any thread; when the pool is full callers take heap buffers instead.
pub struct BufPool {
    base: NonNull<u8>,
    bytes: usize,
    /// One bit per chunk, set while free.
    free: Mutex<Vec<u64>>,
}

// SAFETY: the region is only reached through the buffers handed out, each owning its chunks
// exclusively; the free map is behind a lock.
unsafe impl Send for BufPool {}
// SAFETY: as above.
unsafe impl Sync for BufPool {}

impl BufPool {
    /// A pool of `bytes` (rounded up to whole chunks).
    pub fn new(bytes: usize) -> Arc<BufPool> {
        let chunks = bytes.div_ceil(CHUNK).max(1);
        let bytes = chunks * CHUNK;
        let layout = Layout::from_size_align(bytes, IO_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size. Zeroed once: fresh pages cost nothing more, and no
        // buffer ever hands out bytes another allocation left.
        let raw = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let mut free = vec![0u64; chunks.div_ceil(64)];
        for c in 0..chunks {
            free[c / 64] |= 1 << (c % 64);
        }
        Arc::new(BufPool {
            base,
            bytes,
            free: Mutex::new(free),
        })
    }

    /// The region, to register with a ring.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.bytes)
    }

    /// A buffer of `len` bytes (rounded up to 4 KiB) from the pool, or `None` when no run of
    /// free chunks is long enough.
    ///
    /// # Safety
    /// As [`AlignedBuf::new_uninit`]: the contents are whatever the last user left.
    pub unsafe fn take(self: &Arc<Self>, len: usize) -> Option<AlignedBuf> {
        let len = len.max(1).next_multiple_of(IO_ALIGN);
        let need = len.div_ceil(CHUNK);
        let chunks = self.bytes / CHUNK;
        let mut free = self.free.lock();
        let is_free = |free: &[u64], c: usize| free[c / 64] & (1 << (c % 64)) != 0;
        // First fit: a run of `need` free chunks.
        let mut c = 0;
        while c + need <= chunks {
            if !is_free(&free, c) {
                // Skip to the next free chunk, a word at a time.
                let w = c / 64;
                let rest = free[w] >> (c % 64);
                c = if rest == 0 {
                    (w + 1) * 64
                } else {
                    c + rest.trailing_zeros() as usize
                };
                continue;
            }
            match (c..c + need).find(|&k| !is_free(&free, k)) {
                Some(busy) => c = busy + 1,
                None => {
                    for k in c..c + need {
                        free[k / 64] &= !(1 << (k % 64));
                    }
                    // SAFETY: chunks c..c+need lie inside the region.
                    let ptr = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(c * CHUNK)) };
                    return Some(AlignedBuf {
                        ptr,
                        len,
                        cap: need * CHUNK,
                        home: Some(self.clone()),
                    });
                }
            }
        }
        None
    }

    fn give(&self, ptr: NonNull<u8>, cap: usize) {
        let first = (ptr.as_ptr() as usize - self.base.as_ptr() as usize) / CHUNK;
        let mut free = self.free.lock();
        for k in first..first + cap / CHUNK {
            free[k / 64] |= 1 << (k % 64);
        }
    }

    /// Bytes handed out and not given back.
    pub fn in_use(&self) -> usize {
        let free: u32 = self.free.lock().iter().map(|w| w.count_ones()).sum();
        self.bytes - free as usize * CHUNK
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.bytes, IO_ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this layout; every buffer held a count on the pool,
        // so none is left.
        unsafe { dealloc(self.base.as_ptr(), layout) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.home.take() {
            pool.give(self.ptr, self.cap);
            return;
        }
        let layout = Layout::from_size_align(self.cap, IO_ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// First fit over 64 KiB chunks: buffers do not overlap, freed runs are found again, and
    /// a request longer than any free run is refused.
    #[test]
    fn a_pool_hands_out_disjoint_runs_and_takes_them_back() {
        let pool = BufPool::new(16 * CHUNK);
        // SAFETY: never read (only pointers compared).
        let take = |len| unsafe { pool.take(len) };
        let a = take(CHUNK).unwrap();
        let b = take(3 * CHUNK + 1).unwrap();
        let c = take(4096).unwrap();
        assert_eq!(b.len(), 3 * CHUNK + 4096);
        let (base, _) = pool.region();
        let at = |x: &AlignedBuf| (x.as_ptr() as usize - base as usize) / CHUNK;
        assert_eq!((at(&a), at(&b), at(&c)), (0, 1, 5));
        assert_eq!(pool.in_use(), 6 * CHUNK);
        assert!(take(11 * CHUNK).is_none(), "10 chunks free");
        drop(b);
        // The four-chunk hole is the first fit for three chunks.
        let d = take(3 * CHUNK).unwrap();
        assert_eq!(at(&d), 1);
        let e = take(10 * CHUNK).unwrap();
        assert_eq!(at(&e), 6);
        drop((a, c, d, e));
        assert_eq!(pool.in_use(), 0);
        assert!(take(16 * CHUNK).is_some());
    }
}
