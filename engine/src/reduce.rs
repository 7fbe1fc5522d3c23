//! Data reduction: fingerprints, LZ4 compression of block groups, and the dedup index.
//!
//! Every 4 KiB block written is fingerprinted with XXH3-128 under a secret derived from the
//! pool's secret key and the writing volume's dedup domain ([`FingerprintKey`]). The index maps 64
//! bits of the fingerprint to a block id and is only ever a hint: a block is shared only after
//! its bytes were compared with the candidate's. Clients never learn the key, so they cannot
//! craft blocks whose fingerprints collide with others' (which would force verify reads and push
//! other volumes' entries out of the bounded index), and two domains' fingerprints of the same
//! block are unrelated, so a lookup from one domain never finds another domain's blocks.
//!
//! New blocks that arrive together for consecutive LBAs of one volume are compressed as a group
//! of up to [`GROUP_BLOCKS`] blocks (LZ4 finds more repetition across a 32 KiB window than
//! within each 4 KiB block); each block of a group keeps its own block id, so dedup, trims and
//! overwrites stay per block. Payloads are packed byte-tight in records.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::cache::IdHasher;
use crate::format::{FLAG_LZ4, GROUP_COUNT_SHIFT, GROUP_INDEX_SHIFT};

/// Most blocks compressed together.
pub const GROUP_BLOCKS: usize = 8;
const BLOCK: usize = 4096;

/// BLAKE3 key-derivation context of fingerprint secrets (never reused for anything else).
const FINGERPRINT_CONTEXT: &str = "ingot 2025 dedup fingerprint secret v1";

/// Bytes of an XXH3 secret (its default size; at least 136).
const SECRET_BYTES: usize = 192;

/// The secret one dedup domain fingerprints its blocks under, derived from the pool's secret
/// key with BLAKE3 (key derivation, XOF output): a 192-byte XXH3 secret and a 64-bit tag.
///
/// A fingerprint is 128 bits: the low 64 are XXH3-128 of the block under the domain's secret,
/// the high 64 are the domain's `tag`, itself secret and different for each domain. The index
/// keys on the low 64 bits (see `Inner::dedup_key`); the tag keeps domains apart in the few
/// places that compare whole fingerprints (within a record) and when tests force every key to
/// collide. XXH3 with a secret is not a PRF: without the secret, crafting blocks that collide
/// is much harder than with public XXH3 (the attacker sees no fingerprint, only whether its own
/// writes deduplicate within its domain), but nothing proves it. Keyed BLAKE3 would be a PRF at
/// about six times the cost per 4 KiB block (`bench/benches/fingerprint.rs`, docs/architecture.md
/// "Dedup across tenants"). Every dedup hit is verified byte for byte, so a collision, crafted
/// or not, costs a read and never data.
#[derive(Clone)]
pub struct FingerprintKey {
    secret: Box<[u8; SECRET_BYTES]>,
    tag: u64,
}

impl FingerprintKey {
    /// The key of the domain named by `domain` (bytes that identify it, see
    /// `DedupDomain::id_bytes`) in the pool whose secret is `pool_key`.
    pub fn derive(pool_key: &[u8; 32], domain: &[u8]) -> FingerprintKey {
        let mut h = blake3::Hasher::new_derive_key(FINGERPRINT_CONTEXT);
        h.update(pool_key);
        h.update(&(domain.len() as u64).to_le_bytes());
        h.update(domain);
        let mut xof = h.finalize_xof();
        let mut secret = Box::new([0u8; SECRET_BYTES]);
        xof.fill(&mut secret[..]);
        let mut tag = [0u8; 8];
        xof.fill(&mut tag);
        FingerprintKey {
            secret,
            tag: u64::from_le_bytes(tag),
        }
    }

    /// Fingerprint of a block's plaintext: XXH3-128 under the domain's secret (low 64 bits),
    /// domain tag (high 64).
    pub fn fingerprint(&self, block: &[u8]) -> u128 {
        let lo = xxhash_rust::xxh3::xxh3_128_with_secret(block, &self.secret[..]) as u64;
        u128::from(self.tag) << 64 | u128::from(lo)
    }

    /// The domain tag every fingerprint under this key carries in its high 64 bits.
    pub fn tag(&self) -> u64 {
        self.tag
    }
}

impl std::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FingerprintKey(..)")
    }
}

/// Unkeyed XXH3-128 of a block: what pools fingerprinted with before keys (kept for tests and
/// the benchmark's baseline; the engine no longer calls it).
pub fn unkeyed_fingerprint(block: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(block)
}

/// Flags of member `idx` of a group of `count` blocks (compressed or not).
pub fn group_flags(lz4: bool, idx: usize, count: usize) -> u16 {
    debug_assert!(idx < count && count <= 16);
    let mut f = if lz4 { FLAG_LZ4 } else { 0 };
    if count > 1 {
        f |= (idx as u16) << GROUP_INDEX_SHIFT | ((count - 1) as u16) << GROUP_COUNT_SHIFT;
    }
    f
}

/// (index in group, blocks in group) from a block's flags.
pub fn group_of(flags: u16) -> (usize, usize) {
    (
        usize::from(flags >> GROUP_INDEX_SHIFT & 0xf),
        usize::from(flags >> GROUP_COUNT_SHIFT & 0xf) + 1,
    )
}

/// The stored bytes a block accounts for: its share of the group's payload (the shares of a
/// group add up to the payload exactly).
pub fn share(stored_len: u16, flags: u16) -> u64 {
    let (idx, n) = group_of(flags);
    let len = u64::from(stored_len);
    let n = n as u64;
    len / n + u64::from((idx as u64) < len % n)
}

/// Whether a group starting with `block` is worth compressing: its first KiB, or else its
/// last KiB, shrinks by a sixteenth under LZ4. Random bytes (encrypted or already compressed
/// data, fio's default buffers) do not, so they are rejected after a byte-value count over
/// the outer 256 bytes of each KiB (compressing them took 40% of the write path's CPU and saved
/// nothing); blocks compressible in only part of their length (zero-padded records) still get
/// their chance.
pub fn worth_compressing(block: &[u8]) -> bool {
    const PROBE: usize = 1024;
    const SAMPLE: usize = 256;
    if block.len() < 2 * PROBE {
        return true;
    }
    let shrinks = |probe: &[u8], sample: &[u8]| {
        if diverse(sample) {
            return false;
        }
        let mut out = [0u8; 1200];
        debug_assert!(lz4_flex::block::get_maximum_output_size(probe.len()) <= out.len());
        // A sixteenth: fio's scrambled buffers save ~2% (zero runs in their headers), which the
        // group would then fail to beat by the eighth it needs.
        matches!(
            lz4_flex::block::compress_into(probe, &mut out),
            Ok(n) if n <= probe.len() - probe.len() / 16
        )
    };
    let (head, tail) = (&block[..PROBE], &block[block.len() - PROBE..]);
    shrinks(head, &head[..SAMPLE]) || shrinks(tail, &tail[PROBE - SAMPLE..])
}

/// Whether 256 contiguous bytes use as many byte values as random bytes do (~162 of the 256,
/// standard deviation ~5; fio's buffers, with zero runs in their headers, 140-150), so LZ4 would
/// not shrink them. Counting a quarter of the probe is four times cheaper than counting all of
/// it, and contiguous bytes keep the structure of arrays of small integers, whose every fourth
/// byte alone can look random. The bar, 128, passes on what the whole KiB's count let through
/// before: bytes about two-thirds random or less (a half-random quarter-KiB shows ~102 values).
fn diverse(sample: &[u8]) -> bool {
    // Plain stores, no read-modify-write: a bitset's `|=` chains every byte on the last one.
    let mut seen = [0u8; 256];
    for &b in sample {
        seen[usize::from(b)] = 1;
    }
    seen.iter().map(|&x| u32::from(x)).sum::<u32>() >= 128
}

/// Compress `plain` (whole blocks); `Some(bytes)` when it saves at least an eighth.
pub fn compress(plain: &[u8]) -> Option<Vec<u8>> {
    let limit = plain.len() - plain.len() / 8;
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(plain.len())];
    let n = lz4_flex::block::compress_into(plain, &mut out).ok()?;
    if n > limit || n > usize::from(u16::MAX) {
        return None;
    }
    out.truncate(n);
    Some(out)
}

/// Why a stored payload could not be turned back into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

/// Plaintext of a stored payload (already checksum-verified): the whole group, `count` blocks.
pub fn decode(stored: &[u8], flags: u16) -> Result<Vec<u8>, DecodeError> {
    let (_, n) = group_of(flags);
    if flags & FLAG_LZ4 == 0 {
        return if stored.len() == BLOCK * n {
            Ok(stored.to_vec())
        } else {
            Err(DecodeError)
        };
    }
    let mut out = vec![0u8; BLOCK * n];
    match lz4_flex::block::decompress_into(stored, &mut out) {
        Ok(k) if k == out.len() => Ok(out),
        _ => Err(DecodeError),
    }
}

/// Fingerprint -> block id hints, within a memory budget. Past the budget the index keeps a
/// sample of the fingerprints (those whose top `sample_bits` bits are zero) and drops the rest:
/// fewer dedup hits, never a failed write.
pub struct DedupIndex {
    map: HashMap<u64, u64, BuildHasherDefault<IdHasher>>,
    max_entries: usize,
    sample_bits: u32,
}

/// Bytes of RAM per index entry (key, id, control byte, 7/8 load factor on average).
pub const INDEX_ENTRY_BYTES: u64 = 24;

impl DedupIndex {
    pub fn new(budget_bytes: u64) -> Self {
        DedupIndex {
            map: HashMap::default(),
            max_entries: (budget_bytes / INDEX_ENTRY_BYTES).max(1024) as usize,
            sample_bits: 0,
        }
    }

    /// Whether `key` belongs to the sample kept: its top `sample_bits` bits are zero.
    fn admits(&self, key: u64) -> bool {
        self.sample_bits == 0 || key >> (64 - self.sample_bits) == 0
    }

    pub fn get(&self, key: u64) -> Option<u64> {
        self.map.get(&key).copied()
    }

    pub fn insert(&mut self, key: u64, id: u64) {
        if !self.admits(key) {
            return;
        }
        self.map.insert(key, id);
        if self.map.len() > self.max_entries {
            while self.map.len() > self.max_entries / 2 && self.sample_bits < 63 {
                self.sample_bits += 1;
                let bits = self.sample_bits;
                self.map.retain(|k, _| k >> (64 - bits) == 0);
            }
            self.map.shrink_to_fit();
        }
    }

    /// Forget `key` if it still points at `id`.
    pub fn remove(&mut self, key: u64, id: u64) {
        if self.map.get(&key) == Some(&id) {
            self.map.remove(&key);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// RAM the table holds (allocated slots, not only used ones).
    pub fn bytes(&self) -> u64 {
        self.map.capacity() as u64 * 17
    }

    /// 1 in `2^sample_bits` fingerprints is kept.
    pub fn sample_bits(&self) -> u32 {
        self.sample_bits
    }

    pub fn set_sample_bits(&mut self, bits: u32) {
        self.sample_bits = bits.min(63);
    }

    pub fn entries(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(&k, &v)| (k, v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for len in [1u16, 7, 100, 4095, 30000] {
            for n in 1..=GROUP_BLOCKS {
                let total: u64 = (0..n).map(|i| share(len, group_flags(true, i, n))).sum();
                assert_eq!(total, u64::from(len));
            }
        }
        assert_eq!(share(4096, 0), 4096);
    }

    #[test]
    fn compress_round_trip_and_refuses_noise() {
        let mut plain = vec![0u8; 4 * BLOCK];
        for (i, b) in plain.iter_mut().enumerate() {
            *b = (i % 61) as u8 ^ (i / 700) as u8;
        }
        let c = compress(&plain).expect("compressible");
        assert!(c.len() < plain.len());
        let f = group_flags(true, 2, 4);
        assert_eq!(group_of(f), (2, 4));
        assert_eq!(decode(&c, f).unwrap(), plain);
        assert_eq!(decode(&c[..c.len() - 1], f), Err(DecodeError));
        let noise = random_block(0x1234_5678_9abc_def0);
        assert!(compress(&noise).is_none());
        assert!(!worth_compressing(&noise));
        assert!(worth_compressing(&plain[..BLOCK]));
        let mut half = noise.clone();
        half[..BLOCK / 2].fill(0);
        assert!(worth_compressing(&half));
        // Compressible only at the end (fio's buffer_compress_percentage layout).
        let mut tail = noise.clone();
        tail[BLOCK * 6 / 10..].fill(0);
        assert!(worth_compressing(&tail));
        // The known cost of the byte-value count: a block that repeats a 251-byte pattern using
        // nearly every byte value is not tried, though LZ4 would shrink it.
        let periodic: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8).collect();
        assert!(compress(&periodic).is_some());
        assert!(!worth_compressing(&periodic));
        // Small integers: every fourth byte random, the rest zero.
        let ints: Vec<u8> = noise
            .iter()
            .flat_map(|&b| [b, 0, 0, 0])
            .take(BLOCK)
            .collect();
        assert!(compress(&ints).is_some());
        assert!(worth_compressing(&ints));
        // fio's buffers: random but for a few zero runs in the head.
        let mut fio = noise.clone();
        fio[3..8].fill(0);
        fio[24..32].fill(0);
        fio[44..48].fill(0);
        assert!(!worth_compressing(&fio));
        // Random blocks are rejected by the count, whatever the seed.
        for seed in 1..200u64 {
            let noise = random_block(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            assert!(diverse(&noise[..256]) && diverse(&noise[BLOCK - 256..]));
        }
    }

    /// One block of random-looking bytes: XXH3 of a counter, seeded.
    fn random_block(seed: u64) -> Vec<u8> {
        (0..BLOCK as u64 / 8)
            .flat_map(|i| {
                xxhash_rust::xxh3::xxh3_64_with_seed(&i.to_le_bytes(), seed).to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn fingerprint_depends_on_pool_key_and_domain() {
        let block = random_block(42);
        let a = FingerprintKey::derive(&[1; 32], b"shared");
        let b = FingerprintKey::derive(&[2; 32], b"shared");
        let a2 = FingerprintKey::derive(&[1; 32], b"named:x");
        assert_eq!(a.fingerprint(&block), a.fingerprint(&block.clone()));
        // Another pool's key: neither half agrees.
        let (fa, fb) = (a.fingerprint(&block), b.fingerprint(&block));
        assert_ne!(fa as u64, fb as u64);
        assert_ne!(fa >> 64, fb >> 64);
        // Another domain of the same pool: neither half agrees either.
        let fa2 = a2.fingerprint(&block);
        assert_ne!(fa as u64, fa2 as u64);
        assert_ne!(fa >> 64, fa2 >> 64);
        assert_eq!((fa >> 64) as u64, a.tag());
        // Not the unkeyed hash.
        assert_ne!(fa as u64, unkeyed_fingerprint(&block) as u64);
        let mut other = block.clone();
        other[4095] ^= 1;
        assert_ne!(a.fingerprint(&other), fa);
        // Derivation is length-prefixed: ("ab", "c") and ("a", "bc") stay apart by construction.
        assert_ne!(
            FingerprintKey::derive(&[1; 32], b"named:ab").tag(),
            FingerprintKey::derive(&[1; 32], b"named:a").tag()
        );
    }

    #[test]
    fn index_samples_past_budget() {
        let mut idx = DedupIndex::new(INDEX_ENTRY_BYTES * 1024);
        for i in 0..10_000u64 {
            idx.insert(unkeyed_fingerprint(&i.to_le_bytes()) as u64, i + 1);
        }
        assert!(idx.len() <= 1024);
        assert!(idx.sample_bits() > 0);
        // What is kept still answers.
        let kept = idx.entries();
        assert!(!kept.is_empty());
        for (k, v) in kept {
            assert_eq!(idx.get(k), Some(v));
        }
    }
}
