//! The login phase (RFC 7143 §6.3, §11.12-13): security negotiation (None or CHAP, one-way or
//! mutual) and operational parameter negotiation. Pure: it turns Login Request PDUs into Login
//! Response PDUs; the connection does the I/O.

mod operational;
mod security;

use crate::pdu::{op, Bhs, Pdu};
use crate::text;

pub use self::security::chap_md5;

/// Our default MaxRecvDataSegmentLength (what we accept per PDU).
pub const OUR_MAX_RECV_DATA: u32 = 256 << 10;
/// The largest data segment we accept during login or with a Text request.
pub const MAX_LOGIN_DATA: usize = 64 << 10;
/// Upper bound we accept for MaxBurstLength / FirstBurstLength (RFC 7143 maximum).
pub const MAX_BURST_LIMIT: u32 = (1 << 24) - 1;
/// Our MaxBurstLength offer.
pub const OUR_MAX_BURST: u32 = 1 << 20;
/// Our FirstBurstLength offer.
pub const OUR_FIRST_BURST: u32 = 256 << 10;
/// R2Ts a task may have outstanding (we issue one at a time).
pub const OUR_MAX_OUTSTANDING_R2T: u32 = 1;
/// Bytes of a CHAP challenge.
pub const CHAP_CHALLENGE_BYTES: usize = 16;

/// Login status classes and details (RFC 7143 §11.13.5): `(class << 8) | detail`.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTH_FAILURE: u16 = 0x0201;
    /// Authorization failure: the initiator is not allowed access to the given target.
    pub const NOT_AUTHORIZED: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_NOT_FOUND: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    /// The target has no room for another session (class 3, target error).
    pub const OUT_OF_RESOURCES: u16 = 0x0302;
    /// InitiatorName, SessionType or TargetName declared again with another value (or for
    /// the first time after the first Login PDU). RFC 7143 §6.2 says a redeclaration is
    /// answered with "Login reject (initiator error)", i.e. 0x0200: none of the specific
    /// details fits (0x0207 is a key that is *missing*, 0x0209 a session type we do not
    /// support, 0x020b a PDU that is not allowed during login).
    pub const REDECLARED: u16 = INITIATOR_ERROR;
}

/// CHAP secrets for one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapConfig {
    /// The name the initiator must send (CHAP_N).
    pub user: String,
    /// The secret the initiator proves it knows.
    pub secret: String,
    /// For mutual CHAP: the name and secret the target answers the initiator's challenge with.
    pub mutual: Option<(String, String)>,
}

/// What the login needs to know about a target name.
#[derive(Debug, Clone)]
pub enum TargetLookup {
    /// No such target.
    Missing,
    /// The target exists; `Some` when it requires CHAP.
    Found(Option<ChapConfig>),
}

/// Session type chosen by the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

/// Parameters in force for the full feature phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment we accept.
    pub max_recv_data: u32,
    /// Largest data segment the initiator accepts (its MaxRecvDataSegmentLength).
    pub max_send_data: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
}

impl Default for Params {
    /// The RFC 7143 defaults, before negotiation.
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            max_recv_data: 8192,
            max_send_data: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

/// Target-side settings the negotiation honours.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    pub max_recv_data: u32,
    /// Accept CRC32C digests when offered.
    pub allow_digests: bool,
    /// The target portal group tag we report.
    pub portal_group_tag: u16,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            max_recv_data: OUR_MAX_RECV_DATA,
            allow_digests: true,
            portal_group_tag: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// Nothing chosen yet.
    Start,
    /// AuthMethod=CHAP sent; waiting for CHAP_A.
    ChapWaitAlgorithm,
    /// Challenge sent; waiting for CHAP_N / CHAP_R.
    ChapWaitResponse { id: u8, challenge: Vec<u8> },
    /// Authenticated (or no authentication needed).
    Done,
}

/// Result of one login step.
#[derive(Debug)]
pub struct Step {
    pub bhs: Bhs,
    pub data: Vec<u8>,
    /// Set when this response ends the login (successfully or not).
    pub outcome: Option<Outcome>,
}

/// How the login ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Full feature phase begins with these settings.
    FullFeature(Box<Session>),
    /// The response carries a failure status; close the connection after sending it.
    Failed(u16),
}

/// What a completed login established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub kind: SessionType,
    pub initiator_name: String,
    /// The target's name (empty for discovery).
    pub target_name: String,
    /// The CHAP name the initiator authenticated with (`None`: no CHAP).
    pub chap_user: Option<String>,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub params: Params,
    /// First StatSN of the full feature phase.
    pub stat_sn: u32,
    /// ExpCmdSN at the start of the full feature phase.
    pub exp_cmd_sn: u32,
}

/// Who the security stage authenticated, for what: recorded when authentication completes and
/// checked again at the transition to the full feature phase.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Authenticated {
    kind: SessionType,
    target_name: Option<String>,
    /// The CHAP secrets the initiator proved it knows (`None`: no CHAP was done).
    chap: Option<ChapConfig>,
}

/// Login state of one connection.
pub struct Login {
    cfg: LoginConfig,
    stage: u8,
    initiator_name: Option<String>,
    target_name: Option<String>,
    kind: Option<SessionType>,
    chap: Option<ChapConfig>,
    auth: Auth,
    /// Set once authentication is done (or found not needed) for the session declared.
    authenticated: Option<Authenticated>,
    params: Params,
    isid: [u8; 6],
    itt: Option<u32>,
    stat_sn: u32,
    first: bool,
    /// TSIH handed out when the login completes.
    tsih: u16,
    /// Window of commands the initiator may send.
    window: u32,
}

impl Login {
    pub fn new(cfg: LoginConfig, tsih: u16, window: u32) -> Login {
        let params = Params {
            max_recv_data: cfg.max_recv_data,
            ..Params::default()
        };
        Login {
            cfg,
            stage: 0,
            initiator_name: None,
            target_name: None,
            kind: None,
            chap: None,
            auth: Auth::Start,
            authenticated: None,
            params,
            isid: [0; 6],
            itt: None,
            stat_sn: 0,
            first: true,
            tsih,
            window,
        }
    }

    fn response(&mut self, req: &Bhs, transit: bool, nsg: u8, status: u16, data: Vec<u8>) -> Step {
        let mut b = Bhs::new(op::LOGIN_RESP, 0);
        let csg = self.stage;
        b.0[1] = (u8::from(transit) << 7) | (csg << 2) | if transit { nsg } else { 0 };
        b.0[2] = 0; // Version-max
        b.0[3] = 0; // Version-active
        b.0[8..14].copy_from_slice(&self.isid);
        let tsih = if transit && nsg == 3 && status == status::SUCCESS {
            self.tsih
        } else {
            0
        };
        b.0[14..16].copy_from_slice(&tsih.to_be_bytes());
        b.set_itt(req.itt());
        b.set_u32(24, self.stat_sn);
        b.set_u32(28, req.cmd_sn());
        b.set_u32(32, req.cmd_sn().wrapping_add(self.window.saturating_sub(1)));
        b.0[36] = (status >> 8) as u8;
        b.0[37] = status as u8;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let outcome = if status != status::SUCCESS {
            Some(Outcome::Failed(status))
        } else if transit && nsg == 3 {
            Some(Outcome::FullFeature(Box::new(Session {
                kind: self.kind.unwrap_or(SessionType::Normal),
                initiator_name: self.initiator_name.clone().unwrap_or_default(),
                target_name: self.target_name.clone().unwrap_or_default(),
                chap_user: self
                    .authenticated
                    .as_ref()
                    .and_then(|a| a.chap.as_ref())
                    .map(|c| c.user.clone()),
                isid: self.isid,
                tsih: self.tsih,
                params: self.params.clone(),
                stat_sn: self.stat_sn,
                exp_cmd_sn: req.cmd_sn(),
            })))
        } else {
            None
        };
        Step {
            bhs: b,
            data: if status == status::SUCCESS {
                data
            } else {
                Vec::new()
            },
            outcome,
        }
    }

    fn fail(&mut self, req: &Bhs, status: u16) -> Step {
        self.response(req, false, 0, status, Vec::new())
    }

    /// The InitiatorName declared in the first Login PDU, once it was accepted.
    pub fn initiator_name(&self) -> Option<&str> {
        self.initiator_name.as_deref()
    }

    /// The TargetName declared in the first Login PDU (none for discovery).
    pub fn target_name(&self) -> Option<&str> {
        self.target_name.as_deref()
    }

    /// The session type declared in the first Login PDU.
    pub fn session_type(&self) -> Option<SessionType> {
        self.kind
    }

    /// Turn a response that would start the full feature phase into a login failure with
    /// `status`: the connection refuses the session after the negotiation (no room, or its
    /// own check of the authentication failed).
    pub fn refuse(step: &mut Step, status: u16) {
        let b = &mut step.bhs;
        // No transit, NSG 0, no TSIH, no keys.
        b.0[1] &= !0x83;
        b.0[14..16].copy_from_slice(&[0, 0]);
        b.0[36..38].copy_from_slice(&status.to_be_bytes());
        step.data.clear();
        step.outcome = Some(Outcome::Failed(status));
    }

    /// Handle one Login Request. `lookup` resolves a TargetName.
    pub fn step(&mut self, pdu: &Pdu, lookup: &dyn Fn(&str) -> TargetLookup) -> Step {
        let req = &pdu.bhs;
        if req.opcode() != op::LOGIN_REQ {
            return self.fail(req, status::INVALID_DURING_LOGIN);
        }
        let transit = req.0[1] & 0x80 != 0;
        let cont = req.0[1] & 0x40 != 0;
        let csg = (req.0[1] >> 2) & 3;
        let nsg = req.0[1] & 3;
        let first = self.first;
        if self.first {
            self.first = false;
            self.isid.copy_from_slice(&req.0[8..14]);
            self.stat_sn = req.exp_stat_sn();
            self.itt = Some(req.itt());
            // Version-max must cover 0, version-min must be 0.
            if req.0[3] != 0 {
                return self.fail(req, status::UNSUPPORTED_VERSION);
            }
            if u16::from_be_bytes([req.0[14], req.0[15]]) != 0 {
                // Adding a connection to an existing session (MC/S) or reinstating by TSIH.
                return self.fail(req, status::SESSION_NOT_FOUND);
            }
        } else if req.0[8..14] != self.isid {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        if cont || (transit && (nsg == 2 || nsg <= csg)) || csg == 2 || csg == 3 {
            // Continued text and odd stage transitions are not supported.
            return self.fail(req, status::INITIATOR_ERROR);
        }
        if csg < self.stage {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        let keys = match text::parse(&pdu.data) {
            Ok(k) => k,
            Err(_) => return self.fail(req, status::INITIATOR_ERROR),
        };
        let declared = if first {
            self.start_session(&keys, lookup)
        } else {
            self.same_session(&keys)
        };
        if let Err(s) = declared {
            return self.fail(req, s);
        }
        if csg == 1 && self.stage == 0 {
            // Skipped or finished the security stage.
            if self.auth != Auth::Done {
                if self.chap.is_some() {
                    return self.fail(req, status::AUTH_FAILURE);
                }
                self.auth_done(None);
            }
            self.stage = 1;
        }
        let mut reply: Vec<(String, String)> = Vec::new();
        if self.stage == 0 {
            match self.security(&keys, &mut reply) {
                Ok(()) => {}
                Err(s) => return self.fail(req, s),
            }
        }
        if let Err(s) = self.operational(&keys, &mut reply) {
            return self.fail(req, s);
        }
        let can_transit = transit && self.auth == Auth::Done;
        if can_transit && nsg == 3 {
            // Defence in depth: whatever happened above, the session about to start must be
            // exactly the one authenticated, with what its target requires now.
            if let Err(s) = self.check_authenticated(lookup) {
                return self.fail(req, s);
            }
        }
        if self.kind == Some(SessionType::Normal)
            && self.first_response_pending()
            && !reply.iter().any(|(k, _)| k == "TargetPortalGroupTag")
        {
            reply.push((
                "TargetPortalGroupTag".into(),
                self.cfg.portal_group_tag.to_string(),
            ));
        }
        let step = self.response(req, can_transit, nsg, status::SUCCESS, text::encode(&reply));
        if can_transit {
            self.stage = nsg;
        }
        step
    }

    fn first_response_pending(&self) -> bool {
        // TargetPortalGroupTag goes in the first response of a normal session; sending it in
        // each response of the login is harmless, so we send it until full feature phase.
        self.stage < 3
    }

    /// The first Login PDU fixes InitiatorName, SessionType and TargetName (RFC 7143 §6.3:
    /// the initiator presents them in the first Login Request) and with them the
    /// authentication the target requires.
    fn start_session(
        &mut self,
        keys: &[(String, String)],
        lookup: &dyn Fn(&str) -> TargetLookup,
    ) -> Result<(), u16> {
        let mut initiator = None;
        let mut kind = None;
        let mut target = None;
        for (k, v) in keys {
            let slot = match k.as_str() {
                "InitiatorName" => &mut initiator,
                "SessionType" => &mut kind,
                "TargetName" => &mut target,
                _ => continue,
            };
            // The same key twice in one PDU must say the same thing.
            if slot.as_ref().is_some_and(|old: &String| old != v) {
                return Err(status::REDECLARED);
            }
            *slot = Some(v.clone());
        }
        let initiator = initiator
            .filter(|n| !n.is_empty())
            .ok_or(status::MISSING_PARAMETER)?;
        let kind = match kind.as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(status::INITIATOR_ERROR),
        };
        let chap = match (kind, &target) {
            (SessionType::Normal, None) => return Err(status::MISSING_PARAMETER),
            (SessionType::Normal, Some(t)) => match lookup(t) {
                TargetLookup::Missing => return Err(status::NOT_FOUND),
                TargetLookup::Found(c) => c,
            },
            // Discovery sessions need no authentication.
            (SessionType::Discovery, _) => None,
        };
        self.initiator_name = Some(initiator);
        self.kind = Some(kind);
        self.target_name = target;
        self.chap = chap;
        Ok(())
    }

    /// Later Login PDUs may repeat InitiatorName, SessionType and TargetName with the values
    /// of the first one (some initiators do), never change or add them: switching to another
    /// target or session type after the security stage would skip the new target's CHAP.
    fn same_session(&self, keys: &[(String, String)]) -> Result<(), u16> {
        for (k, v) in keys {
            let same = match k.as_str() {
                "InitiatorName" => self.initiator_name.as_deref() == Some(v.as_str()),
                "SessionType" => {
                    let kind = match v.as_str() {
                        "Normal" => SessionType::Normal,
                        "Discovery" => SessionType::Discovery,
                        _ => return Err(status::INITIATOR_ERROR),
                    };
                    self.kind == Some(kind)
                }
                "TargetName" => self.target_name.as_deref() == Some(v.as_str()),
                _ => true,
            };
            if !same {
                return Err(status::REDECLARED);
            }
        }
        Ok(())
    }

    /// Authentication is complete (`chap`: the secrets the initiator proved it knows).
    fn auth_done(&mut self, chap: Option<ChapConfig>) {
        self.auth = Auth::Done;
        self.authenticated = self.kind.map(|kind| Authenticated {
            kind,
            target_name: self.target_name.clone(),
            chap,
        });
    }

    /// Before the full feature phase: the session is the one authenticated, and if its
    /// target requires CHAP (looked up again now), CHAP was done with that target's secrets.
    fn check_authenticated(&self, lookup: &dyn Fn(&str) -> TargetLookup) -> Result<(), u16> {
        let a = self.authenticated.as_ref().ok_or(status::AUTH_FAILURE)?;
        let kind = self.kind.ok_or(status::MISSING_PARAMETER)?;
        if a.kind != kind || a.target_name != self.target_name {
            return Err(status::AUTH_FAILURE);
        }
        if kind == SessionType::Discovery {
            return Ok(());
        }
        let target = self
            .target_name
            .as_deref()
            .ok_or(status::MISSING_PARAMETER)?;
        match lookup(target) {
            TargetLookup::Missing => Err(status::NOT_FOUND),
            TargetLookup::Found(None) => Ok(()),
            TargetLookup::Found(Some(required)) if a.chap.as_ref() == Some(&required) => Ok(()),
            TargetLookup::Found(Some(_)) => Err(status::AUTH_FAILURE),
        }
    }
}

#[cfg(test)]
mod tests;
