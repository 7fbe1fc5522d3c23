//! Smoke run of the fuzz entry points (`fuzz/fuzz_targets/iscsi_*.rs`): hand-made seeds plus
//! deterministic mutations of them, for a couple of seconds each. With `INGOT_WRITE_SEEDS=DIR`
//! the seeds are also written to `DIR/<target>/` to start a fuzzer.

use std::path::Path;
use std::time::{Duration, Instant};

use ingot_iscsi::fuzzing;
use ingot_iscsi::pdu::{encode_pdu, op, Bhs};

fn pdu(opcode: u8, flags: u8, data: &[u8], hd: bool, dd: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = Bhs::new(opcode, flags);
    b.set_itt(1);
    b.set_u32(20, data.len() as u32);
    b.0[32] = 0x2a;
    encode_pdu(&mut out, &b, data, hd, dd);
    out
}

fn pdu_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (hd, dd) in [(false, false), (true, true)] {
        let mut s = pdu(op::SCSI_CMD, 0xa1, &[0x55; 512], hd, dd);
        s.extend(pdu(op::DATA_OUT, 0x80, &[1, 2, 3], hd, dd));
        s.extend(pdu(op::NOP_OUT, 0x80, b"ping", hd, dd));
        seeds.push(s);
    }
    // A SCSI command with an extended-CDB AHS.
    let mut b = Bhs::new(op::SCSI_CMD, 0xc1);
    b.0[4] = 5;
    let mut s = b.0.to_vec();
    s.extend_from_slice(&[0, 17, 1, 0]);
    s.extend_from_slice(&[0x7f; 16]);
    seeds.push(s);
    seeds
}

fn login_seeds() -> Vec<Vec<u8>> {
    vec![
        b"\x81\x87InitiatorName=iqn.x\0TargetName=iqn.ab\0AuthMethod=None\0\xffHeaderDigest=CRC32C,None\0MaxRecvDataSegmentLength=65536\0".to_vec(),
        b"\x01\x81InitiatorName=iqn.x\0TargetName=iqn.a\0AuthMethod=CHAP,None\0\xffCHAP_A=5\0\xffCHAP_N=u\0CHAP_R=0x00112233445566778899aabbccddeeff\0CHAP_I=1\0CHAP_C=0x0102\0".to_vec(),
        b"\x81\x81SessionType=Discovery\0InitiatorName=i\0\xffMaxBurstLength=0x100\0".to_vec(),
    ]
}

/// Byte flips, truncations, insertions and splices, deterministic.
fn mutate(seed: &[u8], round: u64) -> Vec<u8> {
    let mut x = round.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = seed.to_vec();
    for _ in 0..(next() % 6 + 1) {
        if v.is_empty() {
            v.push(next() as u8);
            continue;
        }
        let at = (next() as usize) % v.len();
        match next() % 5 {
            0 => v[at] ^= 1 << (next() % 8),
            1 => v[at] = next() as u8,
            2 => v.truncate(at),
            3 => v.insert(at, next() as u8),
            _ => {
                let n = (next() % 8) as usize;
                let fill = next() as u8;
                for i in at..(at + n).min(v.len()) {
                    v[i] = fill;
                }
            }
        }
    }
    v
}

fn smoke(name: &str, seeds: &[Vec<u8>], f: fn(&[u8])) {
    if let Some(dir) = std::env::var_os("INGOT_WRITE_SEEDS") {
        let d = Path::new(&dir).join(name);
        std::fs::create_dir_all(&d).expect("seed dir");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s).expect("write seed");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut round = 0u64;
    for s in seeds {
        f(s);
    }
    while Instant::now() < deadline {
        for s in seeds {
            f(&mutate(s, round));
            round += 1;
        }
    }
    assert!(round > 100, "{name}: only {round} mutations ran");
}

#[test]
fn pdu_decoder_survives_mutations() {
    smoke("iscsi_pdu", &pdu_seeds(), fuzzing::pdus);
}

#[test]
fn login_text_survives_mutations() {
    smoke("iscsi_login_text", &login_seeds(), fuzzing::login_text);
}
