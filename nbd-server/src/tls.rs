//! TLS for NBD_OPT_STARTTLS: server certificates from PEM files, optionally client certificates
//! verified against a CA (for access rules by subject), and one rustls session shared by the
//! connection's reader and writer threads.
//!
//! The reader thread reads ciphertext from the socket without holding the session lock and
//! feeds it to the session under the lock; the writer thread encrypts and sends under the lock.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};

use crate::access::Subject;
use crate::stream::Stream;

/// Ciphertext read from the socket at a time.
const TLS_READ_BYTES: usize = 64 << 10;

/// Server side TLS settings: a certificate chain and its private key, and the CA client
/// certificates are verified against, if any.
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<rustls::ServerConfig>,
    verifies_clients: bool,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig { .. }")
    }
}

impl TlsConfig {
    /// Load an X.509 certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or
    /// SEC1), both PEM.
    pub fn from_pem_files(cert: &Path, key: &Path) -> io::Result<TlsConfig> {
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// Like [`TlsConfig::from_pem_files`], and ask clients for a certificate, verified against
    /// the CA certificates in `client_ca` (PEM). A client may still connect without one (an
    /// export without access rules is open), but a certificate it shows must verify.
    pub fn from_pem_files_with_client_ca(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
    ) -> io::Result<TlsConfig> {
        Self::build(&read(cert)?, &read(key)?, Some(&read(client_ca)?))
    }

    /// Like [`TlsConfig::from_pem_files`], from PEM text in memory.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> io::Result<TlsConfig> {
        Self::build(cert_pem, key_pem, None)
    }

    /// Whether client certificates are asked for and verified.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    fn build(cert_pem: &[u8], key_pem: &[u8], ca_pem: Option<&[u8]>) -> io::Result<TlsConfig> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
        };
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate PEM", &e))?;
        if certs.is_empty() {
            return Err(bad("certificate PEM", &"no CERTIFICATE block"));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("key PEM", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", &e))?;
        let builder = match ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca_pem) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca_pem) {
                    let c = c.map_err(|e| bad("client CA PEM", &e))?;
                    roots.add(c).map_err(|e| bad("client CA certificate", &e))?;
                }
                if roots.is_empty() {
                    return Err(bad("client CA PEM", &"no CERTIFICATE block"));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| bad("client CA", &e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let cfg = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("certificate and key", &e))?;
        Ok(TlsConfig {
            inner: Arc::new(cfg),
            verifies_clients: ca_pem.is_some(),
        })
    }
}

fn read(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

struct Session {
    conn: ServerConnection,
    /// Socket the session writes ciphertext to.
    sock: Stream,
}

impl Session {
    fn send_pending(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }
}

/// Plaintext reader of a TLS connection.
pub(crate) struct TlsReader {
    session: Arc<Mutex<Session>>,
    sock: Stream,
    pending: Vec<u8>,
    pending_at: usize,
}

/// Plaintext writer of a TLS connection; sends close_notify when dropped.
pub(crate) struct TlsWriter {
    session: Arc<Mutex<Session>>,
}

/// A TLS session after its handshake: its plaintext streams and the subject of the client's
/// certificate (verified against the client CA), if it showed one.
pub(crate) struct Accepted {
    pub reader: TlsReader,
    pub writer: TlsWriter,
    pub subject: Option<Subject>,
}

/// Run the TLS handshake as the server on `sock`.
pub(crate) fn accept(cfg: &TlsConfig, sock: &Stream) -> io::Result<Accepted> {
    let mut conn = ServerConnection::new(cfg.inner.clone()).map_err(io::Error::other)?;
    let mut s = sock.try_clone()?;
    while conn.is_handshaking() {
        conn.complete_io(&mut s)?;
    }
    // Only a verifying config accepts client certificates at all.
    let subject = match conn.peer_certificates() {
        Some([leaf, ..]) if cfg.verifies_clients => crate::cert::subject(leaf),
        _ => None,
    };
    let session = Arc::new(Mutex::new(Session {
        conn,
        sock: sock.try_clone()?,
    }));
    session.lock().send_pending()?;
    Ok(Accepted {
        reader: TlsReader {
            session: session.clone(),
            sock: s,
            pending: Vec::new(),
            pending_at: 0,
        },
        writer: TlsWriter { session },
        subject,
    })
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut s = self.session.lock();
                match s.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.pending_at < self.pending.len() {
                    let mut rest = self.pending.get(self.pending_at..).unwrap_or(&[]);
                    let before = rest.len();
                    s.conn.read_tls(&mut rest)?;
                    self.pending_at += before - rest.len();
                    let res = s.conn.process_new_packets();
                    // Alerts and handshake messages (key updates) go out right away.
                    let sent = s.send_pending();
                    if let Err(e) = res {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    sent?;
                    continue;
                }
            }
            // Nothing decrypted and nothing buffered: wait for ciphertext without the lock.
            self.pending.resize(TLS_READ_BYTES, 0);
            self.pending_at = 0;
            let n = match self.sock.read(&mut self.pending) {
                Ok(n) => n,
                Err(e) => {
                    self.pending.clear();
                    return Err(e);
                }
            };
            self.pending.truncate(n);
            if n == 0 {
                return Ok(0);
            }
        }
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut s = self.session.lock();
        loop {
            let n = s.conn.writer().write(buf)?;
            s.send_pending()?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut s = self.session.lock();
        s.conn.writer().flush()?;
        s.send_pending()
    }
}

impl Drop for TlsWriter {
    fn drop(&mut self) {
        let mut s = self.session.lock();
        s.conn.send_close_notify();
        let _ = s.send_pending();
    }
}
