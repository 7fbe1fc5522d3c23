//! MODE SENSE and MODE SELECT (6 and 10): the read-write error recovery, caching, control and
//! informational exceptions pages; only the caching page's WCE bit is changeable.

use ingot_engine::Request;

use super::{be16, Response};
use crate::lu::{Lu, BLOCK_BYTES};
use crate::sense;

/// Mode pages: (page, current bytes, changeable mask). Page bytes include the 2-byte header.
pub(super) fn mode_pages(wce: bool) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
    let mut caching = vec![0u8; 20];
    caching[0] = 0x08;
    caching[1] = 18;
    caching[2] = if wce { 0x04 } else { 0 };
    let mut caching_mask = vec![0u8; 20];
    caching_mask[0] = 0x08;
    caching_mask[1] = 18;
    caching_mask[2] = 0x04;
    let mut control = vec![0u8; 12];
    control[0] = 0x0a;
    control[1] = 10;
    control[2] = 0x02; // GLTSD
    control[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering)
    control[8] = 0xff; // busy timeout period: unlimited
    control[9] = 0xff;
    let mut control_mask = vec![0u8; 12];
    control_mask[0] = 0x0a;
    control_mask[1] = 10;
    let mut rw = vec![0u8; 12];
    rw[0] = 0x01;
    rw[1] = 10;
    rw[2] = 0x80; // AWRE
    let mut rw_mask = vec![0u8; 12];
    rw_mask[0] = 0x01;
    rw_mask[1] = 10;
    let mut iec = vec![0u8; 12];
    iec[0] = 0x1c;
    iec[1] = 10;
    let mut iec_mask = vec![0u8; 12];
    iec_mask[0] = 0x1c;
    iec_mask[1] = 10;
    vec![
        (0x01, rw, rw_mask),
        (0x08, caching, caching_mask),
        (0x0a, control, control_mask),
        (0x1c, iec, iec_mask),
    ]
}

pub(super) fn mode_sense(lu: &Lu, cdb: &[u8]) -> Response {
    let ten = cdb[0] == 0x5a;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    if pc == 3 {
        return Response::check(sense::SAVING_PARAMETERS_NOT_SUPPORTED);
    }
    let wce = lu.state.lock().wce;
    let pages = mode_pages(wce);
    let mut body = Vec::new();
    let pick = |cur: &Vec<u8>, mask: &Vec<u8>| -> Vec<u8> {
        if pc == 1 {
            mask.clone()
        } else if pc == 2 {
            // Defaults equal the power-on values (write cache enabled).
            let mut d = cur.clone();
            if d[0] == 0x08 {
                d[2] |= 0x04;
            }
            d
        } else {
            cur.clone()
        }
    };
    if page == 0x3f {
        if subpage != 0 && subpage != 0xff {
            return Response::bad_cdb(3, None);
        }
        for (_, cur, mask) in &pages {
            body.extend_from_slice(&pick(cur, mask));
        }
    } else {
        if subpage != 0 {
            return Response::bad_cdb(3, None);
        }
        match pages.iter().find(|(p, _, _)| *p == page) {
            Some((_, cur, mask)) => body.extend_from_slice(&pick(cur, mask)),
            None => return Response::bad_cdb(2, Some(5)),
        }
    }
    let blocks = lu.blocks();
    let mut bd = Vec::new();
    if !dbd {
        if llbaa {
            bd.extend_from_slice(&blocks.to_be_bytes());
            bd.extend_from_slice(&[0; 4]);
            bd.extend_from_slice(&BLOCK_BYTES.to_be_bytes());
        } else {
            let n = blocks.min(0xff_ffff) as u32;
            bd.extend_from_slice(&n.to_be_bytes());
            bd.extend_from_slice(&BLOCK_BYTES.to_be_bytes());
        }
    }
    // Device-specific parameter: DPOFUA, and WP for a snapshot.
    let dsp = if lu.backend.read_only() { 0x90 } else { 0x10 };
    let mut d = Vec::new();
    if ten {
        let total = 6 + bd.len() + body.len();
        d.extend_from_slice(&(total as u16).to_be_bytes());
        d.push(0);
        d.push(dsp);
        d.push(if llbaa && !dbd { 1 } else { 0 });
        d.push(0);
        d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        let total = 3 + bd.len() + body.len();
        d.push(total.min(255) as u8);
        d.push(0);
        d.push(dsp);
        d.push(bd.len() as u8);
    }
    d.extend_from_slice(&bd);
    d.extend_from_slice(&body);
    d.truncate(alloc);
    Response::data(d)
}

pub(super) fn mode_select(lu: &Lu, cdb: &[u8], data: &[u8]) -> Response {
    let ten = cdb[0] == 0x55;
    let pf = cdb[1] & 0x10 != 0;
    let sp = cdb[1] & 0x01 != 0;
    let plen = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    if sp {
        return Response::bad_cdb(1, Some(0));
    }
    if plen == 0 {
        return Response::good();
    }
    if !pf {
        return Response::bad_cdb(1, Some(4));
    }
    let hdr = if ten { 8 } else { 4 };
    if plen < hdr || data.len() < plen {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let p = &data[..plen];
    let bd_len = if ten {
        usize::from(be16(p, 6))
    } else {
        usize::from(p[3])
    };
    let mut at = hdr + bd_len;
    if at > plen {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let wce_now = lu.state.lock().wce;
    let pages = mode_pages(wce_now);
    let mut new_wce = None;
    while at < plen {
        if at + 2 > plen {
            return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let code = p[at] & 0x3f;
        if p[at] & 0x40 != 0 {
            // Subpage format: none supported.
            return Response::bad_param(at as u16);
        }
        let len = usize::from(p[at + 1]) + 2;
        if at + len > plen {
            return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let Some((_, cur, mask)) = pages.iter().find(|(c, _, _)| *c == code) else {
            return Response::bad_param(at as u16);
        };
        if len != cur.len() {
            return Response::bad_param((at + 1) as u16);
        }
        // Only changeable bits may differ from the current values.
        for i in 2..len {
            if (p[at + i] ^ cur[i]) & !mask[i] != 0 {
                return Response::bad_param((at + i) as u16);
            }
        }
        if code == 0x08 {
            new_wce = Some(p[at + 2] & 0x04 != 0);
        }
        at += len;
    }
    if let Some(w) = new_wce {
        let mut st = lu.state.lock();
        if st.wce && !w {
            // Turning the cache off: make what it held durable.
            drop(st);
            if let Err(e) = lu.backend.call(Request::Flush) {
                return Response::engine(&e);
            }
            st = lu.state.lock();
        }
        st.wce = w;
    }
    Response::good()
}
