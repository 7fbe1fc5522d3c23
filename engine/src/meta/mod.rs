//! Metadata on flash (issue 22, docs/design/paged-metadata.md): the block table, the maps and
//! the per-block arrays written as pages into metadata segments at checkpoints, only what
//! changed since the last one. Built piece by piece: format 3 checkpoints write whole images
//! through the page writer (`writer`) and page trees (`paged::ArrayPages`); the arrays kept as
//! pages in RAM (`paged::PagedArray`) and the retention of metadata segments (`segs`) wait for
//! incremental checkpoints.

pub(crate) mod cache;
pub(crate) mod paged;
pub(crate) mod segs;
pub(crate) mod writer;

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::{Cell, RefCell};
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    use super::paged::StoreSource;
    use super::writer::{MetaTarget, MetaWriter, Stamps};
    use crate::error::Result;
    use crate::format::{LogKey, DATA_START};
    use crate::io::sync::FileSet;
    use crate::io::{open_devices, IoKind};
    use crate::space::Geometry;
    use crate::store::LocalStore;

    pub(crate) const SEG: u64 = 1 << 20;

    /// Flip a bit `off` bytes into the page at `at` of the pool in `dir` (one device, segments
    /// of `segment_bytes`): bit rot under a page a test then reads.
    pub(crate) fn damage_page(
        dir: &std::path::Path,
        segment_bytes: u64,
        at: crate::format::PagePtr,
        off: u64,
    ) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("dev0.img"))
            .unwrap();
        let pos = DATA_START + u64::from(at.segment) * segment_bytes + u64::from(at.offset) + off;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, pos).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], pos).unwrap();
    }

    /// A pool file of `segments` 1 MiB segments behind the real segment store; the writer
    /// takes fresh segments in order (none is reused).
    pub(crate) struct Disk {
        _dir: tempfile::TempDir,
        path: PathBuf,
        pub store: LocalStore,
        pub key: LogKey,
        next: Cell<u32>,
        stamps: RefCell<Stamps>,
    }

    impl Disk {
        pub(crate) fn new(segments: u32) -> Disk {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("dev0.img");
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(DATA_START + u64::from(segments) * SEG).unwrap();
            drop(f);
            let devices = open_devices(
                FileSet::open(std::slice::from_ref(&path)).unwrap(),
                IoKind::Sync,
            )
            .unwrap();
            let geo = Geometry {
                segment_bytes: SEG,
                devs: vec![(0, segments)],
                total_segments: segments,
            };
            Disk {
                _dir: dir,
                path,
                store: LocalStore::new(devices, geo),
                key: LogKey([3; 32]),
                next: Cell::new(0),
                stamps: RefCell::new(Stamps::new(1)),
            }
        }

        /// Run `f` with a writer; returns its result and the pages written.
        pub(crate) fn write<R>(
            &self,
            f: impl FnOnce(&mut MetaWriter<'_>) -> Result<R>,
        ) -> (R, u64) {
            let mut alloc = || {
                let s = self.next.get();
                self.next.set(s + 1);
                Ok(s)
            };
            let nonce = |s: u32| [s as u8; 16];
            let mut guard = self.stamps.borrow_mut();
            let stamps: &mut Stamps = &mut guard;
            let mut w = MetaWriter::new(
                MetaTarget {
                    store: &self.store,
                    key: &self.key,
                    pool_uuid: [9; 16],
                    epoch: 1,
                    segment_bytes: SEG,
                    alloc: &mut alloc,
                    nonce: &nonce,
                },
                stamps,
            );
            let r = f(&mut w).unwrap();
            let written = w.finish().unwrap();
            (r, written.pages.iter().map(|&(_, n)| u64::from(n)).sum())
        }

        pub(crate) fn source(&self) -> StoreSource<'_> {
            StoreSource {
                store: &self.store,
                epoch: 1,
            }
        }

        /// Flip one byte of segment `seg` at `offset`.
        pub(crate) fn flip(&self, seg: u32, offset: u64) {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .unwrap();
            let at = DATA_START + u64::from(seg) * SEG + offset;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            b[0] ^= 0x40;
            f.write_all_at(&b, at).unwrap();
        }
    }
}
