//! The pool's log key and the MAC it seals segment headers and records with.

/// Secret key of a pool that authenticates its log: every segment header and record carries a
/// keyed BLAKE3 MAC ([`log_mac`]) bound to where it lies and where it stands in its chain.
/// Clients choose every byte of their payloads, which land inside segments, so a checksum alone
/// cannot tell a record from a payload that imitates one (or that copies a genuine record); a
/// MAC under a key that only superblocks hold can. Random per pool, never written to a segment,
/// never reported.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LogKey(pub [u8; 32]);

impl LogKey {
    /// A fresh key from the kernel's random source.
    pub fn generate() -> std::io::Result<LogKey> {
        Ok(LogKey(random_bytes()?))
    }
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogKey(..)")
    }
}

/// `N` bytes from getrandom(2) (blocking only until the kernel's pool is first seeded).
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut out = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: the pointer and length describe the unfilled tail of `out`.
        let n = unsafe { libc::getrandom(out[got..].as_mut_ptr().cast(), N - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(out)
}

/// Bytes of a log MAC kept on disk (a truncated keyed BLAKE3 hash).
pub const MAC_BYTES: usize = 16;

/// Keyed BLAKE3 of `parts` under `domain` (which keeps MACs of different structures apart),
/// truncated to [`MAC_BYTES`].
pub fn log_mac(key: &LogKey, domain: &[u8], parts: &[&[u8]]) -> [u8; MAC_BYTES] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(domain);
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..MAC_BYTES]);
    out
}

/// Compare MACs without an early exit.
pub(super) fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
