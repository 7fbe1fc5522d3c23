//! The security stage: AuthMethod None or CHAP (MD5), one-way or mutual.

use md5::{Digest, Md5};

use super::{status, Auth, Login, CHAP_CHALLENGE_BYTES};
use crate::text;

impl Login {
    pub(super) fn security(
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
}

/// CHAP with MD5 (RFC 1994): MD5(id || secret || challenge).
pub fn chap_md5(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().to_vec()
}
