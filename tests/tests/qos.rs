//! Per-volume QoS through the real server: fio over NBD on a limited volume gets about its
//! limit, and `ingot volume set` changes it online. Bounds are generous: this checks that the
//! limit applies through NBD, not its precision (that is `ingot-bench qos`); and limits are
//! durable once set returns (kill -9). iSCSI goes through the same admission: a raw initiator's
//! reads are paced the same way.

use std::path::Path;
use std::process::Command;

use ingot_tests::*;

/// 4 KiB random reads, QD8, for `seconds`: fio's IOPS.
fn fio_iops(uri: &str, seconds: u32) -> f64 {
    let out = run(Command::new(require_tool("fio"))
        .args([
            "--name=qos",
            "--ioengine=nbd",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=8",
            "--size=32m",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}")));
    let v = parse_json(&String::from_utf8_lossy(&out.stdout));
    v["jobs"][0]["read"]["iops"]
        .as_f64()
        .unwrap_or_else(|| panic!("no IOPS in {v}"))
}

/// `ingot volume set VOLUME --pool POOL ARGS...`.
fn set(pool: &Path, volume: &str, args: &[&str]) -> String {
    let pool = pool.display().to_string();
    let mut a = vec!["volume", "set", volume, "--pool", &pool];
    a.extend_from_slice(args);
    ingot_ok(a)
}

#[test]
fn iops_limit_applies_through_nbd_and_changes_online() {
    require_tool("fio");
    let dir = TempDir::new("qos");
    let pool = dir.join("pool");
    ingot_ok([
        "pool",
        "create",
        "--pool",
        &pool.display().to_string(),
        "--size",
        "512M",
    ]);
    let srv = Server::start(ServeOpts::new(&pool, &dir.join("nbd.sock")));
    create_volume(srv.pool(), "q", "64M");
    // A small burst, so that two seconds measure the rate.
    let out = set(
        srv.pool(),
        "q",
        &["--iops-limit", "300", "--burst-iops", "10"],
    );
    assert!(out.contains("IOPS limit 300"), "{out}");
    let v = volume(srv.pool(), "q").expect("volume q");
    assert_eq!(v["iops_limit"], 300, "{v}");
    let uri = srv.unix_uri("q");
    let got = fio_iops(&uri, 2);
    assert!(
        (210.0..=390.0).contains(&got),
        "limited to 300 IOPS, fio measured {got:.0}"
    );

    // Online: raised, the next run gets more; then removed.
    set(srv.pool(), "q", &["--iops-limit", "1200"]);
    let got = fio_iops(&uri, 2);
    assert!(
        (840.0..=1560.0).contains(&got),
        "limited to 1200 IOPS, fio measured {got:.0}"
    );
    let metrics = ingot_ok([
        "stats",
        "--pool",
        &srv.pool().display().to_string(),
        "--prometheus",
    ]);
    assert!(
        metrics.contains("ingot_volume_iops_limit{volume=\"q\"} 1200"),
        "{metrics}"
    );
    let waited = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ingot_volume_qos_wait_seconds_total{volume=\"q\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("qos wait counter");
    assert!(waited > 0.5, "requests waited {waited} s in all");
    // Durable once set returns: a kill -9 keeps it.
    srv.kill9();
    assert_eq!(volume(&pool, "q").expect("q")["iops_limit"], 1200);
    // Offline, 0 removes it.
    set(&pool, "q", &["--iops-limit", "0"]);
    assert_eq!(volume(&pool, "q").expect("q")["iops_limit"], 0);
}

#[test]
fn iops_limit_applies_through_iscsi() {
    let dir = TempDir::new("qos-iscsi");
    let (srv, port) = iscsi_server(dir.path(), "512M", "64M", &[]);
    set(
        srv.pool(),
        "vol0",
        &["--iops-limit", "100", "--burst-iops", "1"],
    );
    let mut i = ingot_tests::iscsi::Initiator::login_normal(port, "iqn.2026-11.io.ingot:vol0");
    let mut reads = |n: u32| {
        let t0 = std::time::Instant::now();
        for lba in 0..n {
            assert_eq!(i.read10(lba * 8, 8).expect("read").status, 0);
        }
        t0.elapsed().as_secs_f64()
    };
    // One at once, then 100/s: 50 reads one after another take about 0.49 s.
    let limited = reads(50);
    assert!(
        (0.34..=1.5).contains(&limited),
        "50 reads at 100 IOPS took {limited:.3} s"
    );
    set(srv.pool(), "vol0", &["--iops-limit", "0"]);
    let free = reads(50);
    assert!(
        free < limited / 2.0,
        "unlimited: {free:.3} s, limited: {limited:.3} s"
    );
    i.logout().expect("logout");
    srv.stop();
}
