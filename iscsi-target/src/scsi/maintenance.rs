//! Housekeeping commands: START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, READ DEFECT DATA and
//! REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN).

use super::{be16, be32, Nexus, Response};
use crate::lu::Lu;

pub(super) fn start_stop(cdb: &[u8]) -> Response {
    let power_condition = cdb[4] >> 4;
    if power_condition != 0 {
        // Power conditions are accepted but have no effect on flash.
        return Response::good();
    }
    Response::good()
}

pub(super) fn prevent_allow(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8]) -> Response {
    let prevent = cdb[4] & 0x03;
    let mut st = lu.state.lock();
    if prevent & 1 != 0 {
        st.prevent.insert(nexus.port.to_string());
    } else {
        st.prevent.remove(nexus.port);
    }
    Response::good()
}

pub(super) fn read_defect_data(cdb: &[u8]) -> Response {
    // No defects: an empty list in the requested format.
    if cdb[0] == 0x37 {
        let alloc = usize::from(be16(cdb, 7));
        let mut d = vec![0u8, cdb[2] & 0x1f, 0, 0];
        d.truncate(alloc);
        Response::data(d)
    } else {
        let alloc = be32(cdb, 6) as usize;
        let mut d = vec![0u8, cdb[1] & 0x1f, 0, 0, 0, 0, 0, 0];
        d.truncate(alloc);
        Response::data(d)
    }
}

/// Supported commands: (opcode, service action, CDB length).
pub(super) const OPCODES: &[(u8, Option<u16>, u8)] = &[
    (0x00, None, 6),
    (0x03, None, 6),
    (0x08, None, 6),
    (0x0a, None, 6),
    (0x12, None, 6),
    (0x15, None, 6),
    (0x16, None, 6),
    (0x17, None, 6),
    (0x1a, None, 6),
    (0x1b, None, 6),
    (0x1e, None, 6),
    (0x25, None, 10),
    (0x28, None, 10),
    (0x2a, None, 10),
    (0x2e, None, 10),
    (0x2f, None, 10),
    (0x34, None, 10),
    (0x35, None, 10),
    (0x37, None, 10),
    (0x41, None, 10),
    (0x42, None, 10),
    (0x55, None, 10),
    (0x5a, None, 10),
    (0x5e, Some(0), 10),
    (0x5e, Some(1), 10),
    (0x5e, Some(2), 10),
    (0x5e, Some(3), 10),
    (0x5f, Some(0), 10),
    (0x5f, Some(1), 10),
    (0x5f, Some(2), 10),
    (0x5f, Some(3), 10),
    (0x5f, Some(4), 10),
    (0x5f, Some(5), 10),
    (0x5f, Some(6), 10),
    (0x83, Some(0), 16),
    (0x84, Some(0), 16),
    (0x84, Some(3), 16),
    (0x88, None, 16),
    (0x89, None, 16),
    (0x8a, None, 16),
    (0x8b, None, 16),
    (0x8e, None, 16),
    (0x8f, None, 16),
    (0x90, None, 16),
    (0x91, None, 16),
    (0x93, None, 16),
    (0x9e, Some(0x10), 16),
    (0x9e, Some(0x12), 16),
    (0xa0, None, 12),
    (0xa3, Some(0x0c), 12),
    (0xa8, None, 12),
    (0xaa, None, 12),
    (0xae, None, 12),
    (0xaf, None, 12),
    (0xb7, None, 12),
];

/// CDB usage bitmap: the opcode, then every bit of the other bytes usable, except the service
/// action field which is exact.
pub(super) fn usage(op: u8, sa: Option<u16>, len: u8) -> Vec<u8> {
    let mut u = vec![0xffu8; usize::from(len)];
    u[0] = op;
    if let Some(sa) = sa {
        u[1] = (sa as u8 & 0x1f) | 0xe0;
    }
    // The CONTROL byte: only NACA-less bits (we reject NACA).
    let last = usize::from(len) - 1;
    u[last] = 0x00;
    u
}

pub(super) fn maintenance_in(cdb: &[u8]) -> Response {
    if cdb[1] & 0x1f != 0x0c {
        return Response::bad_cdb(1, Some(4));
    }
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let op = cdb[3];
    let sa = be16(cdb, 4);
    let alloc = be32(cdb, 6) as usize;
    let timeouts = |d: &mut Vec<u8>| {
        if rctd {
            d.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 30, 0, 0, 0, 60]);
        }
    };
    let mut d = Vec::new();
    match options {
        0 => {
            d.extend_from_slice(&[0; 4]);
            for (o, s, l) in OPCODES {
                d.push(*o);
                d.push(0);
                d.extend_from_slice(&s.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(if s.is_some() { 0x01 } else { 0 } | if rctd { 0x02 } else { 0 });
                d.extend_from_slice(&u16::from(*l).to_be_bytes());
                timeouts(&mut d);
            }
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
        }
        1..=3 => {
            let found = OPCODES.iter().find(|(o, s, _)| {
                *o == op
                    && match options {
                        1 => s.is_none(),
                        2 => *s == Some(sa),
                        _ => s.is_none() || *s == Some(sa),
                    }
            });
            if options == 1 && OPCODES.iter().any(|(o, s, _)| *o == op && s.is_some()) {
                return Response::bad_cdb(2, None);
            }
            if options == 2 && OPCODES.iter().any(|(o, s, _)| *o == op && s.is_none()) {
                return Response::bad_cdb(2, None);
            }
            match found {
                Some((o, s, l)) => {
                    d.push(0);
                    d.push(0x03 | if rctd { 0x80 } else { 0 }); // supported per standard
                    d.extend_from_slice(&u16::from(*l).to_be_bytes());
                    d.extend_from_slice(&usage(*o, *s, *l));
                }
                None => d.extend_from_slice(&[0, 0x01, 0, 0]),
            }
            timeouts(&mut d);
        }
        _ => return Response::bad_cdb(2, None),
    }
    d.truncate(alloc);
    Response::data(d)
}
