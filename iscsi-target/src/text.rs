//! Text keys (RFC 7143 §6): `key=value` pairs, each ended by a NUL byte, in Login and Text PDUs.

/// Longest key name (RFC 7143 §6.1: 63 bytes).
pub const MAX_KEY_BYTES: usize = 63;
/// Longest value we accept (CHAP challenges and responses in hex are the longest we use).
pub const MAX_VALUE_BYTES: usize = 8192;
/// Most pairs one login or text exchange may carry.
pub const MAX_PAIRS: usize = 256;

/// Why a text segment could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    #[error("key=value pair without '='")]
    MissingEquals,
    #[error("empty key")]
    EmptyKey,
    #[error("key longer than {MAX_KEY_BYTES} bytes")]
    KeyTooLong,
    #[error("value longer than {MAX_VALUE_BYTES} bytes")]
    ValueTooLong,
    #[error("key or value is not UTF-8")]
    NotUtf8,
    #[error("more than {MAX_PAIRS} pairs")]
    TooManyPairs,
    #[error("key {0:?} appears twice")]
    Duplicate(String),
}

/// Parse a text data segment. Trailing NUL padding and a final pair without its NUL are
/// accepted; duplicate keys are an error (RFC 7143 §6.1).
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let eq = item
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TextError::MissingEquals)?;
        let (k, v) = (&item[..eq], &item[eq + 1..]);
        if k.is_empty() {
            return Err(TextError::EmptyKey);
        }
        if k.len() > MAX_KEY_BYTES {
            return Err(TextError::KeyTooLong);
        }
        if v.len() > MAX_VALUE_BYTES {
            return Err(TextError::ValueTooLong);
        }
        let k = std::str::from_utf8(k).map_err(|_| TextError::NotUtf8)?;
        let v = std::str::from_utf8(v).map_err(|_| TextError::NotUtf8)?;
        if out.iter().any(|(ok, _)| ok == k) {
            return Err(TextError::Duplicate(k.to_string()));
        }
        if out.len() >= MAX_PAIRS {
            return Err(TextError::TooManyPairs);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encode pairs as `key=value\0...`.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// A numeric value: decimal, or hex with a `0x` prefix (RFC 7143 §6.1 number encodings).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

/// A binary value in hex (`0x...`) or base64 (`0b...`) form.
pub fn parse_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let h = if h.len() % 2 == 1 {
            format!("0{h}")
        } else {
            h.to_string()
        };
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect()
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b)
    } else {
        None
    }
}

/// `0x` followed by lower-case hex.
pub fn hex(data: &[u8]) -> String {
    let mut s = String::with_capacity(2 + data.len() * 2);
    s.push_str("0x");
    for b in data {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in s {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_encode() {
        let d = b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0";
        let p = parse(d).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1], ("SessionType".into(), "Normal".into()));
        assert_eq!(parse(&encode(&p)).unwrap(), p);
        assert_eq!(parse(b"a=b").unwrap().len(), 1);
        assert_eq!(parse(b"a=\0").unwrap()[0].1, "");
    }

    #[test]
    fn parse_errors() {
        assert_eq!(parse(b"novalue\0"), Err(TextError::MissingEquals));
        assert_eq!(parse(b"=v\0"), Err(TextError::EmptyKey));
        assert_eq!(parse(b"a=1\0a=2\0"), Err(TextError::Duplicate("a".into())));
        assert_eq!(parse(&[b'k', b'=', 0xff, 0]), Err(TextError::NotUtf8));
        let long = format!("{}=1", "k".repeat(64));
        assert_eq!(parse(long.as_bytes()), Err(TextError::KeyTooLong));
    }

    #[test]
    fn numbers_and_binary() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("x"), None);
        assert_eq!(parse_binary("0x0a0B"), Some(vec![10, 11]));
        assert_eq!(parse_binary("0xa"), Some(vec![10]));
        assert_eq!(parse_binary("0bAAEC"), Some(vec![0, 1, 2]));
        assert_eq!(parse_binary("12"), None);
        assert_eq!(hex(&[1, 0xab]), "0x01ab");
    }
}
