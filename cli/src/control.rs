//! Control API: one JSON request per line on a unix socket in the pool directory, one JSON
//! reply per line. `ingot serve` answers it; the CLI uses it whenever a server holds the pool.
//!
//! Whoever reaches the socket can delete volumes, so: the socket is 0600 from the moment it
//! appears, peers other than the server's own user and root are refused (SO_PEERCRED), and a
//! request is read into at most [`MAX_REQUEST_BYTES`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ingot_engine::{DedupDomain, Pool, QosChange};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const SOCKET: &str = "control.sock";
/// Longest request line read; a longer one gets an error reply and the connection is closed.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Time a client gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    VolumeCreate {
        name: String,
        size_bytes: u64,
        /// Dedup domain from the first write (shared when not given).
        #[serde(default)]
        dedup_domain: Option<DedupDomain>,
    },
    VolumeList,
    VolumeDelete {
        name: String,
    },
    VolumeResize {
        name: String,
        size_bytes: u64,
    },
    VolumeSet {
        name: String,
        dedup: Option<bool>,
        compression: Option<bool>,
        #[serde(default)]
        dedup_domain: Option<DedupDomain>,
        /// QoS limits to change (absent: unchanged; 0: none).
        #[serde(default)]
        qos: QosChange,
    },
    VolumeSnapshot {
        source: String,
        name: String,
    },
    VolumeClone {
        source: String,
        name: String,
    },
    Stats,
    Check,
    Gc {
        max_utilisation: f64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub error: String,
}

/// Run a request against an open pool.
pub fn execute(pool: &Pool, req: &Request) -> Result<Value> {
    Ok(match req {
        Request::VolumeCreate {
            name,
            size_bytes,
            dedup_domain,
        } => {
            pool.create_volume_in(name, *size_bytes, dedup_domain.clone().unwrap_or_default())?;
            Value::Null
        }
        Request::VolumeList => serde_json::to_value(pool.volumes())?,
        Request::VolumeSnapshot { source, name } => {
            pool.snapshot_volume(source, name)?;
            Value::Null
        }
        Request::VolumeClone { source, name } => {
            pool.clone_volume(source, name)?;
            Value::Null
        }
        Request::VolumeDelete { name } => {
            pool.delete_volume(name)?;
            Value::Null
        }
        Request::VolumeResize { name, size_bytes } => {
            pool.resize_volume(name, *size_bytes)?;
            Value::Null
        }
        Request::VolumeSet {
            name,
            dedup,
            compression,
            dedup_domain,
            qos,
        } => {
            // Nothing to change still checks that the volume exists.
            if dedup.is_some() || compression.is_some() || dedup_domain.is_some() || qos.is_empty()
            {
                pool.set_volume_reduction(name, *dedup, *compression, dedup_domain.clone())?;
            }
            if !qos.is_empty() {
                pool.set_volume_qos(name, qos)?;
            }
            Value::Null
        }
        Request::Stats => serde_json::to_value(pool.stats())?,
        Request::Check => serde_json::to_value(pool.check(&mut |_, _| {}))?,
        Request::Gc { max_utilisation } => {
            serde_json::to_value(pool.gc(*max_utilisation, &mut |_, _| {})?)?
        }
    })
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

/// Send a request to the server holding `dir`, if one answers.
pub fn call(dir: &Path, req: &Request) -> Option<Result<Value>> {
    let stream = UnixStream::connect(socket_path(dir)).ok()?;
    Some(call_on(stream, req))
}

fn call_on(mut stream: UnixStream, req: &Request) -> Result<Value> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    // A server that refuses us replies and closes without reading: its reply says why, so it
    // is read even when sending failed.
    let sent = stream.write_all(&line);
    let mut reply = String::new();
    let read = BufReader::new(&stream).read_line(&mut reply);
    if reply.is_empty() {
        sent.context("sending to the server")?;
    }
    read.context("reading the server's reply")?;
    let resp: Response = serde_json::from_str(&reply).context("the server's reply is not valid")?;
    if resp.ok {
        Ok(resp.result)
    } else {
        Err(anyhow!(resp.error))
    }
}

/// Serve the control socket until the process exits.
pub fn serve(dir: &Path, pool: Arc<Pool>) -> Result<()> {
    let path = socket_path(dir);
    let listener = bind_private(dir, &path)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let server_uid = unsafe { libc::geteuid() };
    std::thread::Builder::new()
        .name("ingot-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let pool = pool.clone();
                std::thread::spawn(move || handle(conn, &pool, server_uid));
            }
        })?;
    Ok(())
}

/// Bind the socket at `path` with mode 0600 and no moment where anyone else could connect: it
/// is bound inside a fresh 0700 directory, made 0600 there, then renamed into place. (A umask
/// would be process-wide, and other threads are already creating files.)
fn bind_private(dir: &Path, path: &Path) -> Result<UnixListener> {
    let private = dir.join(format!(".control.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(private.join(SOCKET));
    let _ = std::fs::remove_dir(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let staged = private.join(SOCKET);
    let bound = UnixListener::bind(&staged)
        .and_then(|l| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&staged, path)?;
            Ok(l)
        })
        .with_context(|| format!("binding {}", path.display()));
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Whether a peer running as `peer_uid` may use the control socket of a server running as
/// `server_uid`: only the same user, and root.
pub fn peer_allowed(peer_uid: u32, server_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == server_uid
}

/// The user id of the process at the other end of `conn` (SO_PEERCRED).
fn peer_uid(conn: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` outlive the call, `len` is the size of `cred`, and the
    // descriptor is open.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Why a request could not be read.
#[derive(Debug)]
enum ReadError {
    TooLong,
    Io,
}

/// Read one request line (newline excluded) of at most `max` bytes, never buffering more.
fn read_request<R: Read>(r: R, max: usize) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    BufReader::with_capacity(8 << 10, r.take(max as u64 + 1))
        .read_until(b'\n', &mut line)
        .map_err(|_| ReadError::Io)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(ReadError::TooLong);
    }
    Ok(line)
}

fn failure(error: String) -> Response {
    Response {
        ok: false,
        result: Value::Null,
        error,
    }
}

fn handle(conn: UnixStream, pool: &Pool, server_uid: u32) {
    let resp = match peer_uid(&conn) {
        Ok(uid) if peer_allowed(uid, server_uid) => {
            let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
            let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
            match read_request(&conn, MAX_REQUEST_BYTES) {
                Ok(line) => answer(pool, &line),
                Err(ReadError::TooLong) => failure(format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes: refused"
                )),
                Err(ReadError::Io) => return,
            }
        }
        Ok(uid) => failure(format!(
            "permission denied: user {uid} may not use the control socket of a server run by \
             user {server_uid}"
        )),
        Err(e) => failure(format!("permission denied: cannot tell who you are ({e})")),
    };
    if let Ok(mut out) = serde_json::to_vec(&resp) {
        out.push(b'\n');
        let _ = (&conn).write_all(&out);
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

fn answer(pool: &Pool, line: &[u8]) -> Response {
    match serde_json::from_slice::<Request>(line) {
        Err(e) => failure(format!("bad request: {e}")),
        Ok(req) => match execute(pool, &req) {
            Ok(result) => Response {
                ok: true,
                result,
                error: String::new(),
            },
            Err(e) => failure(format!("{e:#}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_servers_user_and_root_may_connect() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(65534, 1000));
        assert!(!peer_allowed(1000, 0));
    }

    #[test]
    fn requests_are_read_up_to_the_limit_only() {
        let ok = |input: &[u8]| read_request(input, 16).map_err(|e| format!("{e:?}"));
        assert_eq!(
            ok(b"{\"cmd\":\"stats\"}\n").unwrap(),
            b"{\"cmd\":\"stats\"}"
        );
        assert_eq!(ok(b"0123456789abcdef\nrest").unwrap(), b"0123456789abcdef");
        assert_eq!(ok(b"no newline").unwrap(), b"no newline");
        assert!(ok(b"0123456789abcdefX\n").is_err());
        // A huge line without a newline: refused after reading just past the limit.
        let mut huge = io::repeat(b'a').take(100 << 20);
        assert!(matches!(
            read_request(&mut huge, MAX_REQUEST_BYTES),
            Err(ReadError::TooLong)
        ));
        assert_eq!(huge.limit(), (100 << 20) - MAX_REQUEST_BYTES as u64 - 1);
    }
}
