//! The attacker's toolkit, shared by the engine's and the end-to-end trust tests: blocks
//! crafted to look like ingot's own log records and segment headers, with every field a strong
//! attacker can know or guess, and copies of genuine ones read from a backing file.
#![allow(dead_code)]

pub const BLOCK: usize = 4096;
/// Segment size and pool size the trust tests create pools with.
pub const SEG: u64 = 2 << 20;
pub const POOL_BYTES: u64 = 64 << 20;
/// Volume ids of "a" (the victim) and "b" (the attacker): the first two volumes created.
pub const VOL_A: u32 = 1;
pub const VOL_B: u32 = 2;

/// Deterministic pseudo-random bytes (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    pub fn block(&mut self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        self.fill(&mut b);
        b
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Data records of dedup references: "b"'s LBAs -> "a"'s block ids.
    DataRefs,
    /// Trim records over "a"'s blocks.
    Trims,
    /// Move records relocating "a"'s blocks (ids and locations read from the device) into
    /// the forged record's own payload.
    Moves,
    /// Data segment and checkpoint segment headers, checkpoint blob starts.
    SegmentHeaders,
    /// Exact copies of every record and segment header block found on the device.
    Copies,
}

/// What the attacker knows of "a": block ids and, for moves, where each block lies.
pub struct Intel {
    pub a_ids: Vec<u64>,
    /// (block id, segment, offset in segment) of "a"'s uncompressed blocks, read from dev0.
    pub a_places: Vec<(u64, u32, u32)>,
}

pub fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// A forged record header block in format `version` (1: CRC-sealed, entries at 64; 2: the
/// MAC field filled with random bytes, entries at 80). The rest of the block stays random, so
/// that the engine stores it uncompressed and 4 KiB-aligned, exactly where a header would be.
#[allow(clippy::too_many_arguments)]
pub fn forged_record(
    rng: &mut Rng,
    version: u16,
    kind: u16,
    epoch: u64,
    segment: u32,
    shard: u16,
    entries: &[Vec<u8>],
    payload_blocks: u32,
) -> Vec<u8> {
    let mut b = rng.block();
    let fixed = if version == 1 { 64 } else { 80 };
    let eb = entries.first().map_or(24, Vec::len);
    let end = fixed + entries.len() * eb;
    assert!(end <= BLOCK);
    put(&mut b, 0, b"IREC");
    put(&mut b, 4, &version.to_le_bytes());
    put(&mut b, 6, &kind.to_le_bytes());
    put(&mut b, 8, &(1u64 << 40).to_le_bytes()); // seq: after everything genuine
    put(&mut b, 16, &(1u64 << 20).to_le_bytes()); // shard_seq: above any expected one
    put(&mut b, 24, &epoch.to_le_bytes());
    put(&mut b, 32, &segment.to_le_bytes());
    put(&mut b, 36, &(entries.len() as u32).to_le_bytes());
    put(
        &mut b,
        40,
        &((1 + payload_blocks) * BLOCK as u32).to_le_bytes(),
    );
    put(&mut b, 44, &(BLOCK as u32).to_le_bytes());
    put(&mut b, 48, &0u64.to_le_bytes()); // durable_shard_seq
    put(&mut b, 56, &shard.to_le_bytes());
    put(&mut b, 58, &[0, 0]);
    for (i, e) in entries.iter().enumerate() {
        put(&mut b, fixed + i * eb, e);
    }
    if version == 1 {
        put(&mut b, 60, &[0; 4]);
        let crc = crc32fast::hash(&b[..end]);
        put(&mut b, 60, &crc.to_le_bytes());
    } else {
        put(&mut b, 60, &[0; 4]);
    }
    b
}

pub fn data_entry(
    volume: u32,
    flags: u16,
    lba: u64,
    id: u64,
    off: u32,
    len: u32,
    crc: u32,
) -> Vec<u8> {
    let mut e = vec![0u8; 56];
    put(&mut e, 0, &volume.to_le_bytes());
    put(&mut e, 4, &flags.to_le_bytes());
    put(&mut e, 8, &lba.to_le_bytes());
    put(&mut e, 16, &id.to_le_bytes());
    put(&mut e, 40, &off.to_le_bytes());
    put(&mut e, 44, &len.to_le_bytes());
    put(&mut e, 48, &crc.to_le_bytes());
    e
}

pub fn trim_entry(volume: u32, lba: u64, count: u64) -> Vec<u8> {
    let mut e = vec![0u8; 24];
    put(&mut e, 0, &volume.to_le_bytes());
    put(&mut e, 8, &lba.to_le_bytes());
    put(&mut e, 16, &count.to_le_bytes());
    e
}

pub fn segment_header(rng: &mut Rng, kind: u16, segment: u32, shard: u16, epoch: u64) -> Vec<u8> {
    let mut b = rng.block();
    put(&mut b, 0, b"ISEG");
    put(&mut b, 4, &1u16.to_le_bytes());
    put(&mut b, 6, &kind.to_le_bytes());
    put(&mut b, 8, &segment.to_le_bytes());
    put(&mut b, 12, &shard.to_le_bytes());
    put(&mut b, 40, &u32::MAX.to_le_bytes());
    put(&mut b, 24, &epoch.to_le_bytes());
    put(&mut b, 60, &[0; 4]);
    let crc = crc32fast::hash(&b[..64]);
    put(&mut b, 60, &crc.to_le_bytes());
    // A checkpoint blob's magic right after, as the first bytes of a checkpoint.
    put(&mut b, 80, b"ICKP");
    b
}

/// The attacker's blocks for one cycle, as separate writes (one record each). Candidates come
/// in the order most likely to hit: the current epoch first, shard 1 (which the spray's first
/// record goes to) first, every segment.
pub fn spray(rng: &mut Rng, kind: Kind, epoch: u64, intel: &Intel, device: &[u8]) -> Vec<Vec<u8>> {
    let segments = ((POOL_BYTES - (1 << 20)) / SEG) as u32;
    let mut candidates = Vec::new();
    for version in [1u16, 2] {
        for e in [epoch, epoch - 1, epoch + 1] {
            for shard in [1u16, 0, 2] {
                for seg in 0..segments {
                    candidates.push((version, e, shard, seg));
                }
            }
        }
    }
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    match kind {
        Kind::DataRefs | Kind::Trims => {
            for (n, &(version, e, shard, seg)) in candidates.iter().enumerate() {
                let entries: Vec<Vec<u8>> = if kind == Kind::DataRefs {
                    // Eight of "a"'s ids per record, mapped into "b".
                    (0..8)
                        .map(|i| {
                            let k = (n * 8 + i) % intel.a_ids.len();
                            data_entry(VOL_B, 2, 1000 + k as u64, intel.a_ids[k], 0, 0, 0)
                        })
                        .collect()
                } else {
                    vec![trim_entry(VOL_A, 0, 1 << 20)]
                };
                let k = if kind == Kind::DataRefs { 1 } else { 2 };
                blocks.push(forged_record(rng, version, k, e, seg, shard, &entries, 0));
            }
        }
        Kind::Moves => {
            for &(version, e, shard, seg) in &candidates {
                // The payload the moved blocks would take: the attacker's own bytes.
                let payload = rng.block();
                let crc = crc32fast::hash(&payload);
                let entries: Vec<Vec<u8>> = intel
                    .a_places
                    .iter()
                    .take(8)
                    .map(|&(id, s, o)| {
                        let from = u64::from(s) << 32 | u64::from(o);
                        data_entry(u32::MAX, 0, from, id, BLOCK as u32, BLOCK as u32, crc)
                    })
                    .collect();
                if entries.is_empty() || e != epoch {
                    continue;
                }
                blocks.push(forged_record(rng, version, 3, e, seg, shard, &entries, 1));
                blocks.push(payload);
            }
        }
        Kind::SegmentHeaders => {
            for &(version, e, shard, seg) in &candidates {
                if version == 1 {
                    blocks.push(segment_header(rng, 1 + (seg % 2) as u16, seg, shard, e));
                }
            }
        }
        Kind::Copies => {
            // Every 4 KiB block of the device that starts with a record or segment header.
            blocks = device
                .chunks_exact(BLOCK)
                .skip((1 << 20) / BLOCK)
                .filter(|b| &b[..4] == b"IREC" || &b[..4] == b"ISEG")
                .map(<[u8]>::to_vec)
                .collect();
            assert!(!blocks.is_empty(), "no genuine record found to copy");
        }
    }
    // 62 blocks a write: one record each, its header area a single 4 KiB block.
    blocks.chunks(62).map(<[Vec<u8>]>::concat).collect()
}

impl Intel {
    /// What the attacker learns from the device about "a"'s blocks `a` (in write order): ids
    /// (handed out in write order, from 1; twice as many guessed) and where each block lies.
    pub fn gather(device: &[u8], a: &[Vec<u8>]) -> Intel {
        let a_places = a
            .iter()
            .enumerate()
            .filter_map(|(i, blk)| {
                let at = *find(device, blk).first()?;
                let rel = at - (1 << 20);
                Some((i as u64 + 1, (rel / SEG) as u32, (rel % SEG) as u32))
            })
            .collect();
        Intel {
            a_ids: (1..=a.len() as u64 * 2).collect(),
            a_places,
        }
    }
}

/// Offsets in `device` of 4 KiB blocks equal to `block`.
pub fn find(device: &[u8], block: &[u8]) -> Vec<u64> {
    device
        .chunks_exact(BLOCK)
        .enumerate()
        .filter(|(_, b)| *b == block)
        .map(|(i, _)| (i * BLOCK) as u64)
        .collect()
}
