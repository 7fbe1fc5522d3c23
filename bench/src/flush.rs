//! Write+flush latency measured with libnbd's Python module: fio's nbd engine with
//! `--fdatasync=1` is capped at 1,000 pairs/s whatever the server.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Debian's python3: it has libnbd's `nbd` module (python3-libnbd); one earlier on PATH may not.
pub const PYTHON: &str = "/usr/bin/python3";

/// One 4 KiB write at a random offset, then a flush, in a loop, one request at a time.
const SCRIPT: &str = r#"
import json, os, random, sys, time
import nbd
uri, secs = sys.argv[1], float(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
buf = os.urandom(4096)
rng = random.Random(7)
lat = []
t0 = time.monotonic()
end = t0 + secs
while time.monotonic() < end:
    off = rng.randrange(blocks) * 4096
    s = time.perf_counter_ns()
    h.pwrite(buf, off)
    h.flush()
    lat.append(time.perf_counter_ns() - s)
el = time.monotonic() - t0
h.shutdown()
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000.0
print(json.dumps({"pairs_per_s": len(lat) / el, "latency_us_p50": q(0.50), "latency_us_p99": q(0.99)}))
"#;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FlushLatency {
    /// 4 KiB write + flush pairs per second, one at a time.
    pub pairs_per_s: f64,
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
}

pub fn measure(uri: &str, seconds: f64) -> Result<FlushLatency> {
    let out = Command::new(PYTHON)
        .args(["-c", SCRIPT, uri, &seconds.to_string()])
        .output()
        .context("running /usr/bin/python3 (apt-get install python3-libnbd)")?;
    if !out.status.success() {
        bail!(
            "libnbd flush probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(FlushLatency {
        pairs_per_s: f("pairs_per_s"),
        latency_us_p50: f("latency_us_p50"),
        latency_us_p99: f("latency_us_p99"),
    })
}

/// The same loop on a local file: a 4 KiB `O_DIRECT` write at a random block, then
/// `fdatasync`, one at a time. The file must exist, written through (preallocated), so that
/// the loop measures the device's commit and not block allocation. What a server's pair is held
/// to: a database's WAL on a local disk pays this.
pub fn measure_local(path: &Path, seconds: f64) -> Result<FlushLatency> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let blocks = f.metadata()?.len() / 4096;
    if blocks == 0 {
        bail!("{} is empty", path.display());
    }
    let layout = std::alloc::Layout::from_size_align(4096, 4096)?;
    // SAFETY: a non-zero size; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        bail!("out of memory");
    }
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..512 {
        let v = next().to_ne_bytes();
        // SAFETY: within the 4096-byte allocation.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), buf.add(i * 8), 8) };
    }
    let fd = f.as_raw_fd();
    let mut lat = Vec::new();
    let start = std::time::Instant::now();
    let r = loop {
        if start.elapsed().as_secs_f64() >= seconds {
            break Ok(());
        }
        let off = (next() % blocks * 4096) as libc::off_t;
        let t = std::time::Instant::now();
        // SAFETY: `buf` holds 4096 bytes; `fd` is open for as long as `f` lives.
        let n = unsafe { libc::pwrite(fd, buf.cast(), 4096, off) };
        if n != 4096 {
            break Err(std::io::Error::last_os_error());
        }
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::fdatasync(fd) } != 0 {
            break Err(std::io::Error::last_os_error());
        }
        lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
    };
    let elapsed = start.elapsed().as_secs_f64();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    r.context("write+fdatasync on the local file")?;
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((p * lat.len() as f64) as usize).min(lat.len() - 1)];
    Ok(FlushLatency {
        pairs_per_s: lat.len() as f64 / elapsed,
        latency_us_p50: q(0.50),
        latency_us_p99: q(0.99),
    })
}

/// Whether libnbd's Python module is importable.
pub fn available() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
