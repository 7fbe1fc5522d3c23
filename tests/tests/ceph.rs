//! A pool kept in a real Ceph cluster (issue 23; `tests/ceph/ceph-up.sh`, which `./test.sh`
//! starts, names it in `INGOT_CEPH_CONF`): the real `ingot` binary on several "nodes" (pool
//! directories), written and read by qemu-io over NBD.
//!
//! - `kill -9` of the serving node, then another node attaches and serves with `--takeover`:
//!   every flushed block reads back, over several cycles, each on a new node.
//! - A paused owner (SIGSTOP) whose lease ran out: another node takes the pool; the old one,
//!   resumed, fails its clients' writes, flushes and reads, and a third node serves exactly
//!   what the second wrote.
//!
//! Leases last 2 s here (`INGOT_LEASE_SECS`; 15 s by default). Without `INGOT_CEPH_CONF` these
//! tests fail; they never skip. `INGOT_CEPH_CYCLES` sets the takeover cycles (4 by default; the
//! long mode runs 20 or more).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ingot_tests::*;

const MIB: u64 = 1 << 20;

fn ceph_conf() -> PathBuf {
    std::env::var_os("INGOT_CEPH_CONF").map(Into::into).expect(
        "INGOT_CEPH_CONF must name a test cluster's ceph.conf (./test.sh starts one with tests/ceph/ceph-up.sh)",
    )
}

fn store_name(what: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("rados://ingot/{what}-{}-{t}", std::process::id())
}

fn ceph_args() -> Vec<String> {
    vec!["--ceph-conf".into(), ceph_conf().display().to_string()]
}

fn serve(dir: &Path, sock: &Path, extra: &[&str]) -> Server {
    serve_env(dir, sock, extra, &[])
}

fn serve_env(dir: &Path, sock: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut o = ServeOpts::new(dir, sock);
    o.env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    o.tcp_port = None;
    o.extra_args.extend(extra.iter().map(|s| s.to_string()));
    o.env.push(("INGOT_LEASE_SECS".into(), "2".into()));
    let _ = std::fs::remove_file(sock);
    Server::start(o)
}

/// `qemu-io` on `uri` running `cmds`; its output, and whether every command succeeded (qemu-io
/// prints errors and exits 0 for some of them, so the output is checked too).
fn qemu_io(uri: &str, cmds: &[String]) -> (bool, String) {
    let mut c = Command::new(require_tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = output(&mut c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = !out.status.success()
        || text.contains("failed")
        || text.contains("error")
        || text.contains("Error");
    (!failed, text)
}

/// Write pattern `pat` over `len` bytes at `off`, then flush: durable once this returns.
fn write_flushed(uri: &str, off: u64, len: u64, pat: u8) {
    let (ok, text) = qemu_io(
        uri,
        &[format!("write -P {pat} {off} {len}"), "flush".to_string()],
    );
    assert!(ok, "write of pattern {pat} at {off}: {text}");
}

fn reads_back(uri: &str, regions: &[(u64, u64, u8)]) -> Result<(), String> {
    let cmds: Vec<String> = regions
        .iter()
        .map(|(off, len, pat)| format!("read -P {pat} {off} {len}"))
        .collect();
    let (ok, text) = qemu_io(uri, &cmds);
    if ok {
        Ok(())
    } else {
        Err(text)
    }
}

/// What the volume holds after `written` (offset, length, pattern), in order: each MiB's last
/// pattern, as (offset, length, pattern) runs of one MiB.
fn expected(written: &[(u64, u64, u8)]) -> Vec<(u64, u64, u8)> {
    let mut mib: std::collections::BTreeMap<u64, u8> = Default::default();
    for &(off, len, pat) in written {
        for m in off / MIB..(off + len) / MIB {
            mib.insert(m, pat);
        }
    }
    mib.into_iter()
        .map(|(m, pat)| (m * MIB, MIB, pat))
        .collect()
}

/// `ingot stats --json`'s `replica` of the pool a server holds.
fn replica_stats(dir: &Path) -> serde_json::Value {
    parse_json(&ingot_ok([
        "stats",
        "--json",
        "--pool",
        &dir.display().to_string(),
    ]))["replica"]
        .clone()
}

fn create_on_store(dir: &Path, url: &str) {
    let mut c = ingot();
    c.args(["pool", "create", "--pool"])
        .arg(dir)
        .args(["--size", "1G", "--segment-size", "2M", "--store", url])
        .args(ceph_args());
    run(&mut c);
}

/// A pool created on a store of its own (`store_name(what)`) in `TMP/a`: the temporary
/// directory, the store's URL, the pool's directory and a path for the NBD socket.
fn pool_on_store(what: &str) -> (TempDir, String, PathBuf, PathBuf) {
    let tmp = TempDir::new(&format!("ceph-{what}"));
    let url = store_name(what);
    let a_dir = tmp.join("a");
    create_on_store(&a_dir, &url);
    let sock = tmp.join("nbd.sock");
    (tmp, url, a_dir, sock)
}

/// Volume `v` (64 MiB), through the server that holds `dir`.
fn create_volume(dir: &Path) {
    ingot_ok([
        "volume",
        "create",
        "v",
        "--size",
        "64M",
        "--pool",
        &dir.display().to_string(),
    ]);
}

fn attach(dir: &Path, url: &str) {
    let mut c = ingot();
    c.args(["pool", "attach", "--pool"])
        .arg(dir)
        .args(["--store", url])
        .args(ceph_args());
    run(&mut c);
    let mode = |p: PathBuf| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(dir.join("store.json")), 0o600);
    assert_eq!(mode(dir.join("pool.json")), 0o600);
}

#[test]
fn a_pool_on_ceph_is_taken_over_after_kill_9_with_every_flushed_block() {
    let tmp = TempDir::new("ceph-takeover");
    let url = store_name("takeover");
    create_on_store(&tmp.join("node0"), &url);
    let sock = tmp.join("nbd.sock");
    let s = serve(&tmp.join("node0"), &sock, &[]);
    create_volume(&tmp.join("node0"));
    let mut server = s;
    let mut written: Vec<(u64, u64, u8)> = Vec::new();
    let cycles: u64 = std::env::var("INGOT_CEPH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for k in 0..cycles {
        let uri = server.unix_uri("v");
        // This cycle's region, and an overwrite of half of the previous one (the 64 MiB volume
        // holds 6 regions; later cycles wrap around and overwrite whole regions).
        let region = ((k % 6) * 8 * MIB, 8 * MIB, 10 + (k % 200) as u8);
        write_flushed(&uri, region.0, region.1, region.2);
        written.push(region);
        if k > 0 {
            // The first half of the previous cycle's region.
            let half = (((k - 1) % 6) * 8 * MIB, 4 * MIB, 210 + (k % 40) as u8);
            write_flushed(&uri, half.0, half.1, half.2);
            written.push(half);
        }
        // Written and never flushed: it may or may not survive, and must not break anything.
        let _ = qemu_io(&uri, &[format!("write -P 222 {} {}", 48 * MIB, MIB)]);
        server.kill9();
        // The next node: every other cycle waits for the lease to run out instead of taking
        // it at once.
        let next = tmp.join(format!("node{}", k + 1));
        attach(&next, &url);
        let t = Instant::now();
        let args: &[&str] = if k % 2 == 0 { &["--takeover"] } else { &[] };
        server = serve(&next, &sock, args);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(30), "takeover took {took:?}");
        // Later writes win where regions overlap: check from the newest down, each region
        // less what later ones covered (here: the first half of an overwritten region).
        let expect = expected(&written);
        if let Err(text) = reads_back(&server.unix_uri("v"), &expect) {
            let bad: Vec<String> = expect
                .iter()
                .filter(|r| reads_back(&server.unix_uri("v"), &[**r]).is_err())
                .map(|r| {
                    let (_, dump) =
                        qemu_io(&server.unix_uri("v"), &[format!("read -v {} 16", r.0)]);
                    format!("{r:?}: {}", dump.lines().next().unwrap_or(""))
                })
                .collect();
            panic!(
                "cycle {k}: flushed data lost after the takeover:\n{text}\nwrong: {bad:#?}\nwritten: {written:?}\n--- server ---\n{}",
                server.stderr()
            );
        }
        eprintln!("cycle {k}: node{} serves after {took:?}", k + 1);
    }
    // A clean stop gives the lease back and leaves the store holding what the devices hold:
    // the same node serves again at once without a restore, and a node after it (taking over
    // from a kill -9) finds the same blocks.
    let last = server.pool().to_path_buf();
    server.stop();
    let server = serve(&last, &sock, &[]);
    assert!(
        server.stderr().contains("restored=false"),
        "a clean restart restored from the store:\n{}",
        server.stderr()
    );
    // `stats` names the store and counts what the syncs sent.
    let st = parse_json(&ingot_ok([
        "stats",
        "--json",
        "--pool",
        &last.display().to_string(),
    ]));
    let r = &st["replica"];
    assert_eq!(r["store"], url.as_str(), "{st}");
    assert!(r["commits"].as_u64() > Some(0), "{r}");
    assert!(r["store_objects"].as_u64() > Some(0), "{r}");
    let expect_all = |server: &Server| {
        let expect = expected(&written);
        if let Err(text) = reads_back(&server.unix_uri("v"), &expect) {
            panic!("after the clean stop:\n{text}");
        }
    };
    expect_all(&server);
    server.kill9();
    let next = tmp.join("last");
    attach(&next, &url);
    let server = serve(&next, &sock, &["--takeover"]);
    expect_all(&server);
    let check = ingot()
        .args(["check", "--pool"])
        .arg(server.pool())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    server.stop();
}

#[test]
fn a_paused_owner_is_fenced_and_a_third_node_serves_what_the_second_wrote() {
    let tmp = TempDir::new("ceph-stale");
    let url = store_name("stale");
    let a_dir = tmp.join("a");
    create_on_store(&a_dir, &url);
    let a = serve(&a_dir, &tmp.join("a.sock"), &[]);
    create_volume(&a_dir);
    let a_uri = a.unix_uri("v");
    write_flushed(&a_uri, 0, 4 * MIB, 1);
    // A stops (a long GC pause, a frozen VM): it renews nothing.
    signal(a.pid(), "STOP");
    let b_dir = tmp.join("b");
    attach(&b_dir, &url);
    let b = serve(&b_dir, &tmp.join("b.sock"), &[]);
    let b_uri = b.unix_uri("v");
    write_flushed(&b_uri, 0, MIB, 2);
    write_flushed(&b_uri, 8 * MIB, MIB, 3);
    // A wakes up, its clients still connected: it must not write, and must not serve reads
    // either (its lease ran out by its own clock; B may have changed any block).
    signal(a.pid(), "CONT");
    let (ok, text) = qemu_io(
        &a_uri,
        &[
            format!("write -P 9 {} {}", 8 * MIB, MIB),
            "flush".to_string(),
        ],
    );
    assert!(
        !ok,
        "the stale owner acknowledged a write and a flush:\n{text}"
    );
    let (ok, text) = qemu_io(&a_uri, &[format!("read 0 {}", 4 * MIB)]);
    assert!(!ok, "the stale owner served a read:\n{text}");
    // B goes on; a third node takes over from B and serves exactly B's data.
    write_flushed(&b_uri, 16 * MIB, MIB, 4);
    b.kill9();
    let c_dir = tmp.join("c");
    attach(&c_dir, &url);
    let c = serve(&c_dir, &tmp.join("c.sock"), &["--takeover"]);
    let want = [
        (0, MIB, 2u8),
        (MIB, 3 * MIB, 1),
        (8 * MIB, MIB, 3),
        (16 * MIB, MIB, 4),
    ];
    if let Err(text) = reads_back(&c.unix_uri("v"), &want) {
        panic!("the third node does not serve the second's data:\n{text}");
    }
    drop(a);
    c.stop();
}

/// Past twice what the pool holds, the store gets a new base (every range holding data, sent
/// while the server goes on), and the batch objects before it are deleted; a takeover then
/// replays the base and what came after it, not the whole history, and every flushed block is
/// there.
#[test]
fn a_takeover_replays_from_the_last_base() {
    let (tmp, url, a_dir, sock) = pool_on_store("base");
    // A base as soon as the history passes twice the allocated bytes.
    let a = serve_env(&a_dir, &sock, &[], &[("INGOT_REPLICA_REBASE_BYTES", "1")]);
    create_volume(&a_dir);
    let uri = a.unix_uri("v");
    let stats = || replica_stats(&a_dir);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut round = 0u8;
    while stats()["bases"].as_u64() == Some(0) {
        assert!(
            Instant::now() < deadline,
            "no base after {round} rounds of 48 MiB"
        );
        write_flushed(&uri, 0, 48 * MIB, 30 + round % 50);
        round += 1;
    }
    // What the base made unneeded leaves the store.
    while stats()["store_deleted_objects"].as_u64() == Some(0) {
        assert!(
            Instant::now() < deadline,
            "nothing deleted after the base: {}",
            stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The log's first records go too: the log starts at the base (its head).
    let name = url.rsplit('/').next().unwrap();
    let first_record_exists = || {
        Command::new(require_tool("rados"))
            .args([
                "-c",
                &ceph_conf().display().to_string(),
                "-p",
                "ingot",
                "stat",
            ])
            .arg(format!("{name}.log.{:016x}", 0))
            .output()
            .unwrap()
            .status
            .success()
    };
    while first_record_exists() {
        assert!(
            Instant::now() < deadline,
            "log record 0 still in the store after the base: {}",
            stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // After the base: a last write, flushed.
    write_flushed(&uri, 40 * MIB, 16 * MIB, 99);
    let last = 30 + (round - 1) % 50;
    a.kill9();
    let b_dir = tmp.join("b");
    attach(&b_dir, &url);
    let b = serve(&b_dir, &sock, &["--takeover"]);
    let log = b.stderr();
    let from = log
        .split("from=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no restore logged:\n{log}"));
    assert!(from > 0, "the restore replayed the whole history:\n{log}");
    if let Err(text) = reads_back(
        &b.unix_uri("v"),
        &[(0, 40 * MIB, last), (40 * MIB, 16 * MIB, 99)],
    ) {
        panic!("after a takeover from the base:\n{text}");
    }
    b.stop();
}

/// The store's history since its last base, as `stats` counts it, carries over a clean stop
/// (`store.json`) and a takeover (what the restore listed): a pool restarted more often than
/// it writes twice its data still reaches its next base.
#[test]
fn the_history_since_the_last_base_outlives_a_restart() {
    let (tmp, url, a_dir, sock) = pool_on_store("history");
    let history = |dir: &Path| replica_stats(dir)["history_bytes"].as_u64().unwrap();
    let stored = |dir: &Path| {
        let sf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("store.json")).unwrap()).unwrap();
        sf["history_bytes"].as_u64().unwrap_or(0)
    };
    let a = serve(&a_dir, &sock, &[]);
    create_volume(&a_dir);
    write_flushed(&a.unix_uri("v"), 0, 8 * MIB, 5);
    let first = history(&a_dir);
    // (qemu-io's patterns compress: far fewer bytes reach the store than were written.)
    assert!(first > 0, "8 MiB flushed, a history of {first}");
    a.stop();
    let kept = stored(&a_dir);
    assert!(kept >= first, "store.json keeps {kept}, stats said {first}");
    // The same node again: it counts on from there.
    let a = serve(&a_dir, &sock, &[]);
    // (The open's own syncs add to it.)
    let again = history(&a_dir);
    assert!(again >= kept, "{again} after a clean restart, {kept} kept");
    write_flushed(&a.unix_uri("v"), 8 * MIB, 8 * MIB, 6);
    let second = history(&a_dir);
    assert!(second > kept, "{second} after {kept} and 8 MiB more");
    a.stop();
    // Another node: its restore lists the history.
    let b_dir = tmp.join("b");
    attach(&b_dir, &url);
    let b = serve(&b_dir, &sock, &[]);
    let listed = history(&b_dir);
    assert!(
        listed >= second,
        "the takeover listed {listed} bytes of history, the last owner had {second}"
    );
    if let Err(text) = reads_back(&b.unix_uri("v"), &[(0, 8 * MIB, 5), (8 * MIB, 8 * MIB, 6)]) {
        panic!("after the takeover:\n{text}");
    }
    b.stop();
}

/// Write `len` random bytes (nothing to compress or deduplicate) at the start of `uri`, then
/// flush; returns them.
fn write_random(uri: &str, tmp: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut want = vec![0u8; len];
    Prng::new(seed).fill(&mut want);
    let src = tmp.join("src.raw");
    std::fs::write(&src, &want).unwrap();
    let (ok, text) = qemu_io(
        uri,
        &[
            format!("write -s {} 0 {len}", src.display()),
            "flush".to_string(),
        ],
    );
    assert!(ok, "{text}");
    want
}

/// The volume's first `len` bytes, copied out with nbdcopy.
fn volume_bytes(uri: &str, tmp: &Path, len: u64) -> Vec<u8> {
    let out = tmp.join("copy.raw");
    let _ = std::fs::remove_file(&out);
    run(Command::new(require_tool("nbdcopy")).arg(uri).arg(&out));
    let mut b = read_file(&out);
    b.truncate(len as usize);
    b
}

/// A takeover serves before the data is local: it lists where each range is in the store's
/// objects and fetches a range when it is first read (`--no-fill`: nothing else is fetched).
/// Writes go over cold ranges. With the filler, the directory becomes whole, and a clean stop
/// after that needs nothing from the store on the next start.
#[test]
fn a_takeover_fetches_ranges_from_the_store_as_they_are_read() {
    let (tmp, url, a_dir, sock) = pool_on_store("lazy");
    let a = serve(&a_dir, &sock, &[]);
    create_volume(&a_dir);
    // The store holds 24 MiB of random bytes.
    let mut want = write_random(&a.unix_uri("v"), tmp.path(), 24 << 20, 23);
    // A clean stop: its last checkpoint covers every record, so the next node's open replays
    // no log tail (a tail is read, and so fetched, at open).
    a.stop();
    let b_dir = tmp.join("b");
    attach(&b_dir, &url);
    let b = serve(&b_dir, &sock, &["--no-fill"]);
    let stats = replica_stats;
    let r = stats(&b_dir);
    let cold = r["cold_bytes"].as_u64().unwrap_or(0);
    // (The open reads a few ranges of metadata, whose windows may take in some data.)
    assert!(
        cold >= 20 * MIB,
        "{cold} bytes cold after the takeover: {r}"
    );
    // One 4 KiB read fetches a window around it, not the pool.
    let (ok, text) = qemu_io(&b.unix_uri("v"), &[format!("read {} 4096", 20 * MIB)]);
    assert!(ok, "{text}");
    let r = stats(&b_dir);
    assert!(r["fetches"].as_u64() > Some(0), "{r}");
    let after = r["cold_bytes"].as_u64().unwrap();
    assert!(
        after < cold && cold - after <= 4 * MIB,
        "a 4 KiB read fetched {} bytes",
        cold - after
    );
    // A write over cold ranges stays; the rest reads from the store.
    write_flushed(&b.unix_uri("v"), 16 * MIB, 2 * MIB, 7);
    want[16 << 20..18 << 20].fill(7);
    assert!(
        volume_bytes(&b.unix_uri("v"), tmp.path(), want.len() as u64) == want,
        "reads fetched from the store differ from what was written"
    );
    b.stop();
    // Not filled: serving it read-only, without the lease, would serve holes.
    let out = output(
        ingot()
            .args(["serve", "--read-only", "--nbd"])
            .arg(format!("unix:{}", tmp.join("ro.sock").display()))
            .arg("--pool")
            .arg(&b_dir),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("holds only part of its pool"),
        "serve --read-only of a partial directory: {err}"
    );
    // With the filler (the default), everything comes in without reads.
    let b = serve(&b_dir, &sock, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats(&b_dir)["cold_bytes"].as_u64() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the filler did not finish: {}",
            stats(&b_dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Recorded while serving, not only at a clean stop: a crash from now on keeps the devices.
    let partial = || {
        let sf = parse_json(&String::from_utf8(read_file(&b_dir.join("store.json"))).unwrap());
        sf["partial"] == true
    };
    while partial() {
        assert!(Instant::now() < deadline, "store.json still says partial");
        std::thread::sleep(Duration::from_millis(100));
    }
    b.stop();
    restart_serves(
        &b_dir,
        &sock,
        tmp.path(),
        false,
        &want,
        "a clean restart of a filled directory",
    );
    // The first node, stopped cleanly before B wrote: its directory is out of date, and it
    // takes B's writes from the store.
    restart_serves(
        &a_dir,
        &sock,
        tmp.path(),
        true,
        &want,
        "the first node again, after B's writes",
    );
}

/// `ingot serve` on `dir` again: whether it took the pool from the store (`restored`, as its
/// log says), and that volume `v` then begins with `want`.
fn restart_serves(dir: &Path, sock: &Path, tmp: &Path, restored: bool, want: &[u8], what: &str) {
    let s = serve(dir, sock, &[]);
    let said = format!("restored={restored}");
    assert!(
        s.stderr().contains(&said),
        "{what}: the start did not log {said}:\n{}",
        s.stderr()
    );
    assert!(
        volume_bytes(&s.unix_uri("v"), tmp, want.len() as u64) == want,
        "{what}: the volume does not read back"
    );
    s.stop();
}

/// `--durability local`: flushes are answered once local and the store follows. A `kill -9`
/// of the server, restarted on the same directory, keeps its devices (the store may lack what
/// it acknowledged) and sends the store a base first; after that, another node that takes the
/// pool over has every flushed block.
#[test]
fn local_durability_survives_a_crash_and_the_store_catches_up() {
    let (tmp, url, a_dir, sock) = pool_on_store("local");
    let a = serve(&a_dir, &sock, &["--durability", "local"]);
    create_volume(&a_dir);
    write_flushed(&a.unix_uri("v"), 0, 8 * MIB, 41);
    write_flushed(&a.unix_uri("v"), 8 * MIB, 8 * MIB, 42);
    a.kill9();
    let a = serve(&a_dir, &sock, &["--durability", "local"]);
    assert!(
        a.stderr().contains("kept_local=true"),
        "the restart after a crash with local acknowledgement did not keep its devices:\n{}",
        a.stderr()
    );
    let want = [(0, 8 * MIB, 41u8), (8 * MIB, 8 * MIB, 42)];
    if let Err(text) = reads_back(&a.unix_uri("v"), &want) {
        panic!("after the restart:\n{text}");
    }
    let stats = || replica_stats(&a_dir);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats()["bases"].as_u64() == Some(0) || stats()["behind"] == true {
        assert!(
            Instant::now() < deadline,
            "no base after the restart: {}",
            stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    write_flushed(&a.unix_uri("v"), 16 * MIB, 4 * MIB, 43);
    // The store catches up with the last flush too.
    while stats()["behind"] == true {
        assert!(
            Instant::now() < deadline,
            "the store stays behind: {}",
            stats()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    a.kill9();
    let b_dir = tmp.join("b");
    attach(&b_dir, &url);
    let b = serve(&b_dir, &sock, &["--takeover"]);
    let want = [
        (0, 8 * MIB, 41u8),
        (8 * MIB, 8 * MIB, 42),
        (16 * MIB, 4 * MIB, 43),
    ];
    if let Err(text) = reads_back(&b.unix_uri("v"), &want) {
        panic!("another node after the store caught up:\n{text}");
    }
    b.stop();
}

/// Bytes the files of directory `dir` hold on disk.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// `--local-cache`: a node keeps at most that much of the pool on its flash. Past it, ranges
/// the store holds are dropped from the local files and read back from the store when used;
/// writes over them stay. A clean restart keeps the files (its holes are what is cold), and
/// after a `kill -9` another node takes over with every flushed block.
#[test]
fn a_local_cache_keeps_the_pool_within_its_budget() {
    let (tmp, url, a_dir, sock) = pool_on_store("cache");
    let budget = 40 * MIB;
    let cache = ["--local-cache", "40M"];
    // Refused: with local durability (a directory with holes cannot be kept after a crash),
    // and on a pool that is not on a store.
    let plain = tmp.join("plain");
    create_pool(&plain, "256M");
    for (dir, extra, says) in [
        (&a_dir, "local", "needs --durability store"),
        (&plain, "store", "is not a pool on a store"),
    ] {
        let out = output(
            ingot()
                .args([
                    "serve",
                    "--local-cache",
                    "40M",
                    "--durability",
                    extra,
                    "--nbd",
                ])
                .arg(format!("unix:{}", tmp.join("refused.sock").display()))
                .arg("--pool")
                .arg(dir),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{extra}: {err}"
        );
    }
    let a = serve(&a_dir, &sock, &cache);
    create_volume(&a_dir);
    let mut want = write_random(&a.unix_uri("v"), tmp.path(), 56 << 20, 29);
    let within = |dir: &Path, evicted: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = replica_stats(dir);
            if r["evicted_bytes"].as_u64() > Some(evicted)
                && r["local_bytes"].as_u64() <= Some(budget)
            {
                return r;
            }
            assert!(Instant::now() < deadline, "never within the budget: {r}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let r = within(&a_dir, 0);
    assert!(
        allocated(&a_dir) <= budget + MIB,
        "{} bytes on disk, {r}",
        allocated(&a_dir)
    );
    // A write over dropped ranges stays.
    write_flushed(&a.unix_uri("v"), 8 * MIB, 2 * MIB, 9);
    want[8 << 20..10 << 20].fill(9);
    assert!(
        volume_bytes(&a.unix_uri("v"), tmp.path(), want.len() as u64) == want,
        "the volume does not read back"
    );
    a.stop();
    let sf = parse_json(&String::from_utf8(read_file(&a_dir.join("store.json"))).unwrap());
    assert!(sf["partial"] == true && sf["clean"] == true, "{sf}");
    // A clean restart keeps its files: nothing is taken from the store again but what it had
    // dropped.
    let a = serve(&a_dir, &sock, &cache);
    assert!(a.stderr().contains("restored=false"), "{}", a.stderr());
    let r = replica_stats(&a_dir);
    let cold = r["cold_bytes"].as_u64().unwrap_or(0);
    assert!(
        cold >= 8 * MIB,
        "{cold} bytes cold after a clean restart: {r}"
    );
    // The read cache in RAM is empty now: reads fetch what was dropped, and what they bring
    // back is dropped again.
    assert!(
        volume_bytes(&a.unix_uri("v"), tmp.path(), want.len() as u64) == want,
        "the volume does not read back through the store after a clean restart"
    );
    let r = within(&a_dir, 0);
    assert!(r["fetches"].as_u64() > Some(0), "{r}");
    write_flushed(&a.unix_uri("v"), 20 * MIB, 4 * MIB, 11);
    want[20 << 20..24 << 20].fill(11);
    a.kill9();
    let b_dir = tmp.join("b");
    attach(&b_dir, &url);
    let b = serve(&b_dir, &sock, &["--takeover", "--local-cache", "40M"]);
    assert!(
        volume_bytes(&b.unix_uri("v"), tmp.path(), want.len() as u64) == want,
        "another node after kill -9 does not read back every flushed block"
    );
    b.stop();
}
