//! Crash consistency of the real server: `ingot serve` is SIGKILLed at random moments (while
//! clients write, and sometimes while it recovers) many times over one pool. Two libnbd clients
//! (Python, Debian's `python3-libnbd`) write random blocks at random offsets, zero and trim ranges,
//! flush every few requests and sometimes use FUA; each logs every request before sending it and
//! every completed flush / FUA write. After each restart every block must read back as its last
//! durable value (flushed, or FUA-acknowledged) or as one of the values written after it; blocks
//! never durably written read as before. `ingot check` on the crashed (and finally the cleanly
//! stopped) pool must find no problem.
//!
//! Every cycle must test flushed data, so the kill waits for the writers: each cycle's window
//! (0.2-1.8 s of requests) starts once both writers have connected (a cold Python start takes
//! 0.05-0.6 s on a loaded 2-core machine: measured from the spawn, a 0.3 s window sometimes ended
//! before a writer's first flush), and if a writer's first flush is still pending at its end, the
//! kill waits until it completes (30 s at most, else the test fails). Such waits are printed, and
//! the slowest connection and first flush are summed up at the end.
//!
//! Environment: `INGOT_CRASH_SEED` (reproduce a run; the seed is printed), `INGOT_CRASH_CYCLES`
//! (16 by default, about a minute for both tests), `INGOT_CRASH_STACKS` (sample the server's
//! threads with gdb when a first flush is still pending 500 ms past the window, into
//! `stacks-*.txt` and the server's stderr into `stacks-*.stderr` in the test directory; keep it
//! with `INGOT_KEEP_TMP=1`).
//!
//! Long mode, 1,000 cycles (progress every 100 cycles; 47 min for both tests at once on a shared
//! 2-core machine):
//!
//! ```text
//! cargo build --release -p ingot-cli
//! INGOT_BIN=$PWD/target/release/ingot INGOT_CRASH_CYCLES=1000 \
//!     cargo test --release -p ingot-tests --test crash -- --nocapture >crash-long.log 2>&1
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ingot_tests::*;

const BLOCK: usize = 4096;
/// Blocks in the test volume (64 MiB).
const VOL_BLOCKS: u64 = 16384;

const WRITER: &str = r#"
import random, struct, sys, time, zlib
import nbd

uri, log_path, seed, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
log = open(log_path, "a", buffering=1)
h = nbd.NBD()
h.connect_uri(uri)
fua_ok = h.can_fua()
trim_ok = h.can_trim()
zero_ok = h.can_zero()
log.write("S %d fua=%d trim=%d zero=%d %.6f\n" % (seed, fua_ok, trim_ok, zero_ok, time.time()))
tag = seed * 10_000_000
hot = min(count, 512)
while True:
    for _ in range(rng.randint(1, 8)):
        n = rng.choice([1, 1, 1, 2, 3, 4, 8, 16])
        if rng.random() < 0.5:
            lba = first + rng.randrange(0, hot - n + 1)
        else:
            lba = first + rng.randrange(0, count - n + 1)
        tag += 1
        r = rng.random()
        if r < 0.05 and trim_ok:
            log.write("T %d %d %d\n" % (tag, lba, n))
            h.trim(n * 4096, lba * 4096)
            continue
        if r < 0.10 and zero_ok:
            log.write("Z %d %d %d\n" % (tag, lba, n))
            h.zero(n * 4096, lba * 4096)
            continue
        parts, crcs = [], []
        for i in range(n):
            head = struct.pack("<8sQQ", b"INGOTCRS", tag, lba + i)
            k = rng.random()
            if k < 0.6:
                body = rng.randbytes(4096 - len(head))
            elif k < 0.85:
                body = bytes([rng.randrange(256)]) * (4096 - len(head))
            else:
                body = bytes(4096 - len(head))
            blk = head + body
            parts.append(blk)
            crcs.append("%08x" % zlib.crc32(blk))
        fua = fua_ok and rng.random() < 0.1
        log.write("W %d %d %s\n" % (tag, lba, ",".join(crcs)))
        h.pwrite(b"".join(parts), lba * 4096, nbd.CMD_FLAG_FUA if fua else 0)
        if fua:
            log.write("U %d\n" % tag)
    log.write("P %d %.6f\n" % (tag, time.time()))
    h.flush()
    log.write("F %d %.6f\n" % (tag, time.time()))
"#;

#[derive(Debug)]
enum Op {
    /// Write of consecutive blocks from `lba` with these CRCs.
    Write { tag: u64, lba: u64, crcs: Vec<u32> },
    /// Trim or write-zeroes of `n` blocks: they read as zeroes.
    Zero { tag: u64, lba: u64, n: u64 },
}

/// Parse one writer's log of one cycle: the requests in order, and whether each is durable (a
/// flush completed after it, or it was a FUA write that was acknowledged).
fn parse_log(path: &Path) -> (Vec<(Op, bool)>, usize) {
    let text = String::from_utf8(read_file(path)).expect("log is UTF-8");
    let mut ops: Vec<(Op, bool)> = Vec::new();
    let mut flushes = 0;
    let mut by_tag: HashMap<u64, usize> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| -> u64 {
            f.get(i)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad log line {line:?} in {}", path.display()))
        };
        match f[0] {
            "S" | "P" => {}
            "W" => {
                let crcs = f
                    .get(3)
                    .unwrap_or_else(|| panic!("bad log line {line:?}"))
                    .split(',')
                    .map(|c| u32::from_str_radix(c, 16).expect("crc hex"))
                    .collect();
                by_tag.insert(num(1), ops.len());
                ops.push((
                    Op::Write {
                        tag: num(1),
                        lba: num(2),
                        crcs,
                    },
                    false,
                ));
            }
            "T" | "Z" => {
                by_tag.insert(num(1), ops.len());
                ops.push((
                    Op::Zero {
                        tag: num(1),
                        lba: num(2),
                        n: num(3),
                    },
                    false,
                ));
            }
            "U" => {
                let i = by_tag[&num(1)];
                ops[i].1 = true;
            }
            "F" => {
                flushes += 1;
                for op in ops.iter_mut() {
                    op.1 = true;
                }
            }
            _ => panic!("bad log line {line:?} in {}", path.display()),
        }
    }
    (ops, flushes)
}

/// Per block: the CRCs it may read back as after a crash at the end of these logs, given the
/// value it had (`state`) before them.
fn acceptable(state: &[u32], logs: &[(Vec<(Op, bool)>, usize)]) -> Vec<Vec<(u32, u64)>> {
    let zero = crc32(&[0u8; BLOCK]);
    // Per block: the (crc, tag, durable) of each request that touched it, in order.
    let mut touches: Vec<Vec<(u32, u64, bool)>> = vec![Vec::new(); state.len()];
    for (ops, _) in logs {
        for (op, durable) in ops {
            match op {
                Op::Write { tag, lba, crcs } => {
                    for (i, c) in crcs.iter().enumerate() {
                        touches[*lba as usize + i].push((*c, *tag, *durable));
                    }
                }
                Op::Zero { tag, lba, n } => {
                    for b in *lba..*lba + *n {
                        touches[b as usize].push((zero, *tag, *durable));
                    }
                }
            }
        }
    }
    touches
        .into_iter()
        .enumerate()
        .map(|(b, t)| {
            let last_durable = t.iter().rposition(|x| x.2);
            let mut ok = Vec::new();
            match last_durable {
                Some(d) => {
                    ok.push((t[d].0, t[d].1));
                    ok.extend(t[d + 1..].iter().map(|x| (x.0, x.1)));
                }
                None => {
                    ok.push((state[b], 0));
                    ok.extend(t.iter().map(|x| (x.0, x.1)));
                }
            }
            ok
        })
        .collect()
}

/// Read the whole volume with nbdcopy and check every block against the model; the model then
/// holds what was read.
fn verify(
    srv: &Server,
    dir: &Path,
    state: &mut [u32],
    logs: &[(Vec<(Op, bool)>, usize)],
    when: &str,
) {
    let ok = acceptable(state, logs);
    let dump = dir.join("dump.raw");
    let _ = std::fs::remove_file(&dump);
    run(Command::new(require_tool("nbdcopy"))
        .arg(srv.unix_uri("crash"))
        .arg(&dump));
    let data = read_file(&dump);
    assert_eq!(data.len() as u64, VOL_BLOCKS * BLOCK as u64, "dump size");
    let mut bad = Vec::new();
    for (b, blk) in data.chunks(BLOCK).enumerate() {
        let c = crc32(blk);
        if ok[b].iter().any(|x| x.0 == c) {
            state[b] = c;
        } else {
            let found = if &blk[..8] == b"INGOTCRS" {
                format!(
                    "a block written by request {} for block {}",
                    u64::from_le_bytes(blk[8..16].try_into().unwrap()),
                    u64::from_le_bytes(blk[16..24].try_into().unwrap())
                )
            } else if blk.iter().all(|&x| x == 0) {
                "zeroes".to_string()
            } else {
                format!("unknown data starting {:02x?}", &blk[..16])
            };
            bad.push(format!(
                "block {b} (offset {}): read {found}; acceptable: {}",
                b * BLOCK,
                ok[b]
                    .iter()
                    .map(|(c, t)| if *t == 0 {
                        format!("previous value {c:08x}")
                    } else {
                        format!("request {t}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{when}: {} of {VOL_BLOCKS} blocks lost a durable write or hold torn data:\n{}\n\
         --- server stderr ---\n{}",
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        srv.stderr()
    );
}

fn check_pool(pool: &Path, when: &str) {
    let out = output_timeout(
        ingot().arg("check").arg("--pool").arg(pool),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "{when}: `ingot check --pool {}` exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        pool.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Writer {
    child: Child,
    log: PathBuf,
    err: PathBuf,
}

/// A Python writer on blocks `range` (first, count) of the volume.
fn start_writer(
    py: &Path,
    script: &Path,
    uri: &str,
    dir: &Path,
    name: &str,
    seed: u64,
    range: (u64, u64),
) -> Writer {
    let (first, count) = range;
    let log = dir.join(format!("{name}.log"));
    let err = dir.join(format!("{name}.err"));
    let _ = std::fs::remove_file(&log);
    let child = Command::new(py)
        .arg(script)
        .arg(uri)
        .arg(&log)
        .arg(seed.to_string())
        .arg(first.to_string())
        .arg(count.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&err).expect("create writer stderr"))
        .spawn()
        .expect("spawn python writer");
    Writer { child, log, err }
}

/// Longest a writer may take to connect (Python start-up and the NBD handshake).
const CONNECT_LIMIT: Duration = Duration::from_secs(60);
/// Longest the harness waits past a cycle's window for a writer's first flush to complete.
const FLUSH_LIMIT: Duration = Duration::from_secs(30);

/// Wall-clock seconds, as the writers log them.
fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// How far a writer got, from its log: when it connected, and when it sent its first flush
/// and saw it complete (wall-clock seconds).
#[derive(Default)]
struct Progress {
    connected: Option<f64>,
    first_flush_sent: Option<f64>,
    first_flush_done: Option<f64>,
}

fn progress(log: &Path) -> Progress {
    let text = std::fs::read(log).unwrap_or_default();
    let mut p = Progress::default();
    // Only whole lines: the writer may be half-way through one.
    let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    for line in String::from_utf8_lossy(&text[..end]).lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let t = f.last().and_then(|s| s.parse::<f64>().ok());
        match f[0] {
            "S" => p.connected = t,
            "P" if p.first_flush_sent.is_none() => p.first_flush_sent = t,
            "F" => {
                p.first_flush_done = t;
                break;
            }
            _ => {}
        }
    }
    p
}

/// Timing of the writers over all cycles.
#[derive(Default)]
struct Timing {
    /// Slowest connection, from spawning a writer (seconds).
    connect_max: f64,
    /// Slowest first flush, from sending it to its completion (seconds).
    flush_max: f64,
    /// Cycles whose window was extended for a first flush, and the longest extension.
    extended: usize,
    wait_max: Duration,
}

/// Wait until every writer's log satisfies `done`; returns how long that took past the first
/// look (zero if they all did at once). Panics, with what the writers and the server said, if
/// a writer exits or `limit` passes. With `INGOT_CRASH_STACKS` set, the server's threads are
/// sampled with gdb once a wait passes 500 ms (into `stacks-*.txt` in the test directory).
fn wait_for(
    srv: &Server,
    writers: &mut [Writer],
    limit: Duration,
    what: &str,
    done: impl Fn(&Progress) -> bool,
) -> Duration {
    let start = Instant::now();
    let mut sampled = false;
    for looks in 0.. {
        for w in writers.iter_mut() {
            if let Ok(Some(status)) = w.child.try_wait() {
                panic!(
                    "writer exited ({status}) before the server was killed:\n{}\n--- server stderr ---\n{}",
                    std::fs::read_to_string(&w.err).unwrap_or_default(),
                    srv.stderr()
                );
            }
        }
        if writers.iter().all(|w| done(&progress(&w.log))) {
            return if looks == 0 {
                Duration::ZERO
            } else {
                start.elapsed()
            };
        }
        if !sampled
            && start.elapsed() > Duration::from_millis(500)
            && std::env::var_os("INGOT_CRASH_STACKS").is_some()
        {
            sampled = true;
            let dir = writers[0].log.parent().expect("log dir").to_path_buf();
            let out = dir.join(format!("stacks-{:.3}.txt", now_secs()));
            let _ = Command::new("gdb")
                .args(["-batch", "-ex", "thread apply all bt", "-p"])
                .arg(srv.pid().to_string())
                .stdout(File::create(&out).expect("create stacks file"))
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::write(out.with_extension("stderr"), srv.stderr());
            eprintln!(
                "crash test: waiting for writers: server stacks in {}",
                out.display()
            );
        }
        assert!(
            start.elapsed() < limit,
            "a writer has not {what} within {} s:\n{}\n--- server stderr ---\n{}",
            limit.as_secs(),
            writers
                .iter()
                .map(|w| format!(
                    "{}: {}",
                    w.log.display(),
                    std::fs::read_to_string(&w.err).unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join("\n"),
            srv.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    unreachable!()
}

#[test]
fn sigkill_at_random_moments_loses_no_flushed_write() {
    crash_cycles("crash", "4G", "8M", false);
}

/// The same in a pool barely larger than the volume, so that the cleaner runs all the time and
/// the kills land while it moves blocks and frees segments.
#[test]
fn sigkill_while_cleaning_loses_no_flushed_write() {
    crash_cycles("crash-gc", "96M", "2M", true);
}

fn crash_cycles(tag: &str, pool_size: &str, segment_size: &str, cleaning: bool) {
    let py = require_python_nbd();
    require_tool("nbdcopy");
    require_tool("qemu-io");
    let seed = std::env::var("INGOT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let cycles: u64 = std::env::var("INGOT_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    eprintln!("crash test: INGOT_CRASH_SEED={seed} INGOT_CRASH_CYCLES={cycles}");
    let mut rng = Prng::new(seed);
    let started = Instant::now();

    let dir = TempDir::new(tag);
    let pool = dir.join("pool");
    let script = dir.join("writer.py");
    std::fs::write(&script, WRITER).expect("write writer.py");
    ingot_ok([
        "pool".as_ref(),
        "create".as_ref(),
        "--pool".as_ref(),
        pool.as_os_str(),
        "--size".as_ref(),
        pool_size.as_ref(),
        "--segment-size".as_ref(),
        segment_size.as_ref(),
    ]);
    create_volume(&pool, "crash", "64M");
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    opts.tcp_port = None;

    let mut state = vec![crc32(&[0u8; BLOCK]); VOL_BLOCKS as usize];
    let mut logs: Vec<(Vec<(Op, bool)>, usize)> = Vec::new();
    let (mut total_ops, mut total_flushes, mut startup_kills) = (0usize, 0usize, 0);
    let mut moved = 0u64;
    let mut timing = Timing::default();
    for cycle in 0..cycles {
        if cycle > 0 && cycle % 100 == 0 {
            eprintln!(
                "crash test ({tag}): {cycle} of {cycles} cycles passed, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        // Sometimes kill it while it opens and recovers the pool.
        if cycle > 0 && rng.below(4) == 0 {
            let s = Server::spawn(opts.clone());
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            s.kill9();
            startup_kills += 1;
        }
        let srv = Server::start(opts.clone());
        verify(
            &srv,
            dir.path(),
            &mut state,
            &logs,
            &format!("after crash {cycle} (seed {seed})"),
        );
        let uri = srv.unix_uri("crash");
        let half = VOL_BLOCKS / 2;
        let mut writers = vec![
            start_writer(
                &py,
                &script,
                &uri,
                dir.path(),
                "a",
                seed % 1000 * 100 + cycle * 2,
                (0, half),
            ),
            start_writer(
                &py,
                &script,
                &uri,
                dir.path(),
                "b",
                seed % 1000 * 100 + cycle * 2 + 1,
                (half, half),
            ),
        ];
        let spawned = now_secs();
        // The window starts once both writers are connected (a cold Python start under load
        // can take most of a short window).
        wait_for(&srv, &mut writers, CONNECT_LIMIT, "connected", |p| {
            p.connected.is_some()
        });
        let connected = now_secs();
        // 0.2-1.8 s of requests: the 0.3-2 s from the spawn it replaces, less the ~0.15 s a
        // writer takes to connect (the same kill moments, and the default run as long).
        let window = Duration::from_millis(200 + rng.below(1600));
        std::thread::sleep(window);
        // Every cycle must test flushed data: a writer whose first flush is still pending is
        // given until it completes (bounded), and the wait is recorded.
        let waited = wait_for(&srv, &mut writers, FLUSH_LIMIT, "completed a flush", |p| {
            p.first_flush_done.is_some()
        });
        for (w, name) in writers.iter().zip(["a", "b"]) {
            let p = progress(&w.log);
            let (c, sent, done) = (
                p.connected.unwrap_or(f64::NAN),
                p.first_flush_sent.unwrap_or(f64::NAN),
                p.first_flush_done.unwrap_or(f64::NAN),
            );
            timing.connect_max = timing.connect_max.max(c - spawned);
            timing.flush_max = timing.flush_max.max(done - sent);
            if done - connected > window.as_secs_f64() {
                eprintln!(
                    "crash test: cycle {cycle}: writer {name} connected {:.0} ms after spawn, \
                     sent its first flush {:.0} ms after connecting, which took {:.0} ms \
                     (window {} ms, waited {} ms more)",
                    (c - spawned) * 1e3,
                    (sent - c) * 1e3,
                    (done - sent) * 1e3,
                    window.as_millis(),
                    waited.as_millis()
                );
            }
        }
        if !waited.is_zero() {
            timing.extended += 1;
            timing.wait_max = timing.wait_max.max(waited);
        }
        if cleaning {
            let st = parse_json(&ingot_ok([
                "stats".as_ref(),
                "--json".as_ref(),
                "--pool".as_ref(),
                pool.as_os_str(),
            ]));
            moved += st["gc_bytes_moved"].as_u64().unwrap_or(0);
        }
        srv.kill9();
        logs.clear();
        for mut w in writers {
            if wait_timeout(&mut w.child, Duration::from_secs(30)).is_none() {
                let _ = w.child.kill();
                let _ = w.child.wait();
                panic!("writer still running 30 s after the server was killed");
            }
            let parsed = parse_log(&w.log);
            assert!(
                parsed.1 > 0,
                "a writer completed no flush in cycle {cycle}: {}",
                std::fs::read_to_string(&w.err).unwrap_or_default()
            );
            total_ops += parsed.0.len();
            total_flushes += parsed.1;
            logs.push(parsed);
        }
        if cycle % 4 == 3 {
            check_pool(&pool, &format!("after crash {cycle} (seed {seed})"));
        }
    }
    let srv = Server::start(opts.clone());
    verify(
        &srv,
        dir.path(),
        &mut state,
        &logs,
        &format!("after the last crash (seed {seed})"),
    );
    logs.clear();
    srv.stop();
    check_pool(&pool, &format!("after a clean stop (seed {seed})"));
    let srv = Server::start(opts);
    verify(
        &srv,
        dir.path(),
        &mut state,
        &logs,
        &format!("after a clean restart (seed {seed})"),
    );
    // The checker is not vacuous: a block changed behind its back is reported.
    run(Command::new(require_tool("qemu-io"))
        .args(["-f", "raw", "-c", "write -P 0x77 40960 4096", "-c", "flush"])
        .arg(srv.unix_uri("crash")));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut s = state.clone();
        verify(&srv, dir.path(), &mut s, &[], "self-test");
    }));
    assert!(
        caught.is_err(),
        "the checker did not notice a block overwritten outside the log"
    );
    srv.stop();
    eprintln!(
        "crash test: {cycles} SIGKILLs while writing, {startup_kills} during start-up, \
         {total_ops} requests, {total_flushes} flushes, {moved} bytes moved by the cleaner, \
         {:.1} s",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "crash test: slowest connection {:.0} ms, slowest first flush {:.0} ms; {} cycles \
         waited past their window for a first flush, at most {} ms",
        timing.connect_max * 1e3,
        timing.flush_max * 1e3,
        timing.extended,
        timing.wait_max.as_millis()
    );
    assert!(
        !cleaning || moved > 0,
        "the cleaner never ran: the kills did not test cleaning"
    );
}
