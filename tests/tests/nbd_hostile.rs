//! Clients are hostile: sockets that never finish the NBD handshake (plain or inside TLS) must not
//! lock real clients out of the real `ingot serve`, and each handshake is bounded in time as a
//! whole. The real client is libnbd (Debian's `python3-libnbd`); a missing tool fails the test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ingot_tests::*;

/// Idle sockets opened against the server in the lock-out tests (more than its 256 connections).
const IDLE_SOCKETS: usize = 300;
/// Handshake time given to the server in the timeout tests (INGOT_HANDSHAKE_TIMEOUT_MS).
const SHORT_HANDSHAKE_MS: u64 = 500;

/// A 1 GiB pool in `dir/pool` with a 32 MiB volume vol0, served on a unix socket and TCP.
fn serve(dir: &Path, extra: &[String], env: &[(&str, String)]) -> Server {
    let pool = dir.join("pool");
    create_pool(&pool, "1G");
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    opts.extra_args.extend(extra.iter().cloned());
    opts.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let srv = Server::start(opts);
    create_volume(srv.pool(), "vol0", "32M");
    srv
}

/// Connect with libnbd, read 4 KiB and disconnect; the seconds connect + read took (measured
/// inside Python, so the interpreter's start is not counted).
fn real_client_read(uri: &str) -> f64 {
    let py = require_python_nbd();
    let script = r#"
import sys, time, nbd
t = time.monotonic()
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = h.pread(4096, 0)
took = time.monotonic() - t
assert len(buf) == 4096
h.shutdown()
print("took", took)
"#;
    let out = output_timeout(
        Command::new(&py).args(["-c", script, uri]),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "libnbd could not connect and read {uri} ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("took ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no timing in {stdout}"))
}

fn assert_real_client_gets_in(srv: &Server, uri: &str, idle: usize) {
    let took = real_client_read(uri);
    assert!(
        took < 1.0,
        "with {idle} idle sockets open, a real client took {took:.3} s to connect and read {uri}\n\
         --- server stderr ---\n{}",
        srv.stderr()
    );
}

/// Let the server accept what is queued.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn idle_tcp_sockets_do_not_lock_out_real_clients() {
    require_python_nbd();
    let dir = TempDir::new("hostile-tcp");
    let srv = serve(dir.path(), &[], &[]);
    let idle: Vec<TcpStream> = (0..IDLE_SOCKETS)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", srv.port()))
                .unwrap_or_else(|e| panic!("idle socket {i}: {e}"))
        })
        .collect();
    settle();
    assert_real_client_gets_in(&srv, &srv.tcp_uri("vol0"), idle.len());
    // Over unix too while the TCP sockets are still open.
    assert_real_client_gets_in(&srv, &srv.unix_uri("vol0"), idle.len());
    drop(idle);
    srv.stop();
}

#[test]
fn idle_unix_sockets_do_not_lock_out_real_clients() {
    require_python_nbd();
    let dir = TempDir::new("hostile-unix");
    let srv = serve(dir.path(), &[], &[]);
    let idle: Vec<UnixStream> = (0..IDLE_SOCKETS)
        .map(|i| {
            let mut s = UnixStream::connect(srv.socket())
                .unwrap_or_else(|e| panic!("idle socket {i}: {e}"));
            // Half of them answer the greeting and then stall in option haggling.
            if i % 2 == 0 {
                let _ = s.write_all(&3u32.to_be_bytes());
            }
            s
        })
        .collect();
    settle();
    assert_real_client_gets_in(&srv, &srv.unix_uri("vol0"), idle.len());
    assert_real_client_gets_in(&srv, &srv.tcp_uri("vol0"), idle.len());
    drop(idle);
    srv.stop();
}

/// Read the 18-byte greeting, answer with fixed newstyle + no zeroes, and ask for STARTTLS.
fn start_tls_and_stall(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    let mut m = 3u32.to_be_bytes().to_vec();
    m.extend_from_slice(b"IHAVEOPT");
    m.extend_from_slice(&5u32.to_be_bytes()); // NBD_OPT_STARTTLS
    m.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&m).expect("send STARTTLS");
    // The ACK (20 bytes); the server then waits for a TLS ClientHello that never comes.
    let mut ack = [0u8; 20];
    s.read_exact(&mut ack).expect("STARTTLS reply");
    assert_eq!(
        u32::from_be_bytes(ack[12..16].try_into().unwrap()),
        1,
        "STARTTLS not acknowledged"
    );
}

/// A self-signed certificate for the server (clients here never check it).
fn make_cert(dir: &Path) -> Vec<String> {
    let openssl = require_tool("openssl");
    run(Command::new(&openssl)
        .current_dir(dir)
        .args(["req", "-x509", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-keyout", "key.pem", "-out", "cert.pem", "-days", "2"])
        .args(["-subj", "/CN=localhost"]));
    vec![
        "--tls-cert".into(),
        dir.join("cert.pem").display().to_string(),
        "--tls-key".into(),
        dir.join("key.pem").display().to_string(),
    ]
}

#[test]
fn stalled_tls_handshakes_do_not_lock_out_real_clients() {
    require_python_nbd();
    let dir = TempDir::new("hostile-tls");
    let tls = make_cert(dir.path());
    let srv = serve(dir.path(), &tls, &[]);
    let idle: Vec<TcpStream> = (0..IDLE_SOCKETS)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", srv.port()))
                .unwrap_or_else(|e| panic!("idle socket {i}: {e}"));
            // 200 stall inside the TLS handshake, the rest right after accept.
            if i < 200 {
                start_tls_and_stall(&mut s);
            }
            s
        })
        .collect();
    settle();
    assert_real_client_gets_in(&srv, &srv.unix_uri("vol0"), idle.len());
    drop(idle);
    srv.stop();
}

/// Time until the server closes `s` (EOF or error other than a timeout of our own read).
fn time_to_close<S: Read>(s: &mut S, start: Instant, limit: Duration) -> Option<Duration> {
    let mut b = [0u8; 256];
    while start.elapsed() < limit {
        match s.read(&mut b) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn idle_handshakes_are_closed_after_the_handshake_timeout() {
    let dir = TempDir::new("hostile-timeout");
    let tls = make_cert(dir.path());
    let srv = serve(
        dir.path(),
        &tls,
        &[("INGOT_HANDSHAKE_TIMEOUT_MS", SHORT_HANDSHAKE_MS.to_string())],
    );
    let limit = Duration::from_secs(8);
    let short = Duration::from_millis(SHORT_HANDSHAKE_MS);
    let within = short + Duration::from_millis(2500);

    // Silent after the greeting (TCP).
    let start = Instant::now();
    let mut tcp = TcpStream::connect(("127.0.0.1", srv.port())).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let took = time_to_close(&mut tcp, start, limit);
    assert!(
        took.is_some_and(|t| t >= short && t < within),
        "a silent TCP handshake was closed after {took:?} (timeout {short:?})"
    );

    // Silent after the greeting (unix socket).
    let start = Instant::now();
    let mut unix = UnixStream::connect(srv.socket()).unwrap();
    unix.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let took = time_to_close(&mut unix, start, limit);
    assert!(
        took.is_some_and(|t| t >= short && t < within),
        "a silent unix handshake was closed after {took:?} (timeout {short:?})"
    );

    // Trickling: one byte of option header every 100 ms. Each read is quick; the handshake is
    // bounded as a whole.
    let start = Instant::now();
    let mut slow = TcpStream::connect(("127.0.0.1", srv.port())).unwrap();
    let mut greeting = [0u8; 18];
    slow.read_exact(&mut greeting).unwrap();
    let mut bytes = 3u32.to_be_bytes().to_vec();
    bytes.extend(b"IHAVEOPT".iter().cycle().take(200));
    let mut took = None;
    for b in bytes {
        if slow.write_all(&[b]).is_err() {
            took = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > limit {
            break;
        }
    }
    assert!(
        took.is_some_and(|t| t < within + Duration::from_millis(500)),
        "a trickling handshake was closed after {took:?} (timeout {short:?})"
    );

    // Stalled inside the TLS handshake.
    let start = Instant::now();
    let mut tls_conn = TcpStream::connect(("127.0.0.1", srv.port())).unwrap();
    start_tls_and_stall(&mut tls_conn);
    tls_conn
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let took = time_to_close(&mut tls_conn, start, limit);
    assert!(
        took.is_some_and(|t| t < within),
        "a stalled TLS handshake was closed after {took:?} (timeout {short:?})"
    );

    // Real clients, well within the timeout, are unaffected.
    assert_real_client_gets_in(&srv, &srv.tcp_uri("vol0"), 0);
    srv.stop();
}
