//! Shared helpers for the end-to-end tests: find the `ingot` binary, run it as a server on a
//! temporary pool, require the real client tools (a missing tool fails the test, naming the Debian
//! package), run commands and show their output when they fail.
//!
//! Only the standard library is used here, so this crate adds nothing to the workspace's
//! dependencies.

pub mod iscsi;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Line prefix `ingot serve` prints once per listener when it is ready.
pub const SERVING: &str = "ingot: serving NBD on ";
/// How long a server may take to print its "serving" lines.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

/// Root of the cargo workspace (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// The `ingot` binary under test: `$INGOT_BIN`, else `$CARGO_TARGET_DIR/{release,debug}/ingot`,
/// else `<workspace>/target/{release,debug}/ingot`. Panics with instructions when none exists.
pub fn ingot_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("INGOT_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "INGOT_BIN={} does not exist: build it with `cargo build --release -p ingot-cli`",
            p.display()
        );
        return p;
    }
    let mut candidates = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        let t = if t.is_absolute() {
            t
        } else {
            workspace_root().join(t)
        };
        candidates.push(t.join("release/ingot"));
        candidates.push(t.join("debug/ingot"));
    }
    candidates.push(workspace_root().join("target/release/ingot"));
    candidates.push(workspace_root().join("target/debug/ingot"));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "the `ingot` binary was not found (looked at $INGOT_BIN and {}): run `cargo build --release` \
         first, or set INGOT_BIN to its path",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// The Debian package that provides a tool the tests call.
pub fn debian_package(tool: &str) -> &'static str {
    match tool.rsplit('/').next().unwrap_or(tool) {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdfuse" | "nbddump" => "libnbd-bin",
        "nbdsh" => "python3-libnbd",
        "python3" => "python3-libnbd",
        "fio" => "fio",
        "nbdkit" => "nbdkit",
        "fusermount3" => "fuse3",
        "sha256sum" | "cmp" | "truncate" => "coreutils",
        "kill" => "procps",
        "setpriv" => "util-linux",
        "openssl" => "openssl",
        "iscsi-inq" | "iscsi-ls" | "iscsi-test-cu" | "iscsi-readcapacity16" | "iscsi-perf" => {
            "libiscsi-bin"
        }
        "stdbuf" => "coreutils",
        "groff" => "groff-base",
        "systemd-analyze" => "systemd",
        "dpkg" | "dpkg-deb" => "dpkg",
        "dpkg-shlibdeps" => "dpkg-dev",
        "strip" => "binutils",
        "gzip" => "gzip",
        "bash" => "bash",
        _ => "(unknown package)",
    }
}

/// Full path of a tool the tests need. A missing tool fails the test (never a silent skip) with a
/// message naming the Debian package to install.
pub fn require_tool(tool: &str) -> PathBuf {
    let found = if tool.contains('/') {
        Path::new(tool).is_file().then(|| PathBuf::from(tool))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
    };
    found.unwrap_or_else(|| {
        panic!(
            "required tool `{tool}` is not installed: install the Debian package `{}` \
             (`apt-get install -y {}`, or run ./test.sh as root)",
            debian_package(tool),
            debian_package(tool)
        )
    })
}

/// Debian's `/usr/bin/python3` with libnbd's `nbd` module (a python3 earlier on PATH may lack it).
pub fn require_python_nbd() -> PathBuf {
    let py = require_tool("/usr/bin/python3");
    let out = Command::new(&py)
        .args(["-c", "import nbd"])
        .output()
        .expect("run /usr/bin/python3");
    assert!(
        out.status.success(),
        "/usr/bin/python3 cannot import the `nbd` module: install the Debian package \
         `python3-libnbd`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    py
}

/// Command line of `cmd` for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd`, capturing its output.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to start `{}`: {e}", describe(cmd)))
}

/// Run `cmd` and assert it succeeded; on failure the panic shows its status, stdout and stderr.
pub fn run(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "`{}` failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `cmd`, assert success and return its stdout as a string.
pub fn run_stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// `ingot ARGS...` as a command (not yet run).
pub fn ingot() -> Command {
    Command::new(ingot_bin())
}

/// Run `ingot ARGS...`, assert success, return stdout.
pub fn ingot_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_stdout(ingot().args(args))
}

/// Parse JSON that a tool printed after some text lines (fio's nbd engine prints
/// `fio: connected to NBD server` first): everything from the first `{` or `[` on.
pub fn parse_json(text: &str) -> serde_json::Value {
    let start = text
        .find(['{', '['])
        .unwrap_or_else(|| panic!("no JSON in output:\n{text}"));
    serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("bad JSON ({e}) in output:\n{text}"))
}

/// A temporary directory removed on drop (kept when `INGOT_KEEP_TMP` is set, for debugging).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "ingot-e2e-{tag}-{}-{nanos:x}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("INGOT_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound then released: another process could take it, but the
/// kernel hands out ephemeral ports round-robin, so a reuse in the next instant is unlikely).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// How to start `ingot serve`.
#[derive(Clone, Debug)]
pub struct ServeOpts {
    /// `--pool DIR`; `None` leaves it out (the server uses `./ingot-data` in `cwd`).
    pub pool: Option<PathBuf>,
    /// Listen on this unix socket.
    pub unix: Option<PathBuf>,
    /// Listen on 127.0.0.1:PORT.
    pub tcp_port: Option<u16>,
    /// Pass no `--nbd` at all (the default listener, 127.0.0.1:10809).
    pub default_listener: bool,
    pub cwd: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// Environment variables set for the server (e.g. `INGOT_HANDSHAKE_TIMEOUT_MS`).
    pub env: Vec<(String, String)>,
}

impl ServeOpts {
    /// A pool at `pool`, a unix socket `sock` and a free TCP port.
    pub fn new(pool: &Path, sock: &Path) -> ServeOpts {
        ServeOpts {
            pool: Some(pool.to_path_buf()),
            unix: Some(sock.to_path_buf()),
            tcp_port: Some(free_port()),
            default_listener: false,
            cwd: None,
            extra_args: vec!["--cache-size".into(), "64M".into()],
            env: Vec::new(),
        }
    }

    fn listeners(&self) -> usize {
        if self.default_listener {
            1
        } else {
            self.unix.is_some() as usize + self.tcp_port.is_some() as usize
        }
    }

    fn command(&self) -> Command {
        let mut c = ingot();
        c.arg("serve");
        if let Some(p) = &self.pool {
            c.arg("--pool").arg(p);
        }
        if !self.default_listener {
            if let Some(s) = &self.unix {
                c.arg("--nbd").arg(format!("unix:{}", s.display()));
            }
            if let Some(p) = self.tcp_port {
                c.arg("--nbd").arg(format!("127.0.0.1:{p}"));
            }
        }
        c.args(&self.extra_args);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        c
    }
}

/// A running `ingot serve`; SIGKILLed on drop if still running.
pub struct Server {
    child: Option<Child>,
    pub opts: ServeOpts,
    /// The "serving" lines it printed.
    pub serving: Vec<String>,
    stderr_path: PathBuf,
    // Keeps the temporary stderr file's directory alive.
    _logdir: TempDir,
}

impl Server {
    /// A pool in `dir/pool` (created by the server with its defaults when missing), a unix socket
    /// `dir/nbd.sock` and a free TCP port.
    pub fn start_in(dir: &Path) -> Server {
        Server::start(ServeOpts::new(&dir.join("pool"), &dir.join("nbd.sock")))
    }

    /// Start the server and wait for its "serving" lines; panics (with its stderr) if it exits
    /// or does not become ready in [`START_TIMEOUT`].
    pub fn start(opts: ServeOpts) -> Server {
        let s = Server::spawn(opts);
        s.wait_ready()
    }

    /// Start the server without waiting for it (for killing it during start-up).
    pub fn spawn(opts: ServeOpts) -> SpawnedServer {
        let logdir = TempDir::new("serve-log");
        let stderr_path = logdir.join("stderr");
        let stderr = File::create(&stderr_path).expect("create stderr file");
        let mut cmd = opts.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start `{}`: {e}", describe(&cmd)));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more: keep draining so the server never blocks.
                    continue;
                }
            }
        });
        SpawnedServer {
            server: Server {
                child: Some(child),
                opts,
                serving: Vec::new(),
                stderr_path,
                _logdir: logdir,
            },
            lines: rx,
            cmdline: describe(&cmd),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    pub fn pool(&self) -> &Path {
        self.opts.pool.as_deref().expect("server has --pool")
    }

    pub fn socket(&self) -> &Path {
        self.opts.unix.as_deref().expect("server has a unix socket")
    }

    pub fn port(&self) -> u16 {
        self.opts.tcp_port.expect("server has a TCP port")
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port())
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (at most 120 s) for it to exit; returns its exit status.
    pub fn terminate(self) -> (ExitStatus, String) {
        self.signal_and_wait("TERM")
    }

    /// Send `sig` (`TERM`, `INT`) and wait (at most 120 s) for it to exit.
    pub fn signal_and_wait(mut self, sig: &str) -> (ExitStatus, String) {
        let mut c = self.child.take().expect("server running");
        signal(c.id(), sig);
        let status = wait_timeout(&mut c, Duration::from_secs(120)).unwrap_or_else(|| {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "ingot serve did not exit within 120 s of SIG{sig}\n--- stderr ---\n{}",
                self.stderr()
            )
        });
        (status, self.stderr())
    }

    /// SIGTERM, and assert that it flushed and exited 0.
    pub fn stop(self) {
        let (status, stderr) = self.terminate();
        assert!(
            status.success(),
            "ingot serve exited with {status} after SIGTERM (expected 0)\n--- stderr ---\n{stderr}"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A server that was started but may not be ready yet.
pub struct SpawnedServer {
    pub server: Server,
    lines: mpsc::Receiver<String>,
    cmdline: String,
}

impl SpawnedServer {
    /// Wait for one "serving" line per listener.
    pub fn wait_ready(mut self) -> Server {
        let want = self.server.opts.listeners();
        let deadline = Instant::now() + START_TIMEOUT;
        let mut other = Vec::new();
        while self.server.serving.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) if line.starts_with(SERVING) => self.server.serving.push(line),
                Ok(line) => other.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    let c = self.server.child.as_mut().expect("child");
                    if let Ok(Some(status)) = c.try_wait() {
                        panic!(
                            "`{}` exited with {status} before it was ready\n--- stdout ---\n{}\n\
                             --- stderr ---\n{}",
                            self.cmdline,
                            other.join("\n"),
                            self.server.stderr()
                        );
                    }
                }
                Err(_) => {
                    let c = self.server.child.as_mut().expect("child");
                    let status = match c.try_wait() {
                        Ok(Some(s)) => format!("exited with {s}"),
                        _ => {
                            if Instant::now() >= deadline {
                                "was not ready within the start timeout".to_string()
                            } else {
                                // stdout closed but the process is still alive
                                let s = wait_timeout(c, Duration::from_secs(10));
                                format!("closed stdout ({s:?})")
                            }
                        }
                    };
                    panic!(
                        "`{}` {status}: printed {} of {want} `{SERVING}...` lines\n--- stdout ---\n{}\n\
                         {}\n--- stderr ---\n{}",
                        self.cmdline,
                        self.server.serving.len(),
                        self.server.serving.join("\n"),
                        other.join("\n"),
                        self.server.stderr()
                    );
                }
            }
        }
        // Keep draining stdout in the background (the reader thread does; drop the receiver).
        self.server.child.as_ref().expect("child");
        let SpawnedServer { server, .. } = self;
        server
    }

    /// SIGKILL it whatever state it is in.
    pub fn kill9(self) {
        self.server.kill9()
    }
}

/// Send a signal by name (`TERM`, `KILL`, `INT`) with the `kill` command.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Wait for a child at most `t`; `None` if it is still running.
pub fn wait_timeout(c: &mut Child, t: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        match c.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// Deterministic pseudo-random bytes (splitmix64): fast enough for gigabytes, not compressible.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }
}

/// Write a file of `len` bytes of "realistic" data: random chunks, runs of zeroes (whole and
/// partial blocks), compressible text-like chunks and repeated blocks, in 1 MiB pieces.
pub fn write_mixed_file(path: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut rng = Prng::new(seed);
    let mut f = std::io::BufWriter::with_capacity(
        4 << 20,
        File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    let piece = MIB as usize;
    let mut buf = vec![0u8; piece];
    let mut done = 0u64;
    while done < len {
        let n = piece.min((len - done) as usize);
        let b = &mut buf[..n];
        match rng.below(8) {
            // plain random
            0..=2 => rng.fill(b),
            // all zero
            3 => b.fill(0),
            // random with zero holes of random size at random places (not block aligned)
            4 => {
                rng.fill(b);
                for _ in 0..16 {
                    let at = rng.below(n as u64) as usize;
                    let l = (rng.below(64 << 10) as usize).min(n - at);
                    b[at..at + l].fill(0);
                }
            }
            // text-like, compressible
            5 => {
                for (i, x) in b.iter_mut().enumerate() {
                    *x = b"ingot log-structured block store "[(i + done as usize) % 33];
                }
                for _ in 0..64 {
                    let at = rng.below(n as u64) as usize;
                    b[at] = rng.next_u64() as u8;
                }
            }
            // the same 4 KiB block repeated
            6 => {
                let mut blk = [0u8; 4096];
                rng.fill(&mut blk);
                for c in b.chunks_mut(4096) {
                    c.copy_from_slice(&blk[..c.len()]);
                }
            }
            // sparse: mostly zero, a few random 4 KiB blocks
            _ => {
                b.fill(0);
                for _ in 0..8 {
                    let at = (rng.below((n / 4096) as u64) as usize) * 4096;
                    let end = (at + 4096).min(n);
                    rng.fill(&mut b[at..end]);
                }
            }
        }
        f.write_all(b).expect("write mixed file");
        done += n as u64;
    }
    f.flush().expect("flush mixed file");
}

/// SHA-256 of a file, with coreutils' `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    let out = run_stdout(Command::new(require_tool("sha256sum")).arg(path));
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum printed nothing for {}", path.display()))
        .to_string()
}

/// CRC-32 (IEEE, as Python's `zlib.crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Read a whole file (panicking with its name on error).
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// `ingot stats --json --pool DIR`, parsed.
pub fn stats(pool: &Path) -> serde_json::Value {
    parse_json(&ingot_ok([
        "stats".as_ref(),
        "--json".as_ref(),
        "--pool".as_ref(),
        pool.as_os_str(),
    ]))
}

/// `ingot volume list --json --pool DIR`, parsed.
pub fn volumes(pool: &Path) -> Vec<serde_json::Value> {
    let v = parse_json(&ingot_ok([
        "volume".as_ref(),
        "list".as_ref(),
        "--json".as_ref(),
        "--pool".as_ref(),
        pool.as_os_str(),
    ]));
    v.as_array()
        .unwrap_or_else(|| panic!("volume list --json is not an array: {v}"))
        .clone()
}

/// The entry of volume `name` in `ingot volume list --json`, if any.
pub fn volume(pool: &Path, name: &str) -> Option<serde_json::Value> {
    volumes(pool).into_iter().find(|v| v["name"] == name)
}

/// `ingot volume create NAME --size SIZE --pool DIR`.
pub fn create_volume(pool: &Path, name: &str, size: &str) {
    ingot_ok([
        "volume".as_ref(),
        "create".as_ref(),
        name.as_ref(),
        "--size".as_ref(),
        size.as_ref(),
        "--pool".as_ref(),
        pool.as_os_str(),
    ]);
}

/// `nbdinfo --json URI`: the export's size in bytes.
pub fn nbd_export_size(uri: &str) -> u64 {
    let out = run_stdout(Command::new(require_tool("nbdinfo")).arg("--json").arg(uri));
    let v = parse_json(&out);
    v["exports"][0]["export-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("nbdinfo --json {uri}: no exports[0].export-size in {v}"))
}

/// Run `cmd` capturing its output, but kill it and fail if it runs longer than `t` (for commands
/// that must refuse to start, which would otherwise serve forever).
pub fn output_timeout(cmd: &mut Command, t: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start `{}`: {e}", describe(cmd)));
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let ho = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let he = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = wait_timeout(&mut child, t);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = ho.join().unwrap_or_default();
    let stderr = he.join().unwrap_or_default();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "`{}` still ran after {t:?} (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
            describe(cmd),
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// A pool of `pool_size` in `dir/pool` with volume vol0 of `vol_size`, served over NBD (unix
/// socket and TCP) and iSCSI on a free port, with `extra` serve arguments; the iSCSI port.
/// `ingot pool create --pool POOL --size SIZE`.
pub fn create_pool(pool: &Path, size: &str) {
    create_pool_with(pool, size, &[]);
}

/// `ingot pool create --pool POOL --size SIZE EXTRA...`.
pub fn create_pool_with(pool: &Path, size: &str, extra: &[&str]) {
    let pool = pool.display().to_string();
    let mut args = vec!["pool", "create", "--pool", &pool, "--size", size];
    args.extend_from_slice(extra);
    ingot_ok(args);
}

pub fn iscsi_server(
    dir: &Path,
    pool_size: &str,
    vol_size: &str,
    extra: &[String],
) -> (Server, u16) {
    let pool = dir.join("pool");
    create_pool(&pool, pool_size);
    create_volume(&pool, "vol0", vol_size);
    let port = free_port();
    let mut opts = ServeOpts::new(&pool, &dir.join("nbd.sock"));
    opts.extra_args
        .extend(["--iscsi".to_string(), format!("127.0.0.1:{port}")]);
    opts.extra_args.extend(extra.iter().cloned());
    (Server::start(opts), port)
}
