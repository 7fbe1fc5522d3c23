//! The NBD front end of the real `ingot serve` against real clients: allocation maps (nbdinfo,
//! qemu-img), qemu-io, nbdcopy and fio over several connections, multi-conn flush, TLS, and
//! hostile requests through nbdsh. A missing tool fails the test with the package to install.

use std::fs;
use std::path::Path;
use std::process::Command;

use ingot_tests::*;

/// Server options for a pool of `size` created up front (the default pool preallocates 16 GiB,
/// too much for several tests at once).
fn small_pool(dir: &Path, size: &str) -> ServeOpts {
    ingot_ok([
        "pool",
        "create",
        "--pool",
        &dir.join("pool").display().to_string(),
        "--size",
        size,
    ]);
    ServeOpts::new(&dir.join("pool"), &dir.join("nbd.sock"))
}

/// `nbdinfo --map` as (offset, length, description) rows.
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, String)> {
    let out = run_stdout(Command::new(require_tool("nbdinfo")).arg("--map").arg(uri));
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(3)?.to_string(),
            ))
        })
        .collect()
}

fn qemu_io(uri: &str, cmd: &str) -> String {
    run_stdout(
        Command::new(require_tool("qemu-io"))
            .args(["-f", "raw", "-c", cmd])
            .arg(uri),
    )
}

#[test]
fn allocation_maps_follow_writes_trims_and_zeroes() {
    require_tool("nbdinfo");
    require_tool("qemu-img");
    let dir = TempDir::new("nbdmap");
    let srv = Server::start(small_pool(dir.path(), "1G"));
    create_volume(srv.pool(), "map", "64M");
    create_volume(srv.pool(), "vol0", "32M");
    let uri = srv.unix_uri("map");

    // nbdinfo --list names the volumes (plain text form).
    let list = run_stdout(
        Command::new(require_tool("nbdinfo"))
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", srv.port())),
    );
    assert!(
        list.contains("export=\"map\"") && list.contains("export=\"vol0\""),
        "{list}"
    );

    // Never written: one hole.
    assert_eq!(nbdinfo_map(&uri), [(0, 64 * MIB, "hole,zero".to_string())]);

    qemu_io(&uri, "write -P 0x61 0 4M");
    qemu_io(&uri, "write -P 0x62 8M 1M");
    let m = nbdinfo_map(&uri);
    assert_eq!(
        m,
        [
            (0, 4 * MIB, "data".to_string()),
            (4 * MIB, 4 * MIB, "hole,zero".to_string()),
            (8 * MIB, MIB, "data".to_string()),
            (9 * MIB, 55 * MIB, "hole,zero".to_string()),
        ],
        "{m:?}"
    );

    // qemu-img map sees the same allocation.
    let out = run_stdout(
        Command::new(require_tool("qemu-img"))
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&uri),
    );
    let v = parse_json(&out);
    let data: Vec<(u64, u64)> = v
        .as_array()
        .expect("qemu-img map array")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, [(0, 4 * MIB), (8 * MIB, MIB)], "{out}");

    // Trim and write -z punch holes; reads there return zeroes.
    qemu_io(&uri, "discard 0 2M");
    qemu_io(&uri, "write -z 8M 1M");
    let m = nbdinfo_map(&uri);
    assert_eq!(
        m,
        [
            (0, 2 * MIB, "hole,zero".to_string()),
            (2 * MIB, 2 * MIB, "data".to_string()),
            (4 * MIB, 60 * MIB, "hole,zero".to_string()),
        ],
        "{m:?}"
    );
    let out = qemu_io(&uri, "read -v 1M 512");
    assert!(
        out.lines()
            .filter(|l| l.starts_with("00"))
            .all(|l| l.contains(" 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00")),
        "{out}"
    );
    let out = qemu_io(&uri, "read -v 3M 16");
    assert!(out.contains("61 61 61 61"), "{out}");
    qemu_io(&uri, "read -P 0x61 2M 2M");
    qemu_io(&uri, "read -P 0 0 2M");
    qemu_io(&uri, "read -P 0 8M 1M");
    srv.stop();
}

#[test]
fn nbdcopy_and_fio_over_several_connections() {
    require_tool("nbdcopy");
    require_tool("fio");
    let dir = TempDir::new("nbdmulti");
    let srv = Server::start(small_pool(dir.path(), "2G"));
    create_volume(srv.pool(), "multi", "256M");
    create_volume(srv.pool(), "fio", "256M");
    let src = dir.join("src.img");
    write_mixed_file(&src, 128 * MIB, 7);
    let uri = srv.unix_uri("multi");
    run(Command::new(require_tool("nbdcopy"))
        .args(["--connections=4", "--requests=16"])
        .arg(&src)
        .arg(&uri));
    let back = dir.join("back.img");
    run(Command::new(require_tool("nbdcopy"))
        .args(["--connections=4"])
        .arg(&uri)
        .arg(&back));
    assert_eq!(
        sha256_file(&back),
        {
            // The volume is larger than the file: compare the first 128 MiB, the rest is zeroes.
            let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
            f.set_len(256 * MIB).unwrap();
            sha256_file(&src)
        },
        "nbdcopy round trip over 4 connections differs"
    );

    // fio: 4 jobs, each its own NBD connection on its own 64 MiB, crc32c verified.
    let out = run(Command::new(require_tool("fio"))
        .args([
            "--name=multi",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=32m",
            "--offset_increment=64m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .arg(format!("--uri={}", srv.unix_uri("fio"))));
    let v = parse_json(&String::from_utf8_lossy(&out.stdout));
    let jobs = v["jobs"].as_array().expect("fio jobs");
    assert_eq!(jobs.len(), 4, "{v}");
    for j in jobs {
        assert_eq!(j["error"], 0, "{j}");
        assert_eq!(j["write"]["io_bytes"].as_u64(), Some(32 * MIB), "{j}");
        assert_eq!(j["read"]["io_bytes"].as_u64(), Some(32 * MIB), "{j}");
    }
    srv.stop();
}

#[test]
fn flush_on_one_connection_covers_writes_of_another() {
    let py = require_python_nbd();
    let dir = TempDir::new("multiconn");
    let opts = small_pool(dir.path(), "1G");
    let srv = Server::start(opts.clone());
    create_volume(srv.pool(), "mc", "64M");
    let uri = srv.unix_uri("mc");
    let script = r#"
import nbd, sys
uri = sys.argv[1]
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(uri); b.connect_uri(uri)
assert a.can_multi_conn() and b.can_multi_conn()
for i in range(64):
    a.pwrite(bytes([i + 1]) * 65536, i * 65536)
b.flush()
print("flushed")
"#;
    let out = run_stdout(Command::new(&py).args(["-c", script, &uri]));
    assert!(out.contains("flushed"));
    // Crash the server right after: the flush on `b` made `a`'s writes durable.
    srv.kill9();
    let srv = Server::start(opts);
    let check = r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(64):
    assert h.pread(65536, i * 65536) == bytes([i + 1]) * 65536, i
print("intact")
"#;
    let out = run_stdout(Command::new(&py).args(["-c", check, &uri]));
    assert!(out.contains("intact"));
    srv.stop();
}

/// A throwaway CA and a server certificate for localhost / 127.0.0.1, made with openssl.
fn make_certs(dir: &Path) {
    let openssl = require_tool("openssl");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new(&openssl)
        .current_dir(dir)
        .args(["req", "-x509"])
        .args(ec)
        .args(["-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2"])
        .args(["-subj", "/CN=ingot test CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]));
    run(Command::new(&openssl)
        .current_dir(dir)
        .args(["req"])
        .args(ec)
        .args(["-keyout", "server-key.pem", "-out", "server.csr"])
        .args(["-subj", "/CN=localhost"]));
    fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new(&openssl).current_dir(dir).args([
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "server-cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]));
}

#[test]
fn tls_with_nbdinfo_and_qemu_img() {
    require_tool("nbdinfo");
    require_tool("qemu-img");
    let dir = TempDir::new("nbdtls");
    let certs = dir.join("certs");
    fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let mut opts = small_pool(dir.path(), "1G");
    opts.extra_args.extend([
        "--tls-cert".into(),
        certs.join("server-cert.pem").display().to_string(),
        "--tls-key".into(),
        certs.join("server-key.pem").display().to_string(),
        "--tls-required".into(),
    ]);
    let srv = Server::start(opts);
    create_volume(srv.pool(), "sec", "32M");
    let port = srv.port();

    // nbdinfo over TLS, trusting the test CA.
    let out = run_stdout(
        Command::new(require_tool("nbdinfo"))
            .arg("--json")
            .arg(format!(
                "nbds://127.0.0.1:{port}/sec?tls-certificates={}",
                certs.display()
            )),
    );
    let v = parse_json(&out);
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(32 * MIB),
        "{v}"
    );
    assert_eq!(v["exports"][0]["is_read_only"], false, "{v}");

    // Without TLS the server refuses to serve the export.
    let plain =
        output(Command::new(require_tool("nbdinfo")).arg(format!("nbd://127.0.0.1:{port}/sec")));
    assert!(
        !plain.status.success(),
        "plain nbdinfo succeeded against --tls-required"
    );

    // qemu-img with an x509 credentials object writes and reads over TLS.
    let img = dir.join("small.img");
    fs::write(&img, vec![0x7au8; 1 << 20]).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.display()
    );
    let target = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=sec,tls-creds=tls0"
    );
    run(Command::new(require_tool("qemu-img"))
        .args([
            "convert",
            "-n",
            "-f",
            "raw",
            "--object",
            &obj,
            "--target-image-opts",
        ])
        .arg(&img)
        .arg(&target));
    let out = run_stdout(Command::new(require_tool("qemu-img")).args([
        "info",
        "--output=json",
        "--object",
        &obj,
        "--image-opts",
        &target,
    ]));
    assert_eq!(
        parse_json(&out)["virtual-size"].as_u64(),
        Some(32 * MIB),
        "{out}"
    );
    let out = run_stdout(
        Command::new(require_tool("qemu-img"))
            .args(["compare", "--object", &obj, "--image-opts"])
            .arg(format!(
                "driver=raw,file.driver=file,file.filename={}",
                img.display()
            ))
            .arg(&target),
    );
    assert!(
        out.contains("identical") || out.contains("Images are identical"),
        "{out}"
    );
    srv.stop();
}

#[test]
fn hostile_requests_through_nbdsh() {
    let py = require_python_nbd();
    let dir = TempDir::new("nbdhostile");
    let srv = Server::start(small_pool(dir.path(), "1G"));
    create_volume(srv.pool(), "h", "16M");
    let uri = srv.unix_uri("h");
    let script = r#"
import nbd, sys
uri = sys.argv[1]
size = 16 << 20
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
def err(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno
    return "OK"
def check(name, got, want):
    if got not in want:
        print("FAIL", name, got, want); sys.exit(1)
check("read past end", err(lambda: h.pread(4096, size)), ("EINVAL",))
check("read straddling end", err(lambda: h.pread(8192, size - 4096)), ("EINVAL",))
check("write past end", err(lambda: h.pwrite(b"x" * 4096, size)), ("ENOSPC", "EINVAL"))
check("unaligned read", err(lambda: h.pread(100, 1)), ("EINVAL",))
check("unaligned write", err(lambda: h.pwrite(b"y" * 100, 3)), ("EINVAL",))
check("trim past end", err(lambda: h.trim(4096, size)), ("EINVAL",))
check("read over max", err(lambda: h.pread(33 << 20, 0)), ("EINVAL", "EOVERFLOW"))
check("unknown read flag", err(lambda: h.pread(512, 0, flags=1 << 9)), ("EINVAL",))
check("zero-length read", err(lambda: h.pread(0, 0)), ("OK",))
check("zero-length trim", err(lambda: h.trim(0, 0)), ("OK",))
check("zero-length block status", err(lambda: h.block_status(0, 0, lambda *a: 0)), ("EINVAL",))
# The connection still works after every refusal.
h.pwrite(b"z" * 4096, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 4096) == b"z" * 4096
h.zero(4096, 4096, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 4096) == bytes(4096)
h.cache(65536, 0)
h.flush()
h.shutdown()
print("ok")
"#;
    let out = run_stdout(Command::new(&py).args(["-c", script, &uri]));
    assert!(out.contains("ok"), "{out}");
    // A second, well-behaved client is unaffected.
    // nbdsh (`python3 -m nbd`) with Debian's python3 (one earlier on PATH may lack the module).
    let out = run_stdout(Command::new(&py).args(["-m", "nbd"]).args([
        "-u",
        &uri,
        "-c",
        "h.pwrite(b'w' * 512, 0); assert h.pread(512, 0) == b'w' * 512; print('second ok')",
    ]));
    assert!(out.contains("second ok"), "{out}");
    srv.stop();
}

/// `ingot volume snapshot` and `clone` on a running server, seen by real clients: the snapshot
/// keeps the data written before it while the volume changes, its export is read-only (qemu-io's
/// write fails, nbdinfo reports it), and a clone of it is writable.
#[test]
fn snapshots_and_clones_online() {
    let dir = TempDir::new("nbdsnap");
    let srv = Server::start(small_pool(dir.path(), "512M"));
    let pool = srv.pool().to_path_buf();
    create_volume(&pool, "db", "64M");
    let db = srv.unix_uri("db");
    qemu_io(&db, "write -P 0x5a 0 4M");
    let cli = |args: &[&str]| {
        let mut a: Vec<&str> = args.to_vec();
        let p = pool.display().to_string();
        a.extend(["--pool", &p]);
        ingot_ok(a)
    };
    cli(&["volume", "snapshot", "db", "db-snap"]);
    // The volume moves on.
    qemu_io(&db, "write -P 0xa5 0 1M");
    qemu_io(&db, "discard 2M 1M");
    qemu_io(&db, "read -P 0xa5 0 1M");
    qemu_io(&db, "read -P 0 2M 1M");
    // The snapshot does not.
    let snap = srv.unix_uri("db-snap");
    let read_only = |uri: &str, cmd: &str| {
        run_stdout(
            Command::new(require_tool("qemu-io"))
                .args(["-r", "-f", "raw", "-c", cmd])
                .arg(uri),
        )
    };
    let out = read_only(&snap, "read -P 0x5a 0 4M");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let info = parse_json(&run_stdout(
        Command::new(require_tool("nbdinfo"))
            .arg("--json")
            .arg(&snap),
    ));
    assert_eq!(
        info["exports"][0]["is_read_only"],
        serde_json::Value::Bool(true),
        "nbdinfo on a snapshot: {info}"
    );
    let w = output(
        Command::new(require_tool("qemu-io"))
            .args(["-f", "raw", "-c", "write -P 0x11 0 64k"])
            .arg(&snap),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    // qemu-io opens the read-only export read-write, which fails (EPERM).
    assert!(
        !w.status.success() && text.contains("Permission denied"),
        "a write to a snapshot export was not refused: {text}"
    );
    read_only(&snap, "read -P 0x5a 0 64k");
    // A clone of the snapshot is writable, independently.
    cli(&["volume", "clone", "db-snap", "db-test"]);
    let test = srv.unix_uri("db-test");
    qemu_io(&test, "write -P 0x33 0 64k");
    qemu_io(&test, "read -P 0x33 0 64k");
    qemu_io(&test, "read -P 0x5a 64k 3M");
    let out = read_only(&snap, "read -P 0x5a 0 4M");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let list = parse_json(&cli(&["volume", "list", "--json"]));
    let ro = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {list}"))["read_only"]
            .clone()
    };
    assert_eq!(ro("db-snap"), serde_json::Value::Bool(true));
    assert_eq!(ro("db-test"), serde_json::Value::Bool(false));
    assert_eq!(ro("db"), serde_json::Value::Bool(false));
    let out = output(
        Command::new(ingot_bin())
            .args(["check", "--pool"])
            .arg(&pool),
    );
    assert!(out.status.success(), "ingot check after snapshots failed");
    srv.stop();
}
