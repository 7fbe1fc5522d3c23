//! The subject of an X.509 certificate, read straight from its DER (only what access rules
//! need: the subject's attributes with string values). rustls has already verified the
//! certificate against the client CA when this runs; a certificate this cannot read has no
//! subject, so no subject rule admits it.

use crate::access::Subject;

/// One DER element: its tag, its contents, and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    // High tag numbers never occur in the parts read here.
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (body, after) = rest.split_at(len);
    Some((tag, body, after))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// Dotted form of an OID's contents.
fn oid_string(body: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut v: u64 = 0;
    for (i, &b) in body.iter().enumerate() {
        v = v.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (v / 40).min(2);
                arcs.push(first);
                arcs.push(v - first * 40);
            } else {
                arcs.push(v);
            }
            v = 0;
        } else if i + 1 == body.len() {
            return None;
        }
    }
    if arcs.is_empty() {
        return None;
    }
    Some(
        arcs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// Short name of the usual attribute types (RFC 4514 §3 and a few common ones); others keep
/// their dotted OID, which a rule may name as it is.
fn attr_name(oid: &str) -> String {
    match oid {
        "2.5.4.3" => "CN",
        "2.5.4.5" => "SERIALNUMBER",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAILADDRESS",
        other => other,
    }
    .to_string()
}

/// A directory string's text; `None` for kinds no rule can be written for.
fn string_value(tag: u8, body: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, VisibleString, NumericString
        0x0c | 0x13 | 0x16 | 0x1a | 0x12 => String::from_utf8(body.to_vec()).ok(),
        // TeletexString: in practice Latin-1.
        0x14 => Some(body.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UCS-2 big endian.
        0x1e => {
            if body.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// The subject of a DER certificate.
pub(crate) fn subject(der: &[u8]) -> Option<Subject> {
    let (tag, cert, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // [0] EXPLICIT version, when present.
    if rest.first() == Some(&0xa0) {
        rest = element(rest)?.2;
    }
    // serialNumber, signature, issuer, validity; then the subject.
    for _ in 0..4 {
        rest = element(rest)?.2;
    }
    let (tag, mut name, _) = element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut attrs = Vec::new();
    while !name.is_empty() {
        let (tag, mut rdn, after) = element(name)?;
        if tag != SET {
            return None;
        }
        while !rdn.is_empty() {
            let (tag, atv, after_atv) = element(rdn)?;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = element(atv)?;
            if tag != OID {
                return None;
            }
            let (vtag, vbody, _) = element(value)?;
            attrs.push((attr_name(&oid_string(oid)?), string_value(vtag, vbody)?));
            rdn = after_atv;
        }
        name = after;
    }
    Some(Subject::from_attrs(attrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if body.len() < 0x80 {
            v.push(body.len() as u8);
        } else {
            v.push(0x82);
            v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    fn atv(oid: &[u8], tag: u8, value: &str) -> Vec<u8> {
        tlv(
            SET,
            &tlv(
                SEQUENCE,
                &[tlv(OID, oid), tlv(tag, value.as_bytes())].concat(),
            ),
        )
    }

    /// A certificate skeleton: only the fields `subject` walks are filled in.
    fn cert(subject_rdns: &[Vec<u8>], pad: usize) -> Vec<u8> {
        let tbs = [
            tlv(0xa0, &tlv(0x02, &[2])),
            tlv(0x02, &[1; 9]),
            tlv(
                SEQUENCE,
                &tlv(OID, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 4, 3, 2]),
            ),
            tlv(SEQUENCE, &atv(&[0x55, 4, 3], 0x0c, &"x".repeat(pad))),
            tlv(SEQUENCE, &[]),
            tlv(SEQUENCE, &subject_rdns.concat()),
        ]
        .concat();
        tlv(
            SEQUENCE,
            &[tlv(SEQUENCE, &tbs), tlv(SEQUENCE, &[])].concat(),
        )
    }

    #[test]
    fn reads_the_subject() {
        let c = cert(
            &[
                atv(&[0x55, 4, 10], 0x13, "acme"),
                atv(&[0x55, 4, 3], 0x0c, "db1"),
            ],
            300,
        );
        assert_eq!(subject(&c), Some("CN=db1,O=acme".parse().unwrap()));
        // Unknown attribute types keep their OID.
        let c = cert(&[atv(&[0x55, 4, 99], 0x0c, "v")], 1);
        assert_eq!(subject(&c), Some("2.5.4.99=v".parse().unwrap()));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let good = cert(&[atv(&[0x55, 4, 3], 0x0c, "db1")], 1);
        for cut in 0..good.len() {
            assert_eq!(subject(&good[..cut]), None, "cut at {cut}");
        }
        // A value that is not a string.
        assert_eq!(subject(&cert(&[atv(&[0x55, 4, 3], 0x04, "x")], 1)), None);
        assert_eq!(oid_string(&[0x55, 0x84]), None);
        assert_eq!(oid_string(&[0x2a, 0x86, 0x48]).as_deref(), Some("1.2.840"));
        assert_eq!(
            oid_string(&[0x2a, 0x86, 0x48, 0x01]).as_deref(),
            Some("1.2.840.1")
        );
    }
}
