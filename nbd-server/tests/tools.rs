//! Interoperability with real NBD clients: nbdinfo, qemu-io and libnbd's Python bindings.
//! The tools must be installed; a missing tool fails the test with instructions.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use ingot_nbd::proto::*;

/// Path of a required tool, or a failing test that says how to get it.
fn require(tool: &str, package: &str) -> String {
    let found = if tool.starts_with('/') {
        Path::new(tool).is_file().then(|| tool.to_string())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
                .map(|p| p.display().to_string())
        })
    };
    found.unwrap_or_else(|| {
        panic!("required tool `{tool}` is not installed (install the `{package}` package)")
    })
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn uri(t: &TestServer, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", t.socket.display())
}

/// Write `len` bytes of `byte` at `offset` of vol0 through a raw connection.
fn fill(t: &TestServer, offset: u64, len: usize, byte: u8) {
    let mut c = t.raw();
    c.go("vol0", false, false);
    c.write(0, 1, offset, &vec![byte; len]);
    assert_eq!(c.simple(), (0, 1));
    c.disconnect();
}

#[test]
fn nbdinfo_json() {
    let nbdinfo = require("nbdinfo", "libnbd-bin");
    let t = TestServer::start();
    let out = run(Command::new(&nbdinfo).arg("--json").arg(uri(&t, "vol1")));
    // Compact the JSON so fields can be matched as `"key":value`.
    let compact = |o: &Output| -> String {
        String::from_utf8_lossy(&o.stdout)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect()
    };
    let j = compact(&out);
    for field in [
        r#""protocol":"newstyle-fixed""#,
        r#""export-name":"vol1""#,
        r#""export-size":2097152"#,
        r#""is_read_only":false"#,
        r#""can_flush":true"#,
        r#""can_fua":true"#,
        r#""can_trim":true"#,
        r#""can_zero":true"#,
        r#""can_fast_zero":true"#,
        r#""can_cache":true"#,
        r#""can_multi_conn":true"#,
        r#""can_df":true"#,
        r#""block_size_minimum":512"#,
        r#""block_size_preferred":4096"#,
        r#""block_size_maximum":33554432"#,
        r#""base:allocation""#,
    ] {
        assert!(j.contains(field), "nbdinfo --json lacks {field}: {j}");
    }

    // --list goes through NBD_OPT_LIST and NBD_OPT_INFO for each export.
    let out = run(Command::new(&nbdinfo)
        .arg("--json")
        .arg("--list")
        .arg(uri(&t, "")));
    let j = compact(&out);
    let a = j.find(r#""export-name":"vol0""#);
    let b = j.find(r#""export-name":"vol1""#);
    assert!(a.is_some() && b.is_some() && a < b, "{j}");
    assert!(j.contains(r#""export-size":1048576"#), "{j}");
}

#[test]
fn nbdinfo_map() {
    let nbdinfo = require("nbdinfo", "libnbd-bin");
    let t = TestServer::start();
    fill(&t, 65536, 65536, 0x11);
    let out = run(Command::new(&nbdinfo).arg("--map").arg(uri(&t, "vol0")));
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<(u64, u64, u32)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (0, 65536, STATE_HOLE | STATE_ZERO),
            (65536, 65536, 0),
            (131072, (1 << 20) - 131072, STATE_HOLE | STATE_ZERO)
        ],
        "{text}"
    );
}

#[test]
fn qemu_io_write_and_verify() {
    let qemu_io = require("qemu-io", "qemu-utils");
    let t = TestServer::start();
    let out = run(Command::new(&qemu_io)
        .args(["-f", "raw", &uri(&t, "vol0")])
        .args(["-c", "write -P 0xab 0 64k"])
        .args(["-c", "read -P 0xab 0 64k"])
        .args(["-c", "write -z 64k 64k"])
        .args(["-c", "read -P 0 64k 64k"])
        .args(["-c", "discard 128k 4k"])
        .args(["-c", "flush"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "{text}");
    assert!(!text.contains("error"), "{text}");
    assert_eq!(t.exports[0].contents(0, 65536), vec![0xab; 65536]);
}

const LIBNBD_SCRIPT: &str = r#"
import errno, sys
import nbd

h = nbd.NBD()
h.set_export_name("vol0")
h.add_meta_context("base:allocation")
h.connect_unix(sys.argv[1])
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
size = h.get_size()
assert size == 1 << 20, size
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512

h.pwrite(b"\x5a" * 8192, 65536, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 65536) == b"\x5a" * 8192

chunks = []
def chunk(*args):
    buf, offset, status = args[0], args[1], args[2]
    chunks.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(16384, 61440, chunk, nbd.CMD_FLAG_DF)
assert buf == b"\x00" * 4096 + b"\x5a" * 8192 + b"\x00" * 4096, "bad data"
assert chunks == [(61440, 16384, nbd.READ_DATA)], chunks

extents = []
def extent(*args):
    extents.append((args[0], args[1], list(args[2])))
    return 0
h.block_status(size, 0, extent)
assert extents == [("base:allocation", 0,
                    [65536, 3, 8192, 0, size - 65536 - 8192, 3])], extents
extents.clear()
h.block_status(size, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert extents == [("base:allocation", 0, [65536, 3])], extents

h.zero(4096, 65536)
h.trim(4096, 69632)
h.flush()
h.cache(4096, 0)
assert h.pread(8192, 65536) == b"\x00" * 8192

h.set_strict_mode(0)
for off in (size, size - 512):
    try:
        h.pread(1024, off)
        raise SystemExit("out-of-range read succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"\x01" * 1024, size - 512)
    raise SystemExit("out-of-range write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
try:
    h.pread(512, 100)
    raise SystemExit("unaligned read succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
# The connection is still healthy.
assert h.pread(512, 0) == b"\x00" * 512
h.shutdown()
print("libnbd ok")
"#;

#[test]
fn libnbd_python() {
    let python = require("/usr/bin/python3", "python3");
    let t = TestServer::start();
    let probe = Command::new(&python)
        .args(["-c", "import nbd"])
        .output()
        .expect("run python3");
    assert!(
        probe.status.success(),
        "python3 cannot import nbd (install the `python3-libnbd` package): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let out = run(Command::new(&python)
        .args(["-c", LIBNBD_SCRIPT])
        .arg(&t.socket));
    assert!(String::from_utf8_lossy(&out.stdout).contains("libnbd ok"));
}

#[test]
fn nbdsh_reports_export() {
    let nbdsh = require("nbdsh", "libnbd-bin");
    require("/usr/bin/python3", "python3-libnbd");
    let t = TestServer::start();
    // nbdsh runs `python3 -m nbd` from PATH: make sure that is the system python with libnbd.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = run(Command::new(&nbdsh)
        .env("PATH", path)
        .args(["-u", &uri(&t, "vol1")])
        .args([
            "-c",
            "print(h.get_size(), h.can_multi_conn(), h.is_read_only())",
        ]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2097152 True False"
    );
}
