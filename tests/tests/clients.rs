//! The real `ingot` binary driven by NBD clients nobody here wrote: nbdinfo, qemu-img, nbdcopy and
//! fio. A missing tool fails the test with the Debian package to install.

use std::process::Command;

use ingot_tests::*;

#[test]
fn nbdinfo_reports_volume_sizes() {
    require_tool("nbdinfo");
    let dir = TempDir::new("nbdinfo");
    let srv = Server::start_in(dir.path());
    // The default volume of a new pool, over both transports.
    assert_eq!(nbd_export_size(&srv.unix_uri("vol0")), 8 * GIB);
    assert_eq!(nbd_export_size(&srv.tcp_uri("vol0")), 8 * GIB);
    // A volume created through the control socket of the running server is exported at once.
    create_volume(srv.pool(), "small", "100M");
    assert_eq!(nbd_export_size(&srv.unix_uri("small")), 100 * MIB);
    // nbdinfo --list sees both exports.
    let out = run_stdout(
        Command::new(require_tool("nbdinfo"))
            .args(["--list", "--json"])
            .arg(format!("nbd://127.0.0.1:{}", srv.port())),
    );
    let v = parse_json(&out);
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo --list --json has no exports: {v}"))
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert!(
        names.contains(&"vol0") && names.contains(&"small"),
        "nbdinfo --list shows {names:?}, expected vol0 and small"
    );
    srv.stop();
}

#[test]
fn qemu_img_convert_and_compare() {
    let qemu_img = require_tool("qemu-img");
    let dir = TempDir::new("qemu-img");
    let srv = Server::start_in(dir.path());
    create_volume(srv.pool(), "img", "64M");
    let src = dir.join("src.raw");
    let mut data = vec![0u8; (64 * MIB) as usize];
    Prng::new(7).fill(&mut data);
    std::fs::write(&src, &data).expect("write src.raw");
    drop(data);

    let uri = srv.unix_uri("img");
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    // Over TCP too, after a clean restart of the server with the synchronous I/O engine.
    let mut opts = srv.opts.clone();
    srv.stop();
    opts.extra_args
        .extend(["--io".to_string(), "sync".to_string()]);
    let srv = Server::start(opts);
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(srv.tcp_uri("img")));
    // A changed byte is noticed (the comparison really reads the export).
    let mut changed = read_file(&src);
    changed[(33 * MIB + 5) as usize] ^= 0xff;
    std::fs::write(&src, &changed).expect("rewrite src.raw");
    let out = output(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(srv.tcp_uri("img")),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare should report a difference (exit 1): {}",
        String::from_utf8_lossy(&out.stdout)
    );
    srv.stop();
}

#[test]
fn nbdcopy_one_gib_round_trip() {
    let nbdcopy = require_tool("nbdcopy");
    let dir = TempDir::new("nbdcopy");
    let srv = Server::start_in(dir.path());
    create_volume(srv.pool(), "big", "1G");
    let src = dir.join("src.raw");
    write_mixed_file(&src, GIB, 42);
    let want = sha256_file(&src);

    // In with 4 connections over the unix socket, flushing at the end.
    run(Command::new(&nbdcopy)
        .args(["--connections=4", "--flush"])
        .arg(&src)
        .arg(srv.unix_uri("big")));
    // Out over TCP.
    let back = dir.join("back.raw");
    run(Command::new(&nbdcopy).arg(srv.tcp_uri("big")).arg(&back));
    assert_eq!(
        std::fs::metadata(&back).expect("stat back.raw").len(),
        GIB,
        "nbdcopy read back a file of the wrong size"
    );
    assert_eq!(
        sha256_file(&back),
        want,
        "1 GiB read back over TCP differs from what was written"
    );
    std::fs::remove_file(&back).expect("remove back.raw");

    // Zero runs were not stored as data: the volume maps less than its size.
    let v = volume(srv.pool(), "big").expect("volume big listed");
    let mapped = v["mapped_bytes"].as_u64().expect("mapped_bytes");
    assert!(
        mapped > 0 && mapped < GIB,
        "volume big maps {mapped} bytes after writing 1 GiB with zero runs"
    );

    // After a clean restart, the same bytes come back (over the unix socket, 4 connections).
    let opts = srv.opts.clone();
    srv.stop();
    let srv = Server::start(opts);
    run(Command::new(&nbdcopy)
        .arg("--connections=4")
        .arg(srv.unix_uri("big"))
        .arg(&back));
    assert_eq!(
        sha256_file(&back),
        want,
        "1 GiB read back after a restart differs from what was written"
    );
    srv.stop();
}

/// fio randwrite with crc32c verification through its nbd engine.
fn fio_verify(uri: &str, bs: &[&str], size: &str) {
    let fio = require_tool("fio");
    let mut cmd = Command::new(&fio);
    cmd.args([
        "--name=verify",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ])
    .arg(format!("--uri={uri}"))
    .arg(format!("--size={size}"))
    .args(bs);
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = parse_json(&stdout);
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio job reported an error: {job}");
    let written = job["write"]["io_bytes"].as_u64().expect("write.io_bytes");
    let read = job["read"]["io_bytes"].as_u64().expect("read.io_bytes");
    let size_bytes = size
        .trim_end_matches('m')
        .parse::<u64>()
        .expect("size in m")
        * MIB;
    assert_eq!(written, size_bytes, "fio wrote {written} bytes, not {size}");
    // The verify phase reads back everything it wrote.
    assert_eq!(
        read, size_bytes,
        "fio verified {read} bytes, not {size}: {stdout}"
    );
}

#[test]
fn fio_randwrite_verify_tcp_and_unix() {
    require_tool("fio");
    let dir = TempDir::new("fio");
    let srv = Server::start_in(dir.path());
    create_volume(srv.pool(), "fio", "512M");
    fio_verify(&srv.tcp_uri("fio"), &["--bs=4k"], "256m");
    fio_verify(
        &srv.unix_uri("fio"),
        &["--bsrange=4k-128k", "--randseed=1234"],
        "384m",
    );
    srv.stop();
}
