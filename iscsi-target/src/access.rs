//! Which initiators may log in to which volume's target, and the CHAP secrets: the settings a
//! running target can take anew ([`crate::IscsiTarget::set_security`]). A volume without an
//! initiator list is open to every initiator (CHAP aside).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::login::ChapConfig;

/// An initiator a list lets in, by its iSCSI name (compared without regard to case: iSCSI
/// names are case-insensitive, RFC 3722).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitiatorRule {
    name: String,
}

impl InitiatorRule {
    /// The initiator name, lower case.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Why a rule did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    #[error("unknown rule {0:?}: expected iqn:INITIATOR_NAME (e.g. iqn:iqn.2026-01.com.acme:db1)")]
    UnknownKind(String),
    #[error("bad initiator name {0:?}: expected an iSCSI name (iqn.…, eui.… or naa.…) of at most 223 bytes without spaces")]
    BadName(String),
}

/// Longest iSCSI name (RFC 7143 §4.2.7.1).
const MAX_NAME_BYTES: usize = 223;

impl FromStr for InitiatorRule {
    type Err = RuleError;

    /// `iqn:NAME`, where NAME is the initiator's whole iSCSI name.
    fn from_str(s: &str) -> Result<Self, RuleError> {
        let name = s
            .strip_prefix("iqn:")
            .ok_or_else(|| RuleError::UnknownKind(s.to_string()))?;
        let lower = name.to_ascii_lowercase();
        let well_formed = ["iqn.", "eui.", "naa."]
            .iter()
            .any(|p| lower.starts_with(p))
            && lower.len() <= MAX_NAME_BYTES
            && !lower.chars().any(|c| c.is_whitespace() || c.is_control());
        if !well_formed {
            return Err(RuleError::BadName(name.to_string()));
        }
        Ok(InitiatorRule { name: lower })
    }
}

impl fmt::Display for InitiatorRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iqn:{}", self.name)
    }
}

/// Initiator lists per volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitiatorAccess {
    lists: HashMap<String, Vec<InitiatorRule>>,
    /// For volumes without their own list (`*`).
    default: Option<Vec<InitiatorRule>>,
}

impl InitiatorAccess {
    /// No lists: every target is open.
    pub fn open() -> InitiatorAccess {
        InitiatorAccess::default()
    }

    /// Give `volume` a list (`*`: every volume without its own). An empty list admits no
    /// initiator: the volume has rules for other protocols only.
    pub fn restrict(&mut self, volume: &str, rules: impl IntoIterator<Item = InitiatorRule>) {
        let list = if volume == "*" {
            self.default.get_or_insert_with(Vec::new)
        } else {
            self.lists.entry(volume.to_string()).or_default()
        };
        list.extend(rules);
    }

    /// Whether `initiator` may log in to `volume`'s target.
    pub fn allows(&self, volume: &str, initiator: &str) -> bool {
        match self.lists.get(volume).or(self.default.as_ref()) {
            None => true,
            Some(list) => list.iter().any(|r| r.name.eq_ignore_ascii_case(initiator)),
        }
    }
}

/// What a login is checked against: CHAP secrets and initiator lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// CHAP secrets per volume name; a volume listed here refuses logins without CHAP.
    pub chap: HashMap<String, ChapConfig>,
    /// CHAP secrets for every volume not in `chap`.
    pub default_chap: Option<ChapConfig>,
    /// Which initiators may log in to which volume.
    pub access: InitiatorAccess,
}

impl Security {
    /// The CHAP secrets `volume` requires, if any.
    pub fn chap_for(&self, volume: &str) -> Option<&ChapConfig> {
        self.chap.get(volume).or(self.default_chap.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        let r: InitiatorRule = "iqn:iqn.2026-01.com.acme:DB1".parse().unwrap();
        assert_eq!(r.name(), "iqn.2026-01.com.acme:db1");
        assert_eq!(r.to_string(), "iqn:iqn.2026-01.com.acme:db1");
        assert!("iqn:eui.02004567a425678d".parse::<InitiatorRule>().is_ok());
        assert!(matches!(
            "uid:0".parse::<InitiatorRule>(),
            Err(RuleError::UnknownKind(_))
        ));
        for bad in [
            "iqn:",
            "iqn:db1",
            "iqn:iqn.2026-01.com.acme: db1",
            "iqn:iqn.\n",
        ] {
            assert!(
                matches!(bad.parse::<InitiatorRule>(), Err(RuleError::BadName(_))),
                "{bad:?}"
            );
        }
        let long = format!("iqn:iqn.{}", "a".repeat(MAX_NAME_BYTES));
        assert!(long.parse::<InitiatorRule>().is_err());
    }

    #[test]
    fn lists_admit_only_what_they_name() {
        let mut a = InitiatorAccess::open();
        assert!(a.allows("db", "iqn.x"));
        a.restrict("db", ["iqn:iqn.2026-01.com.acme:db1".parse().unwrap()]);
        a.restrict("nbd-only", []);
        assert!(a.allows("db", "iqn.2026-01.com.acme:db1"));
        assert!(a.allows("db", "IQN.2026-01.COM.ACME:DB1"));
        assert!(!a.allows("db", "iqn.2026-01.com.acme:db2"));
        assert!(!a.allows("db", "iqn.2026-01.com.acme:db1x"));
        assert!(!a.allows("nbd-only", "iqn.2026-01.com.acme:db1"));
        assert!(a.allows("other", "iqn.anyone"));
        a.restrict("*", ["iqn:iqn.admin".parse().unwrap()]);
        assert!(!a.allows("other", "iqn.anyone"));
        assert!(a.allows("other", "iqn.admin"));
        assert!(!a.allows("db", "iqn.admin"));
    }
}
