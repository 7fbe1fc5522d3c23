//! Per-volume QoS at admission: the rate a limited volume gets, neighbours left alone, limits
//! kept across reopen, requests larger than the burst.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingot_engine::{CreateOptions, Error, IoKind, Pool, PoolOptions, QosChange, QosLimits};

fn opts() -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        ..Default::default()
    }
}

fn create(dir: &Path) -> Pool {
    let c = CreateOptions {
        size_bytes: 256 << 20,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    Pool::create(dir, &c, &opts()).expect("create pool")
}

fn iops(n: u64) -> QosChange {
    QosChange {
        iops_limit: Some(n),
        ..QosChange::default()
    }
}

/// Run `threads` submitters of 4 KiB reads on `vol` until `stop`; count completions.
fn reader(pool: &Pool, vol: &str, threads: usize, stop: &Arc<AtomicBool>) -> Arc<AtomicU64> {
    let done = Arc::new(AtomicU64::new(0));
    for t in 0..threads {
        let v = pool.volume(vol).unwrap();
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut i = t as u64;
            while !stop.load(Ordering::Relaxed) {
                v.read((i % 4096) * 4096, 4096).unwrap();
                done.fetch_add(1, Ordering::Relaxed);
                i += 7;
            }
        });
    }
    done
}

#[test]
fn limited_volume_gets_its_rate_and_its_neighbour_is_not_slowed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path());
    pool.create_volume("a", 16 << 20).unwrap();
    pool.create_volume("b", 16 << 20).unwrap();
    pool.set_volume_qos(
        "a",
        &QosChange {
            iops_limit: Some(200),
            burst_iops: Some(10),
            ..QosChange::default()
        },
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let a = reader(&pool, "a", 4, &stop);
    let b = reader(&pool, "b", 2, &stop);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let (na, nb) = (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed));
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // 10 at once, then 200/s: generous bounds, this is a behavioural check.
    let want = 10.0 + 200.0 * secs;
    assert!(
        (na as f64) > want * 0.7 && (na as f64) < want * 1.3,
        "a: {na} requests in {secs:.2}s, want about {want:.0}"
    );
    assert!(nb > 5 * na, "b (unlimited) did {nb}, a did {na}");
    let info = pool.volumes();
    let a = info.iter().find(|v| v.name == "a").unwrap();
    assert_eq!(a.qos.iops_limit, 200);
    assert!(a.qos_wait_seconds > 0.0, "{a:?}");
    let b = info.iter().find(|v| v.name == "b").unwrap();
    assert_eq!((b.qos, b.qos_wait_seconds), (QosLimits::default(), 0.0));
}

#[test]
fn limits_survive_reopen_and_zero_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path());
    pool.create_volume("v", 16 << 20).unwrap();
    let limits = QosLimits {
        iops_limit: 1000,
        bandwidth_limit_bytes: 20 << 20,
        burst_iops: 5,
        burst_bytes: 1 << 20,
    };
    pool.set_volume_qos(
        "v",
        &QosChange {
            iops_limit: Some(limits.iops_limit),
            bandwidth_limit_bytes: Some(limits.bandwidth_limit_bytes),
            burst_iops: Some(limits.burst_iops),
            burst_bytes: Some(limits.burst_bytes),
        },
    )
    .unwrap();
    // Durable when set returns: no shutdown checkpoint.
    drop(pool);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    assert_eq!(pool.volumes()[0].qos, limits);
    // A partial change keeps the rest; 0 removes a limit.
    pool.set_volume_qos("v", &iops(0)).unwrap();
    drop(pool);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    assert_eq!(
        pool.volumes()[0].qos,
        QosLimits {
            iops_limit: 0,
            ..limits
        }
    );
    assert!(matches!(
        pool.set_volume_qos("nope", &iops(1)),
        Err(Error::VolumeNotFound(_))
    ));
    pool.shutdown().unwrap();
}

#[test]
fn a_request_larger_than_the_burst_passes_after_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path());
    pool.create_volume("v", 64 << 20).unwrap();
    pool.set_volume_qos(
        "v",
        &QosChange {
            bandwidth_limit_bytes: Some(4 << 20),
            burst_bytes: Some(4096),
            ..QosChange::default()
        },
    )
    .unwrap();
    let v = pool.volume("v").unwrap();
    let t0 = Instant::now();
    v.write(0, &vec![7u8; 1 << 20], false).unwrap();
    let took = t0.elapsed();
    // (1 MiB - 4 KiB) at 4 MiB/s: about a quarter of a second.
    assert!(took >= Duration::from_millis(240), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Zeroes and trims move no data: a whole-volume trim costs one request, not 64 MiB.
    let t0 = Instant::now();
    v.trim(0, 64 << 20, false).unwrap();
    v.write_zeroes(0, 64 << 20, false).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(v.read(0, 4096).unwrap(), vec![0u8; 4096]);
    pool.shutdown().unwrap();
}
