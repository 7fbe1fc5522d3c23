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
    pub isid: [u8; 6],
    pub tsih: u16,
    pub params: Params,
    /// First StatSN of the full feature phase.
    pub stat_sn: u32,
    /// ExpCmdSN at the start of the full feature phase.
    pub exp_cmd_sn: u32,
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
        if let Some(st) = self.start_session(req, &keys) {
            return st;
        }
        if self.initiator_name.is_none() || self.kind.is_none() {
            return self.fail(req, status::MISSING_PARAMETER);
        }
        if self.kind == Some(SessionType::Normal) && self.target_name.is_none() {
            return self.fail(req, status::MISSING_PARAMETER);
        }
        if self.kind == Some(SessionType::Normal) && self.chap.is_none() {
            if let Some(t) = &self.target_name {
                match lookup(t) {
                    TargetLookup::Missing => return self.fail(req, status::NOT_FOUND),
                    TargetLookup::Found(c) => {
                        if self.auth == Auth::Start {
                            self.chap = c;
                        }
                    }
                }
            }
        }
        if csg == 1 && self.stage == 0 {
            // Skipped or finished the security stage.
            if self.auth != Auth::Done {
                if self.chap.is_some() {
                    return self.fail(req, status::AUTH_FAILURE);
                }
                self.auth = Auth::Done;
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

    /// Record InitiatorName / SessionType / TargetName. `Some` is a failure response.
    fn start_session(&mut self, req: &Bhs, keys: &[(String, String)]) -> Option<Step> {
        for (k, v) in keys {
            match k.as_str() {
                "InitiatorName" => {
                    if v.is_empty() {
                        return Some(self.fail(req, status::MISSING_PARAMETER));
                    }
                    self.initiator_name = Some(v.clone());
                }
                "SessionType" => {
                    self.kind = Some(match v.as_str() {
                        "Normal" => SessionType::Normal,
                        "Discovery" => SessionType::Discovery,
                        _ => return Some(self.fail(req, status::INITIATOR_ERROR)),
                    })
                }
                "TargetName" => self.target_name = Some(v.clone()),
                _ => {}
            }
        }
        if self.kind.is_none() && keys.iter().any(|(k, _)| k == "InitiatorName") {
            // SessionType defaults to Normal.
            self.kind = Some(SessionType::Normal);
        }
        None
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
            self.auth = if want == "CHAP" {
                Auth::ChapWaitAlgorithm
            } else {
                Auth::Done
            };
        } else if self.auth == Auth::Start {
            if self.chap.is_some() {
                return Err(status::AUTH_FAILURE);
            }
            self.auth = Auth::Done;
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
                self.auth = Auth::Done;
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
}
