//! The NBD servers a benchmark compares: each started on a unix socket in a directory of its
//! own, by this process, and stopped by its PID.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Export name every server offers.
pub const EXPORT: &str = "vol0";

/// How long a server may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a server may take to exit after SIGTERM / SIGINT before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Ingot,
    QemuNbd,
    NbdkitFile,
    NbdServer,
    NbdkitMemory,
}

impl Peer {
    pub const ALL: [Peer; 5] = [
        Peer::Ingot,
        Peer::QemuNbd,
        Peer::NbdkitFile,
        Peer::NbdServer,
        Peer::NbdkitMemory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Ingot => "ingot",
            Peer::QemuNbd => "qemu-nbd",
            Peer::NbdkitFile => "nbdkit-file",
            Peer::NbdServer => "nbd-server",
            Peer::NbdkitMemory => "nbdkit-memory",
        }
    }

    pub fn parse(s: &str) -> Result<Peer> {
        Peer::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .with_context(|| {
                format!("unknown server {s:?} (ingot, qemu-nbd, nbdkit-file, nbd-server, nbdkit-memory)")
            })
    }

    /// Whether the server keeps its data in a raw file (`raw.img`).
    pub fn uses_raw_file(self) -> bool {
        matches!(self, Peer::QemuNbd | Peer::NbdkitFile | Peer::NbdServer)
    }

    /// The tool the server needs and its Debian package.
    pub fn tool(self) -> (&'static str, &'static str) {
        match self {
            Peer::Ingot => ("ingot", "cargo build --release -p ingot-cli"),
            Peer::QemuNbd => ("qemu-nbd", "qemu-utils"),
            Peer::NbdkitFile | Peer::NbdkitMemory => ("nbdkit", "nbdkit"),
            Peer::NbdServer => ("nbd-server", "nbd-server"),
        }
    }
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Spec {
    pub server: Peer,
    /// Directory for the socket, logs, pid files and the ingot pool.
    pub dir: PathBuf,
    /// Raw file served by qemu-nbd, nbdkit file and nbd-server.
    pub raw_file: PathBuf,
    /// Export size in bytes.
    pub size_bytes: u64,
    /// The `ingot` binary.
    pub ingot_bin: PathBuf,
    /// ingot pool capacity.
    pub pool_bytes: u64,
    /// `ingot pool create --prefill`.
    pub prefill: bool,
    /// Extra arguments for `ingot serve` (e.g. `--cache-size 0`).
    pub ingot_args: Vec<String>,
}

impl Spec {
    /// The command line the server runs with, for reports.
    pub fn describe(&self) -> String {
        match self.server {
            Peer::Ingot => format!(
                "ingot serve --nbd unix:SOCK {}(pool {} GiB{})",
                self.ingot_args
                    .iter()
                    .map(|a| format!("{a} "))
                    .collect::<String>(),
                self.pool_bytes >> 30,
                if self.prefill { ", prefilled" } else { "" }
            ),
            Peer::QemuNbd => "qemu-nbd -f raw --cache=none --aio=io_uring -t -e 8 raw.img".into(),
            Peer::NbdkitFile => "nbdkit -f file raw.img (page cache)".into(),
            Peer::NbdServer => {
                "nbd-server -C CONF (export raw.img, flush = true, fua = true; page cache)".into()
            }
            Peer::NbdkitMemory => format!("nbdkit -f memory size={}", self.size_bytes),
        }
    }
}

/// A server this process started.
pub struct Running {
    pub server: Peer,
    pub uri: String,
    pub socket: PathBuf,
    pub pool_dir: Option<PathBuf>,
    pid: i32,
    child: Option<Child>,
    ingot_bin: PathBuf,
}

fn log_file(dir: &Path, name: &str) -> Result<Stdio> {
    let f = fs::File::create(dir.join(format!("{name}.log")))?;
    Ok(Stdio::from(f))
}

fn spawn(cmd: &mut Command, dir: &Path, name: &str) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(log_file(dir, name)?)
        .stderr(log_file(dir, &format!("{name}.err"))?);
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// Run a command to completion, failing with its stderr.
pub fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Start a server and wait until its socket accepts connections.
pub fn start(spec: &Spec) -> Result<Running> {
    let dir = &spec.dir;
    fs::create_dir_all(dir)?;
    let socket = dir.join(format!("{}.sock", spec.server.name()));
    // A stale socket makes nbd-server exit silently and fools the readiness check.
    let _ = fs::remove_file(&socket);
    let size = spec.size_bytes.to_string();
    let raw = spec.raw_file.display().to_string();
    let mut pool_dir = None;
    let (child, pid) = match spec.server {
        Peer::Ingot => {
            let pool = dir.join("ingot-pool");
            let _ = fs::remove_dir_all(&pool);
            let mut c = Command::new(&spec.ingot_bin);
            c.args(["pool", "create", "--pool"])
                .arg(&pool)
                .args(["--size", &spec.pool_bytes.to_string()]);
            if spec.prefill {
                c.arg("--prefill");
            }
            run_quiet(&mut c)?;
            run_quiet(
                Command::new(&spec.ingot_bin)
                    .args(["volume", "create", EXPORT, "--size", &size, "--pool"])
                    .arg(&pool),
            )?;
            let mut c = Command::new(&spec.ingot_bin);
            c.args(["serve", "--pool"])
                .arg(&pool)
                .arg("--nbd")
                .arg(format!("unix:{}", socket.display()))
                .args(&spec.ingot_args);
            let child = spawn(&mut c, dir, "ingot")?;
            pool_dir = Some(pool);
            let pid = child.id() as i32;
            (Some(child), pid)
        }
        Peer::QemuNbd => {
            let child = spawn(
                Command::new("qemu-nbd")
                    .args(["-f", "raw", "--cache=none", "--aio=io_uring", "-t"])
                    .args(["-e", "8", "-x", EXPORT, "-k"])
                    .arg(&socket)
                    .arg(&raw),
                dir,
                "qemu-nbd",
            )?;
            let pid = child.id() as i32;
            (Some(child), pid)
        }
        Peer::NbdkitFile | Peer::NbdkitMemory => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "-e", EXPORT, "-U"]).arg(&socket);
            if spec.server == Peer::NbdkitFile {
                c.args(["file", &format!("file={raw}")]);
            } else {
                c.args(["memory", &format!("size={size}")]);
            }
            let child = spawn(&mut c, dir, spec.server.name())?;
            let pid = child.id() as i32;
            (Some(child), pid)
        }
        Peer::NbdServer => {
            let conf = dir.join("nbd-server.conf");
            let pidfile = dir.join("nbd-server.pid");
            let _ = fs::remove_file(&pidfile);
            fs::write(
                &conf,
                format!(
                    "[generic]\nunixsock = {}\n[{EXPORT}]\nexportname = {raw}\nflush = true\nfua = true\n",
                    socket.display()
                ),
            )?;
            // Without -d it daemonises: the parent exits once the daemon is up and the daemon
            // forks a child per connection. It is stopped by the PID in its pid file.
            let mut c = Command::new("nbd-server");
            c.arg("-C").arg(&conf).arg("-p").arg(&pidfile);
            run_quiet(&mut c)?;
            let deadline = Instant::now() + START_TIMEOUT;
            let pid = loop {
                if let Some(p) = fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    break p;
                }
                if Instant::now() > deadline {
                    bail!("nbd-server wrote no pid file (see syslog)");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            (None, pid)
        }
    };
    let mut r = Running {
        server: spec.server,
        uri: format!("nbd+unix:///{EXPORT}?socket={}", socket.display()),
        socket,
        pool_dir,
        pid,
        child,
        ingot_bin: spec.ingot_bin.clone(),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if UnixStream::connect(&r.socket).is_ok() {
            break;
        }
        if let Some(c) = r.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!(
                    "{} exited at start ({st}); see {}",
                    r.server.name(),
                    dir.display()
                );
            }
        }
        if Instant::now() > deadline {
            r.stop()?;
            bail!("{} did not open {}", r.server.name(), r.socket.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(r)
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

/// PIDs whose parent is `pid` (nbd-server's per-connection children).
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) {
            // Fields after the command name: state, ppid, ...
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<i32>().ok());
            if ppid == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PID this process started.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `ingot stats --json` through the server's control socket.
    pub fn ingot_stats(&self) -> Result<serde_json::Value> {
        let pool = self
            .pool_dir
            .as_ref()
            .context("stats are only known for ingot")?;
        let out = run_quiet(
            Command::new(&self.ingot_bin)
                .args(["stats", "--json", "--pool"])
                .arg(pool),
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Stop the server: ingot gets SIGINT (it flushes and checkpoints), the others SIGTERM;
    /// SIGKILL after [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> Result<()> {
        let sig = if self.server == Peer::Ingot {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        let kids = if self.child.is_none() {
            children_of(self.pid)
        } else {
            Vec::new()
        };
        signal(self.pid, sig);
        for k in &kids {
            signal(*k, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let done = match self.child.as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => !alive(self.pid) && kids.iter().all(|k| !alive(*k)),
            };
            if done {
                break;
            }
            if Instant::now() > deadline {
                signal(self.pid, libc::SIGKILL);
                for k in &kids {
                    signal(*k, libc::SIGKILL);
                }
                if let Some(c) = self.child.as_mut() {
                    let _ = c.wait();
                }
                bail!(
                    "{} did not stop within {STOP_TIMEOUT:?}; killed",
                    self.server.name()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = None;
        let _ = fs::remove_file(&self.socket);
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.is_some() || alive(self.pid) {
            let _ = self.stop();
        }
    }
}

/// Check that the tools of `servers` are installed; name the packages that are missing.
pub fn check_tools(servers: &[Peer], ingot_bin: &Path, extra: &[(&str, &str)]) -> Result<()> {
    let mut missing = Vec::new();
    for s in servers {
        let (tool, pkg) = s.tool();
        let ok = if *s == Peer::Ingot {
            ingot_bin.exists()
        } else {
            which(tool)
        };
        if !ok {
            missing.push(format!("{tool} ({pkg})"));
        }
    }
    for (tool, pkg) in extra {
        if !which(tool) {
            missing.push(format!("{tool} ({pkg})"));
        }
    }
    missing.dedup();
    if !missing.is_empty() {
        bail!("missing tools: {}", missing.join(", "));
    }
    Ok(())
}

pub fn which(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The `ingot` binary: `--ingot-bin`, else `INGOT_BIN`, else next to this executable.
pub fn ingot_bin(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("INGOT_BIN").map(PathBuf::from))
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("ingot")))
        })
        .unwrap_or_else(|| PathBuf::from("ingot"))
}
