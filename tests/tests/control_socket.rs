//! What `ingot` leaves on disk and its control socket are its owner's only: pool files and the
//! socket are 0600, other users are refused by the socket (SO_PEERCRED), and an oversized
//! request is refused without the server reading it into memory.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ingot_tests::*;

/// Every entry of `dir` with its mode bits, failing on anything that is not 0600.
fn assert_all_0600(dir: &Path, when: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut bad = Vec::new();
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        let name = e.file_name().to_string_lossy().into_owned();
        if mode != 0o600 {
            bad.push(format!("{name} {mode:o}"));
        }
        names.push(name);
    }
    assert!(
        bad.is_empty(),
        "{when}: files not 0600 in {}: {bad:?}",
        dir.display()
    );
    names.sort();
    names
}

#[test]
fn pool_files_and_the_control_socket_are_0600() {
    let dir = TempDir::new("modes");
    let pool = dir.join("pool");
    create_pool(&pool, "1G");
    let names = assert_all_0600(&pool, "after `ingot pool create`");
    for want in ["dev0.img", "pool.json", "pool.lock"] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }

    let srv = Server::start(ServeOpts::new(&pool, &dir.join("nbd.sock")));
    create_volume(&pool, "vol0", "32M");
    let names = assert_all_0600(&pool, "while served");
    assert!(
        names.iter().any(|n| n == "control.sock"),
        "no control.sock in {names:?}"
    );
    assert!(fs::symlink_metadata(pool.join("control.sock"))
        .unwrap()
        .file_type()
        .is_socket());
    assert!(
        !names.iter().any(|n| n.starts_with(".control")),
        "staging left behind: {names:?}"
    );
    srv.stop();
    assert_all_0600(&pool, "after the server stopped");
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

#[test]
fn oversized_control_request_is_refused_with_bounded_memory() {
    let dir = TempDir::new("control-big");
    let pool = dir.join("pool");
    create_pool(&pool, "1G");
    let srv = Server::start(ServeOpts::new(&pool, &dir.join("nbd.sock")));
    stats(&pool);
    let before = peak_rss(srv.pid());

    let sock = UnixStream::connect(pool.join("control.sock")).expect("connect control.sock");
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut w = sock.try_clone().unwrap();
    // 100 MiB without a newline, sent until the server hangs up.
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        let mut sent = 0u64;
        for _ in 0..100 {
            if w.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        let _ = w.shutdown(std::net::Shutdown::Write);
        sent
    });
    let mut reply = String::new();
    let _ = BufReader::new(&sock).read_line(&mut reply);
    let sent = writer.join().unwrap();
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap_or_else(|e| {
        panic!("no JSON reply to an oversized request ({e}): {reply:?} (sent {sent} bytes)")
    });
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("longer than"),
        "{v}"
    );
    assert!(
        sent < 100 << 20,
        "the server read all 100 MiB instead of hanging up"
    );

    let grew = peak_rss(srv.pid()).saturating_sub(before);
    assert!(
        grew < 32 * MIB,
        "the server's peak memory grew by {} MiB on an oversized request",
        grew >> 20
    );
    // Still serving.
    stats(&pool);
    create_volume(&pool, "after", "16M");
    assert!(volume(&pool, "after").is_some());
    srv.stop();
}

/// Send `{"cmd":"volume_list"}` to `sock` as user nobody (65534); what it got back, or the error.
fn as_nobody(sock: &Path) -> String {
    let setpriv = require_tool("setpriv");
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect failed:", e.strerror)
    sys.exit(0)
try:
    s.sendall(b'{"cmd":"volume_list"}\n')
except OSError as e:
    pass
print(s.makefile().readline().strip())
"#;
    run_stdout(
        Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(require_tool("/usr/bin/python3"))
            .args(["-c", script])
            .arg(sock),
    )
}

#[test]
fn the_control_socket_refuses_other_users() {
    // The owner of /proc/self is the effective user.
    let euid = fs::metadata("/proc/self").expect("stat /proc/self").uid();
    assert_eq!(
        euid, 0,
        "this test runs a client as another user (nobody) and needs root: run it as root"
    );
    let dir = TempDir::new("control-peer");
    let pool = dir.join("pool");
    create_pool(&pool, "1G");
    let srv = Server::start(ServeOpts::new(&pool, &dir.join("nbd.sock")));
    let sock = pool.join("control.sock");

    // The file mode keeps nobody out...
    let out = as_nobody(&sock);
    assert!(
        out.contains("connect failed"),
        "nobody reached the socket: {out}"
    );

    // ...and past the file mode (made world-writable here), the peer check does.
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&sock);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no JSON reply for nobody ({e}): {out:?}"));
    assert_eq!(v["ok"], false, "nobody was served: {v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("permission denied"),
        "{v}"
    );
    // The owner (root) still is.
    assert!(volumes(&pool).is_empty());
    srv.stop();
}
