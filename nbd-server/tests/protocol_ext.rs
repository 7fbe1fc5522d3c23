//! Raw-byte tests of the newer protocol pieces: holes in structured reads, extended headers,
//! TLS policy, timeouts, and hostile clients (each followed by a well-behaved client).

mod common;

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ingot_nbd::proto::*;
use ingot_nbd::ServerConfig;

/// An extended reply: (flags, type, cookie, offset, payload).
fn ext_reply<S: Read + Write>(c: &mut Raw<S>) -> (u16, u16, u64, u64, Vec<u8>) {
    let h = c.read_n(32);
    assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC, "expected an extended reply");
    let len = be64(&h[24..]) as usize;
    (
        be16(&h[4..]),
        be16(&h[6..]),
        be64(&h[8..]),
        be64(&h[16..]),
        c.read_n(len),
    )
}

fn ext_request<S: Read + Write>(
    c: &mut Raw<S>,
    flags: u16,
    cmd: u16,
    cookie: u64,
    off: u64,
    len: u64,
) {
    let h = ExtRequestHeader {
        magic: EXTENDED_REQUEST_MAGIC,
        flags,
        command: cmd,
        cookie,
        offset: off,
        len,
    };
    c.s.write_all(&h.encode()).unwrap();
}

/// Greet, negotiate extended headers and base:allocation, and GO on vol0.
fn go_extended<S: Read + Write>(c: &mut Raw<S>) -> u16 {
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply().kind, REP_ACK);
    // Structured replies cannot be asked for on top.
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().kind, REP_ERR_EXT_HEADER_REQD);
    c.send_option(
        OPT_SET_META_CONTEXT,
        &meta_data("vol0", &[META_BASE_ALLOCATION]),
    );
    let r = c.option_replies();
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    c.send_option(OPT_GO, &info_data("vol0", &[INFO_BLOCK_SIZE]));
    let r = c.option_replies();
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let e = r
        .iter()
        .find(|x| x.kind == REP_INFO && be16(&x.data) == INFO_EXPORT)
        .unwrap();
    be16(&e.data[10..])
}

#[test]
fn sparse_reads_send_holes_not_zero_bytes() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.go("vol0", true, false);
    c.write(0, 1, 8192, &[0xab; 4096]);
    assert_eq!(c.simple(), (0, 1));

    c.request(0, CMD_READ, 2, 0, 16384);
    let a = c.chunk();
    assert_eq!((a.cookie, a.kind, a.flags), (2, REPLY_TYPE_OFFSET_HOLE, 0));
    assert_eq!((be64(&a.payload), be32(&a.payload[8..])), (0, 8192));
    let b = c.chunk();
    assert_eq!((b.kind, b.flags), (REPLY_TYPE_OFFSET_DATA, 0));
    assert_eq!(be64(&b.payload), 8192);
    assert_eq!(&b.payload[8..], &[0xab; 4096][..]);
    let d = c.chunk();
    assert_eq!((d.kind, d.flags), (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE));
    assert_eq!((be64(&d.payload), be32(&d.payload[8..])), (12288, 4096));

    // A whole hole: one chunk and no data bytes at all.
    c.request(0, CMD_READ, 3, 65536, 1 << 16);
    let h = c.chunk();
    assert_eq!((h.kind, h.flags), (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE));
    assert_eq!(h.payload.len(), 12);

    // After a trim the range is a hole again.
    c.request(0, CMD_TRIM, 4, 8192, 4096);
    assert_eq!(c.simple(), (0, 4));
    c.request(0, CMD_READ, 5, 8192, 4096);
    assert_eq!(c.chunk().kind, REPLY_TYPE_OFFSET_HOLE);

    // DF asks for one data chunk, holes included.
    c.request(CMD_FLAG_DF, CMD_READ, 6, 0, 8192);
    let x = c.chunk();
    assert_eq!((x.kind, x.flags), (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE));
    assert_eq!(x.payload.len(), 8 + 8192);
}

#[test]
fn extended_headers_round_trip() {
    let t = TestServer::start();
    let mut c = t.raw();
    let flags = go_extended(&mut c);
    assert!(flags & TFLAG_SEND_DF != 0);

    ext_request(
        &mut c,
        CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA,
        CMD_WRITE,
        1,
        4096,
        4096,
    );
    c.s.write_all(&[0x5a; 4096]).unwrap();
    let (f, k, cookie, off, p) = ext_reply(&mut c);
    assert_eq!(
        (f, k, cookie, off, p.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 4096, 0)
    );
    assert_eq!(t.exports[0].contents(4096, 4096), vec![0x5a; 4096]);

    ext_request(&mut c, 0, CMD_READ, 2, 0, 8192);
    let (_, k, _, off, p) = ext_reply(&mut c);
    assert_eq!((k, off), (REPLY_TYPE_OFFSET_HOLE, 0));
    assert_eq!((be64(&p), be32(&p[8..])), (0, 4096));
    let (f, k, _, off, p) = ext_reply(&mut c);
    // The header's offset is the request's; the payload's is the chunk's.
    assert_eq!(
        (f, k, off, be64(&p)),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 0, 4096)
    );
    assert_eq!(&p[8..], &[0x5a; 4096][..]);

    // Block status in the 64-bit form.
    ext_request(&mut c, 0, CMD_BLOCK_STATUS, 3, 0, 1 << 20);
    let (f, k, cookie, _, p) = ext_reply(&mut c);
    assert_eq!(
        (f, k, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 3)
    );
    assert_eq!(be32(&p), META_BASE_ALLOCATION_ID);
    let n = be32(&p[4..]) as usize;
    assert_eq!(p.len(), 8 + 16 * n);
    let ext: Vec<(u64, u64)> = p[8..]
        .chunks(16)
        .map(|e| (be64(e), be64(&e[8..])))
        .collect();
    assert_eq!(
        ext,
        [
            (4096, u64::from(STATE_HOLE | STATE_ZERO)),
            (4096, 0),
            ((1 << 20) - 8192, u64::from(STATE_HOLE | STATE_ZERO))
        ]
    );

    // A 64-bit effect length past the end is refused, not truncated.
    ext_request(&mut c, 0, CMD_TRIM, 4, 0, (1 << 32) + 4096);
    let (_, k, cookie, _, p) = ext_reply(&mut c);
    assert_eq!((k, cookie, be32(&p)), (REPLY_TYPE_ERROR, 4, EINVAL));

    // A write without PAYLOAD_LEN still carries its payload (as qemu sends it).
    ext_request(&mut c, 0, CMD_WRITE, 5, 0, 512);
    c.s.write_all(&[0x11; 512]).unwrap();
    let (_, k, cookie, _, _) = ext_reply(&mut c);
    assert_eq!((k, cookie), (REPLY_TYPE_NONE, 5));
    assert_eq!(t.exports[0].contents(0, 512), vec![0x11; 512]);
    // A payload on a command that takes none is consumed and refused.
    ext_request(&mut c, CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 6, 0, 16);
    c.s.write_all(&[0xee; 16]).unwrap();
    let (_, k, cookie, _, p) = ext_reply(&mut c);
    assert_eq!((k, cookie, be32(&p)), (REPLY_TYPE_ERROR, 6, EINVAL));
    ext_request(&mut c, 0, CMD_FLUSH, 7, 0, 0);
    let (_, k, cookie, _, _) = ext_reply(&mut c);
    assert_eq!((k, cookie), (REPLY_TYPE_NONE, 7));

    // A compact header after extended headers were negotiated is a protocol violation.
    c.request(0, CMD_FLUSH, 8, 0, 0);
    c.request(0, CMD_FLUSH, 9, 0, 0);
    assert!(c.closed());
    t.wait_idle();

    // A payload longer than the maximum ends the connection (hard disconnect).
    let mut c = t.raw();
    go_extended(&mut c);
    ext_request(&mut c, CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 64 << 20);
    assert!(c.closed());
}

#[test]
fn export_name_after_extended_headers_disconnects() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);
    c.send_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply().kind, REP_ACK);
    c.send_option(OPT_EXPORT_NAME, b"vol0");
    assert!(c.closed());
}

#[test]
fn tls_policy_without_and_with_required_tls() {
    // Not configured: STARTTLS is unsupported, the session goes on.
    let t = TestServer::start();
    let mut c = t.raw();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_reply().kind, REP_ERR_UNSUP);
    c.send_option(OPT_STARTTLS, b"junk");
    assert_eq!(c.option_reply().kind, REP_ERR_INVALID);
    c.send_option(OPT_LIST, &[]);
    assert_eq!(c.option_replies().last().unwrap().kind, REP_ACK);
}

#[test]
fn read_only_exports_advertise_no_write_commands() {
    let t = TestServer::with(
        vec![MemExport::read_only("ro", 1 << 20)],
        ServerConfig::default(),
    );
    let mut c = t.raw();
    let (_, flags) = c.go("ro", true, false);
    assert!(flags & TFLAG_READ_ONLY != 0);
    assert_eq!(
        flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO),
        0
    );
    assert!(flags & TFLAG_SEND_FLUSH != 0);
}

/// A client that behaves: write, read back, flush.
fn well_behaved(t: &TestServer) {
    let mut c = t.raw();
    c.go("vol0", true, false);
    c.write(CMD_FLAG_FUA, 100, 0, &[0x42; 4096]);
    assert_eq!(c.simple(), (0, 100));
    c.request(CMD_FLAG_DF, CMD_READ, 101, 0, 4096);
    let ch = c.chunk();
    assert_eq!(&ch.payload[8..], &[0x42; 4096][..]);
    c.request(0, CMD_FLUSH, 102, 0, 0);
    assert_eq!(c.simple(), (0, 102));
    c.disconnect();
}

#[test]
fn idle_clients_are_dropped_but_busy_ones_are_not() {
    let cfg = ServerConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        request_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("vol0", 1 << 20)], cfg);
    let mut idle = t.raw();
    idle.go("vol0", false, false);
    let started = Instant::now();
    assert!(idle.closed());
    assert!(started.elapsed() >= Duration::from_millis(250));

    // A slow request (in flight longer than the idle timeout) is not idleness.
    t.exports[0]
        .delay_ms
        .store(900, std::sync::atomic::Ordering::Relaxed);
    let mut c = t.raw();
    c.go("vol0", false, false);
    c.request(0, CMD_FLUSH, 1, 0, 0);
    assert_eq!(c.simple(), (0, 1));
    t.exports[0]
        .delay_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    well_behaved(&t);
}

#[test]
fn half_sent_requests_time_out() {
    let cfg = ServerConfig {
        request_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("vol0", 1 << 20)], cfg);
    // Half a header.
    let mut c = t.raw();
    c.go("vol0", false, false);
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    assert!(c.closed());
    // A write whose payload stops short.
    let mut c = t.raw();
    c.go("vol0", false, false);
    c.request(0, CMD_WRITE, 1, 0, 8192);
    c.s.write_all(&[1; 100]).unwrap();
    assert!(c.closed());
    t.wait_idle();
    well_behaved(&t);
    assert_eq!(t.exports[0].contents(4096, 4096), vec![0; 4096]);
}

#[test]
fn client_that_never_reads_replies_is_dropped() {
    let cfg = ServerConfig {
        reply_timeout: Some(Duration::from_millis(500)),
        max_inflight_bytes: 8 << 20,
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("vol0", 1 << 20)], cfg);
    let mut c = t.raw();
    c.go("vol0", false, false);
    // Ask for far more reply bytes than the socket buffers hold, and never read them.
    let writer = {
        let mut s = c.s.try_clone().unwrap();
        thread::spawn(move || {
            for i in 0..2000u64 {
                let h = RequestHeader {
                    magic: REQUEST_MAGIC,
                    flags: 0,
                    command: CMD_READ,
                    cookie: i,
                    offset: 0,
                    len: 1 << 20,
                };
                if s.write_all(&h.encode()).is_err() {
                    return;
                }
            }
        })
    };
    // Meanwhile another client is served normally.
    well_behaved(&t);
    writer.join().unwrap();
    // The server gave up on the reader-less client.
    t.wait_idle();
}

#[test]
fn option_after_go_and_garbage_magic_end_only_that_client() {
    let t = TestServer::start();
    let mut c = t.raw();
    c.go("vol0", false, false);
    c.send_option(OPT_LIST, &[]);
    assert!(c.closed());

    let mut c = t.raw();
    let g = c.read_n(18);
    assert_eq!(be64(&g), NBDMAGIC);
    c.s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    c.s.write_all(&[0xde; 16]).unwrap();
    assert!(c.closed());
    well_behaved(&t);
}

#[test]
fn flood_of_idle_handshakes_pushes_out_the_oldest() {
    let cfg = ServerConfig {
        max_connections: 8,
        max_handshakes: 8,
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("vol0", 1 << 20)], cfg);
    let mut hogs: Vec<_> = (0..8)
        .map(|_| {
            let mut c = t.raw();
            c.read_n(18);
            c
        })
        .collect();
    // More idle handshakes than the budget: each newcomer is greeted, the oldest are closed.
    let mut late: Vec<_> = (0..20)
        .map(|_| {
            let mut c = t.raw();
            c.read_n(18);
            c
        })
        .collect();
    for h in &mut hogs {
        assert!(h.closed());
    }
    for h in late.iter_mut().take(12) {
        assert!(h.closed());
    }
    assert!(t.server.handshake_count() <= 8);
    // A real client still gets through, and fills a transmission slot.
    well_behaved(&t);
    drop(late);
    drop(hogs);
    t.wait_idle();
}

#[test]
fn full_transmission_slots_refuse_newcomers() {
    let cfg = ServerConfig {
        max_connections: 2,
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("vol0", 1 << 20)], cfg);
    // A handshake under way when the slots fill up is closed once it ends.
    let mut pending = t.raw();
    pending.greet(FLAG_C_FIXED_NEWSTYLE);
    let mut a = t.raw();
    a.go("vol0", false, false);
    let mut b = t.raw();
    b.go("vol0", false, false);
    assert_eq!(t.server.connection_count(), 3);
    let mut c = t.raw();
    assert!(c.closed());
    pending.send_option(OPT_GO, &info_data("vol0", &[]));
    let mut rest = Vec::new();
    assert!(
        pending.s.read_to_end(&mut rest).is_ok(),
        "a handshake ending with no free slot was not closed"
    );
    a.disconnect();
    b.disconnect();
    t.wait_idle();
    well_behaved(&t);
}

#[test]
fn handshake_time_is_bounded_in_all_not_per_read() {
    let cfg = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(600)),
        ..Default::default()
    };
    let t = TestServer::with(vec![MemExport::new("vol0", 1 << 20)], cfg);
    let mut c = t.raw();
    let start = Instant::now();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    // One byte of an option header every 100 ms: each read is quick, the handshake is not.
    let hdr = IHAVEOPT.to_be_bytes();
    let mut closed = false;
    for b in hdr.iter().cycle().take(100) {
        thread::sleep(Duration::from_millis(100));
        if c.s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
    }
    let took = start.elapsed();
    assert!(closed, "a trickling handshake was not closed");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    t.wait_idle();
    well_behaved(&t);
}
