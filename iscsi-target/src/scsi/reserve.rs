//! Reservations: the access check every command passes, RESERVE(6) / RELEASE(6) (SPC-2) and
//! PERSISTENT RESERVE IN / OUT (SPC-4 §5.12).

use super::{be16, be32, be64, Nexus, Response};
use crate::lu::{pr_type, Lu, LuState, Reservation, MAX_REGISTRATIONS};
use crate::sense;

/// Class of a command for reservation checks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, ...).
    Any,
    Read,
    Write,
    /// Conflicts with any reservation held by someone else (RESERVE/RELEASE, MODE SELECT).
    Exclusive,
}

pub(super) fn access_of(op: u8, cdb: &[u8]) -> Access {
    match op {
        0x12 | 0xa0 | 0x03 | 0x5e | 0x5f | 0x25 | 0x00 => Access::Any,
        0x9e if cdb[1] & 0x1f == 0x10 => Access::Any,
        0xa3 => Access::Any,
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x9e | 0x1a | 0x5a => {
            Access::Read
        }
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b
        | 0x35 | 0x91 | 0x83 => Access::Write,
        0x16 | 0x17 | 0x15 | 0x55 | 0x1b | 0x1e => Access::Exclusive,
        _ => Access::Any,
    }
}

/// Whether `port` may run a command of class `a` given the reservations.
pub(super) fn reservation_conflict(st: &LuState, port: &str, op: u8, a: Access) -> bool {
    if let Some(holder) = &st.reserve6 {
        if holder != port {
            // SPC-2 reservations: only INQUIRY, REPORT LUNS, REQUEST SENSE, RELEASE, PR IN,
            // and the other Any-class commands pass.
            return !matches!(op, 0x12 | 0xa0 | 0x03 | 0x17 | 0x5e | 0xa3 | 0x25 | 0x9e)
                || (op == 0x9e && a != Access::Any);
        }
        return false;
    }
    let Some(r) = &st.reservation else {
        return false;
    };
    if st.is_holder(port) {
        return false;
    }
    let registered = st.key_of(port).is_some();
    let ro_ar = pr_type::registrants_access(r.kind);
    match a {
        Access::Any => false,
        Access::Read => {
            if pr_type::exclusive_access(r.kind) {
                !(ro_ar && registered)
            } else {
                false
            }
        }
        Access::Write => !(ro_ar && registered),
        Access::Exclusive => match op {
            // RESERVE(6) / RELEASE(6) conflict with any persistent reservation.
            0x16 | 0x17 => true,
            _ => !(ro_ar && registered),
        },
    }
}

pub(super) fn reserve6(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8]) -> Response {
    if cdb[1] & 0x01 != 0 {
        // Third-party / extent reservations are not supported.
        return Response::bad_cdb(1, Some(0));
    }
    let mut st = lu.state.lock();
    if st.reservation.is_some() {
        return Response::conflict();
    }
    match &st.reserve6 {
        Some(h) if h != nexus.port => Response::conflict(),
        _ => {
            st.reserve6 = Some(nexus.port.to_string());
            Response::good()
        }
    }
}

pub(super) fn release6(lu: &Lu, nexus: &Nexus<'_>, _cdb: &[u8]) -> Response {
    let mut st = lu.state.lock();
    if st.reservation.is_some() {
        return Response::conflict();
    }
    if st.reserve6.as_deref() == Some(nexus.port) {
        st.reserve6 = None;
    }
    Response::good()
}

pub(super) fn pr_in(lu: &Lu, cdb: &[u8]) -> Response {
    let sa = cdb[1] & 0x1f;
    let alloc = usize::from(be16(cdb, 7));
    let st = lu.state.lock();
    let mut d = Vec::new();
    d.extend_from_slice(&st.pr_generation.to_be_bytes());
    match sa {
        0 => {
            // READ KEYS
            let keys: Vec<u8> = st
                .registrations
                .iter()
                .flat_map(|(_, k)| k.to_be_bytes())
                .collect();
            d.extend_from_slice(&(keys.len() as u32).to_be_bytes());
            d.extend_from_slice(&keys);
        }
        1 => {
            // READ RESERVATION
            match &st.reservation {
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if pr_type::all_registrants(r.kind) {
                        0
                    } else {
                        st.key_of(&r.holder).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    d.push(0);
                    d.push(r.kind & 0x0f);
                    d.extend_from_slice(&[0; 2]);
                }
                None => d.extend_from_slice(&0u32.to_be_bytes()),
            }
        }
        2 => {
            // REPORT CAPABILITIES
            d.clear();
            d.extend_from_slice(&8u16.to_be_bytes());
            d.push(0x00); // CRH 0, SIP_C 0, ATP_C 0, PTPL_C 0
            d.push(0x80); // TMV; ALLOW COMMANDS 0; PTPL_A 0
                          // Persistent reservation type mask: WE, EA, WERO, EARO, WEAR, EAAR.
            d.push(0xea); // bit7 WR_EX_AR, bit6 EX_AC_RO, bit5 WR_EX_RO, bit3 EX_AC, bit1 WR_EX
            d.push(0x01); // EX_AC_AR
            d.extend_from_slice(&[0; 2]);
        }
        3 => {
            // READ FULL STATUS
            let mut descs = Vec::new();
            for (port, key) in &st.registrations {
                let holder = st.is_holder(port);
                let mut e = Vec::new();
                e.extend_from_slice(&key.to_be_bytes());
                e.extend_from_slice(&[0; 4]);
                e.push(if holder { 0x01 } else { 0 }); // R_HOLDER
                e.push(match (&st.reservation, holder) {
                    (Some(r), true) => r.kind & 0x0f,
                    _ => 0,
                });
                e.extend_from_slice(&[0; 4]);
                e.extend_from_slice(&1u16.to_be_bytes()); // relative target port
                let tid = transport_id(port);
                e.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                e.extend_from_slice(&tid);
                descs.extend_from_slice(&e);
            }
            d.extend_from_slice(&(descs.len() as u32).to_be_bytes());
            d.extend_from_slice(&descs);
        }
        _ => return Response::bad_cdb(1, Some(4)),
    }
    d.truncate(alloc);
    Response::data(d)
}

/// iSCSI TransportID (SPC-4 §7.6.4.6, format 01b: name + ",i,0x" + ISID).
pub(super) fn transport_id(port: &str) -> Vec<u8> {
    let mut name = port.as_bytes().to_vec();
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    let mut t = vec![0x45, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend_from_slice(&name);
    t
}

pub(super) fn pr_out(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8], data: &[u8]) -> Response {
    let sa = cdb[1] & 0x1f;
    let scope = cdb[2] >> 4;
    let kind = cdb[2] & 0x0f;
    let plen = be32(cdb, 5) as usize;
    if sa > 7 {
        return Response::bad_cdb(1, Some(4));
    }
    if sa == 7 {
        // REGISTER AND MOVE is not supported.
        return Response::bad_cdb(1, Some(4));
    }
    if plen != 24 {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    if data.len() < 24 {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let key = be64(data, 0);
    let sa_key = be64(data, 8);
    let flags = data[20];
    if flags & 0x0c != 0 {
        // SPEC_I_PT / ALL_TG_PT are not supported.
        return Response::bad_param(20);
    }
    if flags & 0x01 != 0 {
        // APTPL: persistence across power loss is not supported.
        return Response::bad_param(20);
    }
    let port = nexus.port;
    let mut st = lu.state.lock();
    let current = st.key_of(port);
    match sa {
        0 | 6 => {
            // REGISTER / REGISTER AND IGNORE EXISTING KEY
            if sa == 0 && current.unwrap_or(0) != key {
                return Response::conflict();
            }
            if sa_key == 0 {
                if current.is_some() {
                    unregister(&mut st, port);
                }
            } else if current.is_some() {
                if let Some(r) = st.registrations.iter_mut().find(|(p, _)| p == port) {
                    r.1 = sa_key;
                }
            } else {
                if st.registrations.len() >= MAX_REGISTRATIONS {
                    return Response::check(sense::INSUFFICIENT_REGISTRATION_RESOURCES);
                }
                st.registrations.push((port.to_string(), sa_key));
            }
            st.pr_generation = st.pr_generation.wrapping_add(1);
            Response::good()
        }
        1 => {
            // RESERVE
            if current != Some(key) {
                return Response::conflict();
            }
            if scope != 0 {
                return Response::bad_cdb(2, Some(4));
            }
            if !pr_type::valid(kind) {
                return Response::bad_cdb(2, Some(0));
            }
            match &st.reservation {
                Some(r) if st.is_holder(port) => {
                    if r.kind != kind {
                        return Response::conflict();
                    }
                    Response::good()
                }
                Some(_) => Response::conflict(),
                None => {
                    st.reservation = Some(Reservation {
                        holder: port.to_string(),
                        kind,
                    });
                    Response::good()
                }
            }
        }
        2 => {
            // RELEASE
            if current != Some(key) {
                return Response::conflict();
            }
            let Some(r) = st.reservation.clone() else {
                return Response::good();
            };
            if !st.is_holder(port) {
                return Response::good();
            }
            if scope != 0 || r.kind != kind {
                return Response::check(sense::INVALID_RELEASE);
            }
            st.reservation = None;
            if pr_type::registrants_access(r.kind) {
                let others: Vec<String> = st
                    .registrations
                    .iter()
                    .filter(|(p, _)| p != port)
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in others {
                    st.ua_to(&p, sense::RESERVATIONS_RELEASED);
                }
            }
            Response::good()
        }
        3 => {
            // CLEAR
            if current != Some(key) {
                return Response::conflict();
            }
            let others: Vec<String> = st
                .registrations
                .iter()
                .filter(|(p, _)| p != port)
                .map(|(p, _)| p.clone())
                .collect();
            for p in others {
                st.ua_to(&p, sense::RESERVATIONS_PREEMPTED);
            }
            st.registrations.clear();
            st.reservation = None;
            st.pr_generation = st.pr_generation.wrapping_add(1);
            Response::good()
        }
        4 | 5 => {
            // PREEMPT / PREEMPT AND ABORT
            if current != Some(key) {
                return Response::conflict();
            }
            if !pr_type::valid(kind) {
                return Response::bad_cdb(2, Some(0));
            }
            let res = st.reservation.clone();
            let preempt_holder = match &res {
                Some(r) if pr_type::all_registrants(r.kind) => sa_key == 0,
                Some(r) => st.key_of(&r.holder) == Some(sa_key),
                None => false,
            };
            if sa_key == 0 && !preempt_holder {
                return Response::bad_param(8);
            }
            let victims: Vec<String> = st
                .registrations
                .iter()
                .filter(|(p, k)| p != port && (sa_key == 0 || *k == sa_key))
                .map(|(p, _)| p.clone())
                .collect();
            if victims.is_empty() && !preempt_holder {
                return Response::conflict();
            }
            for v in &victims {
                st.registrations.retain(|(p, _)| p != v);
                st.ua_to(v, sense::REGISTRATIONS_PREEMPTED);
            }
            if preempt_holder {
                st.reservation = Some(Reservation {
                    holder: port.to_string(),
                    kind,
                });
            }
            st.pr_generation = st.pr_generation.wrapping_add(1);
            Response::good()
        }
        _ => Response::bad_cdb(1, Some(4)),
    }
}

pub(super) fn unregister(st: &mut LuState, port: &str) {
    st.registrations.retain(|(p, _)| p != port);
    if let Some(r) = st.reservation.clone() {
        if pr_type::all_registrants(r.kind) {
            if st.registrations.is_empty() {
                st.reservation = None;
            }
        } else if r.holder == port {
            st.reservation = None;
            if pr_type::registrants_access(r.kind) {
                let others: Vec<String> = st.registrations.iter().map(|(p, _)| p.clone()).collect();
                for p in others {
                    st.ua_to(&p, sense::RESERVATIONS_RELEASED);
                }
            }
        }
    }
}
