//! What machine a run was taken on, and whether anything else was competing for it.

use std::fs;
use std::process::Command;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub filesystem: String,
    pub fio: String,
}

pub fn machine(dir: &std::path::Path) -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let memory_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let out = |c: &mut Command| {
        c.output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: (memory_gib * 10.0).round() / 10.0,
        kernel: out(Command::new("uname").arg("-r")),
        filesystem: out(Command::new("df")
            .args(["--output=source,fstype", "-h"])
            .arg(dir))
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" "),
        fio: out(Command::new("fio").arg("--version")),
    }
}

/// Compilers and other heavy processes running now (other engineers' builds make figures noisy).
pub fn competing_processes() -> Vec<String> {
    const HEAVY: [&str; 4] = ["rustc", "cargo", "cc1", "ld"];
    let mut seen = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if e.file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
                .is_none()
            {
                continue;
            }
            if let Ok(c) = fs::read_to_string(e.path().join("comm")) {
                let c = c.trim().to_string();
                if HEAVY.contains(&c.as_str()) && !seen.contains(&c) {
                    seen.push(c);
                }
            }
        }
    }
    seen
}

/// 1-minute load average.
pub fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Load and competing processes seen over a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Noise {
    pub max_load_average: f64,
    pub samples_with_compilers: u32,
    pub samples: u32,
    pub compilers_seen: Vec<String>,
}

impl Noise {
    pub fn sample(&mut self) {
        let l = load_average();
        if l.is_finite() && l > self.max_load_average {
            self.max_load_average = l;
        }
        let c = competing_processes();
        self.samples += 1;
        if !c.is_empty() {
            self.samples_with_compilers += 1;
        }
        for x in c {
            if !self.compilers_seen.contains(&x) {
                self.compilers_seen.push(x);
            }
        }
    }

    pub fn summary(&self) -> String {
        if self.samples_with_compilers == 0 {
            format!(
                "no compilers seen during the run; max load average {:.1}",
                self.max_load_average
            )
        } else {
            format!(
                "NOISY: {} ({}) running during {} of {} measurements; max load average {:.1}",
                self.compilers_seen.join(", "),
                "other builds",
                self.samples_with_compilers,
                self.samples,
                self.max_load_average
            )
        }
    }
}

/// Bytes available to unprivileged users on the file system holding `dir`.
pub fn available_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct it is given; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Refuse to start when `dir`'s file system has less than `need` bytes free: a benchmark that
/// fills a shared disk breaks everyone's work.
pub fn ensure_space(dir: &std::path::Path, need: u64) -> anyhow::Result<()> {
    if let Some(avail) = available_bytes(dir) {
        if avail < need {
            anyhow::bail!(
                "{} has {} MiB free, this run needs about {} MiB: choose a smaller size or \
                 another --dir (a tmpfs such as /dev/shm measures software overhead only)",
                dir.display(),
                avail >> 20,
                need >> 20
            );
        }
    }
    Ok(())
}

/// CPU seconds used so far by the children this process has waited for (fio and its jobs).
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    if rc != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds of process `pid`, its threads and the children it has reaped (nbd-server's
/// per-connection processes).
pub fn process_cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // After the command name: state is field 3; utime, stime, cutime, cstime are 14-17.
    let rest: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = (11..15)
        .filter_map(|i| rest.get(i).and_then(|x| x.parse::<f64>().ok()))
        .sum();
    ticks / hz
}

/// Busy and total jiffies of all CPUs (`/proc/stat`).
pub fn cpu_jiffies() -> (u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are the 4th and 5th numbers.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Machine-wide CPU use between two [`cpu_jiffies`] samples, in % of one core.
pub fn machine_cpu_pct(before: (u64, u64), after: (u64, u64), cores: usize) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1) as f64;
    if total == 0.0 {
        return f64::NAN;
    }
    busy / total * 100.0 * cores as f64
}

/// What bounded a measurement, from the CPU the client, the server and the whole machine used
/// over it (all in % of one core).
pub fn limit(
    client_cpu_pct: f64,
    server_cpu_pct: f64,
    machine_cpu_pct: f64,
    connections: u32,
    cores: usize,
) -> String {
    let server = if server_cpu_pct.is_finite() {
        server_cpu_pct
    } else {
        0.0
    };
    let ours = client_cpu_pct + server;
    let capacity = 100.0 * cores as f64;
    let machine = if machine_cpu_pct.is_finite() {
        machine_cpu_pct.max(ours)
    } else {
        ours
    };
    if client_cpu_pct >= 85.0 * f64::from(connections) {
        "CPU (client)".into()
    } else if machine >= 0.85 * capacity {
        if ours < 0.6 * machine {
            "CPU (other processes)".into()
        } else if client_cpu_pct >= server {
            "CPU (client)".into()
        } else {
            "CPU (server)".into()
        }
    } else {
        "device / latency".into()
    }
}

#[cfg(test)]
mod tests {
    use super::{limit, with_device};

    #[test]
    fn limits() {
        assert_eq!(limit(95.0, 50.0, 150.0, 1, 2), "CPU (client)");
        assert_eq!(limit(40.0, 140.0, 190.0, 1, 2), "CPU (server)");
        assert_eq!(limit(30.0, 40.0, 195.0, 1, 2), "CPU (other processes)");
        assert_eq!(limit(30.0, 40.0, 80.0, 1, 2), "device / latency");
        assert_eq!(limit(60.0, f64::NAN, f64::NAN, 1, 2), "device / latency");
        assert_eq!(
            with_device("device / latency".into(), 97.0),
            "device (busy)"
        );
        assert_eq!(
            with_device("device / latency".into(), 40.0),
            "latency (device 40% busy)"
        );
        assert_eq!(
            with_device("device / latency".into(), f64::NAN),
            "device / latency"
        );
        assert_eq!(with_device("CPU (server)".into(), 30.0), "CPU (server)");
    }
}

/// Tell "device / latency" apart with the device's busy time: a device with I/O in flight
/// nearly all the time is the limit; one idle part of the time is waiting for its submitter.
pub fn with_device(limit: String, device_util_pct: f64) -> String {
    if limit != "device / latency" || !device_util_pct.is_finite() {
        return limit;
    }
    if device_util_pct >= 90.0 {
        "device (busy)".into()
    } else {
        format!("latency (device {device_util_pct:.0}% busy)")
    }
}

/// The block device a directory lives on, as `/proc/diskstats` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub major: u32,
    pub minor: u32,
}

/// The block device under `dir`, if it is one (`None` on tmpfs and other devices without
/// stats).
pub fn disk_of(dir: &std::path::Path) -> Option<Disk> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(dir).ok()?.dev();
    let disk = Disk {
        major: libc::major(dev),
        minor: libc::minor(dev),
    };
    disk_sample(&disk).map(|_| disk)
}

/// A device's cumulative counters (`/proc/diskstats`, see the kernel's iostats documentation).
#[derive(Debug, Clone, Copy)]
pub struct DiskSample {
    at: std::time::Instant,
    ios: u64,
    sectors: u64,
    /// Milliseconds the device had I/O in flight (`io_ticks`).
    busy_ms: u64,
    /// Milliseconds of I/O in flight, weighted by how many (`time_in_queue`).
    queued_ms: u64,
}

pub fn disk_sample(d: &Disk) -> Option<DiskSample> {
    let stats = fs::read_to_string("/proc/diskstats").ok()?;
    let at = std::time::Instant::now();
    stats.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
        if n(0)? != u64::from(d.major) || n(1)? != u64::from(d.minor) {
            return None;
        }
        // 3 reads, 5 sectors read, 7 writes, 9 sectors written, 12 io_ticks, 13 time in queue.
        Some(DiskSample {
            at,
            ios: n(3)? + n(7)?,
            sectors: n(5)? + n(9)?,
            busy_ms: n(12)?,
            queued_ms: n(13)?,
        })
    })
}

/// What the device did between two samples, as `iostat -x` reports it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DeviceLoad {
    /// Average requests in flight (`aqu-sz`).
    pub queue_depth: f64,
    /// Average request size in KiB (`areq-sz`).
    pub request_kib: f64,
    /// Share of the time the device had a request in flight (`%util`).
    pub util_pct: f64,
}

impl Default for DeviceLoad {
    fn default() -> Self {
        DeviceLoad {
            queue_depth: f64::NAN,
            request_kib: f64::NAN,
            util_pct: f64::NAN,
        }
    }
}

pub fn device_load(a: Option<DiskSample>, b: Option<DiskSample>) -> DeviceLoad {
    let (Some(a), Some(b)) = (a, b) else {
        return DeviceLoad::default();
    };
    let ms = b.at.duration_since(a.at).as_secs_f64() * 1000.0;
    let ios = b.ios.saturating_sub(a.ios);
    if ms <= 0.0 {
        return DeviceLoad::default();
    }
    DeviceLoad {
        queue_depth: b.queued_ms.saturating_sub(a.queued_ms) as f64 / ms,
        request_kib: if ios == 0 {
            f64::NAN
        } else {
            b.sectors.saturating_sub(a.sectors) as f64 * 512.0 / 1024.0 / ios as f64
        },
        util_pct: (b.busy_ms.saturating_sub(a.busy_ms) as f64 / ms * 100.0).min(100.0),
    }
}

/// One line of progress for a long benchmark run: rewritten in place on a terminal, a line
/// per step otherwise (logs).
pub fn progress(start: std::time::Instant, step: usize, steps: usize, what: &str) {
    use std::io::IsTerminal;
    let e = start.elapsed().as_secs();
    let line = format!("[{step:>3}/{steps}  {:>2}:{:02}] {what}", e / 60, e % 60);
    if std::io::stderr().is_terminal() {
        eprint!("\r{line:<78}");
        if step == steps {
            eprintln!();
        }
    } else {
        eprintln!("{line}");
    }
}
