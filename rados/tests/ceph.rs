//! Against a real Ceph cluster (`tests/ceph/ceph-up.sh`, which `./test.sh` starts): the RADOS
//! primitives the fence rests on, and the lease and write-once log built on them, driven as
//! two or three nodes would (each its own cluster connection), including a stale owner.
//!
//! `INGOT_CEPH_CONF` names the cluster's ceph.conf; without it these tests fail, they never
//! skip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ingot_rados::lease::{first_free, holder, read_log};
use ingot_rados::{Cluster, ConnectOptions, Lease, LeaseError, LeaseOptions, Pool, Step, Takeover};

fn conf() -> std::path::PathBuf {
    std::env::var_os("INGOT_CEPH_CONF")
        .map(Into::into)
        .expect("INGOT_CEPH_CONF must name a test cluster's ceph.conf (./test.sh starts one with tests/ceph/ceph-up.sh)")
}

fn node() -> (Cluster, Pool) {
    let c = Cluster::connect(&ConnectOptions {
        conf: Some(conf()),
        user: None,
        op_timeout: Some(Duration::from_secs(20)),
    })
    .expect("connect to the test cluster");
    let p = c.pool("ingot").expect("pool ingot");
    (c, p)
}

/// A name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{what}-{}-{t}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The lease of `name` for `who` on this client, taken at once.
fn take_now(c: &Cluster, p: &Pool, name: &str, who: &str) -> Lease {
    Lease::acquire(
        p,
        name,
        who,
        &c.address().unwrap(),
        Takeover::Now,
        quick(),
        None,
    )
    .unwrap()
}

fn quick() -> LeaseOptions {
    LeaseOptions {
        period: Duration::from_millis(1500),
        margin: Duration::from_millis(300),
        blocklist_secs: 600,
    }
}

#[test]
fn objects_round_trip_and_write_once_objects_refuse_a_second_write() {
    let (_c, p) = node();
    let oid = unique("obj");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 + 3) as u8).collect();
    p.create_once(&oid, &data, &[("ingot.epoch", b"7")])
        .unwrap();
    let back = p.read_all(&oid, 2 << 20).unwrap();
    assert!(back == data);
    let mut part = vec![0u8; 4096];
    assert_eq!(p.read(&oid, 12345, &mut part).unwrap(), 4096);
    assert_eq!(part[..], data[12345..12345 + 4096]);
    assert_eq!(p.xattr(&oid, "ingot.epoch").unwrap(), b"7");
    // A second exclusive create fails and changes nothing, xattrs included.
    let e = p
        .create_once(&oid, b"other", &[("ingot.epoch", b"8")])
        .unwrap_err();
    assert!(e.exists(), "{e}");
    assert!(p.read_all(&oid, 2 << 20).unwrap() == data);
    assert_eq!(p.xattr(&oid, "ingot.epoch").unwrap(), b"7");
    // A compare that fails leaves the object as it was.
    let e = p
        .operate(
            &oid,
            &[
                Step::XattrEquals {
                    name: "ingot.epoch",
                    value: b"6",
                },
                Step::WriteFull(b"x"),
            ],
        )
        .unwrap_err();
    assert!(e.lost_race(), "{e}");
    assert_eq!(p.stat(&oid).unwrap(), data.len() as u64);
    p.remove(&oid).unwrap();
    assert!(p.stat(&oid).unwrap_err().not_found());
}

#[test]
fn an_unreachable_cluster_or_missing_pool_is_a_clear_error() {
    let (c, _) = node();
    let e = c.pool("no-such-pool").err().expect("a missing pool fails");
    assert!(e.not_found(), "{e}");
    assert!(e.to_string().contains("no-such-pool"), "{e}");
    let dir = tempfile_dir();
    let bad = dir.join("ceph.conf");
    std::fs::write(&bad, "[global]\nmon host = 127.0.0.1:1\n").unwrap();
    let t = Instant::now();
    let e = Cluster::connect(&ConnectOptions {
        conf: Some(bad),
        user: None,
        op_timeout: Some(Duration::from_secs(2)),
    })
    .err()
    .expect("no monitor there");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(e.to_string().contains("connect"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(unique("ingot-rados"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The first owner creates the lease; a second node that waits takes it only once the first
/// stopped renewing for a whole period; the first, still running, is deposed: it cannot
/// renew, cannot append, cannot overwrite its own old log objects, and the log a third node
/// reads has the second's seal right after the first's last object.
#[test]
fn a_stale_owner_is_fenced_by_the_epoch_and_the_write_once_log() {
    let name = unique("pool");
    let (c1, p1) = node();
    let (c2, p2) = node();
    let mut a = Lease::acquire(
        &p1,
        &name,
        "node-a",
        &c1.address().unwrap(),
        Takeover::Wait,
        quick(),
        Some(&c1),
    )
    .unwrap();
    assert_eq!(a.epoch(), 1);
    assert_eq!(a.next_log(), 1, "the seal is object 0");
    for i in 0..3u8 {
        a.append(&[i; 100]).unwrap();
    }
    // B waits while A renews.
    let b = {
        let p2 = p2.clone();
        let c2 = c2.clone();
        let name = name.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let b = Lease::acquire(
                &p2,
                &name,
                "node-b",
                &c2.address().unwrap(),
                Takeover::Wait,
                quick(),
                None,
            );
            (b, t.elapsed())
        })
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        a.renew().unwrap();
        assert!(a.valid());
        std::thread::sleep(Duration::from_millis(200));
    }
    // A stops renewing (paused, say): by its own clock it stops acting before B takes over.
    let stopped = Instant::now();
    let (b, waited) = b.join().unwrap();
    let mut b = b.unwrap();
    assert!(
        waited >= Duration::from_secs(4),
        "B took the lease while A renewed ({waited:?})"
    );
    assert!(
        !a.valid(),
        "A still thinks it owns the pool after B took it"
    );
    assert!(stopped.elapsed() >= quick().period - quick().margin);
    assert_eq!(b.epoch(), 2);
    // A, woken up: every write it tries is refused.
    match a.renew() {
        Err(LeaseError::Deposed {
            epoch: 2, owner, ..
        }) => assert!(owner.starts_with("node-b")),
        other => panic!("a stale renewal: {:?}", other.err()),
    }
    assert!(matches!(a.append(b"late"), Err(LeaseError::Deposed { .. })));
    let e = p1
        .create_once(&ingot_rados::lease::log_oid(&name, 2), b"rewrite", &[])
        .unwrap_err();
    assert!(e.exists(), "{e}");
    b.append(b"from b").unwrap();
    // A third node reads the log: A's seal and objects, B's seal, B's object.
    let (_c3, p3) = node();
    let log: Vec<_> = (0..first_free(&p3, &name, 0).unwrap())
        .map(|n| read_log(&p3, &name, n, 1 << 20).unwrap().unwrap())
        .collect();
    let summary: Vec<(u64, bool)> = log.iter().map(|o| (o.epoch, o.seal)).collect();
    assert_eq!(
        summary,
        vec![
            (1, true),
            (1, false),
            (1, false),
            (1, false),
            (2, true),
            (2, false)
        ]
    );
    assert_eq!(log[3].data, vec![2u8; 100]);
    assert_eq!(log[5].data, b"from b");
    assert_eq!(holder(&p3, &name).unwrap().unwrap().0.epoch, 2);
}

/// An append that lands just before the takeover is kept: the new owner seals after it.
#[test]
fn an_append_racing_the_takeover_is_kept_before_the_seal() {
    let name = unique("pool");
    let (c1, p1) = node();
    let (_c2, p2) = node();
    let mut a = take_now(&c1, &p1, &name, "a");
    a.append(b"one").unwrap();
    // A's next object is written between B's lease swap and B's seal: B's seal walks past
    // it. (Simulated by writing it first: the seal's search and exclusive create are what
    // make the order safe either way.)
    a.append(b"two").unwrap();
    let mut b = Lease::acquire(&p2, &name, "b", "none", Takeover::Now, quick(), None).unwrap();
    assert_eq!(b.next_log(), 4, "seal at 3, after A's objects 1 and 2");
    let got = read_log(&p2, &name, 2, 100).unwrap().unwrap();
    assert_eq!(
        (got.epoch, got.seal, &got.data[..]),
        (1, false, &b"two"[..])
    );
    assert!(a.append(b"three").is_err());
    b.append(b"b1").unwrap();
}

/// The owner raises the log's head and deletes what came before it: the next owner finds the
/// log's end from the head and seals after it, and a stale owner can no longer move the head.
#[test]
fn a_raised_head_lets_the_log_start_later() {
    let name = unique("pool");
    let (c1, p1) = node();
    let (_c2, p2) = node();
    let mut a = take_now(&c1, &p1, &name, "a");
    for k in 0..6u8 {
        a.append(&[k]).unwrap();
    }
    assert_eq!(a.next_log(), 7);
    assert!(a.set_head(8).is_err(), "a head past the log's end");
    a.set_head(5).unwrap();
    assert_eq!(holder(&p2, &name).unwrap().unwrap().0.head, 5);
    for n in 0..5 {
        p1.remove(&ingot_rados::lease::log_oid(&name, n)).unwrap();
    }
    assert_eq!(first_free(&p2, &name, 5).unwrap(), 7);
    let mut b = Lease::acquire(&p2, &name, "b", "none", Takeover::Now, quick(), None).unwrap();
    assert_eq!(
        (b.head(), b.next_log()),
        (5, 8),
        "sealed at 7, after A's last object"
    );
    assert!(a.set_head(6).is_err(), "the stale owner moved the head");
    assert_eq!(holder(&p2, &name).unwrap().unwrap().0.head, 5);
    b.append(b"b1").unwrap();
    b.set_head(7).unwrap();
    assert_eq!(holder(&p2, &name).unwrap().unwrap().0.head, 7);
}

/// Nodes racing to take the same lease: each epoch has exactly one winner, and every winner
/// found its own seal.
#[test]
fn racing_takeovers_have_one_winner_per_epoch() {
    let name = unique("pool");
    let (c, p) = node();
    Lease::acquire(
        &p,
        &name,
        "first",
        &c.address().unwrap(),
        Takeover::Now,
        quick(),
        None,
    )
    .unwrap();
    const NODES: usize = 4;
    const ROUNDS: usize = 5;
    let barrier = Arc::new(Barrier::new(NODES));
    let threads: Vec<_> = (0..NODES)
        .map(|k| {
            let barrier = barrier.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                let (_c, p) = node();
                let mut won = Vec::new();
                for _ in 0..ROUNDS {
                    barrier.wait();
                    match Lease::acquire(
                        &p,
                        &name,
                        &format!("n{k}"),
                        "-",
                        Takeover::Now,
                        quick(),
                        None,
                    ) {
                        Ok(l) => won.push((l.epoch(), l.next_log() - 1)),
                        Err(LeaseError::Deposed { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                won
            })
        })
        .collect();
    let mut wins: Vec<(u64, u64)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    wins.sort_unstable();
    let epochs: Vec<u64> = wins.iter().map(|w| w.0).collect();
    let mut distinct = epochs.clone();
    distinct.dedup();
    assert_eq!(epochs, distinct, "an epoch won twice: {wins:?}");
    assert!(wins.len() >= ROUNDS, "{wins:?}");
    let final_epoch = holder(&p, &name).unwrap().unwrap().0.epoch;
    assert_eq!(final_epoch, 1 + wins.len() as u64, "{wins:?}");
    // Each winner's seal is where it says, with its epoch.
    for (epoch, at) in wins {
        let o = read_log(&p, &name, at, 16).unwrap().unwrap();
        assert!(o.seal && o.epoch == epoch, "{o:?} for epoch {epoch}");
    }
}

/// The new owner blocklists the previous owner's client: its later operations fail with
/// ESHUTDOWN at once (the server-side fence that also stops operations in flight).
#[test]
fn the_previous_owners_client_is_blocklisted() {
    let name = unique("pool");
    let (c1, p1) = node();
    let (c2, p2) = node();
    let a1 = c1.address().unwrap();
    assert!(a1.contains('/'), "{a1}");
    let _a = Lease::acquire(&p1, &name, "a", &a1, Takeover::Now, quick(), Some(&c1)).unwrap();
    let _b = Lease::acquire(
        &p2,
        &name,
        "b",
        &c2.address().unwrap(),
        Takeover::Now,
        quick(),
        Some(&c2),
    )
    .unwrap();
    let t = Instant::now();
    let e = loop {
        match p1.create_once(&unique("after"), b"x", &[]) {
            Err(e) => break e,
            Ok(()) if t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Ok(()) => panic!("the stale client still writes 20 s after the takeover"),
        }
    };
    assert!(e.blocklisted(), "{e}");
    // B's own client is not affected.
    p2.create_once(&unique("b-after"), b"y", &[]).unwrap();
}

/// A lease past its end by its holder's clock is never renewed again, even when nobody took
/// it: another node may be about to, and the holder must not act as the owner meanwhile.
#[test]
fn a_lapsed_lease_is_not_renewed() {
    let name = unique("pool");
    let (c, p) = node();
    let mut a = Lease::acquire(
        &p,
        &name,
        "a",
        &c.address().unwrap(),
        Takeover::Now,
        quick(),
        None,
    )
    .unwrap();
    a.renew().unwrap();
    std::thread::sleep(quick().period);
    assert!(!a.valid());
    assert!(matches!(a.renew(), Err(LeaseError::Deposed { .. })));
    assert!(matches!(a.append(b"x"), Err(LeaseError::Deposed { .. })));
    assert!(!a.valid());
    // The next node takes it after a period without renewals, as it would after a crash.
    let t = Instant::now();
    let b = Lease::acquire(&p, &name, "b", "-", Takeover::Wait, quick(), None).unwrap();
    assert!(t.elapsed() >= quick().period);
    assert_eq!(b.epoch(), 2);
}
