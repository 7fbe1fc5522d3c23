//! Control API: one JSON request per line on a unix socket in the pool directory, one JSON
//! reply per line. `ingot serve` answers it; the CLI uses it whenever a server holds the pool.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use ingot_engine::Pool;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const SOCKET: &str = "control.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    VolumeCreate {
        name: String,
        size_bytes: u64,
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
        Request::VolumeCreate { name, size_bytes } => {
            pool.create_volume(name, *size_bytes)?;
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
        } => {
            pool.set_volume_policy(name, *dedup, *compression)?;
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
    stream.write_all(&line).context("sending to the server")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the server's reply")?;
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
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::Builder::new()
        .name("ingot-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let pool = pool.clone();
                std::thread::spawn(move || handle(conn, &pool));
            }
        })?;
    Ok(())
}

fn handle(conn: UnixStream, pool: &Pool) {
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.len() > 1 << 16 {
        return;
    }
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response {
            ok: false,
            result: Value::Null,
            error: format!("bad request: {e}"),
        },
        Ok(req) => match execute(pool, &req) {
            Ok(result) => Response {
                ok: true,
                result,
                error: String::new(),
            },
            Err(e) => Response {
                ok: false,
                result: Value::Null,
                error: format!("{e:#}"),
            },
        },
    };
    if let Ok(mut out) = serde_json::to_vec(&resp) {
        out.push(b'\n');
        let _ = (&conn).write_all(&out);
    }
}
