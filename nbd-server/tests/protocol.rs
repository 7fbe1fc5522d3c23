//! Raw-byte protocol tests against the in-memory export.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ingot_nbd::proto::*;
use ingot_nbd::{BoundAddr, ListenAddr, ServerConfig};

const ALL_WRITE_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_SEND_FAST_ZERO
    | TFLAG_SEND_CACHE
    | TFLAG_CAN_MULTI_CONN;

#[test]
fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let t = TestServer::start();
    let mut c = t.raw();
    let flags = c.greet(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

#[test]
fn unknown_client_flags_drop_the_connection() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(0x100);
    assert!(c.closed());
}

#[test]
fn export_name_with_and_without_zeroes() {
    let t = TestServer::start();
    for no_zeroes in [false, true] {
        let mut c = t.raw();
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.greet(flags);
        c.send_option(OPT_EXPORT_NAME, b"vol1");
        let r = c.read_n(10);
        assert_eq!(be64(&r), 2 << 20);
        assert_eq!(be16(&r[8..]), ALL_WRITE_FLAGS);
        if !no_zeroes {
            assert_eq!(c.read_n(124), vec![0u8; 124]);
        }
        // Transmission works right after.
        c.request(0, CMD_FLUSH, 7, 0, 0);
        assert_eq!(c.simple(), (0, 7));
    }
}

#[test]
fn export_name_empty_is_default_and_unknown_disconnects() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send_option(OPT_EXPORT_NAME, b"");
    assert_eq!(be64(&c.read_n(10)), 1 << 20);

    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
}

#[test]
fn list_exports() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(OPT_LIST, &[]);
    let r = c.option_replies();
    assert_eq!(r.len(), 3);
    let names: Vec<_> = r[..2]
        .iter()
        .map(|x| {
            assert_eq!(x.kind, REP_SERVER);
            assert_eq!(x.option, OPT_LIST);
            let n = be32(&x.data) as usize;
            String::from_utf8(x.data[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["vol0", "vol1"]);
    assert_eq!(r[2].kind, REP_ACK);

    c.send_option(OPT_LIST, b"x");
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);
}

#[test]
fn info_replies_then_negotiation_continues() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(
        OPT_INFO,
        &info_data("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999]),
    );
    let r = c.option_replies();
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let info = |t: u16| {
        r.iter()
            .find(|x| x.kind == REP_INFO && be16(&x.data) == t)
            .unwrap_or_else(|| panic!("info {t} missing: {r:?}"))
            .data
            .clone()
    };
    let e = info(INFO_EXPORT);
    assert_eq!(e.len(), 12);
    assert_eq!(be64(&e[2..]), 1 << 20);
    assert_eq!(be16(&e[10..]), ALL_WRITE_FLAGS);
    assert_eq!(&info(INFO_NAME)[2..], b"vol0");
    assert!(String::from_utf8(info(INFO_DESCRIPTION)[2..].to_vec())
        .unwrap()
        .contains("vol0"));
    let b = info(INFO_BLOCK_SIZE);
    assert_eq!(b.len(), 14);
    assert_eq!(
        (be32(&b[2..]), be32(&b[6..]), be32(&b[10..])),
        (512, 4096, 32 << 20)
    );

    // Still in negotiation: a second option works, and GO after structured replies adds DF.
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().kind, REP_ACK);
    c.send_option(OPT_GO, &info_data("vol1", &[]));
    let r = c.option_replies();
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let e = r
        .iter()
        .find(|x| be16(&x.data) == INFO_EXPORT)
        .unwrap()
        .data
        .clone();
    assert_eq!(be64(&e[2..]), 2 << 20);
    assert_eq!(be16(&e[10..]), ALL_WRITE_FLAGS | TFLAG_SEND_DF);
    // GO always carries the block size constraints.
    assert!(r.iter().any(|x| be16(&x.data) == INFO_BLOCK_SIZE));
}

#[test]
fn option_errors() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);

    c.send_option(OPT_GO, &info_data("missing", &[]));
    let r = c.option_replies();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);

    c.send_option(12345, b"whatever");
    let r = c.option_reply();
    assert_eq!((r.option, r.kind), (12345, REP_ERR_UNSUP));

    // Name length pointing past the data.
    c.send_option(OPT_GO, &[0, 0, 1, 0, b'a', 0, 0]);
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);
    // Info count not matching the remaining bytes.
    let mut d = info_data("vol0", &[INFO_NAME]);
    d.push(0);
    c.send_option(OPT_INFO, &d);
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);
    // Too short for anything.
    c.send_option(OPT_INFO, &[0]);
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);

    c.send_option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);

    // SET_META_CONTEXT before structured replies.
    c.send_option(
        OPT_SET_META_CONTEXT,
        &meta_data("vol0", &[META_BASE_ALLOCATION]),
    );
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);

    // Malformed meta context request (query count too large).
    c.send_option(OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 5]);
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);

    c.send_option(OPT_STARTTLS, &[]);
    assert!(c.option_reply().kind & 0x8000_0000 != 0);

    // The session is still usable.
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().kind, REP_ACK);
    assert!(c.closed());
}

#[test]
fn oversized_option_is_refused_and_connection_dropped() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    c.s.write_all(&m).unwrap();
    assert_eq!(c.option_reply().kind, REP_ERR_TOO_BIG);
    assert!(c.closed());
}

#[test]
fn bad_option_magic_drops_connection() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.closed());
    // Another client is unaffected.
    let mut c = t.raw();
    c.go("vol0", false, false);
}

#[test]
fn meta_contexts() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().kind, REP_ACK);

    for queries in [
        &[][..],
        &["base:"][..],
        &["base:allocation", "x-foo:bar"][..],
    ] {
        c.send_option(OPT_LIST_META_CONTEXT, &meta_data("vol0", queries));
        let r = c.option_replies();
        assert_eq!(r.len(), 2, "{queries:?}: {r:?}");
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"base:allocation");
    }
    c.send_option(OPT_LIST_META_CONTEXT, &meta_data("vol0", &["qemu:dirty"]));
    let r = c.option_replies();
    assert_eq!((r.len(), r[0].kind), (1, REP_ACK));

    c.send_option(
        OPT_SET_META_CONTEXT,
        &meta_data("nope", &["base:allocation"]),
    );
    assert_eq!(c.option_reply().kind, REP_ERR_UNKNOWN);

    c.send_option(
        OPT_SET_META_CONTEXT,
        &meta_data("vol0", &["base:", "x-other:thing", "base:allocation"]),
    );
    let r = c.option_replies();
    assert_eq!(r.len(), 2);
    assert_eq!(be32(&r[0].data), META_BASE_ALLOCATION_ID);
    assert_eq!(&r[0].data[4..], b"base:allocation");
}

#[test]
fn simple_replies_round_trip() {
    let t = TestServer::start();
    let mut c = t.raw();
    let (size, _) = c.go("vol0", false, false);
    assert_eq!(size, 1 << 20);

    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.write(CMD_FLAG_FUA, 1, 4096, &data);
    assert_eq!(c.simple(), (0, 1));
    c.request(0, CMD_READ, 2, 4096, 8192);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read_n(8192), data);
    assert_eq!(t.exports[0].contents(4096, 8192), data);

    c.request(0, CMD_FLUSH, 3, 0, 0);
    assert_eq!(c.simple(), (0, 3));
    c.request(
        CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_WRITE_ZEROES,
        4,
        4096,
        512,
    );
    assert_eq!(c.simple(), (0, 4));
    c.request(CMD_FLAG_FUA, CMD_TRIM, 5, 8192, 4096);
    assert_eq!(c.simple(), (0, 5));
    c.request(0, CMD_CACHE, 6, 0, 65536);
    assert_eq!(c.simple(), (0, 6));
    let mut expect = data.clone();
    expect[..512].fill(0);
    expect[4096..].fill(0);
    c.request(0, CMD_READ, 7, 4096, 8192);
    assert_eq!(c.simple(), (0, 7));
    assert_eq!(c.read_n(8192), expect);

    // Zero-length requests succeed without touching the export.
    c.request(0, CMD_READ, 8, 0, 0);
    assert_eq!(c.simple(), (0, 8));
    c.write(0, 9, 0, &[]);
    assert_eq!(c.simple(), (0, 9));
    c.disconnect();
    assert!(c.closed());
}

#[test]
fn simple_error_replies() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.go("vol0", false, false);
    let size = 1u64 << 20;

    let cases: &[(u16, u16, u64, u32, u32)] = &[
        // (flags, command, offset, len, expected errno)
        (0, CMD_READ, size, 512, EINVAL),
        (0, CMD_READ, size - 512, 1024, EINVAL),
        (0, CMD_READ, u64::MAX - 511, 1024, EINVAL),
        (0, CMD_READ, 100, 512, EINVAL),
        (0, CMD_READ, 0, 100, EINVAL),
        (0, CMD_READ, 0, (32 << 20) + 512, EINVAL),
        (CMD_FLAG_DF, CMD_READ, 0, 512, EINVAL),
        (0x8000, CMD_READ, 0, 512, EINVAL),
        (CMD_FLAG_NO_HOLE, CMD_TRIM, 0, 512, EINVAL),
        (0, CMD_TRIM, size, 512, EINVAL),
        (0, CMD_TRIM, 1, 512, EINVAL),
        (0, CMD_WRITE_ZEROES, size - 512, 4096, ENOSPC),
        (0, CMD_CACHE, size, 4096, EINVAL),
        (CMD_FLAG_REQ_ONE, CMD_FLUSH, 0, 0, EINVAL),
        (0, CMD_BLOCK_STATUS, 0, 4096, EINVAL),
        (0, 99, 0, 0, EINVAL),
    ];
    for (i, &(flags, cmd, offset, len, errno)) in cases.iter().enumerate() {
        c.request(flags, cmd, i as u64, offset, len);
        assert_eq!(
            c.simple(),
            (errno, i as u64),
            "case {i}: cmd {cmd} flags {flags:#x} {offset}+{len}"
        );
    }
    // Writes: payload is consumed even when the request fails.
    c.write(0, 100, size - 512, &[1u8; 1024]);
    assert_eq!(c.simple(), (ENOSPC, 100));
    c.write(0, 101, 3, &[1u8; 512]);
    assert_eq!(c.simple(), (EINVAL, 101));
    c.write(CMD_FLAG_REQ_ONE, 102, 0, &[1u8; 512]);
    assert_eq!(c.simple(), (EINVAL, 102));
    // Still in sync.
    c.request(0, CMD_READ, 103, 0, 512);
    assert_eq!(c.simple(), (0, 103));
    assert_eq!(c.read_n(512), vec![0u8; 512]);
    assert_eq!(t.exports[0].submitted.load(Ordering::Relaxed), 1);
}

#[test]
fn oversized_write_payload_is_skipped() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.go("vol0", false, false);
    let len = (32u32 << 20) + 4096;
    c.request(0, CMD_WRITE, 1, 0, len);
    c.s.write_all(&vec![7u8; len as usize]).unwrap();
    assert_eq!(c.simple(), (EINVAL, 1));
    c.request(0, CMD_FLUSH, 2, 0, 0);
    assert_eq!(c.simple(), (0, 2));
}

#[test]
fn structured_replies() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.go("vol0", true, true);

    c.write(0, 1, 8192, &[0xab; 4096]);
    assert_eq!(c.simple(), (0, 1));

    c.request(CMD_FLAG_DF, CMD_READ, 2, 8192, 8192);
    let ch = c.chunk();
    assert_eq!(
        (ch.cookie, ch.kind, ch.flags),
        (2, REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE)
    );
    assert_eq!(be64(&ch.payload), 8192);
    assert_eq!(&ch.payload[8..8 + 4096], &[0xab; 4096][..]);
    assert_eq!(&ch.payload[8 + 4096..], &[0u8; 4096][..]);

    c.request(0, CMD_READ, 3, 0, 0);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.flags), (REPLY_TYPE_NONE, REPLY_FLAG_DONE));

    // Errors on reads are error chunks, never simple replies.
    c.request(0, CMD_READ, 4, 1 << 20, 512);
    let ch = c.chunk();
    assert_eq!((ch.cookie, ch.kind), (4, REPLY_TYPE_ERROR));
    assert_eq!(ch.error(), EINVAL);
    let mlen = be16(&ch.payload[4..]) as usize;
    assert_eq!(ch.payload.len(), 6 + mlen);
    c.request(0x40, CMD_READ, 5, 0, 512);
    assert_eq!(c.chunk().error(), EINVAL);
    c.request(0, CMD_READ, 6, 0, 64 << 20);
    assert_eq!(c.chunk().error(), EOVERFLOW);
    // Other commands report errors as chunks too.
    c.request(0, CMD_TRIM, 7, 1 << 20, 512);
    let ch = c.chunk();
    assert_eq!((ch.cookie, ch.error()), (7, EINVAL));

    // Block status: hole, data, hole.
    c.request(0, CMD_BLOCK_STATUS, 8, 0, 1 << 20);
    let ch = c.chunk();
    assert_eq!(
        (ch.cookie, ch.kind, ch.flags),
        (8, REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE)
    );
    assert_eq!(be32(&ch.payload), META_BASE_ALLOCATION_ID);
    let ext: Vec<(u32, u32)> = ch.payload[4..]
        .chunks(8)
        .map(|e| (be32(e), be32(&e[4..])))
        .collect();
    assert_eq!(
        ext,
        [
            (8192, STATE_HOLE | STATE_ZERO),
            (4096, 0),
            ((1 << 20) - 12288, STATE_HOLE | STATE_ZERO)
        ]
    );
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 9, 0, 4096);
    let ch = c.chunk();
    assert_eq!(ch.payload.len(), 12);
    assert_eq!((be32(&ch.payload[4..]), be32(&ch.payload[8..])), (4096, 3));
    c.request(0, CMD_BLOCK_STATUS, 10, 0, 0);
    assert_eq!(c.chunk().error(), EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 11, 4096, 1 << 20);
    assert_eq!(c.chunk().error(), EINVAL);
}

#[test]
fn block_status_needs_meta_context_for_the_same_export() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    c.option_reply();
    c.send_option(
        OPT_SET_META_CONTEXT,
        &meta_data("vol1", &["base:allocation"]),
    );
    c.option_replies();
    c.send_option(OPT_GO, &info_data("vol0", &[]));
    c.option_replies();
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    assert_eq!(c.chunk().error(), EINVAL);
}

#[test]
fn engine_errors_are_reported() {
    let t = TestServer::start();
    t.exports[0].fail_io.store(true, Ordering::Relaxed);
    let mut c = t.raw();
    c.go("vol0", true, false);
    c.request(0, CMD_READ, 1, 4096, 512);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.error()), (REPLY_TYPE_ERROR_OFFSET, EIO));
    let mlen = be16(&ch.payload[4..]) as usize;
    assert_eq!(be64(&ch.payload[6 + mlen..]), 4096);

    let mut c = t.raw();
    c.go("vol0", false, false);
    c.write(0, 2, 0, &[1; 512]);
    assert_eq!(c.simple(), (EIO, 2));
    c.request(0, CMD_READ, 3, 0, 512);
    assert_eq!(c.simple(), (EIO, 3));
    c.request(0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(c.simple(), (0, 4));
}

#[test]
fn read_only_exports_refuse_writes() {
    let t = TestServer::with(
        vec![MemExport::read_only("ro", 1 << 20)],
        ServerConfig::default(),
    );
    let mut c = t.raw();
    let (_, flags) = c.go("ro", false, false);
    assert!(flags & TFLAG_READ_ONLY != 0);
    c.write(0, 1, 0, &[1; 512]);
    assert_eq!(c.simple(), (EPERM, 1));
    c.request(0, CMD_TRIM, 2, 0, 512);
    assert_eq!(c.simple(), (EPERM, 2));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512);
    assert_eq!(c.simple(), (EPERM, 3));
    c.request(0, CMD_READ, 4, 0, 512);
    assert_eq!(c.simple(), (0, 4));

    let cfg = ServerConfig {
        read_only: true,
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("rw", 1 << 20)], cfg);
    let mut c = t.raw();
    let (_, flags) = c.go("", false, false);
    assert!(flags & TFLAG_READ_ONLY != 0);
    c.write(0, 1, 0, &[1; 512]);
    assert_eq!(c.simple(), (EPERM, 1));
}

#[test]
fn truncated_write_payload_drops_only_that_connection() {
    let t = TestServer::start();
    let mut other = t.raw();
    other.go("vol0", false, false);

    let mut c = t.raw();
    c.go("vol0", false, false);
    c.request(0, CMD_WRITE, 1, 0, 65536);
    c.s.write_all(&[5u8; 1000]).unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.closed());
    drop(c);

    other.request(0, CMD_READ, 2, 0, 4096);
    assert_eq!(other.simple(), (0, 2));
    assert_eq!(other.read_n(4096), vec![0u8; 4096]);
    let mut third = t.raw();
    third.go("vol1", true, false);
    other.disconnect();
    third.disconnect();
    t.wait_idle();
}

#[test]
fn socket_closed_mid_header_and_bad_magic() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.go("vol0", false, false);
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(c);

    let mut c = t.raw();
    c.go("vol0", false, false);
    c.s.write_all(&[0x12u8; 28]).unwrap();
    assert!(c.closed());

    let mut c = t.raw();
    c.go("vol0", false, false);
    c.request(0, CMD_FLUSH, 1, 0, 0);
    assert_eq!(c.simple(), (0, 1));
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let t = TestServer::start();
    t.exports[0].delay_ms.store(5, Ordering::Relaxed);
    let mut c = t.raw();
    c.go("vol0", true, false);
    let n = 64u64;
    for i in 0..n {
        c.write(0, i, i * 4096, &[i as u8; 4096]);
    }
    let mut seen: Vec<u64> = (0..n)
        .map(|_| c.simple())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..n).collect::<Vec<_>>());
    for i in 0..n {
        c.request(0, CMD_READ, 1000 + i, i * 4096, 4096);
    }
    let mut got = 0;
    for _ in 0..n {
        let ch = c.chunk();
        let i = ch.cookie - 1000;
        assert_eq!(be64(&ch.payload), i * 4096);
        assert!(ch.payload[8..].iter().all(|&b| b == i as u8));
        got += 1;
    }
    assert_eq!(got, n);
}

#[test]
fn inflight_budget_smaller_than_a_request_still_progresses() {
    let cfg = ServerConfig {
        max_inflight_bytes: 8192,
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("v", 1 << 20)], cfg);
    t.exports[0].delay_ms.store(1, Ordering::Relaxed);
    let mut c = t.raw();
    c.go("v", false, false);
    // Writing everything before reading any reply must not deadlock: replies are small and
    // the socket buffers absorb them.
    for i in 0..32u64 {
        c.write(0, i, i * 65536 % (1 << 20), &[1u8; 65536]);
    }
    for _ in 0..32 {
        assert_eq!(c.simple().0, 0);
    }
}

#[test]
fn disconnect_waits_for_inflight_requests() {
    let t = TestServer::start();
    t.exports[0].delay_ms.store(200, Ordering::Relaxed);
    let mut c = t.raw();
    c.go("vol0", false, false);
    c.write(CMD_FLAG_FUA, 1, 0, &[9u8; 4096]);
    c.disconnect();
    assert_eq!(c.simple(), (0, 1));
    assert!(c.closed());
    assert_eq!(t.exports[0].contents(0, 4096), vec![9u8; 4096]);
    t.wait_idle();
}

#[test]
fn large_trim_is_split_for_the_engine() {
    let t = TestServer::with(
        vec![MemExport::new("big", 80 << 20)],
        ServerConfig::default(),
    );
    let mut c = t.raw();
    c.go("big", false, false);
    c.request(0, CMD_TRIM, 1, 4096, (70 << 20) - 4096);
    assert_eq!(c.simple(), (0, 1));
    assert_eq!(t.exports[0].submitted.load(Ordering::Relaxed), 3);
    c.request(0, CMD_WRITE_ZEROES, 2, 0, 80 << 20);
    assert_eq!(c.simple(), (0, 2));
}

#[test]
fn connection_limit() {
    let cfg = ServerConfig {
        max_connections: 1,
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("v", 1 << 20)], cfg);
    let mut a = t.raw();
    a.go("v", false, false);
    assert_eq!(t.server.connection_count(), 1);
    // The slot is taken before the reply to NBD_OPT_GO is sent.
    assert_eq!(t.server.transmission_count(), 1);
    let mut b = t.raw();
    assert!(b.closed());
    a.disconnect();
    assert!(a.closed());
    t.wait_idle();
    let mut c = t.raw();
    c.go("v", false, false);
}

#[test]
fn shutdown_closes_connections_and_removes_socket() {
    let t = TestServer::start();
    let mut a = t.raw();
    a.go("vol0", false, false);
    let mut b = t.raw();
    b.greet(FLAG_C_FIXED_NEWSTYLE);
    t.server.shutdown();
    assert_eq!(t.server.connection_count(), 0);
    assert!(a.closed());
    assert!(b.closed());
    assert!(!t.socket.exists());
    t.server.wait();
}

#[test]
fn handshake_timeout_drops_idle_clients() {
    let cfg = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("v", 1 << 20)], cfg);
    let mut c = t.raw();
    c.read_n(18);
    assert!(c.closed());
    t.wait_idle();
}

#[test]
fn listen_addresses() {
    let ok = |s: &str, want: ListenAddr| assert_eq!(s.parse::<ListenAddr>().unwrap(), want);
    ok("127.0.0.1:10809", ListenAddr::Tcp("127.0.0.1:10809".into()));
    ok("[::1]:10809", ListenAddr::Tcp("[::1]:10809".into()));
    ok("localhost:1", ListenAddr::Tcp("localhost:1".into()));
    ok("unix:/tmp/x.sock", ListenAddr::Unix("/tmp/x.sock".into()));
    for bad in [
        "",
        "unix:",
        "10809",
        "::1:10809",
        "host:port",
        ":10809",
        "a:99999",
    ] {
        assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?} accepted");
    }
    assert_eq!(
        "unix:/a".parse::<ListenAddr>().unwrap().to_string(),
        "unix:/a"
    );
}

#[test]
fn tcp_ipv4_and_ipv6() {
    let t = TestServer::start();
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let l = match t.server.listen(&addr.parse().unwrap()) {
            Ok(l) => l,
            Err(e) if addr.starts_with('[') => {
                panic!("cannot listen on IPv6 loopback: {e}")
            }
            Err(e) => panic!("{e}"),
        };
        let BoundAddr::Tcp(sa) = l.local_addr().clone() else {
            panic!("not tcp")
        };
        assert_ne!(sa.port(), 0);
        let s = TcpStream::connect(sa).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Raw { s };
        c.go("vol1", false, false);
        c.write(0, 1, 0, &[3u8; 512]);
        assert_eq!(c.simple(), (0, 1));
        c.disconnect();
        assert!(c.closed());
        l.close();
        assert!(TcpStream::connect(sa).is_err());
    }
}

#[test]
fn stale_unix_socket_is_replaced_but_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    // A stale socket: bound, then the listener dropped.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let t = TestServer::start();
    let l = t.server.listen(&ListenAddr::Unix(path.clone())).unwrap();
    let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut c = Raw { s };
    c.go("vol0", false, false);
    // A live one is refused.
    assert!(t.server.listen(&ListenAddr::Unix(path.clone())).is_err());
    // A regular file is never removed.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(t.server.listen(&ListenAddr::Unix(file.clone())).is_err());
    assert!(file.exists());
    l.close();
    assert!(!path.exists());
}

#[test]
fn concurrent_connections_share_the_export() {
    let t = TestServer::start();
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let mut c = t.raw();
            std::thread::spawn(move || {
                c.go("vol0", i % 2 == 0, false);
                for j in 0..16u64 {
                    let off = i * 65536 + j * 4096;
                    c.write(0, j, off, &[(i * 16 + j) as u8; 4096]);
                }
                for _ in 0..16 {
                    assert_eq!(c.simple().0, 0);
                }
                c.request(0, CMD_FLUSH, 99, 0, 0);
                assert_eq!(c.simple(), (0, 99));
                c.disconnect();
                assert!(c.closed());
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    for i in 0..8u64 {
        for j in 0..16u64 {
            let got = t.exports[0].contents(i * 65536 + j * 4096, 4096);
            assert!(got.iter().all(|&b| b == (i * 16 + j) as u8));
        }
    }
    t.wait_idle();
}

/// Deterministic garbage generator (xorshift).
fn garbage(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_input_never_takes_the_server_down() {
    let cfg = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("v", 1 << 20)], cfg);
    for seed in 0..40u64 {
        let mut c = t.raw();
        let junk = garbage(seed, 64 + (seed as usize * 37) % 2000);
        if seed % 2 == 0 {
            // Garbage during option haggling (valid option magic, random rest).
            c.greet(FLAG_C_FIXED_NEWSTYLE);
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&junk);
            let _ = c.s.write_all(&m);
        } else {
            // Garbage request headers in transmission (valid magic, random rest).
            c.go("v", seed % 3 == 0, false);
            let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&junk);
            let _ = c.s.write_all(&m);
        }
        let _ = c.s.shutdown(std::net::Shutdown::Write);
        // Drain whatever the server answers until it closes.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c.s, &mut sink);
    }
    t.wait_idle();
    let mut c = t.raw();
    c.go("v", true, false);
    c.request(0, CMD_READ, 1, 0, 512);
    let kind = c.chunk().kind;
    assert!(
        kind == REPLY_TYPE_OFFSET_DATA || kind == REPLY_TYPE_OFFSET_HOLE,
        "{kind}"
    );
}

/// Access lists on the wire: NBD_OPT_LIST leaves out what the client may not use, INFO, GO and
/// the meta context options get NBD_REP_ERR_POLICY, EXPORT_NAME (no error reply possible) ends
/// the session, and `set_access` applies to connections that start afterwards.
#[test]
fn access_lists_refuse_with_policy_and_hide_exports() {
    use ingot_nbd::{AccessRules, ClientRule};
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut access = AccessRules::open();
    access.restrict("vol0", [ClientRule::Uid(me)]);
    access.restrict("vol1", [ClientRule::Uid(me.wrapping_add(1))]);
    let cfg = ServerConfig {
        access,
        ..Default::default()
    };
    let t = TestServer::with(
        vec![
            MemExport::new("vol0", 1 << 20),
            MemExport::new("vol1", 2 << 20),
        ],
        cfg,
    );
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(OPT_LIST, &[]);
    let r = c.option_replies();
    assert_eq!(r.len(), 2, "only vol0 is listed");
    assert_eq!(&r[0].data[4..], b"vol0");
    for opt in [OPT_INFO, OPT_GO] {
        c.send_option(opt, &info_data("vol1", &[]));
        let r = c.option_replies();
        assert_eq!((r.len(), r[0].option, r[0].kind), (1, opt, REP_ERR_POLICY));
    }
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().kind, REP_ACK);
    for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        c.send_option(opt, &meta_data("vol1", &[]));
        assert_eq!(c.option_replies()[0].kind, REP_ERR_POLICY);
    }
    // Still negotiating: the allowed export works.
    c.send_option(OPT_GO, &info_data("vol0", &[]));
    assert_eq!(c.option_replies().last().unwrap().kind, REP_ACK);

    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(OPT_EXPORT_NAME, b"vol1");
    assert!(
        c.closed(),
        "EXPORT_NAME of a refused export ends the session"
    );

    t.server.set_access(AccessRules::open());
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(OPT_GO, &info_data("vol1", &[]));
    assert_eq!(c.option_replies().last().unwrap().kind, REP_ACK);
}
