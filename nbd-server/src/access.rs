//! Which clients may use which export: per-export lists of unix peer uids (SO_PEERCRED) and
//! TLS client certificate subjects. An export without a list is open to every client, so a
//! server configured with no rules behaves as it always did.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// A rule that lets a client in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRule {
    /// A unix-socket client whose peer credentials carry this uid.
    Uid(u32),
    /// A TLS client whose verified certificate has exactly this subject (attributes compared
    /// as a set, in any order).
    TlsSubject(Subject),
}

/// Why a rule did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    #[error(
        "unknown rule {0:?}: expected uid:UID or tls-subject:DN (e.g. tls-subject:CN=db1,O=acme)"
    )]
    UnknownKind(String),
    #[error("bad uid {0:?}: expected a number")]
    BadUid(String),
    #[error("bad subject {subject:?}: {reason}")]
    BadSubject {
        subject: String,
        reason: &'static str,
    },
}

impl FromStr for ClientRule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, RuleError> {
        if let Some(uid) = s.strip_prefix("uid:") {
            return uid
                .trim()
                .parse()
                .map(ClientRule::Uid)
                .map_err(|_| RuleError::BadUid(uid.to_string()));
        }
        if let Some(dn) = s.strip_prefix("tls-subject:") {
            return dn.parse().map(ClientRule::TlsSubject);
        }
        Err(RuleError::UnknownKind(s.to_string()))
    }
}

impl fmt::Display for ClientRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientRule::Uid(u) => write!(f, "uid:{u}"),
            ClientRule::TlsSubject(s) => write!(f, "tls-subject:{s}"),
        }
    }
}

/// A distinguished name as a set of `TYPE=value` attributes. Types are kept upper case (short
/// names like `CN`, or a dotted OID); values are compared exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// Sorted, so that two subjects with the same attributes compare equal whatever their order
    /// (a DN written RFC 4514 style lists the RDNs in the reverse of the certificate's order).
    attrs: Vec<(String, String)>,
}

impl Subject {
    /// A subject from `(type, value)` pairs, e.g. those read from a certificate.
    pub fn from_attrs(attrs: impl IntoIterator<Item = (String, String)>) -> Subject {
        let mut attrs: Vec<(String, String)> = attrs
            .into_iter()
            .map(|(t, v)| (t.to_ascii_uppercase(), v))
            .collect();
        attrs.sort();
        Subject { attrs }
    }
}

impl FromStr for Subject {
    type Err = RuleError;

    /// `CN=db1,O=acme` (RFC 4514 style: `,` or `+` between attributes, `\` escapes the next
    /// character).
    fn from_str(s: &str) -> Result<Self, RuleError> {
        let bad = |reason| RuleError::BadSubject {
            subject: s.to_string(),
            reason,
        };
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.push(chars.next().ok_or_else(|| bad("ends with a lone `\\`"))?),
                ',' | '+' => parts.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        parts.push(cur);
        let mut attrs = Vec::new();
        for p in parts {
            let (t, v) = p
                .split_once('=')
                .ok_or_else(|| bad("expected TYPE=value attributes separated by `,`"))?;
            let t = t.trim();
            if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Err(bad("an attribute type is empty or not a name or OID"));
            }
            attrs.push((t.to_string(), v.trim().to_string()));
        }
        Ok(Subject::from_attrs(attrs))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (t, v)) in self.attrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}=")?;
            for c in v.chars() {
                if matches!(c, ',' | '+' | '\\') {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// Who is asking, as far as the server could establish.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// `IP:PORT` for TCP, `unix` for a unix socket.
    pub addr: String,
    /// Peer uid of a unix-socket client (SO_PEERCRED).
    pub uid: Option<u32>,
    /// Subject of the client certificate, verified against the configured CA.
    pub tls_subject: Option<Subject>,
}

impl Peer {
    fn matches(&self, rule: &ClientRule) -> bool {
        match rule {
            ClientRule::Uid(u) => self.uid == Some(*u),
            ClientRule::TlsSubject(s) => self.tls_subject.as_ref() == Some(s),
        }
    }
}

/// The access lists of a server: export name → the rules that let a client in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRules {
    lists: HashMap<String, Vec<ClientRule>>,
    /// For exports without their own list (`*`).
    default: Option<Vec<ClientRule>>,
}

impl AccessRules {
    /// No lists: every export is open.
    pub fn open() -> AccessRules {
        AccessRules::default()
    }

    /// Give `export` a list (`*`: every export without its own). An empty list admits nobody:
    /// the list exists because the volume has rules for other protocols.
    pub fn restrict(&mut self, export: &str, rules: impl IntoIterator<Item = ClientRule>) {
        let list = if export == "*" {
            self.default.get_or_insert_with(Vec::new)
        } else {
            self.lists.entry(export.to_string()).or_default()
        };
        list.extend(rules);
    }

    /// True when some list names a TLS subject (the server must then ask for certificates).
    pub fn uses_tls_subjects(&self) -> bool {
        self.lists
            .values()
            .chain(self.default.iter())
            .flatten()
            .any(|r| matches!(r, ClientRule::TlsSubject(_)))
    }

    /// Whether `peer` may use `export`.
    pub fn allows(&self, export: &str, peer: &Peer) -> bool {
        match self.lists.get(export).or(self.default.as_ref()) {
            None => true,
            Some(list) => list.iter().any(|r| peer.matches(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subj(s: &str) -> Subject {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse() {
        assert_eq!("uid:1000".parse(), Ok(ClientRule::Uid(1000)));
        assert_eq!(
            "tls-subject:CN=db1,O=acme".parse(),
            Ok(ClientRule::TlsSubject(Subject::from_attrs([
                ("CN".to_string(), "db1".to_string()),
                ("O".to_string(), "acme".to_string())
            ])))
        );
        assert!(matches!(
            "uid:root".parse::<ClientRule>(),
            Err(RuleError::BadUid(_))
        ));
        assert!(matches!(
            "uid:-1".parse::<ClientRule>(),
            Err(RuleError::BadUid(_))
        ));
        assert!(matches!(
            "gid:0".parse::<ClientRule>(),
            Err(RuleError::UnknownKind(_))
        ));
        assert!(matches!(
            "tls-subject:db1".parse::<ClientRule>(),
            Err(RuleError::BadSubject { .. })
        ));
        assert!(matches!(
            "tls-subject:=x".parse::<ClientRule>(),
            Err(RuleError::BadSubject { .. })
        ));
        assert!(matches!(
            "tls-subject:CN=x\\".parse::<ClientRule>(),
            Err(RuleError::BadSubject { .. })
        ));
    }

    #[test]
    fn subjects_compare_as_sets_of_exact_attributes() {
        assert_eq!(subj("CN=db1,O=acme"), subj("o=acme, cn=db1"));
        assert_ne!(subj("CN=db1,O=acme"), subj("CN=db1"));
        assert_ne!(subj("CN=db1"), subj("CN=db1,O=acme"));
        assert_ne!(subj("CN=db1"), subj("CN=DB1"));
        // An escaped comma is part of the value, not a separator.
        assert_eq!(
            subj("CN=a\\,O=b"),
            Subject::from_attrs([("CN".into(), "a,O=b".into())])
        );
        assert_ne!(subj("CN=a\\,O=b"), subj("CN=a,O=b"));
        let s = subj("CN=a\\,b,O=acme");
        assert_eq!(s.to_string().parse::<Subject>().unwrap(), s);
    }

    #[test]
    fn lists_admit_only_what_they_name() {
        let mut a = AccessRules::open();
        let uid = |u| Peer {
            addr: "unix".into(),
            uid: Some(u),
            tls_subject: None,
        };
        let tls = |s: &str| Peer {
            addr: "127.0.0.1:1".into(),
            uid: None,
            tls_subject: Some(subj(s)),
        };
        assert!(a.allows("vol0", &uid(5)));
        a.restrict("vol0", [ClientRule::Uid(1000)]);
        a.restrict("db", ["tls-subject:CN=db1,O=acme".parse().unwrap()]);
        a.restrict("iscsi-only", []);
        assert!(a.allows("vol0", &uid(1000)));
        assert!(!a.allows("vol0", &uid(1001)));
        assert!(!a.allows("vol0", &Peer::default()));
        assert!(a.allows("db", &tls("O=acme,CN=db1")));
        assert!(!a.allows("db", &tls("CN=db1")));
        assert!(!a.allows("db", &uid(1000)));
        assert!(!a.allows("iscsi-only", &uid(0)));
        assert!(a.allows("other", &uid(7)));
        assert!(a.uses_tls_subjects());
        a.restrict("*", [ClientRule::Uid(7)]);
        assert!(a.allows("other", &uid(7)));
        assert!(!a.allows("other", &uid(8)));
        // A volume's own list wins over `*`.
        assert!(!a.allows("vol0", &uid(7)));
    }
}
