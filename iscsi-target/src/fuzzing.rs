//! Entry points for the fuzz targets in `fuzz/` (and the corpus smoke test). Not a stable API.

use crate::login::{Login, LoginConfig, TargetLookup};
use crate::pdu::{self, read_pdu, Limits, ScsiCmd};
use crate::text;

/// Decode a stream of PDUs with and without digests, and the SCSI command fields of each.
pub fn pdus(data: &[u8]) {
    for (hd, dd) in [(false, false), (true, true)] {
        let lim = Limits {
            max_data: 64 << 10,
            header_digest: hd,
            data_digest: dd,
        };
        let mut r = data;
        for _ in 0..64 {
            match read_pdu(&mut r, &lim) {
                Ok(Some(p)) => {
                    if p.bhs.opcode() == pdu::op::SCSI_CMD {
                        let _ = ScsiCmd::parse(&p);
                    }
                    let _ = pdu::decode_lun(p.bhs.lun());
                }
                _ => break,
            }
        }
    }
}

/// Parse `key=value` text, then run the bytes as a sequence of login requests.
pub fn login_text(data: &[u8]) {
    if let Ok(pairs) = text::parse(data) {
        let enc = text::encode(&pairs);
        assert_eq!(text::parse(&enc).ok(), Some(pairs.clone()));
        for (_, v) in &pairs {
            let _ = text::parse_number(v);
            let _ = text::parse_binary(v);
        }
    }
    let lookup = |name: &str| {
        if name.len() % 2 == 0 {
            TargetLookup::Found(None)
        } else {
            TargetLookup::Found(Some(crate::login::ChapConfig {
                user: "u".into(),
                secret: "s".into(),
                mutual: Some(("t".into(), "m".into())),
            }))
        }
    };
    let mut login = Login::new(LoginConfig::default(), 1, 16);
    // The first 2 bytes pick the login flags of each step; the rest is split into steps.
    let (flags, body) = data.split_at(data.len().min(2));
    for (i, chunk) in body.split(|&b| b == 0xff).take(8).enumerate() {
        let mut b = pdu::Bhs::new(
            pdu::op::LOGIN_REQ,
            flags.get(i % 2).copied().unwrap_or(0x81),
        );
        b.set_data_len(chunk.len());
        let p = pdu::Pdu {
            bhs: b,
            ahs: Vec::new(),
            data: chunk.to_vec(),
        };
        let step = login.step(&p, &lookup);
        if step.outcome.is_some() {
            break;
        }
    }
}
