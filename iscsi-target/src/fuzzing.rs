//! Entry points for the fuzz targets in `fuzz/` (and the corpus smoke test). Not a stable API.

use std::sync::Arc;

use ingot_engine::Error;

use crate::backend::LuBackend;
use crate::login::{Login, LoginConfig, TargetLookup};
use crate::lu::Lu;
use crate::mem::MemLu;
use crate::pdu::{self, read_pdu, Limits, ScsiCmd};
use crate::scsi::{self, Nexus};
use crate::sense::status;
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

/// Size of the logical unit [`cdbs`] runs commands against: small, so that whole-volume
/// commands (WRITE SAME to the end, GET LBA STATUS, EXTENDED COPY) stay cheap.
const CDB_LU_BYTES: u64 = 64 << 10;
/// Commands run per input.
const CDB_MAX_COMMANDS: usize = 64;

/// Run a sequence of SCSI commands against one in-memory logical unit, as two initiator
/// ports. Each command is a flags byte, a 16-byte CDB, a big-endian 2-byte Data-Out length
/// and that many bytes (fewer at the end of the input). Flags: bit 0 picks the port, bit 1
/// resets the unit first, bit 2 resizes it (a unit attention follows), bit 3 makes the
/// backend fail with ENOSPC and bit 4 with a shutdown while the command runs.
pub fn cdbs(data: &[u8]) {
    let mem = Arc::new(MemLu::new("fuzz", CDB_LU_BYTES));
    let lu = Lu::new(mem.clone());
    let ports = ["iqn.fuzz.a,i,0x000000000001", "iqn.fuzz.b,i,0x000000000002"];
    for p in ports {
        lu.attach(p);
    }
    let mut rest = data;
    for _ in 0..CDB_MAX_COMMANDS {
        if rest.len() < 17 {
            break;
        }
        let flags = rest[0];
        let cdb = &rest[1..17];
        rest = &rest[17..];
        let len = match rest {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => 0,
        };
        rest = &rest[rest.len().min(2)..];
        let data_out = rest[..len.min(rest.len())].to_vec();
        rest = &rest[data_out.len()..];
        if flags & 0x02 != 0 {
            lu.reset();
        }
        if flags & 0x04 != 0 {
            let size = if mem.size_bytes() == CDB_LU_BYTES {
                CDB_LU_BYTES / 2
            } else {
                CDB_LU_BYTES
            };
            mem.resize(size);
        }
        mem.set_failure(match flags & 0x18 {
            0x08 => Some(|| Error::NoSpace),
            0x10 => Some(|| Error::ShutDown),
            _ => None,
        });
        let nexus = Nexus {
            port: ports[usize::from(flags & 1)],
            target_name: "iqn.2026-11.io.ingot:fuzz",
        };
        let _ = scsi::data_out_len(cdb);
        let r = scsi::execute_sync(&lu, &nexus, cdb, data_out);
        // Sense data comes with CHECK CONDITION and only with it.
        assert_eq!(r.sense.is_some(), r.status == status::CHECK_CONDITION);
        assert!(matches!(
            r.status,
            status::GOOD | status::CHECK_CONDITION | status::RESERVATION_CONFLICT
        ));
    }
}
