//! A client's bytes are never taken for log metadata, end to end: an NBD client of volume "b"
//! writes blocks crafted to look like the pool's own records (Data records of dedup references
//! into volume "a", Trim records over "a", Move records relocating "a"'s blocks, segment and
//! checkpoint headers) and exact copies of genuine records read from the backing file, with
//! every field a strong attacker can learn (the epoch, segment numbers, shards, "a"'s block
//! ids and places, read from the backing file itself). The server is SIGKILLed, the header of
//! the record holding the spray is torn (as a power cut may), and the server restarts: after
//! every cycle "b" never reads "a"'s data, no flushed block of "a" changes, and `ingot check`
//! finds nothing. The crafting is shared with `engine/tests/trust.rs`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use ingot_tests::*;

#[path = "../../engine/tests/forge/mod.rs"]
mod forge;
use forge::{find, spray, Intel, Kind, Rng, BLOCK, POOL_BYTES, SEG};

const A_BLOCKS: usize = 48;
const B_SPRAY_LBA: u64 = 2560;
const VOL_A_BYTES: u64 = 32 << 20;
const VOL_B_BYTES: u64 = 32 << 20;

/// Writes `OFFSET:FILE` pairs to the export at URI, then flushes when the last argument is
/// `flush`.
const WRITER: &str = r#"
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for arg in sys.argv[2:]:
    if arg == "flush":
        h.flush()
        continue
    off, path = arg.split(":", 1)
    with open(path, "rb") as f:
        h.pwrite(f.read(), int(off))
h.shutdown()
"#;

fn nbd_write(uri: &str, dir: &Path, writes: &[(u64, Vec<u8>)], flush: bool) {
    let mut cmd = Command::new(require_python_nbd());
    cmd.arg("-c").arg(WRITER).arg(uri);
    for (i, (off, data)) in writes.iter().enumerate() {
        let f = dir.join(format!("w{i}.bin"));
        std::fs::write(&f, data).unwrap();
        cmd.arg(format!("{off}:{}", f.display()));
    }
    if flush {
        cmd.arg("flush");
    }
    run(&mut cmd);
}

fn nbd_read_all(uri: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    run(Command::new(require_tool("nbdcopy")).arg(uri).arg(&out));
    read_file(&out)
}

/// The newest epoch a record on the device carries (what a strong attacker would guess).
fn current_epoch(device: &[u8]) -> u64 {
    device
        .chunks_exact(BLOCK)
        .filter(|b| &b[..4] == b"IREC")
        .map(|b| u64::from_le_bytes(b[24..32].try_into().unwrap()))
        .max()
        .expect("records on the device")
}

/// "a"'s `i`th block: spread over map pages, so over every shard's pages.
fn a_lba(i: usize) -> u64 {
    i as u64 * 37 % (VOL_A_BYTES / BLOCK as u64)
}

#[test]
fn an_nbd_client_cannot_forge_log_records() {
    require_python_nbd();
    let tmp = TempDir::new("trust");
    let pool = tmp.join("pool");
    create_pool_with(
        &pool,
        &POOL_BYTES.to_string(),
        &["--segment-size", &SEG.to_string()],
    );
    create_volume(&pool, "a", &format!("{VOL_A_BYTES}"));
    create_volume(&pool, "b", &format!("{VOL_B_BYTES}"));
    let dev0 = pool.join("dev0.img");
    let mut rng = Rng(0x7e57);
    let mut a: Vec<Vec<u8>> = Vec::new();
    let kinds = [
        Kind::DataRefs,
        Kind::Trims,
        Kind::Moves,
        Kind::SegmentHeaders,
        Kind::Copies,
    ];
    for (cycle, &kind) in kinds.iter().enumerate() {
        let mut opts = ServeOpts::new(&pool, &tmp.join("nbd.sock"));
        // Every write on the device before it is acknowledged, so that the kill finds it there.
        opts.extra_args.extend(["--write-back".into(), "0".into()]);
        let server = Server::start(opts.clone());
        let (ua, ub) = (server.unix_uri("a"), server.unix_uri("b"));
        let mut writes = Vec::new();
        for _ in 0..A_BLOCKS {
            let blk = rng.block();
            writes.push((a_lba(a.len()) * BLOCK as u64, blk.clone()));
            a.push(blk);
        }
        nbd_write(&ua, tmp.path(), &writes, true);
        let device = read_file(&dev0);
        let intel = Intel::gather(&device, &a);
        let marker = rng.block();
        let mut sprayed = spray(&mut rng, kind, current_epoch(&device), &intel, &device);
        sprayed[0].splice(0..0, marker.iter().copied());
        let mut lba = B_SPRAY_LBA;
        let mut b_writes = Vec::new();
        for w in sprayed {
            let n = (w.len() / BLOCK) as u64;
            b_writes.push((lba * BLOCK as u64, w));
            lba += n;
        }
        assert!(lba * (BLOCK as u64) <= VOL_B_BYTES, "spray fits in b");
        nbd_write(&ub, tmp.path(), &b_writes, false);
        server.kill9();
        // A power cut tore the header of the record holding the spray.
        let device = read_file(&dev0);
        let at = find(&device, &marker);
        assert_eq!(
            at.len(),
            1,
            "cycle {cycle}: the marker block is stored once"
        );
        let f = std::fs::OpenOptions::new().write(true).open(&dev0).unwrap();
        f.write_all_at(&[0u8; BLOCK], at[0] - BLOCK as u64).unwrap();
        drop(f);
        assert!(
            !find(&device, &b_writes[0].1[BLOCK..2 * BLOCK]).is_empty(),
            "cycle {cycle}: the crafted blocks were not stored whole and aligned"
        );
        // Replay (twice: a crash right after recovery changes nothing).
        for round in 0..2 {
            let server = Server::start(opts.clone());
            let got_a = nbd_read_all(&server.unix_uri("a"), tmp.path(), "a.img");
            for (i, want) in a.iter().enumerate() {
                let at = (a_lba(i) as usize) * BLOCK;
                assert!(
                    &got_a[at..at + BLOCK] == want.as_slice(),
                    "{kind:?} cycle {cycle} round {round}: flushed block {i} of a changed"
                );
            }
            let got_b = nbd_read_all(&server.unix_uri("b"), tmp.path(), "b.img");
            let secrets: std::collections::HashSet<&[u8]> = a.iter().map(Vec::as_slice).collect();
            for (i, blk) in got_b.chunks_exact(BLOCK).enumerate() {
                assert!(
                    !secrets.contains(blk),
                    "{kind:?} cycle {cycle} round {round}: b's block {i} reads a's data"
                );
            }
            server.kill9();
        }
        let out = output(ingot().arg("check").arg("--pool").arg(&pool));
        assert!(
            out.status.success(),
            "{kind:?} cycle {cycle}: ingot check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
