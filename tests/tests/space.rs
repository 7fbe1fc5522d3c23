//! Space through real NBD clients: a volume of 90% of the pool's usable capacity overwritten at
//! random five times the pool's size with fio's crc32c verification (the cleaner keeps up, no
//! write fails, WA is reported), then the full-pool path: new blocks fail with ENOSPC as the
//! client sees it, while overwrites, reads, trims and other volumes go on, and a trim makes
//! room again.

use std::path::Path;
use std::process::Command;

use ingot_tests::*;
use serde_json::Value;

fn stats(pool: &Path) -> Value {
    parse_json(&ingot_ok([
        "stats".as_ref(),
        "--json".as_ref(),
        "--pool".as_ref(),
        pool.as_os_str(),
    ]))
}

fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` missing or not an unsigned integer in {v}"))
}

/// Run `qemu-io -f raw` with each of `cmds` on the export `uri`; fails the test if one fails.
fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut cmd = Command::new(require_tool("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(uri));
}

/// Run fio with the nbd engine; returns its JSON report's first job.
fn fio(uri: &str, args: &[&str]) -> Value {
    let mut cmd = Command::new(require_tool("fio"));
    cmd.args(["--name=job", "--ioengine=nbd", "--output-format=json"])
        .arg(format!("--uri={uri}"))
        .args(args);
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The nbd engine prints a line before the JSON.
    let json = stdout.find('{').map_or("", |i| &stdout[i..]);
    let v = parse_json(json);
    v["jobs"][0].clone()
}

#[test]
fn ninety_percent_full_overwritten_five_pools_worth_then_full() {
    require_tool("qemu-io");
    require_tool("fio");
    let dir = TempDir::new("space-full");
    let pool = dir.join("pool");
    let pool_bytes = 256 * MIB;
    ingot_ok([
        "pool".as_ref(),
        "create".as_ref(),
        "--size".as_ref(),
        "256M".as_ref(),
        "--segment-size".as_ref(),
        "2M".as_ref(),
        "--pool".as_ref(),
        pool.as_os_str(),
    ]);
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    opts.tcp_port = None;
    let srv = Server::start(opts);
    let usable = u64_of(&stats(&pool), "usable_bytes");
    assert!(
        usable > pool_bytes / 2 && usable < pool_bytes,
        "usable capacity {usable} of a {pool_bytes}-byte pool"
    );
    let vol_bytes = usable * 9 / 10 / MIB * MIB;
    create_volume(&pool, "v", &vol_bytes.to_string());
    let uri = srv.unix_uri("v");

    // Fill, then overwrite five pools' worth at random; the verify phase reads every block back.
    let job = fio(
        &uri,
        &["--rw=write", "--bs=1M", "--iodepth=8", "--size=100%"],
    );
    assert_eq!(job["error"], 0, "fill failed: {job}");
    let s0 = stats(&pool);
    // Whole passes over the volume, each verified after it is written, 5x the pool at least.
    let loops = (5 * pool_bytes).div_ceil(vol_bytes);
    let io_size = loops * vol_bytes;
    let job = fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=100%",
            &format!("--loops={loops}"),
            "--randrepeat=0",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    );
    assert_eq!(job["error"], 0, "overwrites failed: {job}");
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(io_size),
        "fio did not write all {io_size} bytes: {job}"
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(io_size),
        "fio's verify phases did not read the whole volume back after each pass: {job}"
    );
    let s1 = stats(&pool);
    let client = u64_of(&s1, "client_written_bytes") - u64_of(&s0, "client_written_bytes");
    let device = u64_of(&s1, "device_written_bytes") - u64_of(&s0, "device_written_bytes");
    let moved = u64_of(&s1, "gc_bytes_moved") - u64_of(&s0, "gc_bytes_moved");
    let wa = s1["write_amplification"]
        .as_f64()
        .expect("write_amplification");
    eprintln!(
        "90% full ({vol_bytes} of {usable} usable bytes, {pool_bytes}-byte pool): {client} bytes \
         overwritten, WA {:.2} over the overwrites ({wa:.2} since start), cleaner moved {moved} \
         bytes, {} IOPS",
        device as f64 / client as f64,
        job["write"]["iops"]
    );
    assert!(client >= io_size, "stats counted {client} client bytes");
    assert!(
        moved > 0,
        "overwriting 5x the pool must have made the cleaner move data: {s1}"
    );
    assert!(wa.is_finite() && wa >= 1.0, "write_amplification {wa}");
    assert!(
        s1["space_warning"].is_string(),
        "no warning at 90% full: {s1}"
    );

    // Full: a second volume takes new blocks until the usable capacity is reached, then fails
    // with ENOSPC as the client sees it.
    create_volume(&pool, "w", "256M");
    let job = fio(
        &srv.unix_uri("w"),
        &["--rw=write", "--bs=1M", "--iodepth=4", "--size=100%"],
    );
    assert_eq!(
        job["error"], 28,
        "writing 256 MiB of new blocks into a full pool should fail with ENOSPC: {job}"
    );
    // Overwrites of mapped blocks and reads go on, on both volumes.
    qemu_io(&uri, &["write -P 0x5a 0 1M", "flush", "read -P 0x5a 0 1M"]);
    let w = srv.unix_uri("w");
    qemu_io(&w, &["write -P 0x6b 0 64k", "read -P 0x6b 0 64k"]);
    // A trim gives room back: new blocks fit again.
    qemu_io(&uri, &["discard 0 64M", "flush"]);
    qemu_io(
        &w,
        &["write -P 0x7c 128M 32M", "flush", "read -P 0x7c 128M 32M"],
    );
    // Trimming everything gives the space back, to the pool and to the host's file system.
    let du = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).expect("pool file").blocks() * 512
    };
    let img = pool.join("dev0.img");
    let before = du(&img);
    for (vol, size) in [("v", vol_bytes), ("w", 256 * MIB)] {
        qemu_io(&srv.unix_uri(vol), &[&format!("discard 0 {size}"), "flush"]);
    }
    ingot_ok(["gc".as_ref(), "--pool".as_ref(), pool.as_os_str()]);
    let s = stats(&pool);
    assert_eq!(u64_of(&s, "stored_bytes"), 0, "{s}");
    let used = u64_of(&s, "physical_used_bytes");
    let after = du(&img);
    eprintln!("after trimming everything: physical_used_bytes {used}, du {before} -> {after}");
    assert!(
        used <= pool_bytes / 4,
        "physical_used_bytes {used} after trimming everything: {s}"
    );
    assert!(
        after + pool_bytes / 2 <= before,
        "the pool file's allocation shrank from {before} to {after} only"
    );
    srv.stop();
    let out = output(ingot().args(["check", "--pool"]).arg(&pool));
    assert!(
        out.status.success(),
        "ingot check after the full-pool run: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
