//! A file system and a database on an ingot volume: nbdfuse exposes the export as a file, a
//! loop device (direct I/O) carries ext4, and PostgreSQL 15 runs pgbench on it. Both survive a
//! restart of the ingot server. Needs root (mount, losetup); missing tools fail the test.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ingot_tests::*;

/// Server options for a pool of `size` created up front (the default pool preallocates 16 GiB,
/// too much for several tests at once).
fn small_pool(dir: &Path, size: &str) -> ServeOpts {
    ingot_ok([
        "pool",
        "create",
        "--pool",
        &dir.join("pool").display().to_string(),
        "--size",
        size,
    ]);
    ServeOpts::new(&dir.join("pool"), &dir.join("nbd.sock"))
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn tool(name: &str, package: &str) -> PathBuf {
    let p = if name.starts_with('/') {
        PathBuf::from(name)
    } else {
        std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .chain(["/usr/sbin".into(), "/sbin".into()])
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
            .unwrap_or_default()
    };
    assert!(
        p.is_file(),
        "required tool `{name}` is not installed: install the Debian package `{package}` \
         (`apt-get install -y {package}`, or run ./test.sh as root)"
    );
    p
}

/// The export mounted as ext4: nbdfuse file, loop device and mount, torn down in reverse order
/// on drop (also when a test panics).
struct Mounted {
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
    loopdev: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Expose `uri` with nbdfuse under `fuse_dir`, attach a loop device, optionally mkfs, mount.
    fn up(uri: &str, fuse_dir: &Path, mnt: &Path, mkfs: bool) -> Mounted {
        fs::create_dir_all(fuse_dir).unwrap();
        fs::create_dir_all(mnt).unwrap();
        let child = Command::new(tool("nbdfuse", "libnbd-bin"))
            .arg(fuse_dir)
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdfuse");
        let mut m = Mounted {
            fuse_dir: fuse_dir.to_path_buf(),
            nbdfuse: Some(child),
            loopdev: None,
            mnt: mnt.to_path_buf(),
            mounted: false,
        };
        let file = fuse_dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not expose {}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let dev = run_stdout(
            Command::new(tool("losetup", "util-linux"))
                .args(["-f", "--show", "--direct-io=on"])
                .arg(&file),
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        m.loopdev = Some(dev.clone());
        if mkfs {
            run(Command::new(tool("mkfs.ext4", "e2fsprogs")).args(["-q", "-F", &dev]));
        } else {
            // The file system must be clean after the restart, before anything touches it.
            run(Command::new(tool("fsck.ext4", "e2fsprogs")).args(["-n", "-f", &dev]));
        }
        run(Command::new(tool("mount", "mount")).arg(&dev).arg(mnt));
        m.mounted = true;
        m
    }

    fn down(mut self) {
        self.teardown(true);
    }

    fn teardown(&mut self, strict: bool) {
        if self.mounted {
            self.mounted = false;
            let out = output(Command::new("umount").arg(&self.mnt));
            if !out.status.success() {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
                assert!(
                    !strict,
                    "umount failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        if let Some(dev) = self.loopdev.take() {
            let ok = Command::new("losetup")
                .args(["-d", &dev])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok || !strict, "losetup -d {dev} failed");
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.fuse_dir)
                .status();
            if wait_timeout(&mut c, Duration::from_secs(20)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
                assert!(!strict, "nbdfuse did not exit after fusermount3 -u");
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.teardown(false);
    }
}

/// Write a tree of files (sizes from 0 to 3 MiB, some sparse-looking) and return their hashes.
fn write_tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut rng = Prng::new(42);
    let mut hashes = BTreeMap::new();
    for d in 0..6 {
        let dir = root.join(format!("dir{d}")).join(format!("sub{}", d % 3));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..12 {
            let p = dir.join(format!("file{f}.bin"));
            let len = match rng.below(4) {
                0 => rng.below(5000),
                1 => 4096 * rng.below(64),
                _ => rng.below(3 << 20),
            };
            write_mixed_file(&p, len, rng.next_u64());
            hashes.insert(p.strip_prefix(root).unwrap().to_path_buf(), sha256_file(&p));
        }
    }
    run(&mut Command::new("sync"));
    hashes
}

fn hash_tree(root: &Path, names: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
    names
        .keys()
        .map(|k| (k.clone(), sha256_file(&root.join(k))))
        .collect()
}

/// Run a shell command line as the postgres user.
fn as_postgres(cmdline: &str) -> String {
    run_stdout(Command::new("su").args(["postgres", "-s", "/bin/sh", "-c", cmdline]))
}

fn chown_postgres(p: &Path) {
    run(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p));
}

fn pg_count(sock: &Path, table: &str) -> u64 {
    let out = as_postgres(&format!(
        "{PG_BIN}/psql -h {} -d postgres -Atc 'select count(*) from {table}'",
        sock.display()
    ));
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("count of {table}: {out:?}"))
}

/// A PostgreSQL instance, stopped (fast) on drop if still running.
struct Pg {
    data: PathBuf,
    running: bool,
}

impl Pg {
    fn start(data: &Path, sock: &Path) -> Pg {
        let log = sock.join("log");
        let out = Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c"])
            .arg(format!(
                "{PG_BIN}/pg_ctl -D {} -l {} -w -t 120 -o \"-c listen_addresses='' -k {}\" start",
                data.display(),
                log.display(),
                sock.display()
            ))
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start failed ({}): {}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&log).unwrap_or_default()
        );
        Pg {
            data: data.to_path_buf(),
            running: true,
        }
    }

    fn stop(mut self) {
        self.running = false;
        as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {} -w -t 120 -m fast stop",
            self.data.display()
        ));
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new("su")
                .args(["postgres", "-s", "/bin/sh", "-c"])
                .arg(format!(
                    "{PG_BIN}/pg_ctl -D {} -w -t 60 -m immediate stop",
                    self.data.display()
                ))
                .status();
        }
    }
}

fn require_root() {
    let uid = run_stdout(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "tests/tests/nbd_fs.rs needs root (mount, losetup): run ./test.sh as root"
    );
}

#[test]
fn ext4_and_postgres_on_a_volume_survive_server_restarts() {
    require_root();
    for (t, p) in [
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("fsck.ext4", "e2fsprogs"),
        ("pgbench", "postgresql-contrib"),
    ] {
        tool(t, p);
    }
    for b in ["initdb", "pg_ctl", "postgres", "psql"] {
        tool(&format!("{PG_BIN}/{b}"), "postgresql");
    }
    let pgbench = tool("pgbench", "postgresql-client");

    let dir = TempDir::new("nbdfs");
    // postgres must be able to reach its directories under the temp dir.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let opts = small_pool(dir.path(), "5G");
    let srv = Server::start(opts.clone());
    create_volume(srv.pool(), "fs", "3G");
    let uri = srv.unix_uri("fs");
    let (fuse_dir, mnt) = (dir.join("fuse"), dir.join("mnt"));

    // 1. ext4: a tree of files, unmount, restart the server, fsck and compare.
    let m = Mounted::up(&uri, &fuse_dir, &mnt, true);
    let tree = mnt.join("tree");
    let hashes = write_tree(&tree);
    m.down();
    srv.stop();
    let srv = Server::start(opts.clone());
    let m = Mounted::up(&uri, &fuse_dir, &mnt, false);
    assert_eq!(
        hash_tree(&tree, &hashes),
        hashes,
        "files changed across a restart"
    );

    // 2. PostgreSQL 15 on the mount.
    let data = mnt.join("pg");
    let sock = dir.join("pgsock");
    fs::create_dir_all(&data).unwrap();
    fs::create_dir_all(&sock).unwrap();
    chown_postgres(&data);
    chown_postgres(&sock);
    as_postgres(&format!(
        "{PG_BIN}/initdb -D {} -A trust -U postgres >/dev/null",
        data.display()
    ));
    let pg = Pg::start(&data, &sock);
    let h = sock.display();
    as_postgres(&format!(
        "{} -i -s 10 -q -h {h} postgres 2>&1",
        pgbench.display()
    ));
    let out = as_postgres(&format!(
        "{} -c 4 -j 2 -T 15 -h {h} postgres 2>&1",
        pgbench.display()
    ));
    let failed = out
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .unwrap_or_else(|| panic!("pgbench printed no failure count:\n{out}"));
    assert!(
        failed.contains(": 0 "),
        "pgbench had failures: {failed}\n{out}"
    );
    let processed = out
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .unwrap_or_else(|| panic!("pgbench printed no transaction count:\n{out}"));
    let accounts = pg_count(&sock, "pgbench_accounts");
    let history = pg_count(&sock, "pgbench_history");
    assert_eq!(accounts, 1_000_000);
    assert!(
        history > 0,
        "no pgbench transactions recorded ({processed})"
    );
    pg.stop();
    m.down();
    srv.stop();

    // 3. Restart everything; the database comes back with the same rows.
    let srv = Server::start(opts);
    let m = Mounted::up(&uri, &fuse_dir, &mnt, false);
    let pg = Pg::start(&data, &sock);
    assert_eq!(pg_count(&sock, "pgbench_accounts"), accounts);
    assert_eq!(pg_count(&sock, "pgbench_history"), history);
    pg.stop();
    assert_eq!(hash_tree(&tree, &hashes), hashes);
    m.down();
    srv.stop();
}
