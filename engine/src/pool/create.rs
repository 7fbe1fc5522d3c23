//! Creating a pool: claim the devices, write the first superblocks and checkpoint.

use crate::pool::{
    in_dir, is_block_device, lock_dir, now_unix, random_uuid, write_pool_file, CreateOptions, Pool,
    PoolFile, PoolOptions,
};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::{LogKey, Superblock, DATA_START, IO_ALIGN, NO_SEGMENT, SUPERBLOCK_OFFSETS};
use crate::io::claim::{self, DeviceClaim};
use crate::io::sync::FileSet;
use crate::io::{AlignedBuf, Devices};

impl Pool {
    /// Create a pool in `dir` (created if missing; must not hold a pool) and open it.
    pub fn create(dir: &Path, c: &CreateOptions, o: &PoolOptions) -> Result<Pool> {
        use std::os::unix::fs::OpenOptionsExt; // files of a pool are its owner's only: 0600
        let seg = c.segment_bytes;
        if !seg.is_power_of_two() || !(2 << 20..=1 << 30).contains(&seg) {
            return Err(Error::InvalidSize {
                size: seg,
                reason: "segment size must be a power of two from 2 MiB to 1 GiB",
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::File {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock = lock_dir(dir)?;
        if Pool::exists(dir) {
            return Err(Error::InvalidSize {
                size: 0,
                reason: "the directory already holds a pool",
            });
        }
        let paths: Vec<PathBuf> = if c.devices.is_empty() {
            vec![PathBuf::from("dev0.img")]
        } else {
            c.devices.clone()
        };
        let per_dev = c.size_bytes / paths.len() as u64;
        let abs = in_dir(dir, &paths);
        if per_dev / seg < 4 && abs.iter().any(|p| !is_block_device(p)) {
            return Err(Error::InvalidSize {
                size: c.size_bytes,
                reason: "a pool needs at least 4 segments per device",
            });
        }
        // One device, one pool: claimed before anything is written to it, and not overwritten
        // when it holds data or another pool unless told to.
        let claim = DeviceClaim::acquire(&abs, true)?;
        if !c.force {
            claim.refuse_used()?;
        }
        for full in &abs {
            if !is_block_device(full) {
                let segs = per_dev / seg;
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .mode(0o600)
                    .open(full)
                    .map_err(|source| Error::File {
                        path: full.clone(),
                        source,
                    })?;
                f.set_len(DATA_START + segs * seg)
                    .map_err(|source| Error::File {
                        path: full.clone(),
                        source,
                    })?;
                // Sparse: each segment is allocated (fallocate) when a shard reserves it, one
                // ahead of use, so an idle pool takes no disk and writes still land in allocated
                // extents.
            }
        }
        let files = FileSet::open(&abs).map_err(|source| Error::File {
            path: abs[0].clone(),
            source,
        })?;
        if c.prefill {
            let zero = AlignedBuf::new(8 << 20);
            for (d, path) in abs.iter().enumerate() {
                let end = files.size(d as u16);
                let mut off = DATA_START;
                while off < end {
                    let n = (end - off).min(zero.len() as u64) as usize;
                    files
                        .write_at(d as u16, &zero[..n], off)
                        .map_err(|source| Error::File {
                            path: path.clone(),
                            source,
                        })?;
                    off += n as u64;
                }
            }
        }
        let pool_uuid = random_uuid();
        let log_key = LogKey::generate().map_err(|source| Error::File {
            path: abs[0].clone(),
            source,
        })?;
        let mut first = 0u32;
        let mut buf = AlignedBuf::new(IO_ALIGN);
        let created = now_unix();
        let mut sbs = Vec::new();
        let total: u32 = (0..abs.len())
            .map(|d| ((files.size(d as u16).saturating_sub(DATA_START)) / seg) as u32)
            .sum();
        for d in 0..abs.len() {
            let count = (files.size(d as u16).saturating_sub(DATA_START) / seg) as u32;
            let version = if o.paged_metadata {
                crate::format::FORMAT_VERSION_PAGED
            } else {
                crate::format::FORMAT_VERSION
            };
            let sb = Superblock {
                version,
                log_key: Some(log_key),
                device_index: d as u16,
                device_count: abs.len() as u16,
                pool_uuid,
                device_uuid: random_uuid(),
                generation: 0,
                segment_bytes: seg,
                first_segment: first,
                segment_count: count,
                total_segments: total,
                checkpoint_segment: NO_SEGMENT,
                checkpoint_seq: 0,
                checkpoint_bytes: 0,
                checkpoint_crc: 0,
                checkpoint_offset: 0,
                created_unix: created,
            };
            sb.encode(&mut buf);
            for off in SUPERBLOCK_OFFSETS {
                files
                    .write_at(d as u16, &buf, off)
                    .map_err(|source| Error::File {
                        path: abs[d].clone(),
                        source,
                    })?;
            }
            sbs.push(sb);
            first += count;
        }
        {
            files.sync().map_err(|source| Error::File {
                path: abs[0].clone(),
                source,
            })?;
        }
        drop(files);
        let pf = PoolFile {
            // What the superblocks say (the authority; an open upgrades them, not this).
            format_version: sbs
                .first()
                .map_or(crate::format::FORMAT_VERSION, |sb| sb.version),
            devices: paths,
            prefilled: c.prefill,
            pool_uuid: Some(claim::uuid_string(&pool_uuid)),
        };
        write_pool_file(dir, &pf)?;
        Pool::open_locked(dir, o, lock, Some(claim))
    }
}
