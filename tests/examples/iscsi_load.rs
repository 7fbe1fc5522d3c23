//! A small pipelined iSCSI load generator for `bench/scripts/iscsi-vs-tgt.sh`: random 4 KiB
//! READ(10) or WRITE(10) commands, QD commands in flight on one session, against any target
//! (ingot or tgt). Writes carry their data as immediate data.
//!
//! Like a kernel initiator, it reads responses in large buffered reads and sends the commands
//! that replace a batch of responses in one write (`ISCSI_LOAD_BATCH=0`: one read per PDU
//! header and data, one write per command, as before).
//!
//! ```text
//! ISCSI_LOAD_PORT=3260 ISCSI_LOAD_TARGET=iqn... ISCSI_LOAD_MODE=write ISCSI_LOAD_QD=32 \
//! ISCSI_LOAD_SECS=20 ISCSI_LOAD_BLOCKS=2097152 cargo run --release -p ingot-tests \
//!   --example iscsi_load
//! ```

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
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
    let batch = env("ISCSI_LOAD_BATCH", "1") != "0";
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
    // Commands to send, encoded (header and immediate data, no digests were negotiated).
    let mut out: Vec<u8> = Vec::with_capacity(qd * (48 + 4096));
    let queue_one = |ini: &mut Initiator,
                     rng: &mut Prng,
                     started: &mut HashMap<u32, Instant>,
                     out: &mut Vec<u8>| {
        let lba = (rng.below(slots) * 8) as u32;
        let mut cdb = [0u8; 10];
        cdb[0] = if write { 0x2a } else { 0x28 };
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[8] = 8;
        let mut b = ini.command_bhs(&cdb, 4096, !write, write);
        b[8..16].copy_from_slice(&(lun << 48).to_be_bytes());
        let itt = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
        if write {
            b[5..8].copy_from_slice(&[0, 0x10, 0]); // 4096 bytes of immediate data
        }
        out.extend_from_slice(&b);
        if write {
            out.extend_from_slice(&data);
        }
        started.insert(itt, Instant::now());
    };
    let mut rd = BufReader::with_capacity(1 << 20, ini.stream.try_clone().expect("clone"));
    for _ in 0..qd {
        queue_one(&mut ini, &mut rng, &mut started, &mut out);
        if !batch {
            ini.stream.write_all(&out).expect("send");
            out.clear();
        }
    }
    ini.stream.write_all(&out).expect("send");
    out.clear();
    while !started.is_empty() {
        let (bhs, stat_sn) = if batch {
            // A whole PDU from the buffer (refilled by one large read when empty).
            let mut bhs = [0u8; 48];
            rd.read_exact(&mut bhs).expect("recv");
            let len = (usize::from(bhs[4]) * 4)
                + ((usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]));
            let mut skip = vec![0u8; len.div_ceil(4) * 4];
            rd.read_exact(&mut skip).expect("recv data");
            (
                bhs,
                u32::from_be_bytes([bhs[24], bhs[25], bhs[26], bhs[27]]),
            )
        } else {
            let p = ini.recv().expect("recv");
            (p.bhs, p.u32_at(24))
        };
        let fin = match bhs[0] & 0x3f {
            0x21 => true,
            0x25 => bhs[1] & 0x01 != 0,
            _ => false,
        };
        if fin {
            // Status sits in byte 3 of a SCSI Response and of a final Data-In alike.
            assert_eq!(bhs[3], 0, "command failed: {:?}", &bhs[..]);
            ini.exp_stat_sn = stat_sn.wrapping_add(1);
            let itt = u32::from_be_bytes([bhs[16], bhs[17], bhs[18], bhs[19]]);
            if let Some(t) = started.remove(&itt) {
                lat_us.push(t.elapsed().as_micros() as u64);
            }
            done += 1;
            if Instant::now() < deadline {
                queue_one(&mut ini, &mut rng, &mut started, &mut out);
            }
        }
        // Send the new commands once the responses that came together are handled.
        if !out.is_empty() && (!batch || rd.buffer().is_empty()) {
            ini.stream.write_all(&out).expect("send");
            out.clear();
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
