//! SCSI command execution against an in-memory logical unit.

use std::sync::Arc;

use ingot_engine::Error;

use super::{execute_sync, Nexus, Response};
use crate::lu::Lu;
use crate::mem::MemLu;
use crate::sense::status;

const PORT: &str = "iqn.2026-11.test:a,i,0x000000000001";
const OTHER_PORT: &str = "iqn.2026-11.test:b,i,0x000000000002";
const TARGET: &str = "iqn.2026-11.io.ingot:t";
const BLOCKS: u64 = 64;
const BS: usize = 512;

fn unit() -> (Arc<MemLu>, Lu) {
    let mem = Arc::new(MemLu::new("t", BLOCKS * BS as u64));
    let lu = Lu::new(mem.clone());
    lu.attach(PORT);
    lu.attach(OTHER_PORT);
    (mem, lu)
}

fn run_as(lu: &Lu, port: &str, cdb: &[u8], data_out: &[u8]) -> Response {
    // The connection hands every CDB over padded to 16 bytes.
    let mut c = cdb.to_vec();
    c.resize(16, 0);
    let nexus = Nexus {
        port,
        target_name: TARGET,
    };
    execute_sync(lu, &nexus, &c, data_out.to_vec())
}

fn run(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
    run_as(lu, PORT, cdb, data_out)
}

#[track_caller]
fn good(r: &Response) {
    assert_eq!(r.status, status::GOOD, "sense {:02x?}", r.sense);
}

/// Key, ASC and ASCQ of a CHECK CONDITION.
#[track_caller]
fn sense(r: &Response) -> (u8, u8, u8) {
    assert_eq!(r.status, status::CHECK_CONDITION);
    let s = r.sense.expect("sense data");
    (s[2] & 0x0f, s[12], s[13])
}

fn rw10(op: u8, lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}

fn rw16(op: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BS)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn read_write_10_and_16_round_trip() {
    let (mem, lu) = unit();
    let a = pattern(2, 1);
    good(&run(&lu, &rw10(0x2a, 3, 2), &a));
    let r = run(&lu, &rw10(0x28, 3, 2), &[]);
    good(&r);
    assert_eq!(&r.data[..], &a[..]);
    assert_eq!(mem.contents(3 * BS as u64, a.len() as u64), a);

    let b = pattern(3, 7);
    good(&run(&lu, &rw16(0x8a, BLOCKS - 3, 3), &b));
    let r = run(&lu, &rw16(0x88, BLOCKS - 3, 3), &[]);
    good(&r);
    assert_eq!(&r.data[..], &b[..]);
    // Neighbours untouched.
    let r = run(&lu, &rw16(0x88, 2, 1), &[]);
    assert!(r.data.iter().all(|&x| x == 0));
    // A zero-length transfer moves nothing.
    let r = run(&lu, &rw10(0x28, 0, 0), &[]);
    good(&r);
    assert!(r.data.is_empty());
}

#[test]
fn out_of_range_lba_is_illegal_request() {
    let (_mem, lu) = unit();
    let lba_out_of_range = (0x05, 0x21, 0x00);
    assert_eq!(sense(&run(&lu, &rw10(0x28, 63, 2), &[])), lba_out_of_range);
    assert_eq!(
        sense(&run(&lu, &rw10(0x2a, 64, 1), &pattern(1, 0))),
        lba_out_of_range
    );
    // An LBA whose end overflows 64 bits.
    assert_eq!(
        sense(&run(&lu, &rw16(0x88, u64::MAX, 2), &[])),
        lba_out_of_range
    );
    assert_eq!(
        sense(&run(&lu, &rw16(0x8a, u64::MAX, 1), &pattern(1, 0))),
        lba_out_of_range
    );
}

#[test]
fn write_same_and_unmap_read_back_zeroes() {
    let (mem, lu) = unit();
    good(&run(&lu, &rw10(0x2a, 0, 16), &pattern(16, 3)));

    // WRITE SAME(10) with UNMAP deallocates blocks 0-1 whatever the pattern.
    let mut ws10 = rw10(0x41, 0, 2);
    ws10[1] = 0x08;
    good(&run(&lu, &ws10, &[0xaa; BS]));
    assert!(mem.contents(0, 2 * BS as u64).iter().all(|&x| x == 0));

    // WRITE SAME(16) of a pattern, then of zeroes.
    good(&run(&lu, &rw16(0x93, 4, 3), &[0x5a; BS]));
    let r = run(&lu, &rw10(0x28, 4, 3), &[]);
    assert!(r.data.iter().all(|&x| x == 0x5a));
    good(&run(&lu, &rw16(0x93, 4, 1), &[0; BS]));
    let r = run(&lu, &rw10(0x28, 4, 1), &[]);
    assert!(r.data.iter().all(|&x| x == 0));

    // UNMAP of blocks 8-11.
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&8u64.to_be_bytes());
    list.extend_from_slice(&4u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    let mut cdb = vec![0x42, 0, 0, 0, 0, 0, 0];
    cdb.extend_from_slice(&(list.len() as u16).to_be_bytes());
    good(&run(&lu, &cdb, &list));
    let r = run(&lu, &rw10(0x28, 8, 4), &[]);
    assert!(r.data.iter().all(|&x| x == 0));
    // Block 12 still holds data.
    let r = run(&lu, &rw10(0x28, 12, 1), &[]);
    assert_eq!(&r.data[..], &pattern(16, 3)[12 * BS..13 * BS]);

    // GET LBA STATUS: block 8 starts a deallocated run of 4 blocks.
    let mut gls = vec![0x9e, 0x12];
    gls.extend_from_slice(&8u64.to_be_bytes());
    gls.extend_from_slice(&64u32.to_be_bytes());
    let r = run(&lu, &gls, &[]);
    good(&r);
    assert_eq!(&r.data[8..16], &8u64.to_be_bytes());
    assert_eq!(&r.data[16..20], &4u32.to_be_bytes());
    assert_eq!(r.data[20], 1, "deallocated");
    assert_eq!(&r.data[24..32], &12u64.to_be_bytes());
    assert_eq!(r.data[36], 0, "mapped");

    // UNMAP past the end changes nothing.
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&60u64.to_be_bytes());
    list.extend_from_slice(&8u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    assert_eq!(sense(&run(&lu, &cdb, &list)), (0x05, 0x21, 0x00));
}

fn caw(lba: u64, n: u8) -> Vec<u8> {
    let mut c = vec![0x89, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, n, 0, 0]);
    c
}

#[test]
fn compare_and_write_match_and_miscompare() {
    let (mem, lu) = unit();
    let old = pattern(2, 9);
    let new = pattern(2, 10);
    good(&run(&lu, &rw10(0x2a, 5, 2), &old));

    let mut data = old.clone();
    data.extend_from_slice(&new);
    good(&run(&lu, &caw(5, 2), &data));
    assert_eq!(mem.contents(5 * BS as u64, 2 * BS as u64), new);

    // The medium now holds `new`: comparing against `old` fails at the first differing byte
    // and writes nothing.
    let r = run(&lu, &caw(5, 2), &data);
    assert_eq!(sense(&r), (0x0e, 0x1d, 0x00));
    let s = r.sense.unwrap();
    let at = new.iter().zip(&old).position(|(a, b)| a != b).unwrap() as u32;
    assert_eq!(s[0] & 0x80, 0x80, "INFORMATION valid");
    assert_eq!(&s[3..7], &at.to_be_bytes());
    assert_eq!(mem.contents(5 * BS as u64, 2 * BS as u64), new);

    // The Data-Out must hold exactly the verify and write data.
    assert_eq!(
        sense(&run(&lu, &caw(5, 2), &data[..BS * 3])),
        (0x05, 0x24, 0x00)
    );
}

#[test]
fn read_capacity() {
    let (_mem, lu) = unit();
    let mut rc16 = vec![0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0];
    rc16.extend_from_slice(&32u32.to_be_bytes());
    let r = run(&lu, &rc16, &[]);
    good(&r);
    assert_eq!(r.data.len(), 32);
    assert_eq!(&r.data[0..8], &(BLOCKS - 1).to_be_bytes());
    assert_eq!(&r.data[8..12], &512u32.to_be_bytes());
    assert_eq!(r.data[14] & 0xc0, 0xc0, "LBPME and LBPRZ");

    let r = run(&lu, &[0x25], &[]);
    good(&r);
    assert_eq!(&r.data[..], &[0, 0, 0, 63, 0, 0, 2, 0]);
}

fn inquiry(evpd: bool, page: u8) -> Vec<u8> {
    vec![0x12, u8::from(evpd), page, 0x01, 0x00, 0]
}

#[test]
fn inquiry_and_vpd_pages() {
    let (_mem, lu) = unit();
    let r = run(&lu, &inquiry(false, 0), &[]);
    good(&r);
    assert_eq!(r.data[0], 0x00, "direct access block device");
    assert_eq!(&r.data[8..16], b"INGOT   ");

    let r = run(&lu, &inquiry(true, 0x00), &[]);
    good(&r);
    let pages = &r.data[4..];
    assert_eq!(usize::from(r.data[3]), pages.len());
    for p in [0x80, 0x83, 0xb0, 0xb1, 0xb2] {
        assert!(pages.contains(&p), "page {p:#x} listed");
    }

    let r = run(&lu, &inquiry(true, 0x80), &[]);
    good(&r);
    assert_eq!(&r.data[4..], lu.serial.as_bytes());

    let r = run(&lu, &inquiry(true, 0x83), &[]);
    good(&r);
    // The first designator is the NAA one; the target name is in a SCSI name string.
    assert_eq!(&r.data[4..8], &[0x01, 0x03, 0x00, 16]);
    assert_eq!(&r.data[8..24], &lu.naa);
    let name = TARGET.as_bytes();
    assert!(r.data.windows(name.len()).any(|w| w == name));

    let r = run(&lu, &inquiry(true, 0xb0), &[]);
    good(&r);
    assert_eq!(r.data[5], super::MAX_CAW_BLOCKS);
    assert_eq!(&r.data[8..12], &super::MAX_TRANSFER_BLOCKS.to_be_bytes());

    let r = run(&lu, &inquiry(true, 0xb2), &[]);
    good(&r);
    assert_eq!(r.data[5] & 0xe0, 0xe0, "LBPU, LBPWS, LBPWS10");

    // An unknown page, and a page code without EVPD.
    assert_eq!(
        sense(&run(&lu, &inquiry(true, 0x99), &[])),
        (0x05, 0x24, 0x00)
    );
    assert_eq!(
        sense(&run(&lu, &inquiry(false, 0x80), &[])),
        (0x05, 0x24, 0x00)
    );
    // The allocation length truncates.
    let mut short = inquiry(false, 0);
    short[4] = 5;
    short[3] = 0;
    assert_eq!(run(&lu, &short, &[]).data.len(), 5);
}

#[test]
fn unknown_opcode_is_invalid_command_operation_code() {
    let (_mem, lu) = unit();
    for op in [0x02, 0x40, 0xc0, 0xff] {
        assert_eq!(sense(&run(&lu, &[op], &[])), (0x05, 0x20, 0x00), "{op:#x}");
    }
}

#[test]
fn engine_errors_map_to_sense() {
    let (mem, lu) = unit();
    mem.set_failure(Some(|| Error::NoSpace));
    // SPACE ALLOCATION FAILED WRITE PROTECT, for the asynchronous write and the synchronous
    // WRITE SAME alike.
    let r = run(&lu, &rw10(0x2a, 0, 1), &pattern(1, 0));
    assert_eq!(sense(&r), (0x07, 0x27, 0x07));
    assert_eq!(
        sense(&run(&lu, &rw16(0x93, 0, 4), &[1; BS])),
        (0x07, 0x27, 0x07)
    );

    // LOGICAL UNIT NOT READY while the engine shuts down.
    mem.set_failure(Some(|| Error::ShutDown));
    assert_eq!(sense(&run(&lu, &rw10(0x28, 0, 1), &[])), (0x02, 0x04, 0x00));
    assert_eq!(sense(&run(&lu, &[0x35], &[])), (0x02, 0x04, 0x00));

    mem.set_failure(None);
    good(&run(&lu, &rw10(0x2a, 0, 1), &pattern(1, 0)));
}

#[test]
fn read_only_unit_is_write_protected() {
    let mem = Arc::new(MemLu::new("snap", BLOCKS * BS as u64).read_only());
    let lu = Lu::new(mem);
    lu.attach(PORT);
    assert_eq!(
        sense(&run(&lu, &rw10(0x2a, 0, 1), &pattern(1, 0))),
        (0x07, 0x27, 0x00)
    );
    good(&run(&lu, &rw10(0x28, 0, 1), &[]));
    // MODE SENSE(6) reports WP.
    let r = run(&lu, &[0x1a, 0x08, 0x3f, 0, 0xff], &[]);
    good(&r);
    assert_eq!(r.data[2] & 0x80, 0x80);
}

#[test]
fn synchronize_cache_and_disabling_the_write_cache_flush() {
    let (mem, lu) = unit();
    good(&run(&lu, &[0x35], &[]));
    assert_eq!(mem.flushes(), 1);
    // MODE SELECT(6) of the caching page with WCE off.
    let mut list = vec![0, 0, 0, 0, 0x08, 18];
    list.resize(4 + 20, 0);
    good(&run(&lu, &[0x15, 0x10, 0, 0, list.len() as u8], &list));
    assert_eq!(mem.flushes(), 2);
    assert!(lu.fua(false), "every write is FUA without a write cache");
}

#[test]
fn resize_raises_capacity_changed_once() {
    let (mem, lu) = unit();
    mem.resize(2 * BLOCKS * BS as u64);
    assert_eq!(sense(&run(&lu, &[0x00], &[])), (0x06, 0x2a, 0x09));
    good(&run(&lu, &[0x00], &[]));
    let r = run(&lu, &[0x25], &[]);
    assert_eq!(&r.data[0..4], &((2 * BLOCKS - 1) as u32).to_be_bytes());
}

#[test]
fn reserve6_blocks_other_ports() {
    let (_mem, lu) = unit();
    good(&run(&lu, &[0x16], &[]));
    let r = run_as(&lu, OTHER_PORT, &rw10(0x2a, 0, 1), &pattern(1, 0));
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
    good(&run_as(&lu, OTHER_PORT, &inquiry(false, 0), &[]));
    good(&run(&lu, &[0x17], &[]));
    good(&run_as(&lu, OTHER_PORT, &rw10(0x2a, 0, 1), &pattern(1, 0)));
}
