//! The `ingot` command line: pools, volumes and stats with and without a running server (then
//! through its control socket), refusals (second server, foreign pool files, wrong arguments).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use ingot_tests::*;
use serde_json::Value;

fn pool_arg(pool: &Path) -> [&std::ffi::OsStr; 2] {
    ["--pool".as_ref(), pool.as_os_str()]
}

/// Run `ingot ARGS --pool POOL`.
fn ingot_pool(pool: &Path, args: &[&str]) -> Output {
    output(ingot().args(args).args(pool_arg(pool)))
}

fn ingot_pool_ok(pool: &Path, args: &[&str]) -> String {
    run_stdout(ingot().args(args).args(pool_arg(pool)))
}

fn assert_fails(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} should fail but exited 0\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !stderr.trim().is_empty(),
        "{what} failed ({}) without saying why on stderr",
        out.status
    );
    stderr
}

fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` missing or not an unsigned integer in {v}"))
}

fn sizes(pool: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = volumes(pool)
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("volume name").to_string(),
                u64_of(v, "size_bytes"),
            )
        })
        .collect();
    v.sort();
    v
}

/// Fields of `stats --json` and the relations between them that must always hold.
fn check_stats(s: &Value) {
    for f in [
        "capacity_bytes",
        "physical_used_bytes",
        "logical_mapped_bytes",
        "stored_bytes",
        "segments_total",
        "segments_free",
    ] {
        u64_of(s, f);
    }
    let vols = s["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("stats --json: `volumes` is not an array: {s}"));
    let mut mapped_sum = 0;
    for v in vols {
        assert!(v["name"].is_string(), "volume without a name in {s}");
        let size = u64_of(v, "size_bytes");
        let mapped = u64_of(v, "mapped_bytes");
        assert!(mapped <= size, "volume maps more than its size: {v}");
        mapped_sum += mapped;
    }
    assert_eq!(
        u64_of(s, "logical_mapped_bytes"),
        mapped_sum,
        "logical_mapped_bytes is not the sum of the volumes' mapped_bytes: {s}"
    );
    assert!(u64_of(s, "capacity_bytes") > 0, "zero capacity: {s}");
    assert!(
        u64_of(s, "physical_used_bytes") <= u64_of(s, "capacity_bytes"),
        "more used than capacity: {s}"
    );
    assert!(
        u64_of(s, "stored_bytes") <= u64_of(s, "physical_used_bytes"),
        "more stored than used: {s}"
    );
    assert!(
        u64_of(s, "segments_free") <= u64_of(s, "segments_total"),
        "more free segments than segments: {s}"
    );
    assert!(u64_of(s, "segments_total") > 0, "no segments: {s}");
}

#[test]
fn pool_and_volumes_without_server() {
    let dir = TempDir::new("cli-offline");
    let pool = dir.join("pool");
    let out = ingot_pool_ok(
        &pool,
        &["pool", "create", "--size", "2G", "--segment-size", "4M"],
    );
    assert!(
        pool.join("dev0.img").exists(),
        "pool create made no dev0.img: {out}"
    );
    let s = stats(&pool);
    check_stats(&s);
    let cap = u64_of(&s, "capacity_bytes");
    assert!(
        (2 * GIB - 64 * MIB..=2 * GIB).contains(&cap),
        "a 2G pool has capacity {cap}"
    );
    assert_eq!(
        u64_of(&s, "segments_total") * 4 * MIB,
        cap,
        "segments_total x 4M segments != capacity: {s}"
    );
    assert_eq!(u64_of(&s, "logical_mapped_bytes"), 0, "new pool maps data");
    let before = sizes(&pool);

    // Creating a pool over an existing one must fail and leave it intact.
    let out = ingot_pool(&pool, &["pool", "create", "--size", "1G"]);
    assert_fails(&out, "pool create on an existing pool");

    ingot_pool_ok(&pool, &["volume", "create", "a", "--size", "1G"]);
    ingot_pool_ok(&pool, &["volume", "create", "b", "--size", "4096K"]);
    let mut want = before.clone();
    want.push(("a".into(), GIB));
    want.push(("b".into(), 4 * MIB));
    want.sort();
    assert_eq!(sizes(&pool), want);
    let v = volume(&pool, "a").expect("a listed");
    assert_eq!(u64_of(&v, "mapped_bytes"), 0, "new volume maps data: {v}");

    // Duplicates and unknown names are refused.
    assert_fails(
        &ingot_pool(&pool, &["volume", "create", "a", "--size", "1M"]),
        "volume create of an existing name",
    );
    assert_fails(
        &ingot_pool(&pool, &["volume", "delete", "nosuch"]),
        "volume delete of an unknown volume",
    );
    assert_fails(
        &ingot_pool(&pool, &["volume", "resize", "nosuch", "--size", "1G"]),
        "volume resize of an unknown volume",
    );

    ingot_pool_ok(&pool, &["volume", "resize", "a", "--size", "1536M"]);
    ingot_pool_ok(&pool, &["volume", "delete", "b"]);
    let mut want = before.clone();
    want.push(("a".into(), 1536 * MIB));
    want.sort();
    assert_eq!(sizes(&pool), want);

    // The human-readable list names the volume too.
    let text = ingot_pool_ok(&pool, &["volume", "list"]);
    assert!(text.contains('a'), "volume list does not show a: {text}");

    // The state survives a server start and is what the server exports.
    let srv = Server::start(ServeOpts::new(&pool, &dir.join("nbd.sock")));
    assert_eq!(nbd_export_size(&srv.unix_uri("a")), 1536 * MIB);
    srv.stop();
    let out = ingot_pool(&pool, &["check"]);
    assert!(
        out.status.success(),
        "ingot check failed on a fresh pool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn volumes_through_running_server() {
    let dir = TempDir::new("cli-online");
    let srv = Server::start_in(dir.path());
    let pool = srv.pool().to_path_buf();
    assert!(
        pool.join("control.sock").exists(),
        "running server has no control socket at {}",
        pool.join("control.sock").display()
    );
    assert_eq!(sizes(&pool), vec![("vol0".to_string(), 8 * GIB)]);

    ingot_pool_ok(&pool, &["volume", "create", "db", "--size", "3G"]);
    assert_eq!(nbd_export_size(&srv.unix_uri("db")), 3 * GIB);
    ingot_pool_ok(&pool, &["volume", "resize", "db", "--size", "5G"]);
    assert_eq!(nbd_export_size(&srv.tcp_uri("db")), 5 * GIB);
    ingot_pool_ok(&pool, &["volume", "create", "tmp", "--size", "1M"]);
    assert_eq!(
        sizes(&pool),
        vec![
            ("db".to_string(), 5 * GIB),
            ("tmp".to_string(), MIB),
            ("vol0".to_string(), 8 * GIB)
        ]
    );
    ingot_pool_ok(&pool, &["volume", "delete", "tmp"]);
    // A deleted volume is no longer exported.
    let out = output(
        Command::new(require_tool("nbdinfo"))
            .arg("--json")
            .arg(srv.unix_uri("tmp")),
    );
    assert!(
        !out.status.success(),
        "nbdinfo still sees deleted volume tmp"
    );
    assert_fails(
        &ingot_pool(&pool, &["volume", "create", "db", "--size", "1M"]),
        "volume create of an existing name through the server",
    );
    check_stats(&stats(&pool));
    let out = ingot_pool(&pool, &["check"]);
    assert!(
        out.status.success(),
        "ingot check through the server failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    srv.stop();
    assert!(
        !pool.join("control.sock").exists(),
        "control socket left behind after a clean stop"
    );
    // The changes were made durable by the server.
    assert_eq!(
        sizes(&pool),
        vec![("db".to_string(), 5 * GIB), ("vol0".to_string(), 8 * GIB)]
    );
}

fn mapped(pool: &Path, vol: &str) -> (u64, u64) {
    let s = stats(pool);
    check_stats(&s);
    let v = s["volumes"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == vol).cloned())
        .unwrap_or_else(|| panic!("stats --json lists no volume {vol}: {s}"));
    (
        u64_of(&s, "logical_mapped_bytes"),
        u64_of(&v, "mapped_bytes"),
    )
}

#[test]
fn stats_follow_writes_and_trims() {
    let qemu_io = require_tool("qemu-io");
    let nbdsh = require_tool("nbdsh");
    require_python_nbd();
    let dir = TempDir::new("cli-stats");
    let srv = Server::start_in(dir.path());
    let pool = srv.pool().to_path_buf();
    let s = stats(&pool);
    check_stats(&s);
    let cap = u64_of(&s, "capacity_bytes");
    assert!(
        (15 * GIB..=16 * GIB).contains(&cap),
        "the default pool has capacity {cap}, expected 16 GiB"
    );
    assert_eq!(mapped(&pool, "vol0"), (0, 0));

    let uri = srv.unix_uri("vol0");
    run(Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "write -P 0x5a 0 32M", "-c", "flush"])
        .arg(&uri));
    assert_eq!(mapped(&pool, "vol0"), (32 * MIB, 32 * MIB));
    let s = stats(&pool);
    assert!(
        u64_of(&s, "physical_used_bytes") > 0 && u64_of(&s, "stored_bytes") > 0,
        "32 MiB written but nothing stored: {s}"
    );

    // Trim 16 MiB in the middle with qemu-io.
    run(Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "discard 8M 16M", "-c", "flush"])
        .arg(&uri));
    assert_eq!(mapped(&pool, "vol0"), (16 * MIB, 16 * MIB));
    // And 4 MiB more with nbdsh (libnbd), over TCP.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new(&nbdsh)
        .env("PATH", path)
        .args(["-u", &srv.tcp_uri("vol0")])
        .args(["-c", "h.trim(4 * 1024 * 1024, 0); h.flush()"]));
    assert_eq!(mapped(&pool, "vol0"), (12 * MIB, 12 * MIB));
    // The trimmed ranges read as zeroes, the rest as written.
    run(Command::new(&qemu_io)
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0 0 4M",
            "-c",
            "read -P 0x5a 4M 4M",
            "-c",
            "read -P 0 8M 16M",
            "-c",
            "read -P 0x5a 24M 8M",
        ])
        .arg(&uri));

    // Stats survive a restart (read offline from the pool).
    srv.stop();
    assert_eq!(mapped(&pool, "vol0"), (12 * MIB, 12 * MIB));
}

#[test]
fn second_server_on_same_pool_is_refused() {
    let dir = TempDir::new("cli-second");
    let srv = Server::start_in(dir.path());
    let out = output_timeout(
        ingot()
            .arg("serve")
            .arg("--pool")
            .arg(srv.pool())
            .arg("--nbd")
            .arg(format!("unix:{}", dir.join("second.sock").display())),
        Duration::from_secs(30),
    );
    let stderr = assert_fails(&out, "a second ingot serve on the same pool");
    let lower = stderr.to_lowercase();
    assert!(
        ["in use", "lock", "already", "running", "another", "busy"]
            .iter()
            .any(|w| lower.contains(w)),
        "the refusal does not say the pool is in use: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(SERVING),
        "the second server claimed to serve"
    );
    // The first one is unharmed.
    assert_eq!(nbd_export_size(&srv.unix_uri("vol0")), 8 * GIB);
    check_stats(&stats(srv.pool()));
    srv.stop();
}

#[test]
fn wrong_arguments_exit_2() {
    let dir = TempDir::new("cli-args");
    let pool = dir.join("pool");
    let p = pool.to_str().expect("utf-8 path");
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["volume"],
        &["volume", "frobnicate", "--pool", p],
        &["volume", "create", "--pool", p],
        &["volume", "create", "x", "--pool", p],
        &["volume", "create", "x", "--size", "12Q", "--pool", p],
        &["volume", "create", "x", "--size", "lots", "--pool", p],
        &["volume", "resize", "x", "--pool", p],
        &["volume", "list", "--bogus"],
        &["pool", "create", "--pool", p],
        &[
            "pool",
            "create",
            "--pool",
            p,
            "--size",
            "1G",
            "--segment-size",
            "x",
        ],
        &["serve", "--io", "bogus", "--pool", p],
        &["serve", "--cache-size", "many", "--pool", p],
        &["stats", "--pool"],
        &["check", "extra", "--pool", p],
        &[
            "volume",
            "create",
            "x",
            "--size",
            "1M",
            "--dedup-domain",
            "a/b",
            "--pool",
            p,
        ],
        &[
            "volume",
            "create",
            "x",
            "--size",
            "1M",
            "--dedup-domain",
            "",
            "--pool",
            p,
        ],
        &[
            "volume",
            "set",
            "x",
            "--dedup-domain",
            ".hidden",
            "--pool",
            p,
        ],
        &["volume", "set", "x", "--dedup-domain", "--pool", p],
    ];
    for args in cases {
        let out = output_timeout(ingot().args(*args), Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "`ingot {}` should exit 2 (usage error), got {}\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            !stderr.trim().is_empty(),
            "`ingot {}` exited 2 without a message",
            args.join(" ")
        );
        // The complaint goes to stderr alone: a pipe reading stdout gets nothing.
        assert!(
            out.stdout.is_empty(),
            "`ingot {}` wrote to stdout on a usage error:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        !pool.exists(),
        "a rejected command line created the pool directory"
    );
    // --help is not an error.
    let out = run_stdout(ingot().arg("--help"));
    for sub in ["pool", "serve", "volume", "stats", "check"] {
        assert!(
            out.contains(sub),
            "ingot --help does not mention {sub}: {out}"
        );
    }
}

/// `ingot PATH --help`, cached: the examples of one command often name another.
fn help_of(cache: &mut HashMap<Vec<String>, String>, path: &[String]) -> String {
    cache
        .entry(path.to_vec())
        .or_insert_with(|| run_stdout(ingot().args(path).arg("--help")))
        .clone()
}

/// The lines of a `--help` section (`Commands:`, `Examples:`): from the line after its title to
/// the first blank or unindented line.
fn help_section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| l.trim_end() != title)
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .collect()
}

/// The subcommands a `--help` lists (clap's own `help` left out).
fn subcommands(help: &str) -> Vec<String> {
    help_section(help, "Commands:")
        .into_iter()
        // Entries are indented two spaces; a wrapped description, more.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Whether `help` documents the long option `flag` (`--name`).
fn documents_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let before = help[..i].chars().next_back();
        let after = help[i + flag.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '-')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '_')
    })
}

/// One example line (`ingot volume create pgdata --size 100G ... # comment | jq ...`): its command
/// path leads through existing groups to a command, and that command has every `--flag` it uses.
fn check_example(cache: &mut HashMap<Vec<String>, String>, line: &str, shown_by: &str) {
    let command = line.split(" #").next().unwrap_or(line);
    let words: Vec<&str> = command
        .split_whitespace()
        .take_while(|w| !["|", "||", "&&", ";", ">", ">>", "<"].contains(w))
        .collect();
    assert_eq!(
        words.first(),
        Some(&"ingot"),
        "{shown_by}: example does not start with `ingot`: {line:?}"
    );
    let mut path: Vec<String> = Vec::new();
    let mut flags = Vec::new();
    let mut at_command = false;
    for w in &words[1..] {
        if w.starts_with('-') {
            flags.push(w.split('=').next().unwrap_or(w).to_string());
            continue;
        }
        if at_command {
            continue; // an argument or an option's value
        }
        let subs = subcommands(&help_of(cache, &path));
        if subs.is_empty() {
            at_command = true;
        } else {
            assert!(
                subs.iter().any(|s| s == w),
                "{shown_by}: example {line:?}: `ingot {}` has no subcommand {w:?} (it has {subs:?})",
                path.join(" ")
            );
            path.push(w.to_string());
        }
    }
    let help = help_of(cache, &path);
    let asks_help = flags
        .iter()
        .any(|f| ["--help", "-h", "--version", "-V"].contains(&f.as_str()));
    assert!(
        asks_help || subcommands(&help).is_empty(),
        "{shown_by}: example {line:?} stops at the group `ingot {}`",
        path.join(" ")
    );
    for f in flags.iter().filter(|f| f.starts_with("--")) {
        assert!(
            documents_flag(&help, f),
            "{shown_by}: example {line:?} uses {f}, which `ingot {} --help` does not list:\n{help}",
            path.join(" ")
        );
    }
}

/// Every command and command group shows an `Examples:` section in its `--help`, each example
/// names a command that exists, and that command has every option the example gives.
#[test]
fn every_command_has_help_with_examples() {
    let mut cache = HashMap::new();
    let mut todo: Vec<Vec<String>> = vec![Vec::new()];
    let mut walked = Vec::new();
    while let Some(path) = todo.pop() {
        let help = help_of(&mut cache, &path);
        let shown_by = format!("`ingot {} --help`", path.join(" "));
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        let examples = help_section(&help, "Examples:");
        assert!(
            !examples.is_empty(),
            "{shown_by} has no `Examples:` section:\n{help}"
        );
        assert!(
            examples.len() <= 3,
            "{shown_by}: more than three examples:\n{help}"
        );
        for line in examples {
            check_example(&mut cache, line.trim(), &shown_by);
        }
        walked.push(path.join(" "));
    }
    // The walk itself found the tree: a broken `Commands:` parse would stop at the top.
    for must in [
        "",
        "pool create",
        "serve",
        "volume set",
        "volume import",
        "config check",
        "man",
    ] {
        assert!(
            walked.iter().any(|w| w == must),
            "the walk missed `ingot {must}`: {walked:?}"
        );
    }
}

#[test]
fn foreign_files_are_refused() {
    let dir = TempDir::new("cli-foreign");
    let pool = dir.join("pool");
    ingot_pool_ok(&pool, &["pool", "create", "--size", "1G"]);
    ingot_pool_ok(&pool, &["volume", "create", "v", "--size", "64M"]);
    // Replace the device with 8 MiB of random bytes.
    let mut junk = vec![0u8; (8 * MIB) as usize];
    Prng::new(99).fill(&mut junk);
    std::fs::write(pool.join("dev0.img"), &junk).expect("overwrite dev0.img");

    let sock = dir.join("nbd.sock");
    let out = output_timeout(
        ingot()
            .arg("serve")
            .args(pool_arg(&pool))
            .arg("--nbd")
            .arg(format!("unix:{}", sock.display())),
        Duration::from_secs(30),
    );
    assert_fails(&out, "ingot serve on a pool whose dev0.img is random bytes");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(SERVING),
        "served a foreign file"
    );
    assert_fails(
        &ingot_pool(&pool, &["volume", "list", "--json"]),
        "volume list on a foreign dev0.img",
    );
    assert_fails(
        &ingot_pool(&pool, &["stats", "--json"]),
        "stats on a foreign dev0.img",
    );
    assert_fails(
        &ingot_pool(&pool, &["check"]),
        "check on a foreign dev0.img",
    );
    assert_eq!(
        read_file(&pool.join("dev0.img")),
        junk,
        "a refused command modified the foreign dev0.img"
    );

    // A non-empty directory that is not a pool is not turned into one.
    let other = dir.join("notapool");
    std::fs::create_dir(&other).expect("mkdir notapool");
    std::fs::write(other.join("important.txt"), b"keep me\n").expect("write file");
    let out = output_timeout(
        ingot()
            .arg("serve")
            .args(pool_arg(&other))
            .arg("--nbd")
            .arg(format!("unix:{}", dir.join("other.sock").display())),
        Duration::from_secs(30),
    );
    assert_fails(&out, "ingot serve on a non-empty directory that is no pool");
    let names: Vec<_> = std::fs::read_dir(&other)
        .expect("read notapool")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("important.txt")],
        "ingot wrote into a directory that is no pool"
    );
}

#[test]
fn resize_shrink_drops_data_and_sigint_stops_cleanly() {
    let qemu_io = require_tool("qemu-io");
    let dir = TempDir::new("cli-resize");
    let srv = Server::start_in(dir.path());
    let pool = srv.pool().to_path_buf();
    ingot_pool_ok(&pool, &["volume", "create", "r", "--size", "16M"]);
    let uri = srv.unix_uri("r");
    run(Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "write -P 0x11 0 16M", "-c", "flush"])
        .arg(&uri));
    assert_eq!(mapped(&pool, "r").1, 16 * MIB);
    // Shrinking drops the blocks past the new end...
    ingot_pool_ok(&pool, &["volume", "resize", "r", "--size", "4M"]);
    assert_eq!(nbd_export_size(&uri), 4 * MIB);
    assert_eq!(mapped(&pool, "r").1, 4 * MIB);
    // ...so growing again shows zeroes there, and the kept part is intact.
    ingot_pool_ok(&pool, &["volume", "resize", "r", "--size", "12M"]);
    assert_eq!(nbd_export_size(&uri), 12 * MIB);
    run(Command::new(&qemu_io)
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 4M",
            "-c",
            "read -P 0 4M 8M",
        ])
        .arg(&uri));
    let out = ingot_pool(&pool, &["check"]);
    assert!(
        out.status.success(),
        "ingot check after resizes: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGINT is a clean stop too.
    let opts = srv.opts.clone();
    let (status, stderr) = srv.signal_and_wait("INT");
    assert!(
        status.success(),
        "ingot serve exited with {status} after SIGINT (expected 0)\n{stderr}"
    );
    let srv = Server::start(opts);
    assert_eq!(nbd_export_size(&srv.unix_uri("r")), 12 * MIB);
    run(Command::new(&qemu_io)
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 4M",
            "-c",
            "read -P 0 4M 8M",
        ])
        .arg(srv.unix_uri("r")));
    srv.stop();
}

#[test]
fn full_pool_refuses_writes_but_reopens() {
    let qemu_img = require_tool("qemu-img");
    let qemu_io = require_tool("qemu-io");
    let dir = TempDir::new("cli-full");
    let pool = dir.join("pool");
    ingot_pool_ok(
        &pool,
        &["pool", "create", "--size", "32M", "--segment-size", "2M"],
    );
    ingot_pool_ok(&pool, &["volume", "create", "v", "--size", "64M"]);
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    opts.tcp_port = None;
    let srv = Server::start(opts.clone());
    // 8 MiB that fit, flushed...
    run(Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "write -P 0x33 0 8M", "-c", "flush"])
        .arg(srv.unix_uri("v")));
    // ...then 64 MiB of random data into 32 MiB of space: the writes must fail with ENOSPC.
    let src = dir.join("random.raw");
    let mut data = vec![0u8; (64 * MIB) as usize];
    Prng::new(5).fill(&mut data);
    data[..(8 * MIB) as usize].fill(0x33);
    std::fs::write(&src, &data).expect("write random.raw");
    let out = output(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(srv.unix_uri("v")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("No space left on device"),
        "writing 64 MiB into a 32 MiB pool should fail with ENOSPC: {} {stderr}",
        out.status
    );
    // The server is still up and the flushed data reads back.
    run(Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "read -P 0x33 0 8M"])
        .arg(srv.unix_uri("v")));
    let (status, stderr) = srv.terminate();
    eprintln!("stop of a full pool: {status}\n{stderr}");
    // A full pool must still open: to read its data, to trim, to check it.
    let out = ingot_pool(&pool, &["volume", "list", "--json"]);
    assert!(
        out.status.success(),
        "a full pool cannot be opened any more (volume list): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let srv = Server::start(opts);
    run(Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "read -P 0x33 0 8M"])
        .arg(srv.unix_uri("v")));
    srv.stop();
    let out = ingot_pool(&pool, &["check"]);
    assert!(
        out.status.success(),
        "ingot check on a full pool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_metrics_from_the_cli_and_the_server() {
    let dir = TempDir::new("cli-metrics");
    let pool = dir.join("pool");
    let port = free_port();
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    opts.extra_args
        .extend(["--metrics".to_string(), format!("127.0.0.1:{port}")]);
    let srv = Server::start(opts);
    // Through the running server's control socket.
    let text = ingot_ok(["stats", "--prometheus", "--pool", pool.to_str().unwrap()]);
    for name in [
        "ingot_capacity_bytes ",
        "ingot_physical_used_bytes ",
        "ingot_logical_mapped_bytes 0",
        "ingot_volume_size_bytes{volume=\"vol0\"} 8589934592",
        "ingot_request_seconds_count{op=\"read\"} ",
        "ingot_device_seconds_sum{op=\"flush\"} ",
        "# TYPE ingot_queued_seconds summary",
        "ingot_io_registered_bytes ",
    ] {
        assert!(text.contains(name), "{name:?} missing from:\n{text}");
    }
    // The HTTP endpoint, read with a plain socket.
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("ingot_segments_free "), "{body}");
    srv.stop();
}

fn f64_of(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("`{field}` missing or not a number in {v}"))
}

fn volume_stats(s: &Value, vol: &str) -> Value {
    s["volumes"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == vol).cloned())
        .unwrap_or_else(|| panic!("stats --json lists no volume {vol}: {s}"))
}

#[test]
fn data_reduction_policy_and_stats() {
    let qemu_io = require_tool("qemu-io");
    let dir = TempDir::new("cli-reduction");
    let srv = Server::start_in(dir.path());
    let pool = srv.pool().to_path_buf();
    ingot_pool_ok(
        &pool,
        &[
            "volume",
            "create",
            "raw",
            "--size",
            "64M",
            "--dedup",
            "off",
            "--compression",
            "off",
        ],
    );
    // 8 MiB of one repeated block into each volume (qemu-io's pattern fill).
    for vol in ["vol0", "raw"] {
        run(Command::new(&qemu_io)
            .args(["-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "flush"])
            .arg(srv.unix_uri(vol)));
    }
    let s = stats(&pool);
    check_stats(&s);
    for f in ["dedup_ratio", "compression_ratio", "data_reduction_ratio"] {
        assert!(f64_of(&s, f) >= 1.0, "{f} below 1: {s}");
    }
    u64_of(&s, "unique_blocks");
    u64_of(&s, "dedup_index_bytes");
    // The engine's own count of its metadata RAM: some, and less than the whole process.
    let meta = u64_of(&s, "metadata_ram_bytes");
    let rss = u64_of(&s, "process_rss_bytes");
    assert!(meta > 0 && meta < rss, "metadata {meta}, rss {rss}: {s}");
    assert!(f64_of(&s, "ram_bytes_per_stored_block") > 0.0, "{s}");
    // The raw volume's 1 MiB records went out from buffers the server's rings registered.
    assert!(
        u64_of(&s, "io_registered_bytes") >= 2 << 20,
        "no registered write buffers (io_uring refused them?): {s}"
    );
    let on = volume_stats(&s, "vol0");
    let raw = volume_stats(&s, "raw");
    assert_eq!(u64_of(&on, "mapped_bytes"), 8 * MIB);
    assert!(
        u64_of(&on, "stored_bytes") <= 4096,
        "2048 equal blocks stored as more than one: {on}"
    );
    assert!(f64_of(&on, "data_reduction_ratio") >= 2048.0, "{on}");
    assert_eq!(on["dedup"], true);
    assert_eq!(
        u64_of(&raw, "stored_bytes"),
        8 * MIB,
        "policy off must store every block raw: {raw}"
    );
    assert_eq!(raw["dedup"], false);
    assert_eq!(raw["compression"], false);
    let text = ingot_pool_ok(&pool, &["stats"]);
    assert!(
        text.contains("reduction") && text.contains("dedup index"),
        "human-readable stats lack the reduction lines:\n{text}"
    );

    // Online policy change, visible in the listing and durable across a restart.
    ingot_pool_ok(&pool, &["volume", "set", "raw", "--dedup", "on"]);
    let out = assert_fails(
        &ingot_pool(&pool, &["volume", "set", "raw"]),
        "volume set without a setting",
    );
    assert!(out.contains("nothing to set"), "{out}");
    let out = ingot_pool(&pool, &["volume", "set", "raw", "--dedup", "maybe"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad on/off value is a usage error"
    );
    assert_fails(
        &ingot_pool(&pool, &["volume", "set", "nope", "--dedup", "on"]),
        "volume set of a missing volume",
    );
    srv.stop();
    let listed = volumes(&pool);
    let raw = listed
        .iter()
        .find(|v| v["name"] == "raw")
        .expect("volume raw listed");
    assert_eq!(
        (raw["dedup"].clone(), raw["compression"].clone()),
        (Value::Bool(true), Value::Bool(false))
    );
    let out = ingot_pool(&pool, &["check"]);
    assert!(
        out.status.success(),
        "ingot check failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `ingot volume import` copies a raw image into a new volume: holes and zero blocks stay holes,
/// the data reads back identical through a real client (`qemu-img compare` over NBD), and an
/// import into a served pool or an existing name is refused with a clear error.
#[test]
fn import_a_raw_image() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("cli-import");
    let pool = dir.join("pool");
    create_pool(&pool, "256M");
    // 20 MiB + 1536 bytes: data, written zeroes, a hole, data, and a partial last block.
    let img = dir.join("disk.raw");
    let size = 20 * MIB + 1536;
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    let mut data = vec![0u8; (MIB + MIB / 2) as usize];
    Prng::new(5).fill(&mut data);
    f.write_all_at(&data[..MIB as usize], 0).unwrap();
    f.write_all_at(&vec![0u8; 4 * MIB as usize], 4 * MIB)
        .unwrap();
    f.write_all_at(&data[MIB as usize..], 10 * MIB).unwrap();
    f.write_all_at(&data[..3000], size - 3000).unwrap();
    drop(f);

    let image = img.display().to_string();
    let import = |name: &str| ingot_pool(&pool, &["volume", "import", name, "--file", &image]);
    let out = import("disk");
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported"));
    let vols = parse_json(&ingot_pool_ok(&pool, &["volume", "list", "--json"]));
    let disk = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "disk")
        .unwrap_or_else(|| panic!("no volume disk: {vols}"));
    assert_eq!(u64_of(disk, "size_bytes"), size);
    // Only the blocks holding data are mapped: 1 MiB + 512 KiB + the last two blocks.
    assert_eq!(u64_of(disk, "mapped_bytes"), MIB + MIB / 2 + 2 * 4096);
    assert_fails(&import("disk"), "import into an existing volume");

    let srv = Server::start(ServeOpts::new(&pool, &dir.join("nbd.sock")));
    let cmp = output(
        Command::new(require_tool("qemu-img"))
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&img)
            .arg(srv.unix_uri("disk")),
    );
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    let why = assert_fails(&import("other"), "import into a served pool");
    assert!(why.contains("nbdcopy"), "{why}");
    srv.stop();
    let _ = std::io::stderr().flush();
}

/// Unique blocks the pool stores, from `stats --json`.
fn unique_blocks(pool: &Path) -> u64 {
    u64_of(&stats(pool), "unique_blocks")
}

fn dedup_domain_of(pool: &Path, vol: &str) -> Value {
    volume(pool, vol).unwrap_or_else(|| panic!("volume {vol} not listed"))["dedup_domain"].clone()
}

#[test]
fn dedup_domains_from_the_cli() {
    let dir = TempDir::new("cli-domains");
    let pool = dir.join("pool");
    create_pool(&pool, "256M");
    // 1 MiB of distinct random blocks, imported into volumes of different domains: blocks
    // deduplicate within a domain only.
    let img = dir.join("data.raw");
    let mut data = vec![0u8; MIB as usize];
    Prng::new(11).fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let image = img.display().to_string();
    let import = |name: &str, domain: &str| {
        ingot_pool_ok(
            &pool,
            &[
                "volume",
                "import",
                name,
                "--file",
                &image,
                "--dedup-domain",
                domain,
            ],
        );
    };
    import("a1", "tenant-a");
    assert_eq!(unique_blocks(&pool), 256);
    import("a2", "tenant-a");
    assert_eq!(unique_blocks(&pool), 256, "same domain: stored once");
    import("b1", "tenant-b");
    assert_eq!(unique_blocks(&pool), 512, "another domain: stored again");
    import("p1", "private");
    import("s1", "shared");
    assert_eq!(unique_blocks(&pool), 1024);
    import("s2", "shared");
    assert_eq!(unique_blocks(&pool), 1024, "shared volumes share");

    // Shown in `volume list --json` (and the table).
    assert_eq!(dedup_domain_of(&pool, "a1"), "tenant-a");
    assert_eq!(dedup_domain_of(&pool, "b1"), "tenant-b");
    assert_eq!(dedup_domain_of(&pool, "p1"), "private");
    assert_eq!(dedup_domain_of(&pool, "s1"), "shared");
    let text = ingot_pool_ok(&pool, &["volume", "list"]);
    assert!(
        text.contains("DEDUP-DOMAIN") && text.contains("tenant-b"),
        "{text}"
    );

    // Create with a domain, and the default; then change it online through a server, and
    // see the change survive the restart.
    ingot_pool_ok(
        &pool,
        &[
            "volume",
            "create",
            "c",
            "--size",
            "8M",
            "--dedup-domain",
            "private",
        ],
    );
    ingot_pool_ok(&pool, &["volume", "create", "d", "--size", "8M"]);
    assert_eq!(dedup_domain_of(&pool, "c"), "private");
    assert_eq!(dedup_domain_of(&pool, "d"), "shared");
    let srv = Server::start(ServeOpts::new(&pool, &dir.join("nbd.sock")));
    let out = ingot_pool_ok(&pool, &["volume", "set", "c", "--dedup-domain", "tenant-a"]);
    assert!(out.contains("dedup domain tenant-a"), "{out}");
    ingot_pool_ok(&pool, &["volume", "set", "d", "--dedup-domain", "private"]);
    assert_eq!(dedup_domain_of(&pool, "c"), "tenant-a");
    // A bad name is a usage error, and changes nothing.
    let out = ingot_pool(&pool, &["volume", "set", "c", "--dedup-domain", "no/slash"]);
    assert_eq!(out.status.code(), Some(2), "bad domain name: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid dedup domain"),
        "{out:?}"
    );
    assert_fails(
        &ingot_pool(
            &pool,
            &["volume", "set", "nope", "--dedup-domain", "shared"],
        ),
        "volume set of a missing volume",
    );
    srv.stop();
    assert_eq!(dedup_domain_of(&pool, "c"), "tenant-a");
    assert_eq!(dedup_domain_of(&pool, "d"), "private");
    assert_eq!(dedup_domain_of(&pool, "a2"), "tenant-a");
    let out = ingot_pool(&pool, &["check"]);
    assert!(out.status.success(), "ingot check: {out:?}");
}

/// The pool UUID that `dir/pool.json` records.
fn pool_uuid(dir: &Path) -> String {
    parse_json(&String::from_utf8_lossy(&read_file(&dir.join("pool.json"))))["pool_uuid"]
        .as_str()
        .expect("pool.json records pool_uuid")
        .to_string()
}

/// Write `dir/pool.json` as `template`'s with `devices` listed instead.
fn pool_json_naming(dir: &Path, template: &Path, devices: &[&Path]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut pf = parse_json(&String::from_utf8_lossy(&read_file(
        &template.join("pool.json"),
    )));
    pf["devices"] = devices
        .iter()
        .map(|p| Value::from(p.to_str().expect("utf-8 path")))
        .collect();
    std::fs::write(dir.join("pool.json"), pf.to_string()).expect("write pool.json");
}

fn assert_mentions(stderr: &str, words: &[&str], what: &str) {
    for w in words {
        assert!(
            stderr.contains(w),
            "{what}: the message does not mention {w:?}: {stderr}"
        );
    }
}

/// A pool in `dir/a` with volume vol0 (64 MiB); its device.
fn device_pool(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let a = dir.join("a");
    ingot_pool_ok(&a, &["pool", "create", "--size", "256M"]);
    create_volume(&a, "vol0", "64M");
    let dev = a.join("dev0.img");
    (a, dev)
}

#[test]
fn pool_create_refuses_a_device_holding_a_pool_unless_forced() {
    let dir = TempDir::new("cli-dev-create");
    let (a, dev) = device_pool(&dir);
    let dev_s = dev.to_str().expect("utf-8 path");
    let before = sha256_file(&dev);

    let b = dir.join("b");
    let out = ingot_pool(&b, &["pool", "create", "--size", "256M", "--device", dev_s]);
    let stderr = assert_fails(&out, "pool create on a device holding another pool");
    assert_mentions(
        &stderr,
        &[dev_s, &pool_uuid(&a), "--force"],
        "pool create on a pool",
    );
    assert!(
        !b.join("pool.json").exists(),
        "a refused create wrote pool.json"
    );
    assert_eq!(
        sha256_file(&dev),
        before,
        "a refused create changed the device"
    );
    assert_eq!(sizes(&a), vec![("vol0".to_string(), 64 * MIB)]);

    // With --force, `pool create` takes the device: the old pool is gone.
    ingot_pool_ok(
        &b,
        &[
            "pool", "create", "--size", "256M", "--device", dev_s, "--force",
        ],
    );
    assert_fails(
        &ingot_pool(&a, &["volume", "list", "--json"]),
        "the pool whose device was taken with --force",
    );
    assert!(
        ingot_pool_ok(&b, &["pool", "create", "--help"]).contains("--force"),
        "pool create --help does not document --force"
    );
}

#[test]
fn a_served_device_is_refused_to_other_pools() {
    let dir = TempDir::new("cli-dev-served");
    let (a, dev) = device_pool(&dir);
    let dev_s = dev.to_str().expect("utf-8 path");
    let srv = Server::start(ServeOpts::new(&a, &dir.join("a.sock")));
    // Not even with --force.
    let b = dir.join("b");
    for force in [&[][..], &["--force"][..]] {
        let mut args = vec!["pool", "create", "--size", "256M", "--device", dev_s];
        args.extend(force);
        let stderr = assert_fails(&ingot_pool(&b, &args), "pool create on a served device");
        assert_mentions(&stderr, &[dev_s, "in use"], "pool create while served");
    }
    // A second directory whose hand-edited pool.json names the served device.
    let c = dir.join("c");
    pool_json_naming(&c, &a, &[&dev]);
    let out = output_timeout(
        ingot()
            .arg("serve")
            .args(pool_arg(&c))
            .arg("--nbd")
            .arg(format!("unix:{}", dir.join("c.sock").display())),
        Duration::from_secs(30),
    );
    let stderr = assert_fails(&out, "serving a second pool.json naming a served device");
    assert_mentions(&stderr, &[dev_s, "in use"], "second serve");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(SERVING),
        "the second server claimed to serve"
    );
    let stderr = assert_fails(
        &ingot_pool(&c, &["volume", "list", "--json"]),
        "volume list on a pool.json naming a served device",
    );
    assert_mentions(&stderr, &[dev_s, "in use"], "volume list");
    // The first server is unharmed.
    assert_eq!(nbd_export_size(&srv.unix_uri("vol0")), 64 * MIB);
    srv.stop();
    assert_eq!(sizes(&a), vec![("vol0".to_string(), 64 * MIB)]);
    check_stats(&stats(&a));
}

#[test]
fn a_device_listed_twice_is_refused() {
    let dir = TempDir::new("cli-dev-twice");
    let (a, dev) = device_pool(&dir);
    let sym = dir.join("sym.img");
    std::os::unix::fs::symlink(&dev, &sym).expect("symlink");
    let hard = dir.join("hard.img");
    std::fs::hard_link(&dev, &hard).expect("hard link");
    for second in [&sym, &hard] {
        let d = dir.join("dup");
        pool_json_naming(&d, &a, &[&dev, second]);
        let stderr = assert_fails(
            &ingot_pool(&d, &["volume", "list", "--json"]),
            "a pool.json listing one device twice",
        );
        assert_mentions(
            &stderr,
            &[second.to_str().expect("utf-8"), "listed twice"],
            "duplicate device",
        );
    }
}

#[test]
fn a_device_of_another_pool_is_refused() {
    let dir = TempDir::new("cli-dev-foreign");
    let (a, dev) = device_pool(&dir);
    let dev_s = dev.to_str().expect("utf-8 path");
    let before = sha256_file(&dev);
    let f = dir.join("f");
    ingot_pool_ok(&f, &["pool", "create", "--size", "256M"]);
    pool_json_naming(&f, &f, &[&dev]);
    let stderr = assert_fails(
        &ingot_pool(&f, &["volume", "list", "--json"]),
        "a pool.json naming another pool's device",
    );
    assert_mentions(&stderr, &[dev_s, &pool_uuid(&a), "another pool"], "foreign");
    assert_eq!(
        sha256_file(&dev),
        before,
        "a refused open changed the device"
    );
    assert_eq!(sizes(&a), vec![("vol0".to_string(), 64 * MIB)]);
}

/// A reader that goes away early (`ingot volume list | head -1`) ends the output quietly: no
/// panic, and the command's own exit status.
#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let dir = TempDir::new("cli-closed-stdout");
    let pool = dir.join("pool");
    ingot_pool_ok(&pool, &["pool", "create", "--size", "1G"]);
    ingot_pool_ok(&pool, &["volume", "create", "a", "--size", "1G"]);
    let cmds: [&[&str]; 4] = [
        &["volume", "list"],
        &["stats", "--json"],
        &["stats"],
        &["check"],
    ];
    for args in cmds {
        let mut child = ingot()
            .args(args)
            .args(pool_arg(&pool))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ingot");
        // Closed before the command has opened the pool: each write it makes fails (EPIPE).
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait for ingot");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "`ingot {}` with its stdout closed: {}\n--- stderr ---\n{stderr}",
            args.join(" "),
            out.status
        );
    }
}

/// `--version` names the commit; completions and man pages come from the command definitions:
/// bash accepts the script, and every page renders without a warning.
#[test]
fn version_completions_and_man_pages() {
    let groff = require_tool("groff");
    let bash = require_tool("bash");
    let out = output(ingot().arg("--version"));
    assert!(out.status.success(), "{out:?}");
    let v = String::from_utf8_lossy(&out.stdout);
    let commit = v
        .trim()
        .strip_prefix("ingot ")
        .and_then(|r| r.split_once(" ("))
        .and_then(|(_, c)| c.strip_suffix(')'))
        .unwrap_or_else(|| panic!("version without a commit: {v}"));
    assert!(
        commit == "unknown" || commit.chars().take(12).all(|c| c.is_ascii_hexdigit()),
        "{v}"
    );

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("ingot.bash");
    let out = output(ingot().args(["completions", "bash"]));
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&script, &out.stdout).unwrap();
    // Sourcing defines the completion function and registers it for `ingot`.
    let check = format!(
        "source {} && declare -F _ingot >/dev/null && complete -p ingot",
        script.display()
    );
    let out = output(Command::new(&bash).args(["-c", &check]));
    assert!(
        out.status.success(),
        "the bash completion does not load: {out:?}"
    );
    for shell in ["zsh", "fish"] {
        let out = output(ingot().args(["completions", shell]));
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{shell}: {out:?}"
        );
    }
    let out = output(ingot().args(["completions", "tcsh"]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );

    let pages = dir.path().join("man");
    let out = output(ingot().arg("man").arg("--dir").arg(&pages));
    assert!(out.status.success(), "{out:?}");
    for name in [
        "ingot",
        "ingot-serve",
        "ingot-volume",
        "ingot-pool",
        "ingot-check",
    ] {
        let page = pages.join(format!("{name}.1"));
        assert!(page.is_file(), "no {name}.1");
        let out = output(
            Command::new(&groff)
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(&page),
        );
        assert!(out.status.success(), "{name}.1 does not render: {out:?}");
        assert!(
            out.stderr.is_empty(),
            "{name}.1 renders with warnings: {out:?}"
        );
    }
    let out = output(ingot().arg("man"));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && page.contains(".TH ingot 1"),
        "{page}"
    );
}

/// `serve --config FILE`: the file's settings apply, options on the command line override them
/// (a list replaces the file's), and `config check` names an unknown key and its line.
#[test]
fn config_file_settings_and_overrides() {
    let dir = TempDir::new("config");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "# ingot\ncache-size = \"64M\"\nwrite-bak = \"16M\"\n").unwrap();
    let out = output(ingot().args(["config", "check"]).arg(&bad));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad key must fail: {out:?}");
    assert!(
        stderr.contains("write-bak") && stderr.contains(":3:"),
        "the error names the key and its line: {stderr}"
    );
    // The same file refused by serve, before anything starts, also behind a global option
    // that takes a value.
    for pre in [&[][..], &["--log-format", "json"][..]] {
        let out = output(
            ingot()
                .current_dir(dir.path())
                .args(pre)
                .arg("serve")
                .arg("--config")
                .arg(&bad),
        );
        assert!(!out.status.success(), "{pre:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("write-bak"),
            "{pre:?}: {out:?}"
        );
        assert!(!dir.join("ingot-data").exists(), "{pre:?}: serve started");
    }
    // One value where a list is not allowed.
    let list = dir.join("list.toml");
    std::fs::write(&list, "cache-size = [\"64M\"]\n").unwrap();
    let out = output(ingot().args(["config", "check"]).arg(&list));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("one value"),
        "{out:?}"
    );

    let file_sock = dir.join("file.sock");
    let good = dir.join("ingot.toml");
    std::fs::write(
        &good,
        format!(
            "nbd = [\"unix:{}\"]\ncache-size = \"64M\"\nwrite-back = \"32M\"\n",
            file_sock.display()
        ),
    )
    .unwrap();
    let out = output(ingot().args(["config", "check"]).arg(&good));
    assert!(out.status.success(), "{out:?}");
    // The example shipped in docs/ is a valid file.
    let example = workspace_root().join("docs/ingot.example.toml");
    let out = output(ingot().args(["config", "check"]).arg(&example));
    assert!(out.status.success(), "docs/ingot.example.toml: {out:?}");

    let write_back = |server: &Server| -> u64 {
        let st = parse_json(&ingot_ok([
            "stats",
            "--json",
            "--pool",
            server.pool().to_str().unwrap(),
        ]));
        st["write_back_limit_bytes"]
            .as_u64()
            .expect("write_back_limit_bytes")
    };
    // The file's write-back; the command line's listeners replace the file's.
    let mut opts = ServeOpts::new(&dir.join("pool"), &dir.join("flag.sock"));
    opts.extra_args = vec!["--config".into(), good.display().to_string()];
    let server = Server::start(opts.clone());
    assert_eq!(write_back(&server), 32 << 20, "the file's write-back");
    assert!(
        !file_sock.exists(),
        "--nbd on the command line replaces the file's listeners"
    );
    server.stop();
    // A flag overrides the file's value.
    opts.extra_args
        .extend(["--write-back".into(), "16M".into()]);
    let server = Server::start(opts);
    assert_eq!(
        write_back(&server),
        16 << 20,
        "the command line's write-back"
    );
    server.stop();
}
