//! The login phase (RFC 7143 §6.3, §11.12-13): security negotiation (None or CHAP, one-way or
//! mutual) and operational parameter negotiation. Pure: it turns Login Request PDUs into Login
//! Response PDUs; the connection does the I/O.

use md5::{Digest, Md5};

use crate::pdu::{op, Bhs, Pdu};
use crate::text;

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

    fn security(
        &mut self,
        keys: &[(String, String)],
        reply: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        let get = |name: &str| {
            keys.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some(methods) = get("AuthMethod") {
            if self.auth != Auth::Start {
                return Err(status::INITIATOR_ERROR);
            }
            let offered: Vec<&str> = methods.split(',').collect();
            let want = if self.chap.is_some() { "CHAP" } else { "None" };
            if !offered.contains(&want) {
                return Err(status::AUTH_FAILURE);
            }
            reply.push(("AuthMethod".into(), want.into()));
            if want == "CHAP" {
                self.auth = Auth::ChapWaitAlgorithm;
            } else {
                self.auth_done(None);
            }
        } else if self.auth == Auth::Start {
            if self.chap.is_some() {
                return Err(status::AUTH_FAILURE);
            }
            self.auth_done(None);
        }
        match self.auth.clone() {
            Auth::ChapWaitAlgorithm => {
                if let Some(algs) = get("CHAP_A") {
                    if !algs.split(',').any(|a| a == "5") {
                        return Err(status::AUTH_FAILURE);
                    }
                    let id: u8 = rand::random();
                    let challenge: Vec<u8> = (0..CHAP_CHALLENGE_BYTES)
                        .map(|_| rand::random::<u8>())
                        .collect();
                    reply.push(("CHAP_A".into(), "5".into()));
                    reply.push(("CHAP_I".into(), id.to_string()));
                    reply.push(("CHAP_C".into(), text::hex(&challenge)));
                    self.auth = Auth::ChapWaitResponse { id, challenge };
                }
            }
            Auth::ChapWaitResponse { id, challenge } => {
                let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(status::AUTH_FAILURE);
                };
                let Some(chap) = self.chap.clone() else {
                    return Err(status::AUTH_FAILURE);
                };
                let resp = text::parse_binary(resp).ok_or(status::AUTH_FAILURE)?;
                if name != chap.user || resp != chap_md5(id, chap.secret.as_bytes(), &challenge) {
                    return Err(status::AUTH_FAILURE);
                }
                match (get("CHAP_I"), get("CHAP_C"), &chap.mutual) {
                    (Some(i), Some(c), Some((tuser, tsecret))) => {
                        let i = text::parse_number(i)
                            .and_then(|i| u8::try_from(i).ok())
                            .ok_or(status::AUTH_FAILURE)?;
                        let c = text::parse_binary(c).ok_or(status::AUTH_FAILURE)?;
                        // A reflected challenge would let an attacker use us as an oracle.
                        if c.is_empty() || c == challenge {
                            return Err(status::AUTH_FAILURE);
                        }
                        reply.push(("CHAP_N".into(), tuser.clone()));
                        reply.push((
                            "CHAP_R".into(),
                            text::hex(&chap_md5(i, tsecret.as_bytes(), &c)),
                        ));
                    }
                    (None, None, _) => {}
                    // Mutual CHAP asked for but not configured, or half a challenge.
                    _ => return Err(status::AUTH_FAILURE),
                }
                self.auth_done(Some(chap));
            }
            Auth::Start | Auth::Done => {}
        }
        Ok(())
    }

    fn operational(
        &mut self,
        keys: &[(String, String)],
        reply: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        let p = &mut self.params;
        let mut declared_mrdsl = false;
        for (k, v) in keys {
            let num = || text::parse_number(v).and_then(|n| u32::try_from(n).ok());
            let yes = || match v.as_str() {
                "Yes" => Ok(true),
                "No" => Ok(false),
                _ => Err(status::INITIATOR_ERROR),
            };
            let answer = match k.as_str() {
                "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias"
                | "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => continue,
                "HeaderDigest" | "DataDigest" => {
                    let pick = v
                        .split(',')
                        .find(|d| *d == "None" || (*d == "CRC32C" && self.cfg.allow_digests))
                        .ok_or(status::INITIATOR_ERROR)?;
                    if k == "HeaderDigest" {
                        p.header_digest = pick == "CRC32C";
                    } else {
                        p.data_digest = pick == "CRC32C";
                    }
                    pick.to_string()
                }
                "MaxRecvDataSegmentLength" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    if !(512..=MAX_BURST_LIMIT).contains(&n) {
                        return Err(status::INITIATOR_ERROR);
                    }
                    p.max_send_data = n;
                    declared_mrdsl = true;
                    continue;
                }
                "MaxBurstLength" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    if !(512..=MAX_BURST_LIMIT).contains(&n) {
                        return Err(status::INITIATOR_ERROR);
                    }
                    p.max_burst = n.min(OUR_MAX_BURST);
                    p.max_burst.to_string()
                }
                "FirstBurstLength" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    if !(512..=MAX_BURST_LIMIT).contains(&n) {
                        return Err(status::INITIATOR_ERROR);
                    }
                    p.first_burst = n.min(OUR_FIRST_BURST);
                    p.first_burst.to_string()
                }
                "ImmediateData" => {
                    p.immediate_data = yes()?;
                    yn(p.immediate_data)
                }
                "InitialR2T" => {
                    // OR: we are happy without it, so the initiator's choice stands.
                    p.initial_r2t = yes()?;
                    yn(p.initial_r2t)
                }
                "DataPDUInOrder" => {
                    yes()?;
                    p.data_pdu_in_order = true;
                    "Yes".into()
                }
                "DataSequenceInOrder" => {
                    yes()?;
                    p.data_sequence_in_order = true;
                    "Yes".into()
                }
                "MaxOutstandingR2T" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    if n == 0 {
                        return Err(status::INITIATOR_ERROR);
                    }
                    p.max_outstanding_r2t = n.min(OUR_MAX_OUTSTANDING_R2T);
                    p.max_outstanding_r2t.to_string()
                }
                "ErrorRecoveryLevel" => {
                    num().ok_or(status::INITIATOR_ERROR)?;
                    "0".into()
                }
                "MaxConnections" => {
                    num().ok_or(status::INITIATOR_ERROR)?;
                    "1".into()
                }
                "DefaultTime2Wait" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    p.default_time2wait = n.min(3600);
                    p.default_time2wait.to_string()
                }
                "DefaultTime2Retain" => {
                    num().ok_or(status::INITIATOR_ERROR)?;
                    // Nothing is retained at ErrorRecoveryLevel 0.
                    p.default_time2retain = 0;
                    "0".into()
                }
                "IFMarker" | "OFMarker" => "No".into(),
                "IFMarkInt" | "OFMarkInt" => "Irrelevant".into(),
                _ => "NotUnderstood".into(),
            };
            reply.push((k.clone(), answer));
        }
        if (declared_mrdsl || self.stage == 1)
            && !reply.iter().any(|(k, _)| k == "MaxRecvDataSegmentLength")
        {
            reply.push((
                "MaxRecvDataSegmentLength".into(),
                self.cfg.max_recv_data.to_string(),
            ));
        }
        if p.first_burst > p.max_burst {
            p.first_burst = p.max_burst;
        }
        Ok(())
    }
}

fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.into()
}

/// CHAP with MD5 (RFC 1994): MD5(id || secret || challenge).
pub fn chap_md5(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(flags: u8, itt: u32, keys: &[(&str, &str)]) -> Pdu {
        let mut b = Bhs::new(op::LOGIN_REQ, flags);
        b.0[0] |= 0x40;
        b.0[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        b.set_itt(itt);
        b.set_u32(24, 5);
        let data = text::encode(keys);
        b.set_data_len(data.len());
        Pdu {
            bhs: b,
            ahs: vec![],
            data,
        }
    }

    fn chap_target() -> ChapConfig {
        ChapConfig {
            user: "alice".into(),
            secret: "secretsecret".into(),
            mutual: Some(("target".into(), "tsecrettsecret".into())),
        }
    }

    fn lookup_open(name: &str) -> TargetLookup {
        if name == "iqn.t" {
            TargetLookup::Found(None)
        } else {
            TargetLookup::Missing
        }
    }

    fn lookup_chap(_: &str) -> TargetLookup {
        TargetLookup::Found(Some(chap_target()))
    }

    fn keys(s: &Step) -> Vec<(String, String)> {
        text::parse(&s.data).unwrap()
    }

    fn get<'a>(k: &'a [(String, String)], name: &str) -> Option<&'a str> {
        k.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn login_none_then_operational() {
        let mut l = Login::new(LoginConfig::default(), 7, 64);
        let s = l.step(
            &req(
                0x81,
                1,
                &[
                    ("InitiatorName", "iqn.i"),
                    ("TargetName", "iqn.t"),
                    ("SessionType", "Normal"),
                    ("AuthMethod", "None"),
                ],
            ),
            &lookup_open,
        );
        assert!(s.outcome.is_none());
        assert_eq!(s.bhs.0[1], 0x81);
        assert_eq!(get(&keys(&s), "AuthMethod"), Some("None"));
        let s = l.step(
            &req(
                0x87,
                1,
                &[
                    ("HeaderDigest", "CRC32C,None"),
                    ("DataDigest", "None"),
                    ("MaxRecvDataSegmentLength", "65536"),
                    ("MaxBurstLength", "16776192"),
                    ("FirstBurstLength", "262144"),
                    ("InitialR2T", "No"),
                    ("ImmediateData", "Yes"),
                    ("MaxOutstandingR2T", "8"),
                    ("ErrorRecoveryLevel", "2"),
                    ("X-foo", "bar"),
                ],
            ),
            &lookup_open,
        );
        let k = keys(&s);
        assert_eq!(get(&k, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(get(&k, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(get(&k, "X-foo"), Some("NotUnderstood"));
        assert_eq!(get(&k, "MaxOutstandingR2T"), Some("1"));
        match s.outcome {
            Some(Outcome::FullFeature(sess)) => {
                assert_eq!(sess.tsih, 7);
                assert!(sess.params.header_digest);
                assert!(!sess.params.initial_r2t);
                assert_eq!(sess.params.max_send_data, 65536);
                assert_eq!(sess.params.max_burst, OUR_MAX_BURST);
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(u16::from_be_bytes([s.bhs.0[14], s.bhs.0[15]]), 7);
    }

    #[test]
    fn unknown_target_and_missing_name() {
        let mut l = Login::new(LoginConfig::default(), 1, 64);
        let s = l.step(
            &req(
                0x81,
                1,
                &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.nope")],
            ),
            &lookup_open,
        );
        assert_eq!(s.outcome, Some(Outcome::Failed(status::NOT_FOUND)));
        let mut l = Login::new(LoginConfig::default(), 1, 64);
        let s = l.step(&req(0x81, 1, &[("TargetName", "iqn.t")]), &lookup_open);
        assert_eq!(s.outcome, Some(Outcome::Failed(status::MISSING_PARAMETER)));
    }

    fn chap_login(secret: &str, mutual: bool) -> (Step, Vec<u8>) {
        let mut l = Login::new(LoginConfig::default(), 1, 64);
        let s = l.step(
            &req(
                0x01,
                1,
                &[
                    ("InitiatorName", "iqn.i"),
                    ("TargetName", "iqn.t"),
                    ("AuthMethod", "CHAP,None"),
                ],
            ),
            &lookup_chap,
        );
        assert_eq!(get(&keys(&s), "AuthMethod"), Some("CHAP"));
        let s = l.step(&req(0x01, 1, &[("CHAP_A", "7,5")]), &lookup_chap);
        let k = keys(&s);
        let id: u8 = get(&k, "CHAP_I").unwrap().parse().unwrap();
        let c = text::parse_binary(get(&k, "CHAP_C").unwrap()).unwrap();
        let r = text::hex(&chap_md5(id, secret.as_bytes(), &c));
        let my_c = vec![9u8; 16];
        let mut ks = vec![("CHAP_N", "alice".to_string()), ("CHAP_R", r)];
        if mutual {
            ks.push(("CHAP_I", "3".into()));
            ks.push(("CHAP_C", text::hex(&my_c)));
        }
        let ks: Vec<(&str, &str)> = ks.iter().map(|(k, v)| (*k, v.as_str())).collect();
        (l.step(&req(0x81, 1, &ks), &lookup_chap), my_c)
    }

    #[test]
    fn chap_one_way_and_mutual() {
        let (s, _) = chap_login("secretsecret", false);
        assert!(s.outcome.is_none(), "{:?}", s.outcome);
        assert_eq!(s.bhs.0[1] & 0x80, 0x80);
        let (s, c) = chap_login("secretsecret", true);
        assert!(s.outcome.is_none());
        let k = keys(&s);
        assert_eq!(get(&k, "CHAP_N"), Some("target"));
        assert_eq!(
            text::parse_binary(get(&k, "CHAP_R").unwrap()).unwrap(),
            chap_md5(3, b"tsecrettsecret", &c)
        );
        let (s, _) = chap_login("wrong", false);
        assert_eq!(s.outcome, Some(Outcome::Failed(status::AUTH_FAILURE)));
    }

    #[test]
    fn chap_required_refuses_none() {
        let mut l = Login::new(LoginConfig::default(), 1, 64);
        let s = l.step(
            &req(
                0x81,
                1,
                &[
                    ("InitiatorName", "iqn.i"),
                    ("TargetName", "iqn.t"),
                    ("AuthMethod", "None"),
                ],
            ),
            &lookup_chap,
        );
        assert_eq!(s.outcome, Some(Outcome::Failed(status::AUTH_FAILURE)));
        // Skipping the security stage is refused too.
        let mut l = Login::new(LoginConfig::default(), 1, 64);
        let s = l.step(
            &req(
                0x87,
                1,
                &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t")],
            ),
            &lookup_chap,
        );
        assert_eq!(s.outcome, Some(Outcome::Failed(status::AUTH_FAILURE)));
    }

    fn lookup_mixed(name: &str) -> TargetLookup {
        match name {
            "iqn.open" => TargetLookup::Found(None),
            "iqn.t" => TargetLookup::Found(Some(chap_target())),
            _ => TargetLookup::Missing,
        }
    }

    /// A security stage with AuthMethod=None, then `second` as the operational stage's PDU.
    fn switch(first: &[(&str, &str)], second: &[(&str, &str)]) -> Step {
        let mut l = Login::new(LoginConfig::default(), 1, 64);
        let s = l.step(&req(0x81, 1, first), &lookup_mixed);
        assert!(s.outcome.is_none(), "{:?}", s.outcome);
        assert_eq!(s.bhs.0[1] & 0x80, 0x80, "security stage did not end");
        l.step(&req(0x87, 1, second), &lookup_mixed)
    }

    #[test]
    fn session_identity_cannot_change_after_the_first_pdu() {
        let disc = [
            ("InitiatorName", "iqn.i"),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ];
        let open = [
            ("InitiatorName", "iqn.i"),
            ("TargetName", "iqn.open"),
            ("AuthMethod", "None"),
        ];
        let refused = Some(Outcome::Failed(status::REDECLARED));
        // Discovery, then a normal session to a CHAP target.
        let s = switch(&disc, &[("SessionType", "Normal"), ("TargetName", "iqn.t")]);
        assert_eq!(s.outcome, refused);
        assert_eq!(s.bhs.0[1] & 0x83, 0, "no transit on a failure");
        assert_eq!(s.bhs.0[14..16], [0, 0], "no TSIH on a failure");
        // Discovery, then a TargetName alone.
        assert_eq!(switch(&disc, &[("TargetName", "iqn.t")]).outcome, refused);
        // An open target, then a protected one.
        assert_eq!(switch(&open, &[("TargetName", "iqn.t")]).outcome, refused);
        // Another initiator name, another session type.
        assert_eq!(
            switch(&open, &[("InitiatorName", "iqn.j")]).outcome,
            refused
        );
        assert_eq!(
            switch(&open, &[("SessionType", "Discovery")]).outcome,
            refused
        );
        // The same key twice in the first PDU with two values.
        let mut l = Login::new(LoginConfig::default(), 1, 64);
        let s = l.step(
            &req(
                0x81,
                1,
                &[
                    ("InitiatorName", "iqn.i"),
                    ("TargetName", "iqn.open"),
                    ("TargetName", "iqn.t"),
                    ("AuthMethod", "None"),
                ],
            ),
            &lookup_mixed,
        );
        assert_eq!(s.outcome, refused);
        // Repeating the first PDU's values is allowed.
        let s = switch(
            &open,
            &[
                ("InitiatorName", "iqn.i"),
                ("SessionType", "Normal"),
                ("TargetName", "iqn.open"),
            ],
        );
        assert!(
            matches!(s.outcome, Some(Outcome::FullFeature(_))),
            "{:?}",
            s.outcome
        );
        let s = switch(&disc, &[("SessionType", "Discovery")]);
        assert!(
            matches!(s.outcome, Some(Outcome::FullFeature(_))),
            "{:?}",
            s.outcome
        );
    }

    #[test]
    fn full_feature_phase_rechecks_the_targets_authentication() {
        // The target had no CHAP when the login started and requires it by the end.
        let calls = std::cell::Cell::new(0);
        let lookup = |_: &str| {
            calls.set(calls.get() + 1);
            if calls.get() == 1 {
                TargetLookup::Found(None)
            } else {
                TargetLookup::Found(Some(chap_target()))
            }
        };
        let mut l = Login::new(LoginConfig::default(), 1, 64);
        let s = l.step(
            &req(
                0x81,
                1,
                &[
                    ("InitiatorName", "iqn.i"),
                    ("TargetName", "iqn.t"),
                    ("AuthMethod", "None"),
                ],
            ),
            &lookup,
        );
        assert!(s.outcome.is_none());
        let s = l.step(&req(0x87, 1, &[]), &lookup);
        assert_eq!(s.outcome, Some(Outcome::Failed(status::AUTH_FAILURE)));
        // After CHAP, the session records who authenticated.
        let (s, _) = chap_login("secretsecret", false);
        assert!(s.outcome.is_none());
    }

    #[test]
    fn refuse_turns_success_into_failure() {
        let mut l = Login::new(LoginConfig::default(), 9, 64);
        let mut s = l.step(
            &req(
                0x87,
                1,
                &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.open")],
            ),
            &lookup_mixed,
        );
        assert!(matches!(s.outcome, Some(Outcome::FullFeature(_))));
        Login::refuse(&mut s, status::OUT_OF_RESOURCES);
        assert_eq!(s.outcome, Some(Outcome::Failed(status::OUT_OF_RESOURCES)));
        assert_eq!(s.bhs.0[1] & 0x83, 0);
        assert_eq!(s.bhs.0[14..16], [0, 0]);
        assert_eq!(s.bhs.0[36..38], [3, 2]);
        assert!(s.data.is_empty());
    }
}
