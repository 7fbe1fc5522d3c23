//! Fixed newstyle negotiation: the server greeting, client flags and option haggling.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ingot_engine::{MAX_REQUEST_BYTES, SECTOR_BYTES};

use crate::access::{AccessRules, Peer, Subject};
use crate::error::{NbdError, Result};
use crate::export::{Export, ExportSource};
use crate::proto::*;

/// Options a single connection may send before it is considered abusive.
const MAX_OPTIONS: usize = 4096;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
const PREFERRED_BLOCK: u32 = ingot_engine::BLOCK_BYTES as u32;

/// The outcome of a successful negotiation.
pub(crate) struct Negotiated {
    pub export: Arc<dyn Export>,
    pub read_only: bool,
    /// Structured replies (also true with extended headers).
    pub structured: bool,
    /// Extended (64-bit) request and reply headers.
    pub extended: bool,
    /// Context id of `base:allocation` when the client selected it for this export.
    pub meta_context: Option<u32>,
}

/// What negotiation needs from the server.
pub(crate) struct HandshakeCtx<'a> {
    pub source: &'a dyn ExportSource,
    pub max_option_bytes: u32,
    pub force_read_only: bool,
    pub stopping: &'a AtomicBool,
    /// NBD_OPT_STARTTLS is available.
    pub tls_available: bool,
    /// Every option but STARTTLS and ABORT is refused until TLS is active.
    pub tls_required: bool,
    /// Which clients may use which export.
    pub access: &'a AccessRules,
    /// The client, as the socket tells (its TLS certificate is learnt at STARTTLS).
    pub peer: &'a Peer,
    /// Take a transmission slot; called before the client is told it may go on, so that a
    /// client that hears it holds its slot. False: none is free (the connection then ends).
    pub establish: &'a dyn Fn() -> bool,
}

/// The connection as negotiation sees it: a byte stream that can switch to TLS.
pub(crate) trait HandshakeIo {
    fn reader(&mut self) -> &mut dyn Read;
    fn writer(&mut self) -> &mut dyn Write;
    /// Run the TLS handshake; called after the ACK of NBD_OPT_STARTTLS has been sent. Returns
    /// the subject of the client's verified certificate, if it showed one.
    fn start_tls(&mut self) -> Result<Option<Subject>>;
}

/// Transmission flags for an export.
pub(crate) fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_CACHE
        | TFLAG_CAN_MULTI_CONN;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

struct State<'a, 'c> {
    ctx: &'a HandshakeCtx<'c>,
    structured: bool,
    extended: bool,
    tls_active: bool,
    no_zeroes: bool,
    /// Export name for which `base:allocation` was selected by the last SET_META_CONTEXT.
    meta_for: Option<String>,
    /// The client, with its certificate's subject once TLS is on.
    peer: Peer,
}

/// Run the handshake. `Ok(None)` means the client ended the session (NBD_OPT_ABORT or EOF
/// between options).
pub(crate) fn negotiate(
    io: &mut dyn HandshakeIo,
    ctx: &HandshakeCtx<'_>,
) -> Result<Option<Negotiated>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.writer().write_all(&hello)?;
    io.writer().flush()?;

    let mut flags = [0u8; 4];
    io.reader()
        .read_exact(&mut flags)
        .map_err(NbdError::from_read)?;
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::BadClientFlags(client_flags));
    }
    let mut st = State {
        ctx,
        structured: false,
        extended: false,
        tls_active: false,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        meta_for: None,
        peer: ctx.peer.clone(),
    };

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; 16];
        if !read_exact_or_eof(io.reader(), &mut hdr)? {
            return Ok(None);
        }
        let mut c = Cursor::new(&hdr);
        let magic = c.u64().unwrap_or_default();
        let option = c.u32().unwrap_or_default();
        let len = c.u32().unwrap_or_default();
        if magic != IHAVEOPT {
            return Err(NbdError::BadOptionMagic(magic));
        }
        if len > ctx.max_option_bytes {
            let mut out = Vec::new();
            put_option_reply(&mut out, option, REP_ERR_TOO_BIG, b"option data too large");
            let w = io.writer();
            let _ = w.write_all(&out).and_then(|_| w.flush());
            return Err(NbdError::OptionTooLarge {
                option,
                len,
                max: ctx.max_option_bytes,
            });
        }
        // `len` is bounded by max_option_bytes (a u32), so this allocation is bounded too.
        let mut data = vec![0u8; len as usize];
        io.reader()
            .read_exact(&mut data)
            .map_err(NbdError::from_read)?;

        let mut out = Vec::new();
        let step = st.option(option, &data, &mut out)?;
        let room = !matches!(step, Step::Transmit(_)) || (ctx.establish)();
        io.writer().write_all(&out)?;
        io.writer().flush()?;
        if !room {
            // NBD has no "busy" reply: the client hears its ACK, then the connection ends.
            return Err(NbdError::NoRoom);
        }
        match step {
            Step::Continue => {}
            Step::StartTls => {
                st.peer.tls_subject = io.start_tls()?;
                // Everything negotiated in the clear is forgotten.
                st.tls_active = true;
                st.structured = false;
                st.extended = false;
                st.meta_for = None;
            }
            Step::Abort => return Ok(None),
            Step::Transmit(n) => return Ok(Some(n)),
        }
    }
    Err(NbdError::TooManyOptions(MAX_OPTIONS))
}

enum Step {
    Continue,
    StartTls,
    Abort,
    Transmit(Negotiated),
}

fn error_reply(out: &mut Vec<u8>, option: u32, reply: u32, msg: &str) -> Result<Step> {
    put_option_reply(out, option, reply, msg.as_bytes());
    Ok(Step::Continue)
}

impl State<'_, '_> {
    fn resolve(&self, name: &str) -> Option<Arc<dyn Export>> {
        let name = if name.is_empty() {
            self.ctx.source.default_name()?
        } else {
            name.to_string()
        };
        self.ctx.source.lookup(&name)
    }

    /// Whether the access lists let this client use `export`.
    fn allowed(&self, export: &str) -> bool {
        self.ctx.access.allows(export, &self.peer)
    }

    /// Log a refused attempt, naming the client and the export.
    fn log_refusal(&self, export: &str, option: u32) {
        let p = &self.peer;
        tracing::warn!(
            peer = %p.addr,
            uid = p.uid.map_or_else(|| "-".to_string(), |u| u.to_string()),
            tls_subject = p.tls_subject.as_ref().map_or_else(|| "-".to_string(), |s| s.to_string()),
            export,
            option = option_name(option),
            "NBD: client refused by the export's access list"
        );
    }

    fn read_only(&self, export: &dyn Export) -> bool {
        self.ctx.force_read_only || export.read_only()
    }

    fn finish(&self, export: Arc<dyn Export>) -> Negotiated {
        let meta_context = match &self.meta_for {
            Some(n) if n == export.name() => Some(META_BASE_ALLOCATION_ID),
            _ => None,
        };
        Negotiated {
            read_only: self.read_only(&*export),
            export,
            structured: self.structured || self.extended,
            extended: self.extended,
            meta_context,
        }
    }

    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Result<Step> {
        if option == OPT_ABORT {
            put_option_reply(out, option, REP_ACK, &[]);
            return Ok(Step::Abort);
        }
        if self.ctx.stopping.load(Ordering::Relaxed) {
            if option == OPT_EXPORT_NAME {
                return Err(NbdError::Io(std::io::ErrorKind::ConnectionAborted.into()));
            }
            return error_reply(out, option, REP_ERR_SHUTDOWN, "server is shutting down");
        }
        if option == OPT_STARTTLS {
            return self.starttls(data, out);
        }
        if self.ctx.tls_required && !self.tls_active {
            if option == OPT_EXPORT_NAME {
                return Err(NbdError::TlsRequired);
            }
            return error_reply(
                out,
                option,
                REP_ERR_TLS_REQD,
                "TLS is required (NBD_OPT_STARTTLS)",
            );
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, out),
            OPT_LIST => {
                if !data.is_empty() {
                    return error_reply(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                // Exports this client may not use are not even named.
                for (name, _) in self.ctx.source.list() {
                    if !self.allowed(&name) {
                        continue;
                    }
                    let mut d = Vec::with_capacity(4 + name.len());
                    let name = truncate_message(&name);
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    put_option_reply(out, option, REP_SERVER, &d);
                }
                put_option_reply(out, option, REP_ACK, &[]);
                Ok(Step::Continue)
            }
            OPT_STRUCTURED_REPLY => {
                if self.extended {
                    return error_reply(
                        out,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    );
                }
                if !data.is_empty() {
                    return error_reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                self.structured = true;
                put_option_reply(out, option, REP_ACK, &[]);
                Ok(Step::Continue)
            }
            OPT_INFO | OPT_GO => self.info_go(option, data, out),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    return error_reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    );
                }
                self.extended = true;
                put_option_reply(out, option, REP_ACK, &[]);
                Ok(Step::Continue)
            }
            _ => error_reply(out, option, REP_ERR_UNSUP, "unsupported option"),
        }
    }

    fn starttls(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Step> {
        let option = OPT_STARTTLS;
        if !data.is_empty() {
            return error_reply(
                out,
                option,
                REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            );
        }
        if !self.ctx.tls_available {
            return error_reply(
                out,
                option,
                REP_ERR_UNSUP,
                "TLS is not configured on this server",
            );
        }
        if self.tls_active {
            return error_reply(out, option, REP_ERR_INVALID, "TLS is already active");
        }
        put_option_reply(out, option, REP_ACK, &[]);
        Ok(Step::StartTls)
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Step> {
        if self.extended {
            // Clients must use NBD_OPT_GO once extended headers are on; no way to say so.
            return Err(NbdError::ExportNameAfterExtendedHeaders);
        }
        let name = String::from_utf8_lossy(data).into_owned();
        let export = match self.resolve(&name) {
            Some(e) => e,
            // No way to report an error for this option: the session ends.
            None => return Err(NbdError::UnknownExport(name)),
        };
        if !self.allowed(export.name()) {
            self.log_refusal(export.name(), OPT_EXPORT_NAME);
            // Here too the only refusal is to end the session (proto.md).
            return Err(NbdError::AccessDenied {
                export: export.name().to_string(),
                peer: self.peer.addr.clone(),
            });
        }
        let n = self.finish(export);
        out.extend_from_slice(&n.export.size_bytes().to_be_bytes());
        out.extend_from_slice(&transmission_flags(n.read_only, n.structured).to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Ok(Step::Transmit(n))
    }

    fn info_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Result<Step> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string32()?;
            let count = usize::from(c.u16()?);
            if c.remaining() != count.checked_mul(2)? {
                return None;
            }
            let mut infos = Vec::with_capacity(count);
            for _ in 0..count {
                infos.push(c.u16()?);
            }
            Some((name, infos))
        })();
        let Some((name, infos)) = parsed else {
            return error_reply(out, option, REP_ERR_INVALID, "malformed info request");
        };
        let Some(export) = self.resolve(name) else {
            return error_reply(out, option, REP_ERR_UNKNOWN, "no such export");
        };
        if !self.allowed(export.name()) {
            self.log_refusal(export.name(), option);
            return error_reply(out, option, REP_ERR_POLICY, "access denied");
        }
        let read_only = self.read_only(&*export);

        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&export.size_bytes().to_be_bytes());
        d.extend_from_slice(
            &transmission_flags(read_only, self.structured || self.extended).to_be_bytes(),
        );
        put_option_reply(out, option, REP_INFO, &d);

        if infos.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(truncate_message(export.name()).as_bytes());
            put_option_reply(out, option, REP_INFO, &d);
        }
        if infos.contains(&INFO_DESCRIPTION) {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(truncate_message(&export.description()).as_bytes());
            put_option_reply(out, option, REP_INFO, &d);
        }
        // Always advertised: requests must be 512-byte aligned, which is not the default.
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&(SECTOR_BYTES as u32).to_be_bytes());
        d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        d.extend_from_slice(&(MAX_REQUEST_BYTES as u32).to_be_bytes());
        put_option_reply(out, option, REP_INFO, &d);

        put_option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Ok(Step::Transmit(self.finish(export)))
        } else {
            Ok(Step::Continue)
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Result<Step> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the previous selection even when it fails.
            self.meta_for = None;
            if !self.structured && !self.extended {
                return error_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                );
            }
        }
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string32()?;
            let count = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                // Each query consumes at least 4 bytes, so this loop is bounded by the data.
                queries.push(c.string32()?);
            }
            if c.remaining() != 0 {
                return None;
            }
            Some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return error_reply(
                out,
                option,
                REP_ERR_INVALID,
                "malformed meta context request",
            );
        };
        let Some(export) = self.resolve(name) else {
            return error_reply(out, option, REP_ERR_UNKNOWN, "no such export");
        };
        if !self.allowed(export.name()) {
            self.log_refusal(export.name(), option);
            return error_reply(out, option, REP_ERR_POLICY, "access denied");
        }
        let selected = if set {
            queries.contains(&META_BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == "base:" || *q == META_BASE_ALLOCATION)
        };
        if selected {
            let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            put_option_reply(out, option, REP_META_CONTEXT, &d);
            if set {
                self.meta_for = Some(export.name().to_string());
            }
        }
        put_option_reply(out, option, REP_ACK, &[]);
        Ok(Step::Continue)
    }
}

/// An option's name for logs.
fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "option",
    }
}

/// Fill `buf`; `Ok(false)` on a clean EOF before the first byte, `Truncated` on EOF after it.
pub(crate) fn read_exact_or_eof<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        match r.read(rest) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(NbdError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(NbdError::Io(e)),
        }
    }
    Ok(true)
}
