//! A small pipelined iSCSI load generator for `bench/scripts/iscsi-vs-tgt.sh`: random 4 KiB
//! READ(10) or WRITE(10) commands, QD commands in flight on one session, against any target
//! (ingot or tgt). Writes carry their data as immediate data.
//!
//! ```text
//! ISCSI_LOAD_PORT=3260 ISCSI_LOAD_TARGET=iqn... ISCSI_LOAD_MODE=write ISCSI_LOAD_QD=32 \
//! ISCSI_LOAD_SECS=20 ISCSI_LOAD_BLOCKS=2097152 cargo run --release -p ingot-tests \
//!   --example iscsi_load
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ingot_tests::iscsi::Initiator;
use ingot_tests::Prng;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    let port: u16 = env("ISCSI_LOAD_PORT", "3260").parse().expect("port");
    let target = env("ISCSI_LOAD_TARGET", "iqn.2026-11.io.ingot:vol0");
    let lun: u64 = env("ISCSI_LOAD_LUN", "0").parse().expect("lun");
    let write = env("ISCSI_LOAD_MODE", "read") == "write";
    let qd: usize = env("ISCSI_LOAD_QD", "32").parse().expect("qd");
    let secs: u64 = env("ISCSI_LOAD_SECS", "20").parse().expect("secs");
    // Logical blocks (512 bytes) of the LUN to spread the I/O over.
    let blocks: u64 = env("ISCSI_LOAD_BLOCKS", "2097152").parse().expect("blocks");
    let mut ini = Initiator::connect(port).expect("connect");
    ini.isid[5] = std::process::id() as u8;
    let r = ini
        .login(
            Some(&target),
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("ImmediateData", "Yes"),
                ("InitialR2T", "No"),
                ("MaxRecvDataSegmentLength", "262144"),
                ("FirstBurstLength", "262144"),
                ("MaxBurstLength", "1048576"),
            ],
        )
        .expect("login");
    assert_eq!(r.bhs[36..38], [0, 0], "login failed");
    // Clear unit attentions (tgt reports a power-on reset to each new session).
    for _ in 0..5 {
        let mut cdb = [0u8; 6];
        cdb[0] = 0x00;
        let mut b = ini.command_bhs(&cdb, 0, false, false);
        b[8..16].copy_from_slice(&(lun << 48).to_be_bytes());
        ini.send(&b, &[]).expect("send TUR");
        let p = ini.recv().expect("TUR response");
        if p.bhs[3] == 0 {
            break;
        }
    }
    let mut rng = Prng::new(42);
    let mut data = vec![0u8; 4096];
    rng.fill(&mut data);
    let slots = blocks / 8;
    let mut started: HashMap<u32, Instant> = HashMap::new();
    let mut lat_us: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let begin = Instant::now();
    let mut done = 0u64;
    let send_one = |ini: &mut Initiator, rng: &mut Prng, started: &mut HashMap<u32, Instant>| {
        let lba = (rng.below(slots) * 8) as u32;
        let mut cdb = [0u8; 10];
        cdb[0] = if write { 0x2a } else { 0x28 };
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[8] = 8;
        let mut b = ini.command_bhs(&cdb, 4096, !write, write);
        b[8..16].copy_from_slice(&(lun << 48).to_be_bytes());
        let itt = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
        ini.send(&b, if write { &data[..] } else { &[] })
            .expect("send");
        started.insert(itt, Instant::now());
    };
    for _ in 0..qd {
        send_one(&mut ini, &mut rng, &mut started);
    }
    while !started.is_empty() {
        let p = ini.recv().expect("recv");
        let fin = match p.opcode() {
            0x21 => true,
            0x25 => p.bhs[1] & 0x01 != 0,
            _ => false,
        };
        if !fin {
            continue;
        }
        // Status sits in byte 3 of a SCSI Response and of a final Data-In alike.
        let status = p.bhs[3];
        assert_eq!(status, 0, "command failed: {:?}", &p.bhs[..]);
        if let Some(t) = started.remove(&p.itt()) {
            lat_us.push(t.elapsed().as_micros() as u64);
        }
        done += 1;
        if Instant::now() < deadline {
            send_one(&mut ini, &mut rng, &mut started);
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    lat_us.sort_unstable();
    let pct = |p: f64| lat_us[((lat_us.len() as f64 * p) as usize).min(lat_us.len() - 1)];
    println!(
        "iscsi-load {} qd={qd}: {:.0} IOPS, {:.1} MB/s, p50 {} us, p99 {} us ({done} I/Os in {elapsed:.1} s)",
        if write { "randwrite" } else { "randread" },
        done as f64 / elapsed,
        done as f64 * 4096.0 / elapsed / 1e6,
        pct(0.5),
        pct(0.99)
    );
}
