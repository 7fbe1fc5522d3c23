//! Hostile input on the iSCSI port, as raw bytes: each case gets the protocol's Reject or a
//! dropped connection, while another session keeps working and data written before survives.

use std::io::Write;
use std::time::Duration;

use ingot_tests::iscsi::{crc32c, Initiator, BHS};
use ingot_tests::*;

const TARGET: &str = "iqn.2026-11.io.ingot:vol0";

/// The bystander session still answers, and the reference data is intact.
fn still_serving(bystander: &mut Initiator, reference: &[u8], srv: &Server) {
    let r = bystander.test_unit_ready().expect("bystander TUR");
    assert_eq!(r.status, 0, "bystander TUR failed: {r:?}");
    let back = bystander.read10(0, 64).expect("bystander read");
    assert_eq!(back.status, 0);
    assert_eq!(back.data, reference, "data written earlier changed");
    let stderr = srv.stderr();
    assert!(!stderr.contains("panicked"), "server panicked:\n{stderr}");
}

fn bhs(opcode: u8, flags: u8) -> [u8; BHS] {
    let mut b = [0u8; BHS];
    b[0] = opcode;
    b[1] = flags;
    b
}

#[test]
fn hostile_pdus_are_rejected_or_dropped_and_the_target_keeps_serving() {
    let dir = TempDir::new("iscsi-hostile");
    let (srv, port) = iscsi_server(dir.path(), "1G", "64M", &[]);
    let mut reference = vec![0u8; 64 * 512];
    Prng::new(7).fill(&mut reference);
    let mut bystander = Initiator::connect(port).expect("connect");
    // Its own ISID, so that the other sessions of this test do not reinstate it.
    bystander.isid[5] ^= 0x40;
    let r = bystander
        .login(
            Some(TARGET),
            &[
                ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "65536"),
            ],
        )
        .expect("login");
    assert_eq!(r.bhs[36..38], [0, 0]);
    let r = bystander.write10(0, &reference).expect("write reference");
    assert_eq!(r.status, 0);
    assert_eq!(bystander.sync_cache().expect("sync").status, 0);

    // 1. A SCSI command before login: the connection is dropped.
    let mut raw = Initiator::connect(port).expect("connect");
    let mut cmd = bhs(0x01, 0xc1);
    cmd[32] = 0x28; // READ(10)
    cmd[20..24].copy_from_slice(&512u32.to_be_bytes());
    raw.send(&cmd, &[]).expect("send");
    assert!(
        raw.closed_by_target(),
        "SCSI command before login was served"
    );
    still_serving(&mut bystander, &reference, &srv);

    // 2. Garbage instead of a login.
    let mut raw = Initiator::connect(port).expect("connect");
    raw.stream.write_all(&[0xffu8; 4096]).expect("send garbage");
    assert!(raw.closed_by_target(), "garbage was not dropped");
    still_serving(&mut bystander, &reference, &srv);

    // 3. An unknown opcode in the full feature phase: Reject (COMMAND NOT SUPPORTED), and the
    // session goes on.
    let mut s = Initiator::login_normal(port, TARGET);
    let mut b = bhs(0x1c, 0x80);
    b[16..20].copy_from_slice(&77u32.to_be_bytes());
    s.send(&b, &[]).expect("send");
    let p = s.recv().expect("reject");
    assert_eq!(
        p.opcode(),
        0x3f,
        "expected a Reject, got {:#04x}",
        p.opcode()
    );
    assert_eq!(p.bhs[2], 0x05, "reject reason");
    assert_eq!(&p.data[..4], &b[..4], "reject carries the offending header");
    assert_eq!(s.test_unit_ready().expect("TUR after reject").status, 0);

    // 4. SNACK at ErrorRecoveryLevel 0: Reject, session goes on.
    let b = bhs(0x10, 0x80);
    s.send(&b, &[]).expect("send");
    let p = s.recv().expect("reject");
    assert_eq!(p.opcode(), 0x3f);
    assert_eq!(s.test_unit_ready().expect("TUR").status, 0);

    // 5. A malformed AHS on a SCSI command (length past its end): Reject.
    let mut c = s.command_bhs(&[0u8; 16], 0, false, false);
    c[4] = 1; // one AHS word follows
    let mut wire = c.to_vec();
    wire[5..8].copy_from_slice(&[0, 0, 0]);
    wire.extend_from_slice(&[0x00, 0x40, 0x01, 0x00]); // AHS claims 64 bytes
    s.stream.write_all(&wire).expect("send");
    let p = s.recv().expect("reject");
    assert_eq!(p.opcode(), 0x3f, "malformed AHS not rejected");
    assert_eq!(s.test_unit_ready().expect("TUR").status, 0);

    // 6. A CmdSN far outside the window is ignored; the next good command is answered.
    let mut c = s.command_bhs(&[0u8; 16], 0, false, false);
    c[24..28].copy_from_slice(&(s.cmd_sn.wrapping_add(100_000)).to_be_bytes());
    s.cmd_sn = s.cmd_sn.wrapping_sub(1);
    s.send(&c, &[]).expect("send");
    assert_eq!(s.test_unit_ready().expect("TUR").status, 0);
    s.logout().expect("logout");

    // 7. A data segment longer than the negotiated MaxRecvDataSegmentLength: dropped.
    let mut s = Initiator::login_normal(port, TARGET);
    let mut b = bhs(0x40, 0x80);
    b[16..20].copy_from_slice(&5u32.to_be_bytes());
    let len = 0x00ff_ffff; // the largest a 24-bit length can say
    b[5] = (len >> 16) as u8;
    b[6] = (len >> 8) as u8;
    b[7] = len as u8;
    s.stream.write_all(&b).expect("send header");
    let _ = s.stream.write_all(&vec![0u8; 1 << 20]);
    assert!(s.closed_by_target(), "oversized data segment was accepted");
    still_serving(&mut bystander, &reference, &srv);

    // 8. A wrong header digest: dropped.
    let mut s = Initiator::connect(port).expect("connect");
    let r = s
        .login(
            Some(TARGET),
            &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
        )
        .expect("login");
    assert_eq!(r.bhs[36..38], [0, 0]);
    let c = s.command_bhs(&[0u8; 16], 0, false, false);
    let mut wire = c.to_vec();
    wire.extend_from_slice(&(crc32c(&c) ^ 1).to_le_bytes());
    s.stream.write_all(&wire).expect("send");
    assert!(s.closed_by_target(), "bad header digest accepted");
    still_serving(&mut bystander, &reference, &srv);

    // 9. A wrong data digest on a write: Reject (DATA DIGEST ERROR) then dropped; nothing written.
    let mut s = Initiator::connect(port).expect("connect");
    s.login(
        Some(TARGET),
        &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
    )
    .expect("login");
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[8] = 1; // one block at LBA 0
    let c = s.command_bhs(&cdb, 512, false, true);
    let mut c = c;
    c[5..8].copy_from_slice(&[0, 2, 0]);
    let mut wire = c.to_vec();
    wire.extend_from_slice(&crc32c(&c).to_le_bytes());
    let data = vec![0xeeu8; 512];
    wire.extend_from_slice(&data);
    wire.extend_from_slice(&(crc32c(&data) ^ 0xdead).to_le_bytes());
    s.stream.write_all(&wire).expect("send");
    let p = s.recv().expect("reject for data digest");
    assert_eq!(p.opcode(), 0x3f);
    assert_eq!(p.bhs[2], 0x02, "reject reason DATA DIGEST ERROR");
    assert!(
        s.closed_by_target(),
        "connection kept after a data digest error"
    );
    still_serving(&mut bystander, &reference, &srv);

    // 10. A connection dropped in the middle of a Data-Out sequence: nothing of the write lands.
    let mut s = Initiator::login_normal(port, TARGET);
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[7..9].copy_from_slice(&64u16.to_be_bytes()); // 64 blocks at LBA 0
    let c = s.command_bhs(&cdb, 64 * 512, false, true);
    let itt = u32::from_be_bytes([c[16], c[17], c[18], c[19]]);
    s.send(&c, &[0x55u8; 4096])
        .expect("send with immediate data");
    let r2t = s.recv().expect("R2T");
    assert_eq!(r2t.opcode(), 0x31, "expected an R2T");
    let mut d = bhs(0x05, 0x00);
    d[16..20].copy_from_slice(&itt.to_be_bytes());
    d[20..24].copy_from_slice(&r2t.bhs[20..24]);
    d[40..44].copy_from_slice(&4096u32.to_be_bytes());
    s.send(&d, &[0x55u8; 4096]).expect("half the data");
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    still_serving(&mut bystander, &reference, &srv);

    // 11. Login with bad keys and a login PDU in the full feature phase.
    let mut s = Initiator::connect(port).expect("connect");
    let mut b = bhs(0x43, 0x81);
    b[16..20].copy_from_slice(&1u32.to_be_bytes());
    s.send(&b, b"no-equals-sign\0").expect("send");
    let p = s.recv().expect("login response");
    assert_eq!(p.opcode(), 0x23);
    assert_eq!(p.bhs[36], 0x02, "initiator error class expected");
    let mut s = Initiator::login_normal(port, TARGET);
    let mut b = bhs(0x43, 0x81);
    b[16..20].copy_from_slice(&9u32.to_be_bytes());
    s.send(&b, b"InitiatorName=x\0").expect("send");
    let p = s.recv().expect("reject");
    assert_eq!(p.opcode(), 0x3f);
    assert!(s.closed_by_target());
    still_serving(&mut bystander, &reference, &srv);

    bystander.logout().expect("logout");
    srv.stop();
}

#[test]
fn task_management_and_nop() {
    let dir = TempDir::new("iscsi-tmf");
    let (srv, port) = iscsi_server(dir.path(), "1G", "64M", &[]);
    let mut s = Initiator::login_normal(port, TARGET);
    // NOP-Out ping with data is echoed.
    let mut b = bhs(0x40, 0x80);
    b[16..20].copy_from_slice(&1234u32.to_be_bytes());
    b[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    b[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
    s.send(&b, b"ping").expect("send");
    let p = s.recv().expect("nop-in");
    assert_eq!(p.opcode(), 0x20);
    assert_eq!(p.itt(), 1234);
    assert_eq!(p.data, b"ping");
    // LUN RESET: function complete, then a unit attention (29/00) on the next command.
    let mut t = bhs(0x42, 0x85);
    t[16..20].copy_from_slice(&99u32.to_be_bytes());
    t[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    t[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
    s.send(&t, &[]).expect("send");
    let p = s.recv().expect("tmf response");
    assert_eq!(p.opcode(), 0x22);
    assert_eq!(p.bhs[2], 0, "LUN RESET response");
    let r = s.test_unit_ready().expect("TUR");
    assert_eq!(r.status, 2);
    assert_eq!(r.sense_key(), Some(6));
    assert_eq!(r.asc(), Some((0x29, 0)));
    assert_eq!(s.test_unit_ready().expect("TUR").status, 0);
    // ABORT TASK of an unknown task: "task does not exist".
    let mut t = bhs(0x42, 0x81);
    t[16..20].copy_from_slice(&100u32.to_be_bytes());
    t[20..24].copy_from_slice(&4242u32.to_be_bytes());
    t[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
    s.send(&t, &[]).expect("send");
    let p = s.recv().expect("tmf response");
    assert_eq!(p.bhs[2], 1);
    // ABORT TASK of a write still waiting for its data: aborted, the data is never written.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[7..9].copy_from_slice(&16u16.to_be_bytes());
    let c = s.command_bhs(&cdb, 16 * 512, false, true);
    let itt = u32::from_be_bytes([c[16], c[17], c[18], c[19]]);
    s.send(&c, &[0xabu8; 512]).expect("send");
    let r2t = s.recv().expect("R2T");
    assert_eq!(r2t.opcode(), 0x31);
    let mut t = bhs(0x42, 0x81);
    t[16..20].copy_from_slice(&101u32.to_be_bytes());
    t[20..24].copy_from_slice(&itt.to_be_bytes());
    t[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
    s.send(&t, &[]).expect("send");
    let p = s.recv().expect("tmf response");
    assert_eq!(p.opcode(), 0x22);
    assert_eq!(p.bhs[2], 0, "ABORT TASK of a pending write");
    let back = s.read10(0, 16).expect("read");
    assert!(back.data.iter().all(|&b| b == 0), "aborted write landed");
    s.logout().expect("logout");
    srv.stop();
}

/// A snapshot is a write-protected LU: writes fail with DATA PROTECT / WRITE PROTECTED, MODE
/// SENSE sets WP, reads return the data as it was when the snapshot was taken.
#[test]
fn snapshot_luns_are_write_protected() {
    let dir = TempDir::new("iscsi-snap");
    let (srv, port) = iscsi_server(dir.path(), "1G", "64M", &[]);
    let mut before = vec![0u8; 64 * 512];
    Prng::new(11).fill(&mut before);
    let mut vol = Initiator::login_normal(port, TARGET);
    assert_eq!(vol.write10(0, &before).expect("write").status, 0);
    ingot_ok([
        "volume".as_ref(),
        "snapshot".as_ref(),
        "vol0".as_ref(),
        "snap".as_ref(),
        "--pool".as_ref(),
        srv.pool().as_os_str(),
    ]);
    assert_eq!(vol.write10(0, &[0x77; 64 * 512]).expect("write").status, 0);
    let mut snap = Initiator::login_normal(port, "iqn.2026-11.io.ingot:snap");
    let r = snap
        .write10(0, &[0x55; 512])
        .expect("write to the snapshot");
    assert_eq!(r.status, 0x02, "write to a snapshot: {r:?}");
    assert_eq!(r.sense_key(), Some(0x07), "{r:?}");
    assert_eq!(r.asc(), Some((0x27, 0x00)), "{r:?}");
    let back = snap.read10(0, 64).expect("read the snapshot");
    assert_eq!(back.status, 0);
    assert_eq!(back.data, before, "the snapshot changed");
    // MODE SENSE(6), all pages: the device-specific parameter's WP bit.
    let ms = snap
        .scsi(&[0x1a, 0x08, 0x3f, 0, 255, 0], &[], 255)
        .expect("mode sense");
    assert_eq!(ms.status, 0);
    assert_eq!(ms.data[2] & 0x80, 0x80, "WP not set: {:?}", &ms.data[..4]);
    let ms = vol
        .scsi(&[0x1a, 0x08, 0x3f, 0, 255, 0], &[], 255)
        .expect("mode sense");
    assert_eq!(ms.data[2] & 0x80, 0, "WP set on a writable volume");
    let stderr = srv.stderr();
    assert!(!stderr.contains("panicked"), "server panicked:\n{stderr}");
}

/// Status (class << 8 | detail) of a Login Response.
fn login_status(p: &ingot_tests::iscsi::Pdu) -> u16 {
    assert_eq!(
        p.opcode(),
        0x23,
        "not a Login Response: {:#04x}",
        p.opcode()
    );
    u16::from_be_bytes([p.bhs[36], p.bhs[37]])
}

/// The login was refused as an initiator error (class 2) without reaching the full feature
/// phase, and the connection serves no command: a READ gets no Data-In and no status.
fn refused_and_nothing_served(mut i: Initiator, r: &ingot_tests::iscsi::Pdu, what: &str) {
    let st = login_status(r);
    assert_eq!(
        st >> 8,
        2,
        "{what}: login status {st:#06x}, expected class 2"
    );
    assert_eq!(
        r.bhs[1] & 0x80,
        0,
        "{what}: refused response with the T bit"
    );
    assert_ne!(r.bhs[1] & 0x03, 3, "{what}: full feature phase granted");
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[8] = 1;
    let c = i.command_bhs(&cdb, 512, true, false);
    let _ = i.send(&c, &[]);
    if let Ok(p) = i.recv() {
        panic!(
            "{what}: the target answered a READ after a refused login (opcode {:#04x}, {} bytes)",
            p.opcode(),
            p.data.len()
        );
    }
}

const INITIATOR: &str = "iqn.2026-11.io.ingot.test:attacker";
const OPEN: &str = "iqn.2026-11.io.ingot:open";
/// Operational keys of a login's last PDU.
const OPERATIONAL: [(&str, &str); 3] = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxRecvDataSegmentLength", "65536"),
];

fn with_operational<'a>(keys: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = keys.to_vec();
    v.extend_from_slice(&OPERATIONAL);
    v
}

/// An attacker who may log in without CHAP somewhere (discovery, an open target) tries to
/// switch to the CHAP-protected target in a later Login PDU, or to change the session's
/// declared identity: each attempt is refused before the full feature phase.
#[test]
fn login_cannot_switch_target_or_session_type_to_skip_chap() {
    let dir = TempDir::new("iscsi-switch");
    let secrets = dir.join("chap");
    std::fs::write(&secrets, "vol0 alice alicesecret12\n").expect("write chap file");
    let (srv, port) = iscsi_server(
        dir.path(),
        "1G",
        "64M",
        &["--iscsi-chap-file".into(), secrets.display().to_string()],
    );
    create_volume(srv.pool(), "open", "32M");
    let start = |keys: &[(&str, &str)], flags: u8| {
        let mut i = Initiator::connect(port).expect("connect");
        let r = i.login_pdu(flags, keys).expect("first login PDU");
        assert_eq!(login_status(&r), 0, "first PDU {keys:?} refused");
        i
    };
    let discovery = [
        ("InitiatorName", INITIATOR),
        ("SessionType", "Discovery"),
        ("AuthMethod", "None"),
    ];
    let open = [
        ("InitiatorName", INITIATOR),
        ("SessionType", "Normal"),
        ("TargetName", OPEN),
        ("AuthMethod", "None"),
    ];

    // 1. Discovery (no CHAP needed), then SessionType=Normal and the protected target in the
    // operational stage.
    let mut i = start(&discovery, 0x81);
    let r = i
        .login_pdu(
            0x87,
            &with_operational(&[("SessionType", "Normal"), ("TargetName", TARGET)]),
        )
        .expect("second login PDU");
    refused_and_nothing_served(i, &r, "discovery -> normal");

    // 2. The same with only TargetName added.
    let mut i = start(&discovery, 0x81);
    let r = i
        .login_pdu(0x87, &with_operational(&[("TargetName", TARGET)]))
        .expect("second login PDU");
    refused_and_nothing_served(i, &r, "discovery + TargetName");

    // 3. An open target, then the protected one in the operational stage.
    let mut i = start(&open, 0x81);
    let r = i
        .login_pdu(0x87, &with_operational(&[("TargetName", TARGET)]))
        .expect("second login PDU");
    refused_and_nothing_served(i, &r, "open -> protected (operational stage)");

    // 4. An open target, then the protected one while still in the security stage (first
    // PDU without the T bit).
    let mut i = start(&open, 0x01);
    let r = i
        .login_pdu(0x81, &[("TargetName", TARGET)])
        .expect("second login PDU");
    refused_and_nothing_served(i, &r, "open -> protected (security stage)");

    // 5. Repeated keys with new values: session type, initiator name.
    let mut i = start(&open, 0x81);
    let r = i
        .login_pdu(0x87, &with_operational(&[("SessionType", "Discovery")]))
        .expect("second login PDU");
    refused_and_nothing_served(i, &r, "normal -> discovery");
    let mut i = start(&open, 0x81);
    let r = i
        .login_pdu(
            0x87,
            &with_operational(&[("InitiatorName", "iqn.2026-11.io.ingot.test:other")]),
        )
        .expect("second login PDU");
    refused_and_nothing_served(i, &r, "another InitiatorName");

    // 6. Two TargetNames in the first PDU.
    let mut i = Initiator::connect(port).expect("connect");
    let r = i
        .login_pdu(
            0x81,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", OPEN),
                ("TargetName", TARGET),
                ("AuthMethod", "None"),
            ],
        )
        .expect("login PDU");
    refused_and_nothing_served(i, &r, "two TargetNames");

    // 7. The protected target directly without CHAP: authentication failure.
    let mut i = Initiator::connect(port).expect("connect");
    let r = i
        .login_pdu(
            0x81,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "None"),
            ],
        )
        .expect("login PDU");
    assert_eq!(login_status(&r), 0x0201);
    refused_and_nothing_served(i, &r, "protected target without CHAP");

    // Control: the open target with its keys repeated unchanged logs in and serves reads.
    let mut i = start(&open, 0x81);
    let r = i
        .login_pdu(
            0x87,
            &with_operational(&[
                ("InitiatorName", INITIATOR),
                ("SessionType", "Normal"),
                ("TargetName", OPEN),
            ]),
        )
        .expect("second login PDU");
    assert_eq!(login_status(&r), 0);
    assert_eq!(r.bhs[1] & 0x83, 0x83, "open target: no full feature phase");
    let back = i.read10(0, 1).expect("read the open target");
    assert_eq!(back.status, 0);
    assert_eq!(back.data.len(), 512);
    let stderr = srv.stderr();
    assert!(!stderr.contains("panicked"), "server panicked:\n{stderr}");
    srv.stop();
}

/// Hundreds of idle connections that never log in do not keep a real initiator out, and the
/// target closes each of them once the login timeout (10 s) is over.
#[test]
fn idle_half_open_logins_do_not_lock_out_a_real_client() {
    let inq = require_tool("iscsi-inq");
    let dir = TempDir::new("iscsi-idle");
    let (srv, port) = iscsi_server(dir.path(), "1G", "64M", &[]);
    let t0 = std::time::Instant::now();
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect idle"))
        .collect();
    // Let the target accept them all.
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let out = output_timeout(
        std::process::Command::new(&inq).arg(format!("iscsi://127.0.0.1:{port}/{TARGET}/0")),
        Duration::from_secs(30),
    );
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "iscsi-inq failed behind 300 idle connections: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(3),
        "iscsi-inq took {took:?} behind 300 idle connections"
    );
    // Every idle connection is closed by the login timeout (plus slack for a busy machine).
    let limit = Duration::from_secs(15);
    for (n, mut s) in idle.into_iter().enumerate() {
        let left = limit
            .saturating_sub(t0.elapsed())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).expect("timeout");
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => {}
            Ok(k) => panic!("idle connection {n} got {k} bytes"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "idle connection {n} still open {:?} after connecting",
                    t0.elapsed()
                )
            }
            Err(_) => {} // reset: closed too
        }
    }
    let stderr = srv.stderr();
    assert!(!stderr.contains("panicked"), "server panicked:\n{stderr}");
    srv.stop();
}

/// A login that trickles in one byte at a time (each read finishes well within any per-read
/// timeout) is closed when the whole login's time is up.
#[test]
fn a_trickling_login_is_closed_at_the_login_timeout() {
    let dir = TempDir::new("iscsi-trickle");
    let (srv, port) = iscsi_server(dir.path(), "1G", "64M", &[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    // A Login Request header announcing 4000 bytes of keys, sent a byte at a time.
    let mut b = bhs(0x43, 0x81);
    b[5..8].copy_from_slice(&[0, 0x0f, 0xa0]);
    b[16..20].copy_from_slice(&1u32.to_be_bytes());
    let mut wire = b.to_vec();
    wire.resize(48 + 4000, b'a');
    let t0 = std::time::Instant::now();
    let mut closed_after = None;
    for byte in wire.iter().cycle().take(200) {
        if s.write_all(&[*byte]).is_err() {
            closed_after = Some(t0.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => {
                closed_after = Some(t0.elapsed());
                break;
            }
            Ok(_) => panic!("the target answered a partial login"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                closed_after = Some(t0.elapsed());
                break;
            }
        }
        if t0.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    let Some(t) = closed_after else {
        panic!("a login trickling in for {:?} was not closed", t0.elapsed());
    };
    assert!(
        t >= Duration::from_secs(8) && t <= Duration::from_secs(14),
        "trickling login closed after {t:?}, expected about 10 s"
    );
    let stderr = srv.stderr();
    assert!(!stderr.contains("panicked"), "server panicked:\n{stderr}");
    srv.stop();
}
