//! One backing file, one pool: a device in use by an open pool is refused to every other pool,
//! `create` does not overwrite a device that holds a pool or data unless forced, and `open`
//! refuses a device of another pool or one listed twice.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ingot_engine::format::SUPERBLOCK_OFFSETS;
use ingot_engine::{CreateOptions, Error, ErrorKind, IoKind, Pool, PoolOptions};

const SEG: u64 = 2 << 20;
const POOL_BYTES: u64 = 32 << 20;

fn opts() -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        shards: 1,
        cache_bytes: Some(0),
        ..Default::default()
    }
}

fn create_on(dir: &Path, devices: &[PathBuf], force: bool) -> Result<Pool, Error> {
    let c = CreateOptions {
        size_bytes: POOL_BYTES * devices.len().max(1) as u64,
        segment_bytes: SEG,
        devices: devices.to_vec(),
        force,
        ..Default::default()
    };
    Pool::create(dir, &c, &opts())
}

/// A closed pool in `dir` on its default device, with volume `v` holding a known block.
fn made_pool(dir: &Path) -> Vec<u8> {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let pool = create_on(dir, &[], false).expect("create pool");
    pool.create_volume("v", 8 << 20).unwrap();
    pool.volume("v").unwrap().write(0, &data, true).unwrap();
    pool.shutdown().unwrap();
    data
}

fn dev0(dir: &Path) -> PathBuf {
    dir.join("dev0.img")
}

fn pool_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("pool.json")).unwrap()).unwrap()
}

fn set_devices<P: AsRef<Path>>(dir: &Path, devices: &[P]) {
    let mut pf = pool_json(dir);
    pf["devices"] = devices
        .iter()
        .map(|p| p.as_ref().to_str().unwrap())
        .collect();
    std::fs::write(dir.join("pool.json"), serde_json::to_vec(&pf).unwrap()).unwrap();
}

fn uuid_of(dir: &Path) -> String {
    pool_json(dir)["pool_uuid"]
        .as_str()
        .expect("pool.json records the pool's UUID")
        .to_string()
}

fn open_err(dir: &Path) -> Error {
    match Pool::open(dir, &opts()) {
        Ok(_) => panic!("opened {}", dir.display()),
        Err(e) => e,
    }
}

fn create_err(dir: &Path, devices: &[PathBuf], force: bool) -> Error {
    match create_on(dir, devices, force) {
        Ok(_) => panic!("created a pool in {} on {devices:?}", dir.display()),
        Err(e) => e,
    }
}

fn assert_reads(dir: &Path, data: &[u8]) {
    let pool = Pool::open(dir, &opts()).expect("the first pool still opens");
    assert_eq!(pool.volume("v").unwrap().read(0, 4096).unwrap(), data);
    pool.shutdown().unwrap();
}

#[test]
fn create_refuses_a_device_that_holds_another_pool_unless_forced() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let data = made_pool(&a);
    let uuid = uuid_of(&a);
    let before = std::fs::read(dev0(&a)).unwrap();

    let b = t.path().join("b");
    let e = create_err(&b, &[dev0(&a)], false);
    match &e {
        Error::DeviceHoldsData { path, what } => {
            assert_eq!(path, &dev0(&a));
            assert!(what.contains(&uuid), "{e}");
        }
        _ => panic!("{e:?}"),
    }
    let msg = e.to_string();
    // The way out (`--force`) is the CLI's to name; the engine says what the device holds.
    assert!(
        msg.contains("dev0.img") && msg.contains("refusing to overwrite"),
        "{msg}"
    );
    assert!(
        !b.join("pool.json").exists(),
        "a refused create wrote pool.json"
    );
    assert!(
        std::fs::read(dev0(&a)).unwrap() == before,
        "a refused create changed the device"
    );
    assert_reads(&a, &data);

    // Only the second superblock copy left: still a pool.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev0(&a))
        .unwrap();
    f.write_all_at(&[0u8; 4096], SUPERBLOCK_OFFSETS[0]).unwrap();
    let e = create_err(&b, &[dev0(&a)], false);
    assert!(
        matches!(&e, Error::DeviceHoldsData { what, .. } if what.contains(&uuid)),
        "{e:?}"
    );

    // Forced: the device is the new pool's, and the old pool no longer opens on it.
    let pool = create_on(&b, &[dev0(&a)], true).expect("create --force");
    let b_uuid = uuid_of(&b);
    assert_ne!(b_uuid, uuid);
    pool.shutdown().unwrap();
    drop(pool);
    match open_err(&a) {
        Error::ForeignDevice {
            path,
            found,
            expected,
        } => {
            assert_eq!(path, dev0(&a));
            assert_eq!(found, b_uuid);
            assert_eq!(expected, uuid);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn create_refuses_a_device_that_holds_data_unless_forced() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("disk.img");
    let refuse = |what: &str| {
        let before = std::fs::read(&file).unwrap();
        let e = create_err(&t.path().join("p"), std::slice::from_ref(&file), false);
        assert!(
            matches!(&e, Error::DeviceHoldsData { path, what } if *path == file && what.contains("data")),
            "{what}: {e:?}"
        );
        assert!(
            std::fs::read(&file).unwrap() == before,
            "{what}: a refused create changed the file"
        );
    };

    // Bytes in the first MiB.
    std::fs::write(&file, b"precious\n").unwrap();
    refuse("a short text file");
    // A large sparse file with one byte far past the first MiB.
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(96 << 20).unwrap();
    f.write_all_at(b"x", 50_000_000).unwrap();
    drop(f);
    refuse("a sparse file with a byte at 50 MB");
    // A fully written file whose first MiB is zeroes.
    let mut bytes = vec![0u8; 1 << 20];
    bytes.resize(8 << 20, 0xab);
    std::fs::write(&file, &bytes).unwrap();
    refuse("a written file with data past its first MiB");

    // Forced, it becomes a pool.
    let pool = create_on(&t.path().join("p"), std::slice::from_ref(&file), true)
        .expect("create --force over data");
    pool.shutdown().unwrap();
    drop(pool);

    // An empty file, and a sparse file of zeroes, are taken without --force.
    for (i, len) in [0u64, 96 << 20].into_iter().enumerate() {
        let file = t.path().join(format!("zero{i}.img"));
        std::fs::File::create(&file).unwrap().set_len(len).unwrap();
        let pool = create_on(&t.path().join(format!("z{i}")), &[file], false)
            .unwrap_or_else(|e| panic!("create on a zero file of {len} bytes: {e}"));
        pool.shutdown().unwrap();
    }
}

#[test]
fn a_device_in_use_by_an_open_pool_is_refused_to_every_other_pool() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let data = made_pool(&a);
    let pool = Pool::open(&a, &opts()).unwrap();

    // Not even with --force.
    for force in [false, true] {
        let e = create_err(&t.path().join("b"), &[dev0(&a)], force);
        assert!(
            matches!(&e, Error::DeviceInUse { path } if *path == dev0(&a)),
            "force {force}: {e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert!(e.to_string().contains("in use"), "{e}");
    }
    // A second directory whose pool.json names the device (a copy of the first's).
    let c = t.path().join("c");
    std::fs::create_dir(&c).unwrap();
    std::fs::copy(a.join("pool.json"), c.join("pool.json")).unwrap();
    set_devices(&c, &[&dev0(&a)]);
    let e = open_err(&c);
    assert!(
        matches!(&e, Error::DeviceInUse { path } if *path == dev0(&a)),
        "{e:?}"
    );
    // Through a symlink too.
    let link = t.path().join("link.img");
    std::os::unix::fs::symlink(dev0(&a), &link).unwrap();
    set_devices(&c, &[&link]);
    assert!(matches!(open_err(&c), Error::DeviceInUse { .. }), "symlink");

    // The first pool is unharmed, and once it is closed the device is free again.
    assert_eq!(pool.volume("v").unwrap().read(0, 4096).unwrap(), data);
    pool.shutdown().unwrap();
    drop(pool);
    let other = Pool::open(&c, &opts()).expect("open once the first pool is closed");
    assert!(matches!(open_err(&a), Error::DeviceInUse { .. }));
    drop(other);
    assert_reads(&a, &data);
}

#[test]
fn a_device_listed_twice_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("p");
    let (x, y) = (t.path().join("x.img"), t.path().join("y.img"));
    let pool = create_on(&p, &[x.clone(), y.clone()], false).expect("two-device pool");
    pool.shutdown().unwrap();
    drop(pool);

    let sym = t.path().join("sym.img");
    std::os::unix::fs::symlink(&x, &sym).unwrap();
    let hard = t.path().join("hard.img");
    std::fs::hard_link(&x, &hard).unwrap();
    let dotted = t.path().join(".").join("x.img");
    for second in [&x, &sym, &hard, &dotted] {
        set_devices(&p, &[&x, second]);
        match open_err(&p) {
            Error::DuplicateDevice { path, first } => {
                assert_eq!(&path, second);
                assert_eq!(first, x);
            }
            e => panic!("{}: {e:?}", second.display()),
        }
    }
    set_devices(&p, &[&x, &y]);
    Pool::open(&p, &opts()).expect("the pool opens with its own devices");

    // At create: one existing file twice, and one new file under two spellings.
    let e = create_err(&t.path().join("q"), &[x.clone(), sym.clone()], true);
    assert!(matches!(e, Error::DuplicateDevice { .. }), "{e:?}");
    let n = t.path().join("new.img");
    let e = create_err(
        &t.path().join("r"),
        &[n.clone(), t.path().join(".").join("new.img")],
        false,
    );
    assert!(matches!(e, Error::DuplicateDevice { .. }), "{e:?}");
}

#[test]
fn a_device_of_another_pool_is_refused_at_open() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let data = made_pool(&a);
    made_pool(&b);
    let (ua, ub) = (uuid_of(&a), uuid_of(&b));

    // b's pool.json, one device: a's.
    set_devices(&b, &[&dev0(&a)]);
    match open_err(&b) {
        Error::ForeignDevice {
            path,
            found,
            expected,
        } => {
            assert_eq!(path, dev0(&a));
            assert_eq!(found, ua);
            assert_eq!(expected, ub);
        }
        e => panic!("{e:?}"),
    }
    assert!(open_err(&b).to_string().contains(&ua));
    assert_reads(&a, &data);

    // A two-device pool whose first device is swapped for a's: that device is named.
    let m = t.path().join("m");
    let (x, y) = (t.path().join("x.img"), t.path().join("y.img"));
    create_on(&m, &[x.clone(), y.clone()], false)
        .unwrap()
        .shutdown()
        .unwrap();
    set_devices(&m, &[&dev0(&a), &y]);
    assert!(
        matches!(open_err(&m), Error::ForeignDevice { path, .. } if path == dev0(&a)),
        "first device swapped"
    );
    set_devices(&m, &[&x, &dev0(&a)]);
    assert!(
        matches!(open_err(&m), Error::ForeignDevice { path, .. } if path == dev0(&a)),
        "second device swapped"
    );

    // A pool.json written before the UUID was recorded still opens its own devices.
    set_devices(&m, &[&x, &y]);
    let mut pf = pool_json(&m);
    pf.as_object_mut().unwrap().remove("pool_uuid");
    std::fs::write(m.join("pool.json"), serde_json::to_vec(&pf).unwrap()).unwrap();
    Pool::open(&m, &opts()).expect("open a pool.json without pool_uuid");
}
