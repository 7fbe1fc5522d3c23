//! Access lists (`serve --allow VOLUME=RULE`) tried the way an intruder would, with real
//! clients: nbdinfo and nbdsh as other uids on the unix socket (setpriv), over TLS with client
//! certificates from the right CA, from another CA, and none; iscsi-inq and iscsi-ls with
//! allowed and refused initiator names; and SIGHUP reloads, good and broken.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ingot_tests::*;

/// Let every uid connect to the server's unix socket (the access list is what decides).
fn open_socket(srv: &Server) {
    fs::set_permissions(srv.socket(), fs::Permissions::from_mode(0o777)).unwrap();
}

/// Run `tool args...` as `uid` (and gid `uid`, no supplementary groups).
fn as_uid(uid: u32, tool: &str, args: &[String]) -> Output {
    output(
        Command::new(require_tool("setpriv"))
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(require_tool(tool))
            .args(args),
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_attaches(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} should attach: {}", text(o));
}

fn assert_refused(o: &Output, what: &str) {
    assert!(!o.status.success(), "{what} should be refused: {}", text(o));
}

/// Exports `nbdinfo --list` shows to `uid` on the unix socket.
fn listed_as(uid: u32, srv: &Server) -> String {
    let o = as_uid(
        uid,
        "nbdinfo",
        &["--list".into(), "--json".into(), srv.unix_uri("")],
    );
    assert!(o.status.success(), "nbdinfo --list: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Wait until the server's stderr holds `needle` `times` times.
fn wait_log(srv: &Server, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while srv.stderr().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "the server never logged {needle:?} ({times}x)\n--- stderr ---\n{}",
            srv.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pool_with(dir: &Path, volumes: &[&str]) -> PathBuf {
    let pool = dir.join("pool");
    create_pool(&pool, "1G");
    for v in volumes {
        create_volume(&pool, v, "32M");
    }
    pool
}

#[test]
fn unix_socket_clients_by_uid() {
    let dir = TempDir::new("acl-uid");
    let pool = pool_with(dir.path(), &["vol0", "other", "open"]);
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    opts.extra_args.extend(
        ["--allow", "vol0=uid:1000", "--allow", "other=uid:1001"]
            .iter()
            .map(|s| s.to_string()),
    );
    let srv = Server::start(opts);
    open_socket(&srv);

    assert_attaches(
        &as_uid(1000, "nbdinfo", &[srv.unix_uri("vol0")]),
        "uid 1000 on vol0",
    );
    let refused = as_uid(1000, "nbdinfo", &[srv.unix_uri("other")]);
    assert_refused(&refused, "uid 1000 on other (listed for uid 1001)");
    // The server's word, through libnbd: NBD_REP_ERR_POLICY with our message.
    let debug = output(
        Command::new(require_tool("setpriv"))
            .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
            .arg(require_tool("nbdinfo"))
            .arg(srv.unix_uri("other"))
            .env("LIBNBD_DEBUG", "1"),
    );
    assert!(
        String::from_utf8_lossy(&debug.stderr).contains("server error message: access denied"),
        "{}",
        text(&debug)
    );
    // Root is no exception, and a volume without rules stays open to anyone.
    assert_refused(
        &as_uid(0, "nbdinfo", &[srv.unix_uri("vol0")]),
        "uid 0 on vol0",
    );
    assert_attaches(
        &as_uid(1002, "nbdinfo", &[srv.unix_uri("open")]),
        "uid 1002 on open",
    );
    // A refused export is not even listed.
    let l = listed_as(1000, &srv);
    assert!(
        l.contains("\"vol0\"") && l.contains("\"open\"") && !l.contains("\"other\""),
        "{l}"
    );
    let l = listed_as(1001, &srv);
    assert!(!l.contains("\"vol0\"") && l.contains("\"other\""), "{l}");
    // NBD_OPT_EXPORT_NAME (old-style negotiation, no error reply possible): disconnected.
    let py = r#"
import nbd, sys
h = nbd.NBD()
h.set_opt_mode(False)
h.set_request_structured_replies(False)
h.set_handshake_flags(0)
h.set_export_name(sys.argv[2])
try:
    h.connect_unix(sys.argv[1])
    print("attached")
except nbd.Error as e:
    print("refused:", e.string)
"#;
    require_python_nbd();
    let run_py = |uid: u32, export: &str| {
        let o = as_uid(
            uid,
            "/usr/bin/python3",
            &[
                "-c".into(),
                py.into(),
                srv.socket().display().to_string(),
                export.into(),
            ],
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(
        run_py(1001, "other").starts_with("attached"),
        "{}",
        run_py(1001, "other")
    );
    assert!(
        run_py(1000, "other").starts_with("refused"),
        "{}",
        run_py(1000, "other")
    );
    // Each refusal is logged with the peer's uid and the volume.
    wait_log(&srv, "uid=\"1000\"", 1);
    let log = srv.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("refused by the export's access list")
                && l.contains("uid=\"1000\"")
                && l.contains("export=\"other\"")),
        "{log}"
    );
    assert!(log.contains("NBD_OPT_EXPORT_NAME"), "{log}");
    srv.stop();
}

/// A CA, a server certificate for 127.0.0.1, and one directory per client in the layout libnbd
/// reads (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`): `db1` and `db2` signed by the CA,
/// `forged` claiming db1's subject but signed by another CA.
fn make_certs(dir: &Path) {
    let openssl = require_tool("openssl");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = |name: &str| {
        run(Command::new(&openssl)
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", &format!("{name}-key.pem")])
            .args(["-out", &format!("{name}-cert.pem"), "-days", "2"])
            .args(["-subj", &format!("/CN=ingot test {name}")])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]));
    };
    ca("ca");
    ca("evil-ca");
    let sign = |name: &str, subj: &str, ca: &str, ext: &str| {
        run(Command::new(&openssl)
            .current_dir(dir)
            .args(["req"])
            .args(ec)
            .args(["-keyout", &format!("{name}-key.pem")])
            .args(["-out", &format!("{name}.csr"), "-subj", subj]));
        fs::write(dir.join(format!("{name}.cnf")), ext).unwrap();
        run(Command::new(&openssl).current_dir(dir).args([
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-out",
            &format!("{name}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.cnf"),
        ]));
    };
    sign(
        "server",
        "/CN=localhost",
        "ca",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    );
    let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
                      extendedKeyUsage=clientAuth\n";
    for (name, subj, ca) in [
        ("db1", "/O=acme/CN=db1", "ca"),
        ("db2", "/O=acme/CN=db2", "ca"),
        ("forged", "/O=acme/CN=db1", "evil-ca"),
    ] {
        sign(name, subj, ca, client_ext);
        let d = dir.join(name);
        fs::create_dir_all(&d).unwrap();
        fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
        fs::copy(
            dir.join(format!("{name}-cert.pem")),
            d.join("client-cert.pem"),
        )
        .unwrap();
        fs::copy(
            dir.join(format!("{name}-key.pem")),
            d.join("client-key.pem"),
        )
        .unwrap();
    }
    // Trusts the CA but shows no certificate.
    let d = dir.join("anonymous");
    fs::create_dir_all(&d).unwrap();
    fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
}

#[test]
fn tls_clients_by_certificate_subject() {
    let nbdinfo = require_tool("nbdinfo");
    let dir = TempDir::new("acl-tls");
    let certs = dir.join("certs");
    fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let pool = pool_with(dir.path(), &["vol0", "open"]);
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    let pem = |n: &str| certs.join(n).display().to_string();
    opts.extra_args.extend([
        "--tls-cert".into(),
        pem("server-cert.pem"),
        "--tls-key".into(),
        pem("server-key.pem"),
        "--tls-client-ca".into(),
        pem("ca-cert.pem"),
        "--tls-required".into(),
        // Written in RFC 4514 order, the reverse of the certificate's.
        "--allow".into(),
        "vol0=tls-subject:CN=db1,O=acme".into(),
    ]);
    let srv = Server::start(opts);
    let port = srv.port();
    let uri = |export: &str, client: &str| {
        format!(
            "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
            certs.join(client).display()
        )
    };
    let info = |export: &str, client: &str| output(Command::new(&nbdinfo).arg(uri(export, client)));
    assert_attaches(&info("vol0", "db1"), "db1's certificate on vol0");
    assert_refused(&info("vol0", "db2"), "db2's certificate on vol0");
    assert_refused(
        &info("vol0", "forged"),
        "a certificate with db1's subject from another CA",
    );
    assert_refused(
        &info("vol0", "anonymous"),
        "a TLS client without certificate",
    );
    // Volumes without rules stay open to TLS clients with or without a certificate.
    assert_attaches(&info("open", "anonymous"), "no certificate on open");
    assert_attaches(&info("open", "db2"), "db2 on open");
    // nbdsh too (`python3 -m nbd` with Debian's python3), reading data; and the list hides
    // vol0 from db2.
    let py = require_python_nbd();
    let nbdsh = || {
        let mut c = Command::new(&py);
        c.args(["-m", "nbd"]);
        c
    };
    // libnbd refuses tls-certificates in a URI unless told local files are fine.
    let sh = |client: &str, script: &str| {
        let full = format!(
            "h.set_uri_allow_local_file(True)\nh.connect_uri({:?})\n{script}",
            uri("vol0", client)
        );
        output(nbdsh().args(["-c", &full]))
    };
    let read = sh(
        "db1",
        "assert h.pread(4096, 0) == bytes(4096); print(h.get_size())",
    );
    assert_attaches(&read, "nbdsh with db1's certificate");
    assert!(
        String::from_utf8_lossy(&read.stdout).contains("33554432"),
        "{}",
        text(&read)
    );
    assert_refused(
        &sh("db2", "print(h.get_size())"),
        "nbdsh with db2's certificate",
    );
    let list = |client: &str| {
        let o = output(
            Command::new(&nbdinfo)
                .args(["--list", "--json"])
                .arg(uri("", client)),
        );
        assert!(o.status.success(), "nbdinfo --list: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let l = list("db2");
    assert!(!l.contains("\"vol0\"") && l.contains("\"open\""), "{l}");
    assert!(list("db1").contains("\"vol0\""));
    wait_log(&srv, "CN=db2", 1);
    let log = srv.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("refused by the export's access list")
                && l.contains("tls_subject=\"CN=db2,O=acme\"")
                && l.contains("export=\"vol0\"")
                && l.contains("peer=127.0.0.1:")),
        "{log}"
    );
    srv.stop();
}

#[test]
fn subject_rules_without_a_client_ca_are_refused_at_start() {
    let dir = TempDir::new("acl-noca");
    let pool = pool_with(dir.path(), &["vol0"]);
    let o = output(
        ingot()
            .args(["serve", "--nbd"])
            .arg(format!("unix:{}", dir.join("s.sock").display()))
            .arg("--pool")
            .arg(&pool)
            .args(["--allow", "vol0=tls-subject:CN=db1"]),
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--tls-client-ca"),
        "{}",
        text(&o)
    );
    let o = output(ingot().args(["serve", "--allow", "vol0=gid:5"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn iscsi_initiators_by_name() {
    let inq = require_tool("iscsi-inq");
    let ls = require_tool("iscsi-ls");
    let dir = TempDir::new("acl-iscsi");
    let (srv, port) = iscsi_server(
        dir.path(),
        "1G",
        "32M",
        &["--allow".into(), "vol0=iqn:iqn.2026-01.com.acme:db1".into()],
    );
    create_volume(srv.pool(), "open", "32M");
    let lun = |vol: &str| format!("iscsi://127.0.0.1:{port}/iqn.2026-11.io.ingot:{vol}/0");
    let inq_as = |initiator: &str, vol: &str| {
        output(Command::new(&inq).args(["-i", initiator]).arg(lun(vol)))
    };
    assert_attaches(&inq_as("iqn.2026-01.com.acme:db1", "vol0"), "db1 on vol0");
    // Names are case-insensitive; a longer name is another initiator.
    assert_attaches(&inq_as("IQN.2026-01.COM.ACME:DB1", "vol0"), "DB1 on vol0");
    let refused = inq_as("iqn.2026-01.com.acme:db2", "vol0");
    assert_refused(&refused, "db2 on vol0");
    assert_refused(&inq_as("iqn.2026-01.com.acme:db1x", "vol0"), "db1x on vol0");
    assert_attaches(&inq_as("iqn.2026-01.com.acme:db2", "open"), "db2 on open");
    // libiscsi names the status: class 2, detail 2 (0x0202 = 514, authorization failure).
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("Authorization failure(514)"),
        "{}",
        text(&refused)
    );
    // Discovery hides targets the initiator may not log in to.
    let discover = |initiator: &str| {
        run_stdout(
            Command::new(&ls)
                .args(["-i", initiator])
                .arg(format!("iscsi://127.0.0.1:{port}")),
        )
    };
    let seen = discover("iqn.2026-01.com.acme:db2");
    assert!(!seen.contains(":vol0") && seen.contains(":open"), "{seen}");
    assert!(discover("iqn.2026-01.com.acme:db1").contains(":vol0"));
    // NBD clients are refused too: vol0 has rules, none of them for NBD.
    assert_refused(
        &output(Command::new(require_tool("nbdinfo")).arg(srv.unix_uri("vol0"))),
        "NBD client on an iSCSI-only volume",
    );
    wait_log(&srv, "iqn.2026-01.com.acme:db2", 1);
    let log = srv.stderr();
    assert!(
        log.lines().any(
            |l| l.contains("initiator refused by the volume's access list")
                && l.contains("initiator=\"iqn.2026-01.com.acme:db2\"")
                && l.contains("volume=vol0")
        ),
        "{log}"
    );
    srv.stop();
}

/// Messages that arrived on a notify socket so far.
fn drain(sock: &UnixDatagram) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

#[test]
fn sighup_reloads_the_lists_and_a_broken_file_keeps_them() {
    let dir = TempDir::new("acl-reload");
    let pool = pool_with(dir.path(), &["vol0"]);
    let config = dir.join("ingot.toml");
    let write_config = |body: &str| {
        // Replaced in one step, as an editor or config manager would.
        let tmp = dir.join("ingot.toml.new");
        fs::write(&tmp, body).unwrap();
        fs::rename(&tmp, &config).unwrap();
    };
    write_config("allow = [\"vol0=uid:1001\"]\ncheckpoint-interval = \"1G\"\n");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    opts.extra_args
        .extend(["--config".into(), config.display().to_string()]);
    opts.env = vec![("NOTIFY_SOCKET".into(), notify_path.display().to_string())];
    let srv = Server::start(opts);
    open_socket(&srv);
    let attach = |uid| as_uid(uid, "nbdinfo", &[srv.unix_uri("vol0")]);
    assert_refused(&attach(1000), "uid 1000 before the reload");
    assert_attaches(&attach(1001), "uid 1001 before the reload");
    drain(&notify);

    // A held connection (attached before the reload) is not cut by it.
    let holder = std::process::Command::new(require_tool("setpriv"))
        .args(["--reuid=1001", "--regid=1001", "--clear-groups"])
        .arg(require_python_nbd())
        .args(["-m", "nbd"])
        .args(["-u", &srv.unix_uri("vol0")])
        .args([
            "-c",
            "import time; time.sleep(6); h.pread(512, 0); print('still served')",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));

    write_config("allow = [\"vol0=uid:1000\"]\ncheckpoint-interval = \"2G\"\n");
    signal(srv.pid(), "HUP");
    wait_log(&srv, "reloaded", 1);
    assert_attaches(&attach(1000), "uid 1000 after the reload added it");
    assert_refused(&attach(1001), "uid 1001 after the reload dropped it");
    let log = srv.stderr();
    assert!(
        log.lines().any(|l| l.contains("cannot change while serving")
            && l.contains("checkpoint-interval")),
        "a changed setting that needs a restart is reported: {log}"
    );
    let out = holder.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("still served"),
        "an attached client keeps its session across a reload: {out:?}"
    );
    let msgs = drain(&notify);
    let reloading = msgs
        .iter()
        .position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="));
    let ready = msgs.iter().rposition(|m| m.starts_with("READY=1"));
    assert!(
        matches!((reloading, ready), (Some(a), Some(b)) if a < b),
        "RELOADING=1 then READY=1: {msgs:?}"
    );

    // A broken file: logged as an error, the lists in force stay.
    write_config("allow = [\"vol0=uid:1001\"\n");
    signal(srv.pid(), "HUP");
    wait_log(&srv, "reload failed", 1);
    assert_attaches(&attach(1000), "uid 1000 after a broken reload");
    assert_refused(&attach(1001), "uid 1001 after a broken reload");
    // A file that parses but holds a bad rule is refused as a whole too.
    write_config("allow = [\"vol0=uid:1001\", \"vol0=uid:nobody\"]\n");
    signal(srv.pid(), "HUP");
    wait_log(&srv, "reload failed", 2);
    assert_refused(&attach(1001), "uid 1001 after a reload with a bad rule");
    assert!(srv.stderr().contains("ERROR"), "{}", srv.stderr());
    srv.stop();
}
