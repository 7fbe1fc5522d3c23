//! Write+flush latency measured with libnbd's Python module: fio's nbd engine with
//! `--fdatasync=1` is capped at 1,000 pairs/s whatever the server.

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

/// Whether libnbd's Python module is importable.
pub fn available() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
