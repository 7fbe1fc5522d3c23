//! io_uring engine: one ring per shard worker, files registered with the ring, O_DIRECT buffers,
//! batched submission (every op pushed between two `submit` calls goes in one syscall).

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring, Probe};

use super::sync::FileSet;
use super::{AlignedBuf, BufPool, Devices, Doorbell, IoDone, IoOp, IoQueue, OpKind};

/// Check that the kernel offers io_uring with the opcodes we use.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(4)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if probe.is_supported(opcode::Read::CODE) && probe.is_supported(opcode::Write::CODE) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring lacks READ/WRITE",
        ))
    }
}

/// Devices whose data path goes through io_uring; metadata I/O uses the blocking calls.
pub struct UringDevices {
    files: FileSet,
}

impl UringDevices {
    pub fn new(files: FileSet) -> io::Result<Self> {
        probe()?;
        Ok(UringDevices { files })
    }
}

impl Devices for UringDevices {
    fn engine_name(&self) -> &'static str {
        "io_uring"
    }
    fn count(&self) -> usize {
        self.files.count()
    }
    fn size(&self, dev: u16) -> u64 {
        self.files.size(dev)
    }
    fn read_at(&self, dev: u16, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.files.read_at(dev, buf, offset)
    }
    fn write_at(&self, dev: u16, buf: &[u8], offset: u64) -> io::Result<()> {
        self.files.write_at(dev, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.files.sync()
    }
    fn discard(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        self.files.discard(dev, offset, len)
    }
    fn preallocate(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        self.files.preallocate(dev, offset, len)
    }
    fn host_space(&self, dev: u16) -> io::Result<Option<super::HostSpace>> {
        self.files.host_space(dev)
    }
    fn data_ranges(&self, dev: u16) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.files.data_ranges(dev)
    }
    fn queue(&self, depth: u32) -> io::Result<Box<dyn IoQueue>> {
        Ok(Box::new(UringQueue::new(&self.files, depth)?))
    }
}

/// `user_data` of the doorbell's eventfd read (slots are indexed from 0).
const BELL: u64 = u64::MAX;

/// Bytes of write buffers a ring registers: room for 32 full records (1 MiB of blocks and
/// their 16 KiB header area each); smaller sizes are tried when the kernel refuses (an
/// unprivileged user's `RLIMIT_MEMLOCK`) or the process's budget runs low, and none at all
/// still works (heap buffers).
const POOL_BYTES: [usize; 3] = [34 << 20, 8 << 20, 2 << 20];

/// Registered bytes the whole process may hold (the pages are pinned: a machine with many
/// cores runs a shard per core, each with its own ring).
const POOL_BUDGET: usize = 256 << 20;

/// Registered bytes held by the rings alive now.
static POOL_HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Bytes of write buffers the process's rings hold registered now.
pub fn registered_bytes() -> usize {
    POOL_HELD.load(std::sync::atomic::Ordering::Relaxed)
}

/// A ring's registered buffers.
enum Fixed {
    /// No long write yet.
    Untried,
    /// Registered: the pool, and the bytes counted in `POOL_HELD`.
    Pool(Arc<BufPool>, usize),
    /// Refused (or no budget left): heap buffers.
    None,
}

/// Writes shorter than this take heap buffers: pinning a few pages costs little, and 4k random
/// writes over NBD (records of 13-15 blocks) ran 8% slower from the pool (four alternating
/// rounds, docs/benchmarks.md).
const FIXED_MIN_BYTES: usize = 256 << 10;

/// The fixed-buffer index of the pool: it is registered as one buffer.
const POOL_INDEX: u16 = 0;

/// A pool registered with `ring` within the process's budget, or `Fixed::None` if the kernel
/// refused every size that fits.
fn register_pool(ring: &IoUring) -> Fixed {
    use std::sync::atomic::Ordering;
    for bytes in POOL_BYTES {
        if POOL_HELD.fetch_add(bytes, Ordering::AcqRel) + bytes > POOL_BUDGET {
            POOL_HELD.fetch_sub(bytes, Ordering::AcqRel);
            continue;
        }
        let pool = BufPool::new(bytes);
        let (base, len) = pool.region();
        let iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        // SAFETY: the region is valid for `len` bytes and the kernel pins its pages; the ring
        // reaches it only through ops whose buffers hold a count on the pool (`Drop` waits
        // for those, or leaks them).
        match unsafe { ring.submitter().register_buffers(&[iov]) } {
            Ok(()) => return Fixed::Pool(pool, bytes),
            Err(e) => {
                POOL_HELD.fetch_sub(bytes, Ordering::AcqRel);
                tracing::debug!("io_uring refused {len} bytes of fixed buffers: {e}");
            }
        }
    }
    Fixed::None
}

/// One ring. Ops in flight live in `slots` (indexed by user_data) until their completion.
pub struct UringQueue {
    /// Where the doorbell's eventfd read lands, when one is armed. Leaked, not freed: a read
    /// still armed when the ring closes is cancelled by the kernel later, asynchronously.
    bell_buf: &'static mut [u8; 8],
    bell_armed: bool,
    ring: IoUring,
    slots: Vec<Option<IoOp>>,
    free: Vec<usize>,
    pending: VecDeque<IoOp>,
    done: Vec<IoDone>,
    in_kernel: usize,
    registered: bool,
    /// Buffers registered with the ring (see [`BufPool`]): registered at the first long
    /// write, so rings that never write one (a connection's reads) pin nothing.
    fixed: Fixed,
    fds: Vec<i32>,
    // Keeps the fds open for as long as the ring uses them.
    _files: Vec<std::fs::File>,
}

impl UringQueue {
    fn new(files: &FileSet, depth: u32) -> io::Result<Self> {
        let depth = depth.clamp(8, 4096);
        let ring = IoUring::builder().setup_cqsize(depth * 2).build(depth)?;
        let owned = files
            .files()
            .iter()
            .map(|f| f.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let fds: Vec<i32> = owned.iter().map(|f| f.as_raw_fd()).collect();
        // Registered files save an fget/fput per op; fall back to plain fds if refused.
        let registered = ring.submitter().register_files(&fds).is_ok();
        Ok(UringQueue {
            bell_buf: Box::leak(Box::new([0u8; 8])),
            bell_armed: false,
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            pending: VecDeque::new(),
            done: Vec::new(),
            in_kernel: 0,
            registered,
            fixed: Fixed::Untried,
            fds,
            _files: owned,
        })
    }

    /// Move pending ops into the submission queue while it has room.
    fn fill_sq(&mut self) {
        while !self.pending.is_empty() {
            if self.ring.submission().is_full()
                || self.in_kernel >= self.ring.params().cq_entries() as usize
            {
                break;
            }
            let Some(mut op) = self.pending.pop_front() else {
                break;
            };
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let len = op.len as u32;
            let fixed = match &self.fixed {
                // The whole range lies in the registered region only if it lies in the buffer.
                Fixed::Pool(p, _) => op.buf.is_in(p) && op.len <= op.buf.len(),
                _ => false,
            };
            let entry = match (op.kind, self.registered) {
                (OpKind::Write, true) if fixed => opcode::WriteFixed::new(
                    types::Fixed(op.dev as u32),
                    op.buf.as_ptr(),
                    len,
                    POOL_INDEX,
                )
                .offset(op.offset)
                .build(),
                (OpKind::Write, false) if fixed => opcode::WriteFixed::new(
                    types::Fd(self.fds[op.dev as usize]),
                    op.buf.as_ptr(),
                    len,
                    POOL_INDEX,
                )
                .offset(op.offset)
                .build(),
                (OpKind::Read, true) => {
                    opcode::Read::new(types::Fixed(op.dev as u32), op.buf.as_mut_ptr(), len)
                        .offset(op.offset)
                        .build()
                }
                (OpKind::Read, false) => opcode::Read::new(
                    types::Fd(self.fds[op.dev as usize]),
                    op.buf.as_mut_ptr(),
                    len,
                )
                .offset(op.offset)
                .build(),
                (OpKind::Write, true) => {
                    opcode::Write::new(types::Fixed(op.dev as u32), op.buf.as_ptr(), len)
                        .offset(op.offset)
                        .build()
                }
                (OpKind::Write, false) => {
                    opcode::Write::new(types::Fd(self.fds[op.dev as usize]), op.buf.as_ptr(), len)
                        .offset(op.offset)
                        .build()
                }
                (OpKind::Sync, true) => opcode::Fsync::new(types::Fixed(op.dev as u32))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                (OpKind::Sync, false) => opcode::Fsync::new(types::Fd(self.fds[op.dev as usize]))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            }
            .user_data(slot as u64);
            self.slots[slot] = Some(op);
            // SAFETY: the buffer lives in `slots` until its completion is reaped.
            unsafe {
                // Cannot fail: we checked the queue is not full.
                let _ = self.ring.submission().push(&entry);
            }
            self.in_kernel += 1;
        }
    }

    fn collect(&mut self) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            if cqe.user_data() == BELL {
                // Read (or failed): armed again at the next wait.
                self.bell_armed = false;
                continue;
            }
            let slot = cqe.user_data() as usize;
            let Some(op) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            self.in_kernel -= 1;
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as usize != op.len {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {} bytes", op.len),
                ))
            } else {
                Ok(())
            };
            self.done.push(op.done(result));
        }
    }
}

impl Drop for UringQueue {
    /// Wait for the ops still in the kernel: a ring closed under them would let the device
    /// read from or write into buffers that are freed and reused (a thread that failed drops
    /// its queue with records in flight).
    fn drop(&mut self) {
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(_) => break,
            }
            self.collect();
        }
        if self.in_kernel > 0 {
            // Could not wait: leak the buffers rather than free memory the device may touch.
            std::mem::forget(std::mem::take(&mut self.slots));
        }
        if let Fixed::Pool(_, bytes) = self.fixed {
            // The ring closes with the queue, and its registration with it.
            POOL_HELD.fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

impl IoQueue for UringQueue {
    unsafe fn write_buf(&mut self, len: usize) -> AlignedBuf {
        if len >= FIXED_MIN_BYTES {
            if matches!(self.fixed, Fixed::Untried) {
                self.fixed = register_pool(&self.ring);
            }
            if let Fixed::Pool(pool, _) = &self.fixed {
                // SAFETY: the caller's contract.
                if let Some(b) = unsafe { pool.take(len) } {
                    return b;
                }
            }
        }
        // SAFETY: the caller's contract.
        unsafe { AlignedBuf::new_uninit(len) }
    }
    fn push(&mut self, op: IoOp) {
        self.pending.push_back(op);
    }

    fn submit(&mut self, min_complete: usize) -> io::Result<()> {
        loop {
            self.fill_sq();
            let want = min_complete
                .saturating_sub(self.done.len())
                .min(self.in_kernel);
            let idle = {
                let sq = self.ring.submission();
                sq.is_empty() && !sq.cq_overflow()
            };
            if want == 0 && idle {
                // Nothing to tell the kernel: completions are read from the shared ring, with
                // no system call (readers poll their queue before each blocking wait). This
                // holds for rings without DEFER_TASKRUN (as built in `new`), whose completions
                // are posted without the owner entering the kernel.
                self.collect();
                return Ok(());
            }
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.collect();
            // Keep going while ops wait for room and the caller wants completions.
            if self.pending.is_empty() || self.done.len() >= min_complete.max(1) {
                return Ok(());
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        self.collect();
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.pending.len() + self.in_kernel + self.done.len()
    }

    fn fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.ring.as_raw_fd())
    }

    fn wait(&mut self, bell: &Arc<Doorbell>) -> io::Result<()> {
        if !self.bell_armed {
            let entry = opcode::Read::new(types::Fd(bell.fd()), self.bell_buf.as_mut_ptr(), 8)
                .build()
                .user_data(BELL);
            // SAFETY: the buffer is never freed (see `bell_buf`).
            self.bell_armed = unsafe { self.ring.submission().push(&entry).is_ok() };
        }
        if self.bell_armed && self.in_kernel == 0 && self.pending.is_empty() && self.done.is_empty()
        {
            // Nothing of ours in flight (a wrapper waits for work of its own, which rings the
            // bell when done): only the bell can end this wait, and `submit(1)` would not wait.
            loop {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => return Err(e),
                }
            }
            self.collect();
            return Ok(());
        }
        self.submit(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoOp;

    fn queue(dir: &std::path::Path) -> UringQueue {
        let path = dir.join("dev.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let files = FileSet::open(&[path]).unwrap();
        UringQueue::new(&files, 64).unwrap()
    }

    fn write(q: &mut UringQueue, offset: u64, buf: AlignedBuf) -> IoDone {
        let len = buf.len();
        q.push(IoOp {
            kind: OpKind::Write,
            dev: 0,
            offset,
            len,
            buf,
            tag: 7,
        });
        q.submit(1).unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            q.reap(&mut done);
        }
        done.pop().unwrap()
    }

    /// Long writes from the registered pool reach the file like any other, the pool gets its
    /// chunks back when the buffers drop, and a request the pool cannot hold (or a short one)
    /// comes from the heap instead of failing.
    #[test]
    fn writes_from_registered_buffers_land_and_give_their_chunks_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = queue(dir.path());
        assert!(
            matches!(q.fixed, Fixed::Untried),
            "nothing pinned before a long write"
        );
        // A short write's buffer comes from the heap, and registers nothing.
        // SAFETY: never read.
        let short = unsafe { q.write_buf(4096) };
        assert!(matches!(q.fixed, Fixed::Untried));

        // SAFETY: filled whole below before any read.
        let mut b = unsafe { q.write_buf(FIXED_MIN_BYTES + 3 * 4096) };
        let Fixed::Pool(pool, _) = &q.fixed else {
            panic!("the kernel refused the buffers (run as root, or raise RLIMIT_MEMLOCK)");
        };
        let pool = pool.clone();
        let (_, pool_bytes) = pool.region();
        assert!(b.is_in(&pool));
        assert!(!short.is_in(&pool));
        assert_eq!(b.len(), FIXED_MIN_BYTES + 3 * 4096);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        let expect = b.to_vec();
        let done = write(&mut q, 1 << 20, b);
        assert!(done.result.is_ok(), "{:?}", done.result);
        drop(done);
        assert_eq!(pool.in_use(), 0, "the written buffer went back");
        let mut got = vec![0u8; expect.len()];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(dir.path().join("dev.img")).unwrap(),
            &mut got,
            1 << 20,
        )
        .unwrap();
        assert_eq!(got, expect);

        // The whole pool in one buffer, then one more: from the heap.
        // SAFETY: never read.
        let whole = unsafe { q.write_buf(pool_bytes) };
        assert!(whole.is_in(&pool));
        // SAFETY: as above.
        let spill = unsafe { q.write_buf(FIXED_MIN_BYTES) };
        assert!(!spill.is_in(&pool));
        drop(whole);
        // SAFETY: as above.
        let again = unsafe { q.write_buf(FIXED_MIN_BYTES) };
        assert!(again.is_in(&pool));
        drop(again);
        assert_eq!(pool.in_use(), 0);
    }
}
