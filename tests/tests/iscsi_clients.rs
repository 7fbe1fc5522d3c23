//! `ingot serve --iscsi` driven by real iSCSI clients (libiscsi's iscsi-ls, iscsi-inq,
//! iscsi-readcapacity16) and by the raw initiator in `ingot_tests::iscsi`, with data crossing
//! between the iSCSI and NBD front ends.

use std::process::Command;

use ingot_tests::iscsi::Initiator;
use ingot_tests::*;

const TARGET: &str = "iqn.2026-11.io.ingot:vol0";

fn url(port: u16, target: &str) -> String {
    format!("iscsi://127.0.0.1:{port}/{target}/0")
}

#[test]
fn discovery_lists_every_volume_including_new_ones() {
    let ls = require_tool("iscsi-ls");
    let dir = TempDir::new("iscsi-disc");
    let (srv, port) = iscsi_server(dir.path(), "1G", "64M", &[]);
    let out = run_stdout(Command::new(&ls).arg(format!("iscsi://127.0.0.1:{port}")));
    assert!(
        out.contains(&format!("Target:{TARGET} Portal:127.0.0.1:{port},1")),
        "iscsi-ls output: {out}"
    );
    // A volume created while the server runs is a target at once.
    create_volume(srv.pool(), "late", "32M");
    let out = run_stdout(Command::new(&ls).arg(format!("iscsi://127.0.0.1:{port}")));
    assert!(out.contains("iqn.2026-11.io.ingot:late"), "{out}");
    assert!(out.contains(TARGET), "{out}");
    // With -s iscsi-ls logs in to each target and reports its LUNs.
    let out = run_stdout(
        Command::new(&ls)
            .arg("-s")
            .arg(format!("iscsi://127.0.0.1:{port}")),
    );
    assert!(out.contains("Lun:0"), "{out}");
    let cap = run_stdout(
        Command::new(require_tool("iscsi-readcapacity16"))
            .arg(url(port, "iqn.2026-11.io.ingot:late")),
    );
    assert!(cap.contains("Total size:33554432"), "{cap}");
    // An unknown target refuses the login.
    let out =
        output(Command::new(require_tool("iscsi-inq")).arg(url(port, "iqn.2026-11.io.ingot:nope")));
    assert!(!out.status.success(), "login to a missing target succeeded");
    srv.stop();
}

#[test]
fn inquiry_every_vpd_page_and_read_capacity() {
    let inq = require_tool("iscsi-inq");
    let dir = TempDir::new("iscsi-inq");
    let (srv, port) = iscsi_server(dir.path(), "1G", "256M", &[]);
    let u = url(port, TARGET);
    let std = run_stdout(Command::new(&inq).arg(&u));
    assert!(
        std.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{std}"
    );
    assert!(std.contains("Vendor:INGOT"), "{std}");
    assert!(std.contains("Version Descriptor:04c0 SBC-3"), "{std}");
    // iscsi-inq takes the page code in decimal.
    let expect: &[(u8, &[&str])] = &[
        (
            0x00,
            &["0x80 UNIT_SERIAL_NUMBER", "0x83", "0xb0", "0xb1", "0xb2"],
        ),
        (0x80, &["Unit Serial Number:["]),
        (
            0x83,
            &[
                "Designator Type:(3) NAA",
                "SCSI_NAME_STRING",
                "[iqn.2026-11.io.ingot:vol0]",
            ],
        ),
        (
            0xb0,
            &[
                "maximum unmap lba count:1048576",
                "optimal transfer length granularity:8",
                "maximum compare and write length:255",
                "maximum write same length:",
            ],
        ),
        (0xb1, &["Medium Rotation Rate:1RPM"]),
        (
            0xb2,
            &[
                "lbpu:1",
                "lbpws:1",
                "lbpws10:1",
                "lbprz:1",
                "provisioning type:2",
            ],
        ),
    ];
    for (page, needles) in expect {
        let out = run_stdout(
            Command::new(&inq)
                .args(["-e", "1", "-c", &page.to_string()])
                .arg(&u),
        );
        for n in *needles {
            assert!(out.contains(n), "VPD page {page:#04x} lacks {n:?}:\n{out}");
        }
    }
    // An unsupported page is refused (INVALID FIELD IN CDB).
    let out = output(Command::new(&inq).args(["-e", "1", "-c", "153"]).arg(&u));
    assert!(!out.status.success(), "VPD 0x99 answered");
    let cap = run_stdout(Command::new(require_tool("iscsi-readcapacity16")).arg(&u));
    assert!(cap.contains("Total size:268435456"), "{cap}");
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");
    assert!(cap.contains("LBPME:1 LBPRZ:1"), "{cap}");
    // The same over a session with CRC32C header digests.
    let cap = run_stdout(
        Command::new(require_tool("iscsi-readcapacity16")).arg(format!("{u}?header_digest=crc32c")),
    );
    assert!(cap.contains("Total size:268435456"), "{cap}");
    srv.stop();
}

#[test]
fn chap_one_way_and_mutual() {
    let inq = require_tool("iscsi-inq");
    let dir = TempDir::new("iscsi-chap");
    let secrets = dir.join("chap");
    std::fs::write(
        &secrets,
        "# volume user secret [mutual-user mutual-secret]\n\
         vol0 alice alicesecret12\n\
         mvol bob bobsecret1234 ingot targetsecret1\n",
    )
    .expect("write chap file");
    let (srv, port) = iscsi_server(
        dir.path(),
        "1G",
        "64M",
        &["--iscsi-chap-file".into(), secrets.display().to_string()],
    );
    create_volume(srv.pool(), "mvol", "32M");
    let at = |cred: &str, target: &str, args: &str| {
        format!("iscsi://{cred}127.0.0.1:{port}/iqn.2026-11.io.ingot:{target}/0{args}")
    };
    let ok = |u: String| {
        let out = output(Command::new(&inq).arg(&u));
        assert!(
            out.status.success(),
            "login with {u} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let refused = |u: String| {
        let out = output(Command::new(&inq).arg(&u));
        assert!(!out.status.success(), "login with {u} succeeded");
    };
    ok(at("alice%alicesecret12@", "vol0", ""));
    refused(at("alice%wrongsecret12@", "vol0", ""));
    refused(at("mallory%alicesecret12@", "vol0", ""));
    refused(at("", "vol0", ""));
    // Mutual: the target proves it knows the target secret too.
    ok(at(
        "bob%bobsecret1234@",
        "mvol",
        "?target_user=ingot&target_password=targetsecret1",
    ));
    refused(at(
        "bob%bobsecret1234@",
        "mvol",
        "?target_user=ingot&target_password=notthesecret1",
    ));
    refused(at("bob%wrongsecret12@", "mvol", ""));
    // Discovery needs no CHAP.
    let out =
        run_stdout(Command::new(require_tool("iscsi-ls")).arg(format!("iscsi://127.0.0.1:{port}")));
    assert!(out.contains("iqn.2026-11.io.ingot:mvol"), "{out}");
    srv.stop();
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Prng::new(seed).fill(&mut v);
    v
}

#[test]
fn data_written_over_iscsi_reads_back_over_nbd_and_back() {
    let nbdcopy = require_tool("nbdcopy");
    let dir = TempDir::new("iscsi-nbd");
    let (srv, port) = iscsi_server(dir.path(), "1G", "64M", &[]);

    // iSCSI writes: small immediate-data writes and a 1 MiB write that needs R2Ts.
    let small = pattern(8 * 512, 1);
    let big = pattern(1 << 20, 2);
    let mut i = Initiator::login_normal(port, TARGET);
    let r = i.write10(0, &small).expect("write10");
    assert_eq!(r.status, 0, "{r:?}");
    let r = i.write10(4096, &big).expect("write10 1 MiB");
    assert_eq!(r.status, 0, "{r:?}");
    // A write with CRC32C header and data digests on a second session.
    let mut d = Initiator::connect(port).expect("connect");
    // Another ISID: the same initiator port would reinstate (end) the first session.
    d.isid[5] ^= 1;
    let resp = d
        .login(
            Some(TARGET),
            &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
        )
        .expect("login with digests");
    assert_eq!(resp.bhs[36..38], [0, 0]);
    assert!(d.header_digest && d.data_digest, "digests not negotiated");
    let dig = pattern(64 << 10, 3);
    let r = d.write10(20000, &dig).expect("write with digests");
    assert_eq!(r.status, 0, "{r:?}");
    let back = d.read10(20000, 128).expect("read with digests");
    assert_eq!(back.data, dig);
    let r = i.sync_cache().expect("sync cache");
    assert_eq!(r.status, 0);
    i.logout().expect("logout");
    d.logout().expect("logout");

    // Read the whole volume over NBD and compare.
    let img = dir.join("vol0.img");
    run(Command::new(&nbdcopy).arg(srv.unix_uri("vol0")).arg(&img));
    let all = read_file(&img);
    assert_eq!(all.len(), 64 << 20);
    assert_eq!(&all[..small.len()], &small[..]);
    assert_eq!(&all[4096 * 512..4096 * 512 + big.len()], &big[..]);
    assert_eq!(&all[20000 * 512..20000 * 512 + dig.len()], &dig[..]);
    assert!(all[small.len()..4096 * 512].iter().all(|&b| b == 0));

    // Now the other way: NBD writes, iSCSI reads.
    let fresh = pattern(64 << 20, 4);
    std::fs::write(&img, &fresh).expect("write image");
    run(Command::new(&nbdcopy).arg(&img).arg(srv.unix_uri("vol0")));
    let mut i = Initiator::login_normal(port, TARGET);
    for (lba, blocks) in [(0u32, 8u16), (4096, 2048), (131_064, 8), (77_777, 100)] {
        let r = i.read10(lba, blocks).expect("read10");
        assert_eq!(r.status, 0);
        let at = lba as usize * 512;
        assert_eq!(
            r.data,
            &fresh[at..at + usize::from(blocks) * 512],
            "mismatch at LBA {lba}"
        );
    }
    // Past the end: CHECK CONDITION, ILLEGAL REQUEST / LBA OUT OF RANGE.
    let r = i.read10(131_072, 1).expect("read past the end");
    assert_eq!(r.status, 2);
    assert_eq!(r.sense_key(), Some(5));
    assert_eq!(r.asc(), Some((0x21, 0)));
    i.logout().expect("logout");
    srv.stop();
}

#[test]
fn resize_raises_a_unit_attention_and_recreated_volumes_work() {
    let dir = TempDir::new("iscsi-resize");
    let (srv, port) = iscsi_server(dir.path(), "1G", "64M", &[]);
    let pool = srv.pool().display().to_string();
    let mut i = Initiator::login_normal(port, TARGET);
    assert_eq!(i.test_unit_ready().expect("TUR").status, 0);
    ingot_ok([
        "volume", "resize", "vol0", "--size", "128M", "--pool", &pool,
    ]);
    let r = i.test_unit_ready().expect("TUR");
    assert_eq!(r.status, 2, "no unit attention after a resize: {r:?}");
    assert_eq!(r.sense_key(), Some(6));
    assert_eq!(r.asc(), Some((0x2a, 0x09)), "CAPACITY DATA HAS CHANGED");
    let mut cdb = [0u8; 10];
    cdb[0] = 0x25;
    let cap = i.scsi(&cdb, &[], 8).expect("READ CAPACITY(10)");
    assert_eq!(cap.status, 0);
    assert_eq!(
        u32::from_be_bytes([cap.data[0], cap.data[1], cap.data[2], cap.data[3]]),
        (128 << 20) / 512 - 1
    );
    i.logout().expect("logout");

    // Delete and create again under the same name: a new session sees the new, empty volume.
    create_volume(srv.pool(), "again", "32M");
    let target = "iqn.2026-11.io.ingot:again";
    let mut a = Initiator::login_normal(port, target);
    assert_eq!(a.write10(0, &[0x77u8; 4096]).expect("write").status, 0);
    a.logout().expect("logout");
    ingot_ok(["volume", "delete", "again", "--pool", &pool]);
    create_volume(srv.pool(), "again", "32M");
    let mut a = Initiator::login_normal(port, target);
    let _ = a.test_unit_ready();
    let r = a.read10(0, 8).expect("read");
    assert_eq!(r.status, 0, "{r:?}");
    assert!(
        r.data.iter().all(|&b| b == 0),
        "recreated volume shows old data"
    );
    a.logout().expect("logout");
    srv.stop();
}
