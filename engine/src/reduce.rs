//! Data reduction: fingerprints, LZ4 compression of block groups, and the dedup index.
//!
//! Every 4 KiB block written is fingerprinted with XXH3-128. The fingerprint is not
//! cryptographic, so a block is shared only after its bytes were compared with the candidate's:
//! the index maps 64 bits of the fingerprint to a block id and is only ever a hint.
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

/// XXH3-128 of a block's plaintext.
pub fn fingerprint(block: &[u8]) -> u128 {
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

    /// Keep only entries whose block id passes `live` (dead blocks' entries only cost reads).
    pub fn retain(&mut self, mut live: impl FnMut(u64) -> bool) {
        self.map.retain(|_, id| live(*id));
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
    fn index_samples_past_budget() {
        let mut idx = DedupIndex::new(INDEX_ENTRY_BYTES * 1024);
        for i in 0..10_000u64 {
            idx.insert(fingerprint(&i.to_le_bytes()) as u64, i + 1);
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
