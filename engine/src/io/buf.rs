//! 4 KiB-aligned heap buffers, as O_DIRECT requires.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use crate::format::IO_ALIGN;

/// A zero-initialised, 4 KiB-aligned byte buffer whose length is a multiple of 4 KiB.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes allocated (`len` until [`AlignedBuf::truncate`]).
    cap: usize,
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
        AlignedBuf { ptr, len, cap: len }
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
        AlignedBuf { ptr, len, cap: len }
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
