//! Running under systemd: the unit file passes `systemd-analyze verify`, and `ingot serve`
//! speaks the notification protocol (READY=1 once listening, WATCHDOG=1 while healthy,
//! STOPPING=1 at shutdown) to the socket in NOTIFY_SOCKET.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use ingot_tests::*;

#[test]
fn the_unit_file_verifies() {
    let analyze = require_tool("systemd-analyze");
    let dir = TempDir::new("unit");
    // verify wants ExecStart's binary to exist: point it at the one under test.
    let unit = std::fs::read_to_string(workspace_root().join("packaging/ingot.service")).unwrap();
    let unit = unit.replace("/usr/bin/ingot", &ingot_bin().display().to_string());
    let path = dir.join("ingot.service");
    std::fs::write(&path, unit).unwrap();
    let out = output(
        Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&path),
    );
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {out:?}"
    );
}

#[test]
fn serve_notifies_ready_watchdog_and_stopping() {
    let dir = TempDir::new("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut opts = ServeOpts::new(&dir.join("pool"), &dir.join("nbd.sock"));
    opts.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    let server = Server::start(opts);
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && got.iter().filter(|m| *m == "WATCHDOG=1").count() < 2 {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let ready = format!("READY=1\nMAINPID={}", server.pid());
    assert_eq!(got.first(), Some(&ready), "READY=1 first: {got:?}");
    assert!(
        got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2,
        "the watchdog is pinged every WATCHDOG_USEC / 2: {got:?}"
    );
    server.stop();
    let mut last = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        last.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        last.iter().any(|m| m == "STOPPING=1"),
        "STOPPING=1 at shutdown: {last:?}"
    );
}
