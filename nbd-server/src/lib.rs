//! NBD server front end for the ingot engine.
//!
//! The server speaks the fixed newstyle NBD protocol (structured replies, `base:allocation`
//! block status) over TCP and unix sockets. It is thread based: one accept thread per listener,
//! and per connection a reader thread that submits requests without waiting and a writer thread
//! that sends replies as they complete (possibly out of order).
//!
//! ```no_run
//! use std::sync::Arc;
//! use ingot_nbd::{ListenAddr, NbdServer, PoolExports, ServerConfig};
//! # fn run(pool: Arc<ingot_engine::Pool>) -> Result<(), Box<dyn std::error::Error>> {
//! let server = NbdServer::new(Arc::new(PoolExports::new(pool)), ServerConfig::default());
//! server.listen(&"0.0.0.0:10809".parse::<ListenAddr>()?)?;
//! server.listen(&"unix:/run/ingot/nbd.sock".parse::<ListenAddr>()?)?;
//! server.wait(); // until another thread calls server.shutdown()
//! # Ok(()) }
//! ```

// No unwrap on data from disk or wire: fail with an error instead (tests may unwrap).
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod access;
mod cert;
mod credit;
mod engine_export;
mod error;
mod export;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod input;
pub mod proto;
mod reply;
mod sender;
mod server;
mod stream;
mod tls;
mod transmission;

pub use access::{AccessRules, ClientRule, Peer, RuleError, Subject};
pub use engine_export::PoolExports;
pub use error::{NbdError, Result};
pub use export::{Export, ExportReader, ExportSource, StaticExports};
pub use server::{
    BoundAddr, ListenAddr, ListenerHandle, NbdServer, ServerConfig, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_HANDSHAKES,
};
pub use tls::TlsConfig;
