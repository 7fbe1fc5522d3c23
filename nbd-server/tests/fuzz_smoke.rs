//! Smoke run of the fuzz entry points (`fuzz/fuzz_targets/nbd_*.rs`): hand-made seeds plus
//! deterministic mutations of them, and any corpus files under `fuzz/corpus/nbd_*`. With
//! `INGOT_WRITE_SEEDS=DIR` the seeds are also written to `DIR/<target>/` to start a fuzzer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ingot_nbd::fuzzing;
use ingot_nbd::proto::*;

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn name_data(name: &str, tail: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(tail);
    d
}

fn meta(name: &str) -> Vec<u8> {
    let q = META_BASE_ALLOCATION.as_bytes();
    let mut tail = 1u32.to_be_bytes().to_vec();
    tail.extend_from_slice(&(q.len() as u32).to_be_bytes());
    tail.extend_from_slice(q);
    name_data(name, &tail)
}

fn compact(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    RequestHeader {
        magic: REQUEST_MAGIC,
        flags,
        command: cmd,
        cookie,
        offset,
        len,
    }
    .encode()
    .to_vec()
}

fn extended(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    ExtRequestHeader {
        magic: EXTENDED_REQUEST_MAGIC,
        flags,
        command: cmd,
        cookie,
        offset,
        len,
    }
    .encode()
    .to_vec()
}

fn compact_requests() -> Vec<u8> {
    let mut v = compact(CMD_FLAG_FUA, CMD_WRITE, 1, 4096, 8192);
    v.extend_from_slice(&[0xa5; 8192]);
    v.extend(compact(0, CMD_READ, 2, 0, 16384));
    v.extend(compact(CMD_FLAG_DF, CMD_READ, 3, 4096, 4096));
    v.extend(compact(0, CMD_TRIM, 4, 4096, 4096));
    v.extend(compact(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 0, 4096));
    v.extend(compact(0, CMD_BLOCK_STATUS, 6, 0, 1 << 20));
    v.extend(compact(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 7, 0, 4096));
    v.extend(compact(0, CMD_CACHE, 8, 0, 4096));
    v.extend(compact(0, CMD_FLUSH, 9, 0, 0));
    v.extend(compact(0, CMD_READ, 10, 1 << 20, 512));
    v.extend(compact(0, 99, 11, 0, 0));
    v.extend(compact(0, CMD_DISC, 12, 0, 0));
    v
}

fn extended_requests() -> Vec<u8> {
    let mut v = extended(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 4096);
    v.extend_from_slice(&[7; 4096]);
    v.extend(extended(0, CMD_READ, 2, 0, 8192));
    v.extend(extended(0, CMD_BLOCK_STATUS, 3, 0, 1 << 40));
    v.extend(extended(0, CMD_TRIM, 4, 0, 1 << 33));
    v.extend(extended(CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 5, 0, 16));
    v.extend_from_slice(&[0; 16]);
    v.extend(extended(0, CMD_WRITE, 6, 0, 512));
    v.extend(extended(0, CMD_DISC, 7, 0, 0));
    v
}

fn session_seeds() -> Vec<Vec<u8>> {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let go = |name: &str| opt(OPT_GO, &name_data(name, &[0, 1, 0, 3]));
    let mut seeds = Vec::new();
    for mode in [0u8, 1, 3, 4] {
        let mut s = vec![mode];
        s.extend_from_slice(&flags);
        s.extend(opt(OPT_LIST, &[]));
        s.extend(opt(OPT_INFO, &name_data("vol0", &[0, 2, 0, 1, 0, 2])));
        s.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        s.extend(opt(OPT_LIST_META_CONTEXT, &meta("vol0")));
        s.extend(opt(OPT_SET_META_CONTEXT, &meta("vol0")));
        s.extend(opt(OPT_STARTTLS, &[]));
        s.extend(go("vol0"));
        s.extend(compact_requests());
        seeds.push(s);

        let mut s = vec![mode];
        s.extend_from_slice(&flags);
        s.extend(opt(OPT_EXTENDED_HEADERS, &[]));
        s.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        s.extend(opt(OPT_SET_META_CONTEXT, &meta("")));
        s.extend(go(""));
        s.extend(extended_requests());
        seeds.push(s);

        let mut s = vec![mode];
        s.extend_from_slice(&flags);
        s.extend(opt(12345, b"junk"));
        s.extend(opt(OPT_EXPORT_NAME, b"ro"));
        s.extend(compact_requests());
        seeds.push(s);

        let mut s = vec![mode];
        s.extend_from_slice(&flags);
        s.extend(opt(OPT_ABORT, &[]));
        seeds.push(s);
    }
    seeds
}

fn request_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for mode in 0u8..16 {
        let mut s = vec![mode];
        if mode & 2 != 0 {
            s.extend(extended_requests());
        } else {
            s.extend(compact_requests());
        }
        seeds.push(s);
    }
    seeds
}

/// Deterministic mutations: flipped bytes, truncations and splices (xorshift).
fn mutations(seed: &[u8], n: usize, salt: u64) -> Vec<Vec<u8>> {
    let mut x = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let mut m = seed.to_vec();
            match next() % 3 {
                0 => {
                    for _ in 0..1 + next() % 4 {
                        let i = (next() as usize) % m.len().max(1);
                        if let Some(b) = m.get_mut(i) {
                            *b = next() as u8;
                        }
                    }
                }
                1 => m.truncate((next() as usize) % (m.len() + 1)),
                _ => {
                    let i = (next() as usize) % (m.len() + 1);
                    let junk: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
                    m.splice(i..i, junk);
                }
            }
            m
        })
        .collect()
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .collect()
}

fn write_seeds(target: &str, seeds: &[Vec<u8>]) {
    let Some(dir) = std::env::var_os("INGOT_WRITE_SEEDS") else {
        return;
    };
    let dir = Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s).unwrap();
    }
}

fn smoke(target: &str, seeds: Vec<Vec<u8>>, run: fn(&[u8])) {
    write_seeds(target, &seeds);
    let started = Instant::now();
    let mut inputs = seeds.clone();
    for (i, s) in seeds.iter().enumerate() {
        inputs.extend(mutations(s, 40, i as u64));
    }
    inputs.extend(corpus(target));
    for input in &inputs {
        run(input);
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{target}: {} inputs took {:?}",
        inputs.len(),
        started.elapsed()
    );
}

#[test]
fn session_target_survives_seeds_and_mutations() {
    smoke("nbd_session", session_seeds(), fuzzing::session);
}

#[test]
fn requests_target_survives_seeds_and_mutations() {
    smoke("nbd_requests", request_seeds(), fuzzing::requests);
}
