//! A whole target over TCP serving an in-memory logical unit through `IscsiTarget::with_source`:
//! login, then a write and a read, with raw PDUs.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use ingot_iscsi::pdu::{encode_lun, encode_pdu, op, read_pdu, Bhs, Limits, Pdu};
use ingot_iscsi::testing::MemLu;
use ingot_iscsi::{text, IscsiTarget, LuBackend, StaticLus, TargetConfig, IQN_PREFIX};

const LIMITS: Limits = Limits {
    max_data: 1 << 20,
    header_digest: false,
    data_digest: false,
};

fn send(s: &mut TcpStream, b: &Bhs, data: &[u8]) {
    let mut b = b.clone();
    b.set_data_len(data.len());
    let mut out = Vec::new();
    encode_pdu(&mut out, &b, data, false, false);
    s.write_all(&out).unwrap();
}

fn recv(s: &mut TcpStream) -> Pdu {
    read_pdu(s, &LIMITS).unwrap().expect("a PDU")
}

fn login_step(s: &mut TcpStream, flags: u8, keys: &[(&str, &str)]) -> Pdu {
    let mut b = Bhs::new(op::LOGIN_REQ, flags);
    b.0[0] |= 0x40;
    b.0[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    b.set_itt(0);
    b.set_u32(24, 1);
    send(s, &b, &text::encode(keys));
    let r = recv(s);
    assert_eq!(r.bhs.opcode(), op::LOGIN_RESP);
    assert_eq!(&r.bhs.0[36..38], &[0, 0], "login status");
    r
}

fn command(s: &mut TcpStream, itt: u32, cmd_sn: u32, cdb: &[u8], edtl: u32, data: &[u8]) -> Pdu {
    let rw = if data.is_empty() { 0x40 } else { 0x20 };
    let mut b = Bhs::new(op::SCSI_CMD, 0x80 | rw | 0x01);
    b.set_lun(encode_lun(0));
    b.set_itt(itt);
    b.set_u32(20, edtl);
    b.set_u32(24, cmd_sn);
    b.0[32..32 + cdb.len()].copy_from_slice(cdb);
    send(s, &b, data);
    recv(s)
}

#[test]
fn login_write_and_read_against_an_in_memory_unit() {
    let mem = Arc::new(MemLu::new("mem0", 1 << 20));
    let source = StaticLus::new(vec![mem.clone() as Arc<dyn LuBackend>]);
    let target = IscsiTarget::with_source(source, TargetConfig::default());
    let addr = target.listen("127.0.0.1:0").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    let name = format!("{IQN_PREFIX}mem0");
    login_step(
        &mut s,
        0x81,
        &[
            ("InitiatorName", "iqn.2026-11.test:init"),
            ("TargetName", name.as_str()),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ],
    );
    let r = login_step(&mut s, 0x87, &[]);
    assert_eq!(r.bhs.0[1] & 0x83, 0x83, "transit to the full feature phase");
    let cmd_sn = r.bhs.u32_at(28);

    // WRITE(10) of one block at LBA 7 with immediate data.
    let block: Vec<u8> = (0..512).map(|i| (i * 7) as u8).collect();
    let w = command(
        &mut s,
        1,
        cmd_sn,
        &[0x2a, 0, 0, 0, 0, 7, 0, 0, 1, 0],
        512,
        &block,
    );
    assert_eq!(w.bhs.opcode(), op::SCSI_RESP);
    assert_eq!(w.bhs.0[3], 0, "GOOD");
    assert_eq!(mem.contents(7 * 512, 512), block);

    // READ(10) of it: Data-In with the status.
    let r = command(
        &mut s,
        2,
        cmd_sn.wrapping_add(1),
        &[0x28, 0, 0, 0, 0, 7, 0, 0, 1, 0],
        512,
        &[],
    );
    assert_eq!(r.bhs.opcode(), op::DATA_IN);
    assert_eq!(r.bhs.0[1] & 0x01, 0x01, "status in the Data-In");
    assert_eq!(r.bhs.0[3], 0, "GOOD");
    assert_eq!(r.data, block);
    target.shutdown();
}
