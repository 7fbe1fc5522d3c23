//! The full feature phase of a connection, reader side: decodes PDUs, collects Data-Out, runs
//! commands and task management.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ingot_engine::Request;

use super::writer::{finish_after_response, respond, whole_pdu_buffered, Ctx, MAX_HELD};
use crate::error::{IscsiError, Result};
use crate::login::{Session, SessionType};
use crate::lu::Lu;
use crate::pdu::{self, decode_lun, op, read_pdu, reject, Bhs, Pdu, ScsiCmd, RESERVED_TAG};
use crate::scsi::{self, Action, Nexus, Response};
use crate::sense;
use crate::target::Shared;
use crate::text;

/// TMF function codes (RFC 7143 §11.5.1).
mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LUN_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    // Responses.
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const NOT_SUPPORTED: u8 = 5;
}

/// A write waiting for its Data-Out.
struct PendingWrite {
    cmd: ScsiCmd,
    lu: u16,
    buf: Vec<u8>,
    /// Bytes of the unsolicited burst (immediate + unsolicited Data-Out).
    unsolicited_end: usize,
    unsolicited_done: bool,
    next_data_sn: u32,
    /// Current R2T: target transfer tag and the end of its burst.
    r2t: Option<(u32, usize)>,
    r2t_sn: u32,
}

pub(super) struct Conn {
    shared: Arc<Shared>,
    ctx: Arc<Ctx>,
    session: Session,
    lu: Option<(Arc<Lu>, String)>,
    pending: HashMap<u32, PendingWrite>,
    next_ttt: u32,
    /// `HOST:PORT` this connection arrived on, for SendTargets.
    portal: String,
}

/// Serial number comparison (RFC 1982): a < b.
fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

impl Conn {
    pub(super) fn new(
        shared: Arc<Shared>,
        ctx: Arc<Ctx>,
        session: Session,
        lu: Option<(Arc<Lu>, String)>,
        portal: String,
    ) -> Conn {
        Conn {
            shared,
            ctx,
            session,
            lu,
            pending: HashMap::new(),
            next_ttt: 1,
            portal,
        }
    }

    pub(super) fn run(
        &mut self,
        reader: &mut BufReader<TcpStream>,
        limits: &pdu::Limits,
    ) -> Result<()> {
        loop {
            if !whole_pdu_buffered(reader.buffer(), limits) || self.ctx.held() >= MAX_HELD {
                self.ctx.release_held();
            }
            let p = match read_pdu(reader, limits) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(IscsiError::DataDigest { pdu, .. }) => {
                    // ERL 0: reject the PDU, then give up on the connection.
                    self.reject(&pdu.bhs, reject::DATA_DIGEST_ERROR);
                    return Err(IscsiError::Protocol("data digest error"));
                }
                Err(e) => return Err(e),
            };
            self.ctx.touch();
            // Other PDUs (task management, logout, ...) may wait for commands, and their
            // responses must follow those already completed: send what is held first.
            let opcode = p.bhs.opcode();
            if opcode != op::SCSI_CMD && opcode != op::DATA_OUT {
                self.ctx.release_held();
            }
            if !self.handle(p)? {
                return Ok(());
            }
        }
    }

    fn reject(&self, bhs: &Bhs, reason: u8) {
        let mut b = Bhs::new(op::REJECT, 0x80);
        b.0[2] = reason;
        b.set_itt(RESERVED_TAG);
        self.ctx.send(b, Bytes::copy_from_slice(&bhs.0), true);
    }

    /// Handle one PDU; `Ok(false)` ends the connection cleanly.
    fn handle(&mut self, p: Pdu) -> Result<bool> {
        let opcode = p.bhs.opcode();
        let discovery = self.session.kind == SessionType::Discovery;
        match opcode {
            op::NOP_OUT => self.nop_out(p),
            op::SCSI_CMD if !discovery => {
                if let Some(cmd) = self.admit(&p) {
                    self.scsi_command(p, cmd)?;
                }
                Ok(true)
            }
            op::DATA_OUT if !discovery => {
                self.data_out(p)?;
                Ok(true)
            }
            op::TMF_REQ if !discovery => {
                self.admit_sn(&p.bhs);
                self.task_management(&p);
                Ok(true)
            }
            op::TEXT_REQ => {
                self.admit_sn(&p.bhs);
                self.text(&p);
                Ok(true)
            }
            op::LOGOUT_REQ => {
                self.admit_sn(&p.bhs);
                self.ctx.wait_idle();
                self.pending.clear();
                let mut b = Bhs::new(op::LOGOUT_RESP, 0x80);
                b.0[2] = 0; // connection or session closed successfully
                b.set_itt(p.bhs.itt());
                self.ctx.send(b, Bytes::new(), true);
                Ok(false)
            }
            op::LOGIN_REQ => {
                // A login in the full feature phase is a protocol error.
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                Err(IscsiError::Protocol("login request in full feature phase"))
            }
            op::SNACK_REQ => {
                // No SNACK at ErrorRecoveryLevel 0.
                self.reject(&p.bhs, reject::SNACK_REJECT);
                Ok(true)
            }
            _ => {
                self.reject(&p.bhs, reject::COMMAND_NOT_SUPPORTED);
                Ok(true)
            }
        }
    }

    /// CmdSN bookkeeping for non-SCSI requests.
    fn admit_sn(&self, b: &Bhs) {
        let exp = self.ctx.exp_cmd_sn.load(Ordering::Acquire);
        if !b.immediate()
            && !sn_lt(b.cmd_sn(), exp)
            && sn_lt(b.cmd_sn(), exp.wrapping_add(self.ctx.window))
        {
            self.ctx
                .exp_cmd_sn
                .store(b.cmd_sn().wrapping_add(1), Ordering::Release);
        }
    }

    /// Check a SCSI command's CmdSN against the window; `None` drops it silently.
    fn admit(&self, p: &Pdu) -> Option<ScsiCmd> {
        let cmd = match ScsiCmd::parse(p) {
            Ok(c) => c,
            Err(reason) => {
                self.reject(&p.bhs, reason);
                return None;
            }
        };
        let exp = self.ctx.exp_cmd_sn.load(Ordering::Acquire);
        if p.bhs.immediate() {
            return Some(cmd);
        }
        let limit = exp.wrapping_add(self.ctx.window);
        if sn_lt(cmd.cmd_sn, exp) || !sn_lt(cmd.cmd_sn, limit) {
            // Outside the command window: ignore (RFC 7143 §4.2.2.1).
            return None;
        }
        // One connection per session keeps commands in order, so a gap can only come from a
        // PDU we rejected or dropped: move past it rather than stall the window.
        self.ctx
            .exp_cmd_sn
            .store(cmd.cmd_sn.wrapping_add(1), Ordering::Release);
        Some(cmd)
    }

    fn nop_out(&mut self, p: Pdu) -> Result<bool> {
        let itt = p.bhs.itt();
        if itt == RESERVED_TAG {
            // The answer to our ping, or a one-way keep-alive: nothing to send.
            return Ok(true);
        }
        self.admit_sn(&p.bhs);
        let mut b = Bhs::new(op::NOP_IN, 0x80);
        b.set_lun(p.bhs.lun());
        b.set_itt(itt);
        b.set_u32(20, RESERVED_TAG);
        let data = p.data;
        self.ctx.send(b, Bytes::from(data), true);
        Ok(true)
    }

    fn text(&mut self, p: &Pdu) {
        let itt = p.bhs.itt();
        let mut b = Bhs::new(op::TEXT_RESP, 0x80);
        b.set_itt(itt);
        b.set_u32(20, RESERVED_TAG);
        if p.bhs.flags() & 0x40 != 0 {
            // Continued text requests are not supported.
            self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            return;
        }
        let keys = match text::parse(&p.data) {
            Ok(k) => k,
            Err(_) => {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return;
            }
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in &keys {
            if k == "SendTargets" {
                let portal = &self.portal;
                let security = self.shared.security();
                for name in self.shared.target_names() {
                    // Targets this initiator may not log in to are not named.
                    let vol = name
                        .strip_prefix(crate::target::IQN_PREFIX)
                        .unwrap_or(&name);
                    if !security.access.allows(vol, &self.session.initiator_name) {
                        continue;
                    }
                    // A normal session only learns about its own target.
                    let visible = match v.as_str() {
                        "All" if self.session.kind == SessionType::Discovery => true,
                        "All" | "" => name == self.session.target_name,
                        other => other == name,
                    };
                    if visible {
                        out.push(("TargetName".into(), name.clone()));
                        out.push(("TargetAddress".into(), format!("{portal},1")));
                    }
                }
            } else {
                out.push((k.clone(), "NotUnderstood".into()));
            }
        }
        let mut data = text::encode(&out);
        // One PDU only: clip at the initiator's limit on a pair boundary.
        let max = self.ctx.params.max_send_data as usize;
        if data.len() > max {
            let mut cut = 0;
            for (i, b) in data.iter().enumerate() {
                if *b == 0 && i < max {
                    cut = i + 1;
                }
            }
            data.truncate(cut);
        }
        self.ctx.send(b, Bytes::from(data), true);
    }

    fn task_management(&mut self, p: &Pdu) {
        let function = p.bhs.flags() & 0x7f;
        let rtt = p.bhs.u32_at(20);
        let lun = decode_lun(p.bhs.lun());
        let response = match function {
            tmf::ABORT_TASK => {
                if self.pending.remove(&rtt).is_some() {
                    tmf::COMPLETE
                } else {
                    // A running task finishes (its response goes first); then it is gone.
                    let running = self.ctx.inflight.lock().contains(&rtt);
                    if running {
                        let mut f = self.ctx.inflight.lock();
                        while f.contains(&rtt) {
                            self.ctx.drained.wait_for(&mut f, Duration::from_millis(10));
                        }
                    }
                    tmf::NO_TASK
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                self.pending.clear();
                self.ctx.wait_idle();
                tmf::COMPLETE
            }
            tmf::LUN_RESET => {
                if lun != Some(0) {
                    tmf::NO_LUN
                } else {
                    self.pending.clear();
                    self.ctx.wait_idle();
                    if let Some((lu, _)) = &self.lu {
                        lu.reset();
                    }
                    tmf::COMPLETE
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.pending.clear();
                self.ctx.wait_idle();
                if let Some((lu, _)) = &self.lu {
                    lu.reset();
                }
                tmf::COMPLETE
            }
            tmf::CLEAR_ACA => tmf::NOT_SUPPORTED,
            _ => tmf::NOT_SUPPORTED,
        };
        let mut b = Bhs::new(op::TMF_RESP, 0x80);
        b.0[2] = response;
        b.set_itt(p.bhs.itt());
        self.ctx.send(b, Bytes::new(), true);
        if function == tmf::TARGET_COLD_RESET && response == tmf::COMPLETE {
            // A cold reset also ends every session of the target, this one included.
            self.shared.drop_target_sessions(&self.session.target_name);
        }
    }

    fn scsi_command(&mut self, p: Pdu, cmd: ScsiCmd) -> Result<()> {
        let Some(lun) = decode_lun(cmd.lun).filter(|l| *l == 0) else {
            // Only LUN 0 exists. INQUIRY still answers (peripheral qualifier 011b).
            let r = match cmd.cdb.first() {
                Some(0x12) => {
                    let mut d = vec![0u8; 36];
                    d[0] = 0x7f;
                    d[2] = 0x06;
                    d[3] = 0x12;
                    d[4] = 31;
                    Response::data(d)
                }
                Some(0xa0) => scsi_report_luns(&cmd),
                _ => Response::check(sense::LU_NOT_SUPPORTED),
            };
            // Any unsolicited Data-Out that follows is dropped as data of an unknown task.
            self.respond(&cmd, r);
            return Ok(());
        };
        if self.pending.contains_key(&cmd.itt) || self.ctx.inflight.lock().contains(&cmd.itt) {
            // A reused task tag while the task is alive is a protocol error.
            self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            return Ok(());
        }
        if cmd.write {
            let edtl = cmd.edtl as usize;
            let imm = p.data.len();
            if imm > 0 && !self.ctx.params.immediate_data {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return Err(IscsiError::Protocol("immediate data without ImmediateData"));
            }
            if imm > edtl || imm > self.ctx.params.first_burst as usize {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return Err(IscsiError::Protocol("immediate data beyond the burst"));
            }
            if edtl > self.shared.cfg.max_write_bytes {
                let r = Response::check(sense::INVALID_FIELD_IN_CDB);
                if p.bhs.final_bit() {
                    self.respond(&cmd, r);
                } else {
                    return Err(IscsiError::Protocol("write larger than the target accepts"));
                }
                return Ok(());
            }
            let unsolicited_end = if self.ctx.params.initial_r2t {
                imm
            } else {
                edtl.min(self.ctx.params.first_burst as usize)
            };
            let buf = if imm >= edtl {
                // All the data came with the command (the usual small write): keep its buffer.
                p.data
            } else {
                // Grow with the data rather than trust the announced length up front.
                let mut buf = Vec::with_capacity(edtl.min(self.ctx.params.first_burst as usize));
                buf.extend_from_slice(&p.data);
                buf
            };
            let mut w = PendingWrite {
                cmd,
                lu: lun,
                buf,
                unsolicited_end,
                unsolicited_done: p.bhs.final_bit() || imm >= unsolicited_end,
                next_data_sn: 0,
                r2t: None,
                r2t_sn: 0,
            };
            if w.buf.len() >= edtl {
                self.execute(w.cmd, w.lu, w.buf);
                return Ok(());
            }
            if w.unsolicited_done {
                self.send_r2t(&mut w);
            }
            self.pending.insert(w.cmd.itt, w);
            return Ok(());
        }
        self.execute(cmd, lun, Vec::new());
        Ok(())
    }

    fn send_r2t(&mut self, w: &mut PendingWrite) {
        let offset = w.buf.len();
        let edtl = w.cmd.edtl as usize;
        let len = (edtl - offset).min(self.ctx.params.max_burst as usize);
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        let mut b = Bhs::new(op::R2T, 0x80);
        b.set_lun(w.cmd.lun);
        b.set_itt(w.cmd.itt);
        b.set_u32(20, ttt);
        b.set_u32(36, w.r2t_sn);
        b.set_u32(40, offset as u32);
        b.set_u32(44, len as u32);
        w.r2t_sn = w.r2t_sn.wrapping_add(1);
        w.r2t = Some((ttt, offset + len));
        w.next_data_sn = 0;
        self.ctx.send(b, Bytes::new(), false);
    }

    fn data_out(&mut self, p: Pdu) -> Result<()> {
        let itt = p.bhs.itt();
        let ttt = p.bhs.u32_at(20);
        let data_sn = p.bhs.u32_at(36);
        let offset = p.bhs.u32_at(40) as usize;
        let Some(mut w) = self.pending.remove(&itt) else {
            // Data for a task we do not know (aborted, or never existed).
            if itt == RESERVED_TAG {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            }
            return Ok(());
        };
        let edtl = w.cmd.edtl as usize;
        let end = offset + p.data.len();
        let burst_end = match w.r2t {
            Some((t, e)) if t == ttt => e,
            None if ttt == RESERVED_TAG && !w.unsolicited_done => w.unsolicited_end,
            _ => {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return Err(IscsiError::Protocol(
                    "Data-Out with an unexpected transfer tag",
                ));
            }
        };
        if data_sn != w.next_data_sn {
            // A lost or reordered Data-Out: the task fails with a data phase error; later
            // Data-Out of it is dropped as data of an unknown task. The connection goes on.
            self.respond(&w.cmd, Response::check(sense::DATA_PHASE_ERROR));
            return Ok(());
        }
        if offset != w.buf.len() || end > burst_end || end > edtl {
            // DataPDUInOrder=Yes: anything out of order or past the burst is a protocol error,
            // which ends the connection at ErrorRecoveryLevel 0.
            self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            return Err(IscsiError::Protocol(
                "Data-Out out of order or past the burst",
            ));
        }
        w.next_data_sn = w.next_data_sn.wrapping_add(1);
        w.buf.extend_from_slice(&p.data);
        let fin = p.bhs.final_bit();
        if w.buf.len() == burst_end && !fin {
            self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            return Err(IscsiError::Protocol("burst complete without the F bit"));
        }
        if fin {
            if w.buf.len() != burst_end {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return Err(IscsiError::Protocol("F bit before the end of the burst"));
            }
            if w.r2t.is_none() {
                w.unsolicited_done = true;
            }
            w.r2t = None;
            if w.buf.len() >= edtl {
                self.execute(w.cmd, w.lu, w.buf);
                return Ok(());
            }
            self.send_r2t(&mut w);
        }
        self.pending.insert(itt, w);
        Ok(())
    }

    fn execute(&mut self, cmd: ScsiCmd, _lun: u16, data_out: Vec<u8>) {
        let Some((lu, port)) = self.lu.clone() else {
            self.respond(&cmd, Response::check(sense::LU_NOT_SUPPORTED));
            return;
        };
        if cmd.write && cmd.read {
            // Bidirectional commands are not supported.
            self.respond(&cmd, Response::check(sense::INVALID_FIELD_IN_CDB));
            return;
        }
        let nexus = Nexus {
            port: &port,
            target_name: &self.session.target_name,
        };
        // Commands other than READ and WRITE run here and may wait (SYNCHRONIZE CACHE, UNMAP,
        // ...): send what this thread holds first.
        if !matches!(
            cmd.cdb.first(),
            Some(0x08 | 0x0a | 0x28 | 0x2a | 0xa8 | 0xaa | 0x88 | 0x8a)
        ) {
            self.ctx.release_held();
        }
        match scsi::execute(&lu, &nexus, &cmd.cdb, data_out) {
            Action::Done(r) => self.respond(&cmd, r),
            Action::Read { offset, len } => {
                self.ctx.start(cmd.itt);
                let ctx = self.ctx.clone();
                lu.backend.submit(
                    Request::Read { offset, len },
                    Box::new(move |r| {
                        respond(&ctx, &cmd, scsi::read_response(r, len));
                        finish_after_response(ctx, cmd.itt);
                    }),
                );
            }
            Action::Write { offset, data, fua } => {
                self.ctx.start(cmd.itt);
                let ctx = self.ctx.clone();
                lu.backend.submit(
                    Request::Write { offset, data, fua },
                    Box::new(move |r| {
                        respond(&ctx, &cmd, scsi::write_response(r));
                        finish_after_response(ctx, cmd.itt);
                    }),
                );
            }
        }
    }

    fn respond(&self, cmd: &ScsiCmd, r: Response) {
        respond(&self.ctx, cmd, r)
    }
}

fn scsi_report_luns(cmd: &ScsiCmd) -> Response {
    let alloc = cmd
        .cdb
        .get(6..10)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(0);
    let mut d = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    d.truncate(alloc);
    Response::data(d)
}
