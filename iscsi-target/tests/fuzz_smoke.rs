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

/// One command of a [`fuzzing::cdbs`] input.
fn cmd(out: &mut Vec<u8>, flags: u8, cdb: &[u8], data: &[u8]) {
    out.push(flags);
    let mut c = cdb.to_vec();
    c.resize(16, 0);
    out.extend_from_slice(&c);
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

fn cdb_seeds() -> Vec<Vec<u8>> {
    let block = [0x5au8; 512];
    let mut io = Vec::new();
    // WRITE(10) 2 blocks at 4, READ(16), WRITE SAME(16) with UNMAP, VERIFY(10) BYTCHK=1.
    cmd(
        &mut io,
        0,
        &[0x2a, 0, 0, 0, 0, 4, 0, 0, 2, 0],
        &[0x11; 1024],
    );
    cmd(
        &mut io,
        1,
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 2],
        &[],
    );
    cmd(
        &mut io,
        0,
        &[0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8],
        &block,
    );
    cmd(
        &mut io,
        0,
        &[0x2f, 0x02, 0, 0, 0, 4, 0, 0, 1, 0],
        &[0x11; 512],
    );
    // COMPARE AND WRITE of one block, OR WRITE, GET LBA STATUS, SYNCHRONIZE CACHE.
    let mut caw = vec![0x11; 512];
    caw.extend_from_slice(&block);
    cmd(
        &mut io,
        0,
        &[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 1],
        &caw,
    );
    cmd(
        &mut io,
        0,
        &[0x8b, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 1],
        &block,
    );
    cmd(
        &mut io,
        0,
        &[0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[],
    );
    cmd(&mut io, 0x08, &[0x35], &[]);
    // UNMAP of blocks 0-15.
    let mut unmap = vec![
        0, 22, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0,
    ];
    cmd(&mut io, 0x04, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24], &unmap);
    unmap[19] = 0xff;
    cmd(&mut io, 0x10, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24], &unmap);

    let mut pr = Vec::new();
    // REGISTER key 1 for each port, RESERVE type 1 (WE), a write from the other port,
    // PREEMPT, READ FULL STATUS.
    let param = |key: u64, sa_key: u64| {
        let mut p = key.to_be_bytes().to_vec();
        p.extend_from_slice(&sa_key.to_be_bytes());
        p.resize(24, 0);
        p
    };
    cmd(&mut pr, 0, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24], &param(0, 1));
    cmd(&mut pr, 1, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24], &param(0, 2));
    cmd(
        &mut pr,
        0,
        &[0x5f, 1, 0x01, 0, 0, 0, 0, 0, 24],
        &param(1, 0),
    );
    cmd(&mut pr, 1, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &block);
    cmd(
        &mut pr,
        1,
        &[0x5f, 4, 0x01, 0, 0, 0, 0, 0, 24],
        &param(2, 1),
    );
    cmd(&mut pr, 0, &[0x5e, 3, 0, 0, 0, 0, 0, 4, 0], &[]);
    cmd(&mut pr, 0x02, &[0x16], &[]);
    cmd(&mut pr, 1, &[0x17], &[]);

    let mut misc = Vec::new();
    // INQUIRY VPD 0x83, MODE SENSE(10) all pages, MODE SELECT(6) of the caching page,
    // REPORT SUPPORTED OPERATION CODES, READ CAPACITY(16), REQUEST SENSE.
    cmd(&mut misc, 0, &[0x12, 1, 0x83, 1, 0], &[]);
    cmd(&mut misc, 0, &[0x5a, 0x10, 0x3f, 0xff, 0, 0, 0, 1, 0], &[]);
    let mut caching = vec![0, 0, 0, 0, 0x08, 18];
    caching.resize(24, 0);
    cmd(&mut misc, 0, &[0x15, 0x10, 0, 0, 24], &caching);
    cmd(&mut misc, 0, &[0xa3, 0x0c, 0x80, 0, 0, 0, 0, 0, 4, 0], &[]);
    cmd(
        &mut misc,
        0,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32],
        &[],
    );
    cmd(&mut misc, 0x04, &[0x03, 0, 0, 0, 18], &[]);

    // EXTENDED COPY of 4 blocks from LBA 0 to LBA 8 within the unit: one identification
    // descriptor (an NAA designator nothing matches yet) and one block-to-block segment.
    let mut xcopy = Vec::new();
    let mut list = vec![0x01, 0, 0, 32, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 0];
    let mut target = vec![0xe4, 0, 0, 0, 0x01, 0x03, 0, 16];
    target.resize(32, 0);
    target[30] = 0x02;
    list.extend_from_slice(&target);
    let mut seg = vec![0x02, 0, 0, 24, 0, 0, 0, 0, 0, 0, 0, 4];
    seg.extend_from_slice(&0u64.to_be_bytes());
    seg.extend_from_slice(&8u64.to_be_bytes());
    list.extend_from_slice(&seg);
    let mut cdb = vec![0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb.extend_from_slice(&(list.len() as u32).to_be_bytes());
    cmd(&mut xcopy, 0, &cdb, &list);
    cmd(
        &mut xcopy,
        0,
        &[0x84, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[],
    );
    cmd(
        &mut xcopy,
        0,
        &[0x84, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[],
    );

    vec![io, pr, misc, xcopy]
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

#[test]
fn cdb_execution_survives_mutations() {
    smoke("iscsi_cdb", &cdb_seeds(), fuzzing::cdbs);
}
