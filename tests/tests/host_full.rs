//! The host's file system fills under a thin pool: a 512 MiB sparse pool on a 200 MiB ext4
//! (a loop-mounted image). Writes past the room fail with ENOSPC (not EIO, not a halt), reads
//! and flushes of what is stored go on, `stats` warns, the server shuts down cleanly and opens
//! again read-write (its checkpoints use segments kept allocated for them), `check` and
//! `serve --read-only` open the full pool without writing, and once the file system grows
//! every flushed byte is there. Needs root (mount); missing tools fail the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use ingot_tests::*;

/// Writes 1 MiB pieces of FILE from offset 0 until three writes fail, flushing every 16 MiB;
/// prints "stored N" (bytes written before the first failure), the failures' errno names, and
/// whether a final flush and a read succeeded.
const FILLER: &str = r#"
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = open(sys.argv[2], "rb").read()
off, stored, errs = 0, None, []
while off + (1 << 20) <= len(data) and len(errs) < 3:
    try:
        h.pwrite(data[off:off + (1 << 20)], off)
        if off % (16 << 20) == 0:
            h.flush()
    except nbd.Error as e:
        if stored is None:
            stored = off
        errs.append(e.errno)
    off += 1 << 20
print("stored", stored if stored is not None else off)
print("errors", " ".join(str(e) for e in errs))
try:
    h.flush()
    print("flush ok")
except nbd.Error as e:
    print("flush failed", e)
try:
    h.pread(4096, 0)
    print("read ok")
except nbd.Error as e:
    print("read failed", e)
"#;

fn require_root() {
    let uid = run_stdout(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "tests/tests/host_full.rs needs root (mount): run ./test.sh as root"
    );
}

/// A loop-mounted ext4 image, unmounted on drop.
struct SmallFs {
    image: PathBuf,
    mnt: PathBuf,
}

impl SmallFs {
    fn new(dir: &Path, size: &str) -> SmallFs {
        let image = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        run(Command::new("truncate").args(["-s", size]).arg(&image));
        run(Command::new(require_tool("mkfs.ext4"))
            .arg("-q")
            .arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt));
        SmallFs { image, mnt }
    }

    /// Unmount, grow the image and its file system, mount again.
    fn grow(&self, size: &str) {
        assert!(
            unmount(&self.mnt),
            "umount {} stays busy",
            self.mnt.display()
        );
        run(Command::new("truncate").args(["-s", size]).arg(&self.image));
        let _ = Command::new("e2fsck").arg("-fy").arg(&self.image).output();
        run(Command::new("resize2fs").arg(&self.image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&self.image)
            .arg(&self.mnt));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        unmount(&self.mnt);
    }
}

/// Unmount, retrying for a few seconds: the last server's files may take a moment to be
/// released after it exits.
fn unmount(mnt: &Path) -> bool {
    for _ in 0..50 {
        if Command::new("umount")
            .arg(mnt)
            .status()
            .is_ok_and(|s| s.success())
        {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    false
}

/// Run [`FILLER`] against volume "v" of `server` with `data`; what it printed.
fn fill(python: &Path, server: &Server, data: &Path) -> String {
    run_stdout(
        Command::new(python)
            .arg("-c")
            .arg(FILLER)
            .arg(server.unix_uri("v"))
            .arg(data),
    )
}

/// Read volume "v" of `server` whole into `file`: its start must be `want`.
fn assert_stored(server: &Server, file: &Path, want: &[u8], what: &str) {
    run(Command::new(require_tool("nbdcopy"))
        .arg(server.unix_uri("v"))
        .arg(file));
    assert!(read_file(file)[..want.len()] == *want, "{what}");
}

#[test]
fn a_full_host_file_system_fails_writes_with_enospc_and_loses_nothing() {
    require_root();
    let python = require_python_nbd();
    let tmp = TempDir::new("hostfull");
    let fs = SmallFs::new(tmp.path(), "200M");
    let pool = fs.mnt.join("pool");
    ingot_ok([
        "pool",
        "create",
        "--pool",
        &pool.display().to_string(),
        "--size",
        "512M",
    ]);
    create_volume(&pool, "v", "400M");
    let data = tmp.join("data.bin");
    // Random bytes: neither compression nor dedup makes them fit.
    let mut expect = vec![0u8; 300 << 20];
    Prng::new(7).fill(&mut expect);
    std::fs::write(&data, &expect).unwrap();

    let sock = tmp.join("nbd.sock");
    let server = Server::start(ServeOpts::new(&pool, &sock));
    let out = fill(&python, &server, &data);
    let stored: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("stored "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("filler printed {out}"));
    assert!(
        (64 << 20..300 << 20).contains(&stored),
        "stored {stored} before ENOSPC: {out}"
    );
    let errnos = out
        .lines()
        .find_map(|l| l.strip_prefix("errors "))
        .unwrap_or("");
    assert!(
        !errnos.is_empty() && errnos.split(" ").all(|e| e == "ENOSPC" || e == "28"),
        "writes past the room must fail with ENOSPC, got: {out}"
    );
    assert!(out.contains("flush ok"), "flush of what is stored: {out}");
    assert!(out.contains("read ok"), "reads go on: {out}");
    let st = stats(&pool);
    assert!(st["halted"].is_null(), "the pool must not halt: {st}");
    assert!(
        st["host_warning"]
            .as_str()
            .is_some_and(|w| w.contains("ENOSPC")),
        "stats warns about the host file system: {st}"
    );
    // The final checkpoint takes segments kept allocated for it: the shutdown is clean.
    server.stop();

    // Opening without writing works on the full file system.
    let out = output(ingot().arg("check").arg("--pool").arg(&pool));
    assert!(out.status.success(), "check on a full host: {out:?}");
    let ro_sock = tmp.join("ro.sock");
    let mut ro = ServeOpts::new(&pool, &ro_sock);
    ro.extra_args.push("--read-only".into());
    let server = Server::start(ro);
    assert_stored(
        &server,
        &tmp.join("got.bin"),
        &expect[..stored],
        "data read back read-only",
    );
    server.stop();

    // A read-write open finds its recovery checkpoint's room kept too, and serves: reads
    // succeed, writes past the room still fail with ENOSPC.
    let server = Server::start(ServeOpts::new(&pool, &sock));
    assert_stored(
        &server,
        &tmp.join("got-rw.bin"),
        &expect[..stored],
        "data read back read-write",
    );
    let out = fill(&python, &server, &data);
    assert!(out.contains("read ok") && out.contains("flush ok"), "{out}");
    server.stop();

    // Room again: everything stored is there, and writes go on.
    fs.grow("1G");
    let server = Server::start(ServeOpts::new(&pool, &sock));
    assert_stored(
        &server,
        &tmp.join("got2.bin"),
        &expect[..stored],
        "data after growing",
    );
    server.stop();
    let out = output(ingot().arg("check").arg("--pool").arg(&pool));
    assert!(out.status.success(), "check after growing: {out:?}");
}
