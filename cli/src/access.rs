//! `serve --allow VOLUME=RULE`: per-volume access lists for NBD and iSCSI clients.
//!
//! A volume named by any rule admits only the clients its rules name, over every protocol: a
//! volume with only `iqn:` rules refuses every NBD client, and one with only `uid:` rules every
//! iSCSI initiator. A volume no rule names stays open. `*` stands for every volume without its
//! own rules.

use anyhow::{bail, Result};
use ingot_iscsi::{InitiatorAccess, InitiatorRule};
use ingot_nbd::{AccessRules, ClientRule};

/// A client a rule lets in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    Nbd(ClientRule),
    Iscsi(InitiatorRule),
}

/// One `--allow VOLUME=RULE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    pub volume: String,
    pub rule: Rule,
}

/// The value parser of `--allow`.
pub fn parse_allow(s: &str) -> Result<Allow, String> {
    let (volume, rule) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected VOLUME=RULE, e.g. vol0=uid:1000"))?;
    let volume = volume.trim();
    let valid_name = volume == "*"
        || (!volume.is_empty()
            && volume.len() <= 64
            && volume
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
    if !valid_name {
        return Err(format!(
            "{s:?}: {volume:?} is not a volume name (1-64 characters of [A-Za-z0-9._-]) or `*`"
        ));
    }
    let rule = rule.trim();
    let rule = if rule.starts_with("iqn:") {
        Rule::Iscsi(rule.parse().map_err(|e| format!("{s:?}: {e}"))?)
    } else {
        Rule::Nbd(rule.parse().map_err(|e| format!("{s:?}: {e}"))?)
    };
    Ok(Allow {
        volume: volume.to_string(),
        rule,
    })
}

/// The lists each front end checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lists {
    pub nbd: AccessRules,
    pub iscsi: InitiatorAccess,
}

impl Lists {
    /// Build the lists; `client_ca`: whether NBD verifies client certificates (subject rules
    /// could never match otherwise, which is a mistake worth refusing).
    pub fn build(allows: &[Allow], client_ca: bool) -> Result<Lists> {
        let mut l = Lists::default();
        for a in allows {
            match &a.rule {
                Rule::Nbd(r) => {
                    if matches!(r, ClientRule::TlsSubject(_)) && !client_ca {
                        bail!(
                            "--allow {}={r}: subject rules need --tls-client-ca (and \
                             --tls-cert/--tls-key) so that clients show a verified certificate",
                            a.volume
                        );
                    }
                    l.nbd.restrict(&a.volume, [r.clone()]);
                    l.iscsi.restrict(&a.volume, []);
                }
                Rule::Iscsi(r) => {
                    l.iscsi.restrict(&a.volume, [r.clone()]);
                    l.nbd.restrict(&a.volume, []);
                }
            }
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingot_nbd::Peer;

    #[test]
    fn allow_parses() {
        let a = parse_allow("vol0=uid:1000").unwrap();
        assert_eq!(a.volume, "vol0");
        assert_eq!(a.rule, Rule::Nbd(ClientRule::Uid(1000)));
        let a = parse_allow("db=tls-subject:CN=db1,O=acme").unwrap();
        assert!(matches!(a.rule, Rule::Nbd(ClientRule::TlsSubject(_))));
        let a = parse_allow("db=iqn:iqn.2026-01.com.acme:db1").unwrap();
        assert!(matches!(a.rule, Rule::Iscsi(_)));
        assert_eq!(parse_allow("*=uid:0").unwrap().volume, "*");
        for bad in [
            "vol0",
            "=uid:1",
            "vol 0=uid:1",
            "vol0=gid:1",
            "vol0=uid:x",
            "vol0=iqn:nope",
            "vol0=tls-subject:nope",
        ] {
            assert!(parse_allow(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_volume_with_rules_is_closed_to_other_protocols() {
        let allows: Vec<Allow> = ["a=uid:1000", "b=iqn:iqn.x:db1"]
            .iter()
            .map(|s| parse_allow(s).unwrap())
            .collect();
        let l = Lists::build(&allows, false).unwrap();
        let uid = |u| Peer {
            addr: "unix".into(),
            uid: Some(u),
            tls_subject: None,
        };
        assert!(l.nbd.allows("a", &uid(1000)));
        assert!(!l.nbd.allows("b", &uid(1000)));
        assert!(l.nbd.allows("c", &uid(1000)));
        assert!(!l.iscsi.allows("a", "iqn.x:db1"));
        assert!(l.iscsi.allows("b", "iqn.x:db1"));
        assert!(l.iscsi.allows("c", "iqn.y"));
        let subject = [parse_allow("a=tls-subject:CN=x").unwrap()];
        assert!(Lists::build(&subject, false).is_err());
        assert!(Lists::build(&subject, true).is_ok());
    }
}
