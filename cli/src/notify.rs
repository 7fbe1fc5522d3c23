//! The systemd notification protocol (`sd_notify`), for `Type=notify` units: READY=1 once every
//! listener is up, WATCHDOG=1 while the pool is healthy, RELOADING=1 then READY=1 around a
//! reload (SIGHUP), STOPPING=1 at shutdown. Without
//! `NOTIFY_SOCKET` in the environment nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// Half of `WATCHDOG_USEC`: how often the watchdog hears from us.
    watchdog: Option<Duration>,
    last_ping: Instant,
}

impl Notifier {
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_str()?;
        let addr = match path.strip_prefix('@') {
            // An abstract socket (the usual kind under systemd).
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            }
            None => SocketAddr::from_pathname(path).ok()?,
        };
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0)
            // WATCHDOG_PID, when set, names the process the watchdog is for.
            .filter(|_| {
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_none_or(|p| p == std::process::id())
            })
            .map(|us| Duration::from_micros(us / 2));
        Some(Notifier {
            sock: UnixDatagram::unbound().ok()?,
            addr,
            watchdog,
            last_ping: Instant::now(),
        })
    }

    fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::warn!(error = %e, "could not notify the service manager");
        }
    }

    /// Every listener is up.
    pub fn ready(&mut self) {
        self.send(&format!("READY=1\nMAINPID={}", std::process::id()));
        self.last_ping = Instant::now();
    }

    /// Called often: pings the watchdog when one is due, unless the pool stopped taking
    /// requests (the service manager then restarts the server, which recovers the pool).
    pub fn tick(&mut self, healthy: bool) {
        if let Some(every) = self.watchdog {
            if healthy && self.last_ping.elapsed() >= every {
                self.send("WATCHDOG=1");
                self.last_ping = Instant::now();
            }
        }
    }

    /// A reload started (READY=1 follows when it is over). MONOTONIC_USEC lets a
    /// `Type=notify-reload` service manager match it to the signal it sent.
    pub fn reloading(&self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec that outlives the call.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let us = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={us}"));
    }

    /// Shutdown started (flush, checkpoint).
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}
