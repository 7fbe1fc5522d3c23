//! A volume's state: its size, flags, dedup domain and one LBA map per shard; and the
//! pool's table of volumes by name.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::api::{DedupDomain, BLOCK_BYTES};
use crate::map::lba::{shard_of, LbaMap};
use crate::meta::cache::MetaCache;
use crate::reduce::FingerprintKey;

/// Volumes by name, and the id the next one gets.
pub(crate) struct VolumeTable {
    pub(crate) by_name: BTreeMap<String, Arc<VolumeState>>,
    pub(crate) next_id: u32,
}

pub(crate) struct VolumeState {
    pub id: u32,
    pub name: String,
    pub size_bytes: AtomicU64,
    /// One map per shard (each holds the pages that shard owns).
    pub maps: Vec<Mutex<LbaMap>>,
    pub deleted: AtomicBool,
    /// New blocks are deduplicated against stored ones.
    pub dedup: AtomicBool,
    /// New blocks are compressed.
    pub compress: AtomicBool,
    /// A snapshot: writes, zeroes and trims are refused.
    pub read_only: AtomicBool,
    /// QoS limits and buckets, taken at admission (`Volume::submit`).
    pub qos: crate::qos::Limiter,
    /// The volume's dedup domain.
    domain: RwLock<DedupDomain>,
    /// The key its new blocks are fingerprinted under, one copy per shard so that shards
    /// writing the volume at once never share a lock's cache line.
    fp_keys: Vec<PerShard<Mutex<FingerprintKey>>>,
}

/// A value alone on its cache line.
#[repr(align(64))]
struct PerShard<T>(T);

impl VolumeState {
    /// A volume whose map leaves `meta` counts.
    pub(crate) fn new(
        id: u32,
        name: String,
        size_bytes: u64,
        shards: usize,
        meta: &Arc<MetaCache>,
    ) -> Self {
        let blocks = size_bytes.div_ceil(BLOCK_BYTES);
        VolumeState {
            id,
            name,
            size_bytes: AtomicU64::new(size_bytes),
            maps: (0..shards)
                .map(|_| Mutex::new(LbaMap::cached(blocks, meta.clone())))
                .collect(),
            deleted: AtomicBool::new(false),
            dedup: AtomicBool::new(true),
            compress: AtomicBool::new(true),
            read_only: AtomicBool::new(false),
            qos: crate::qos::Limiter::default(),
            domain: RwLock::new(DedupDomain::Shared),
            // Replaced by `set_dedup_domain` before the volume is published (this placeholder
            // key is derived from no secret).
            fp_keys: (0..shards)
                .map(|_| PerShard(Mutex::new(FingerprintKey::derive(&[0; 32], b"unset"))))
                .collect(),
        }
    }

    /// Put the volume in dedup domain `d` of the pool whose secret is `pool_key`: its new
    /// blocks are fingerprinted under that domain's key from now on.
    pub fn set_dedup_domain(&self, d: DedupDomain, pool_key: &[u8; 32]) {
        let key = FingerprintKey::derive(pool_key, &d.id_bytes(self.id));
        let mut domain = self.domain.write();
        for k in &self.fp_keys {
            *k.0.lock() = key.clone();
        }
        *domain = d;
    }

    pub fn dedup_domain(&self) -> DedupDomain {
        self.domain.read().clone()
    }

    /// Fingerprint of a new block of this volume written by shard `shard`, under its domain's
    /// key (`reduce::FingerprintKey`).
    pub fn fingerprint(&self, shard: usize, block: &[u8]) -> u128 {
        self.fp_keys[shard % self.fp_keys.len()]
            .0
            .lock()
            .fingerprint(block)
    }

    /// Checkpoint flags (`format::VOLUME_NO_DEDUP`, `format::VOLUME_NO_COMPRESSION`).
    pub fn flags(&self) -> u16 {
        let mut f = 0;
        if !self.dedup.load(Ordering::Relaxed) {
            f |= crate::format::VOLUME_NO_DEDUP;
        }
        if !self.compress.load(Ordering::Relaxed) {
            f |= crate::format::VOLUME_NO_COMPRESSION;
        }
        if self.read_only.load(Ordering::Relaxed) {
            f |= crate::format::VOLUME_READ_ONLY;
        }
        f
    }

    pub fn set_flags(&self, f: u16) {
        self.dedup
            .store(f & crate::format::VOLUME_NO_DEDUP == 0, Ordering::Relaxed);
        self.compress.store(
            f & crate::format::VOLUME_NO_COMPRESSION == 0,
            Ordering::Relaxed,
        );
        self.read_only
            .store(f & crate::format::VOLUME_READ_ONLY != 0, Ordering::Relaxed);
    }

    pub fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub fn blocks(&self) -> u64 {
        self.size().div_ceil(BLOCK_BYTES)
    }

    pub fn lookup(&self, lba: u64) -> crate::error::Result<u64> {
        self.maps[shard_of(lba, self.maps.len())].lock().get(lba)
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.maps.iter().map(|m| m.lock().mapped).sum()
    }
}
