//! One device, one pool on a block device (a loop device over a sparse file): a served pool's
//! device is claimed (O_EXCL) against every other pool, also through another device node for
//! the same disk, and `pool create` does not overwrite it without --force. Needs root (losetup,
//! mknod).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ingot_tests::*;

/// A loop device, detached on drop.
struct Loop(String);

impl Loop {
    fn over(file: &Path) -> Loop {
        let dev = run_stdout(
            Command::new(require_tool("losetup"))
                .args(["-f", "--show"])
                .arg(file),
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop(dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn require_root() {
    let uid = run_stdout(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "tests/tests/block_device.rs needs root (losetup, mknod): run ./test.sh as root"
    );
}

fn ingot_pool(pool: &Path, args: &[&str]) -> Output {
    output(ingot().args(args).arg("--pool").arg(pool))
}

/// Fails, and says why on stderr, naming each of `words`.
fn refused(out: &Output, what: &str, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} should fail but exited 0");
    for w in words {
        assert!(stderr.contains(w), "{what}: no {w:?} in: {stderr}");
    }
}

/// `dir/pool.json` listing `devices` (format 1).
fn pool_json(dir: &Path, devices: &[&str]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let v = serde_json::json!({ "format_version": 1, "devices": devices });
    std::fs::write(dir.join("pool.json"), v.to_string()).expect("write pool.json");
}

#[test]
fn a_block_device_belongs_to_one_pool() {
    require_root();
    let dir = TempDir::new("blockdev");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(256 * MIB))
        .expect("sparse backing file");
    let lo = Loop::over(&img);
    let dev = lo.0.as_str();
    // A second device node for the same disk: another inode, one block device.
    let rdev = std::fs::metadata(dev).expect("stat loop device").rdev();
    let (major, minor) = (
        ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff),
        (rdev & 0xff) | ((rdev >> 12) & !0xff),
    );
    let node: PathBuf = dir.join("node");
    run(Command::new("mknod")
        .arg(&node)
        .args(["b", &major.to_string(), &minor.to_string()]));
    let node_s = node.to_str().expect("utf-8 path");

    let a = dir.join("a");
    run(ingot()
        .args([
            "pool",
            "create",
            "--size",
            "200M",
            "--segment-size",
            "2M",
            "--device",
            dev,
        ])
        .arg("--pool")
        .arg(&a));
    create_volume(&a, "vol0", "64M");

    // The same disk twice in one pool.json.
    let d = dir.join("dup");
    pool_json(&d, &[dev, node_s]);
    refused(
        &ingot_pool(&d, &["volume", "list", "--json"]),
        "a pool.json listing one disk under two nodes",
        &[node_s, "listed twice"],
    );

    let srv = Server::start(ServeOpts::new(&a, &dir.join("a.sock")));
    let b = dir.join("b");
    for target in [dev, node_s] {
        refused(
            &ingot_pool(
                &b,
                &[
                    "pool", "create", "--size", "200M", "--device", target, "--force",
                ],
            ),
            "pool create --force on a served block device",
            &[target, "in use"],
        );
        let c = dir.join("c");
        pool_json(&c, &[target]);
        refused(
            &ingot_pool(&c, &["volume", "list", "--json"]),
            "opening a pool.json naming a served block device",
            &[target, "in use"],
        );
    }
    assert_eq!(nbd_export_size(&srv.unix_uri("vol0")), 64 * MIB);
    srv.stop();

    refused(
        &ingot_pool(&b, &["pool", "create", "--size", "200M", "--device", dev]),
        "pool create on a block device holding a pool",
        &[dev, "holds ingot pool", "--force"],
    );
    assert_eq!(
        volumes(&a).len(),
        1,
        "the pool on the block device is intact"
    );
    run(ingot()
        .args([
            "pool", "create", "--size", "200M", "--device", dev, "--force",
        ])
        .arg("--pool")
        .arg(&b));
    drop(lo);
}
