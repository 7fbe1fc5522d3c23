//! Replies of the transmission phase: what a request's reply is made of, and its encoding into
//! the bytes sent to the client ([`Wire`]).

use std::sync::Arc;

use bytes::Bytes;
use ingot_engine::{Reply, SECTOR_BYTES};

use crate::export::Export;
use crate::proto::*;

/// Which reply headers the connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Simple,
    Structured,
    Extended,
}

/// What the sender needs to know about a request to format its reply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReqCtx {
    pub cookie: u64,
    pub command: u16,
    pub offset: u64,
    pub len: u64,
    /// Bytes charged to the in-flight budget, released once the reply is written.
    pub cost: u64,
}

pub(crate) enum Body {
    /// Straight from the engine.
    Engine(ingot_engine::Result<Reply>),
    /// A read's data, with the export to ask for holes when runs of zeroes may be sent as
    /// holes (structured replies without NBD_CMD_FLAG_DF).
    Read(ingot_engine::Result<Reply>, Option<Arc<dyn Export>>),
    Done,
    /// Block status descriptors (length, flags) for one metadata context.
    Extents(u32, Vec<(u64, u32)>),
    /// `at_offset`: report with NBD_REPLY_TYPE_ERROR_OFFSET (engine failures of a read).
    Error {
        errno: u32,
        msg: String,
        at_offset: bool,
    },
}

pub(crate) struct Outgoing {
    pub ctx: ReqCtx,
    pub body: Body,
}

/// A reply encoded for the socket: `head` then `data` (a read's bytes, written from the
/// engine's buffer: a large read bypasses the write buffer, no copy).
pub(crate) struct Wire {
    pub head: Vec<u8>,
    /// A read's data, as the engine gave it (often a cached block: sent without a copy).
    pub data: Bytes,
    /// The rest of a read given in pieces, sent after `data`.
    pub rest: Vec<Bytes>,
    /// Credit to give back once the reply is written (or dropped).
    pub cost: u64,
}

/// Room for the largest fast-path header (extended header + data offset).
const HEAD_BYTES: usize = 48;

/// Encode the reply to a request.
pub(crate) fn encode(mode: Mode, msg: Outgoing) -> Wire {
    let ctx = msg.ctx;
    let is_read = ctx.command == CMD_READ;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    // Fast paths: a write-like command that succeeded, a read whose data goes in one piece.
    match msg.body {
        Body::Done => {
            done_header(&mut head, mode, &ctx);
            return Wire::new(head, Bytes::new(), ctx.cost);
        }
        Body::Engine(Ok(Reply::Done)) if !is_read => {
            done_header(&mut head, mode, &ctx);
            return Wire::new(head, Bytes::new(), ctx.cost);
        }
        Body::Read(Ok(Reply::Data(d)), holes)
            if is_read
                && d.len() as u64 == ctx.len
                && (mode == Mode::Simple || holes.is_none() || !has_zero_sector(&d)) =>
        {
            data_header(&mut head, mode, &ctx);
            return Wire::new(head, d, ctx.cost);
        }
        Body::Read(Ok(Reply::Pieces(p)), holes)
            if is_read && p.iter().map(|d| d.len() as u64).sum::<u64>() == ctx.len =>
        {
            // Pieces start at sector boundaries of the request (block boundaries of the
            // volume), so each can be scanned for zero sectors alone.
            if mode == Mode::Simple || holes.is_none() || !p.iter().any(|d| has_zero_sector(d)) {
                data_header(&mut head, mode, &ctx);
                let mut p = p.into_iter();
                let first = p.next().unwrap_or_default();
                return Wire {
                    head,
                    data: first,
                    rest: p.collect(),
                    cost: ctx.cost,
                };
            }
            let body = Body::Read(Ok(Reply::Data(Bytes::from(p.concat()))), holes);
            encode_general(&mut head, mode, &ctx, body);
        }
        body => encode_general(&mut head, mode, &ctx, body),
    }
    Wire::new(head, Bytes::new(), ctx.cost)
}

impl Wire {
    fn new(head: Vec<u8>, data: Bytes, cost: u64) -> Wire {
        Wire {
            head,
            data,
            rest: Vec::new(),
            cost,
        }
    }
}

/// The header of a read's reply whose data follows in one chunk.
fn data_header(head: &mut Vec<u8>, mode: Mode, ctx: &ReqCtx) {
    if mode == Mode::Simple {
        put_simple_reply(head, 0, ctx.cookie);
    } else {
        chunk_header(
            head,
            mode,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            ctx,
            8 + ctx.len,
        );
        head.extend_from_slice(&ctx.offset.to_be_bytes());
    }
}

/// The reply that a request succeeded with nothing to return.
fn done_header(out: &mut Vec<u8>, mode: Mode, ctx: &ReqCtx) {
    match mode {
        Mode::Simple => put_simple_reply(out, 0, ctx.cookie),
        Mode::Structured if ctx.command != CMD_READ => put_simple_reply(out, 0, ctx.cookie),
        _ => chunk_header(out, mode, REPLY_FLAG_DONE, REPLY_TYPE_NONE, ctx, 0),
    }
}

/// Append a chunk header (structured or extended) for a reply to `ctx`.
fn chunk_header(out: &mut Vec<u8>, mode: Mode, flags: u16, kind: u16, ctx: &ReqCtx, len: u64) {
    if mode == Mode::Extended {
        put_extended_header(out, flags, kind, ctx.cookie, ctx.offset, len);
    } else {
        // Chunk payloads are bounded by the 32 MiB request limit.
        put_chunk_header(
            out,
            flags,
            kind,
            ctx.cookie,
            u32::try_from(len).unwrap_or(u32::MAX),
        );
    }
}

/// True when every byte of `s` is zero.
fn is_zero(s: &[u8]) -> bool {
    // Data rarely starts with 16 zero bytes: most sectors of a read are decided here (scanning
    // half of every sector was ~6% of a cached 1 MiB read profile).
    if s.get(..16).is_some_and(|h| h.iter().any(|&b| b != 0)) {
        return false;
    }
    s.chunks(256)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Every other reply, encoded whole into `out`.
fn encode_general(out: &mut Vec<u8>, mode: Mode, ctx: &ReqCtx, body: Body) {
    let is_read = ctx.command == CMD_READ;
    let (res, export) = match body {
        Body::Read(res, export) => (Body::Engine(res), export),
        other => (other, None),
    };
    let res = match res {
        Body::Engine(Ok(Reply::Pieces(p))) => {
            Body::Engine(Ok(Reply::Data(Bytes::from(p.concat()))))
        }
        other => other,
    };
    let body = match res {
        Body::Engine(Ok(Reply::Data(d))) if is_read && d.len() as u64 == ctx.len => {
            // Only a read with a sector of zeroes can have a hole to report.
            let holes = match export {
                Some(e) if mode != Mode::Simple && has_zero_sector(&d) => {
                    holes(&*e, ctx.offset, ctx.len)
                }
                _ => Vec::new(),
            };
            return encode_data(out, mode, ctx, &d, &holes);
        }
        Body::Engine(Ok(Reply::Done)) if !is_read => Body::Done,
        Body::Engine(Ok(_)) => Body::Error {
            errno: EIO,
            msg: "engine returned a reply of the wrong kind or length".into(),
            at_offset: is_read,
        },
        Body::Engine(Err(e)) => Body::Error {
            errno: crate::proto::error_errno(&e),
            msg: e.to_string(),
            at_offset: is_read,
        },
        other => other,
    };
    match body {
        Body::Done | Body::Engine(_) | Body::Read(..) => done_header(out, mode, ctx),
        Body::Extents(context_id, ext) => {
            if mode == Mode::Extended {
                let len = (ext.len() as u64).saturating_mul(16).saturating_add(8);
                chunk_header(
                    out,
                    mode,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS_EXT,
                    ctx,
                    len,
                );
                out.extend_from_slice(&context_id.to_be_bytes());
                // At most one descriptor per 4 KiB block of a 32 MiB query.
                out.extend_from_slice(&(ext.len() as u32).to_be_bytes());
                for (l, f) in ext {
                    out.extend_from_slice(&l.to_be_bytes());
                    out.extend_from_slice(&u64::from(f).to_be_bytes());
                }
            } else {
                let len = (ext.len() as u64).saturating_mul(8).saturating_add(4);
                chunk_header(
                    out,
                    mode,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    ctx,
                    len,
                );
                out.extend_from_slice(&context_id.to_be_bytes());
                for (l, f) in ext {
                    // Queries cover at most 32 MiB, so lengths fit in 32 bits.
                    out.extend_from_slice(&u32::try_from(l).unwrap_or(u32::MAX).to_be_bytes());
                    out.extend_from_slice(&f.to_be_bytes());
                }
            }
        }
        Body::Error {
            errno,
            msg,
            at_offset,
        } => {
            let errno = if errno == 0 { EIO } else { errno };
            if mode == Mode::Simple {
                put_simple_reply(out, errno, ctx.cookie);
            } else {
                let msg = truncate_message(&msg).as_bytes();
                // msg <= 4096 bytes.
                let mlen = msg.len() as u16;
                let (kind, extra) = if at_offset {
                    (REPLY_TYPE_ERROR_OFFSET, 8u64)
                } else {
                    (REPLY_TYPE_ERROR, 0)
                };
                chunk_header(
                    out,
                    mode,
                    REPLY_FLAG_DONE,
                    kind,
                    ctx,
                    6 + u64::from(mlen) + extra,
                );
                out.extend_from_slice(&errno.to_be_bytes());
                out.extend_from_slice(&mlen.to_be_bytes());
                out.extend_from_slice(msg);
                if at_offset {
                    out.extend_from_slice(&ctx.offset.to_be_bytes());
                }
            }
        }
    }
}

/// True when some 512-byte sector of `data` (a read's, sector-aligned) is all zero.
fn has_zero_sector(data: &[u8]) -> bool {
    data.chunks(SECTOR_BYTES as usize).any(is_zero)
}

/// Ranges (absolute offset, length) of `offset..offset+len` the export reports as holes (none
/// if it cannot tell).
fn holes(export: &dyn Export, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let Ok(extents) = export.holes_hint(offset, len) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    for e in extents {
        if pos >= end {
            break;
        }
        let l = e.len.min(end - pos);
        if e.hole && l > 0 {
            out.push((pos, l));
        }
        pos += l;
    }
    out
}

/// A read's data: one simple reply, or structured chunks where ranges the export reported as
/// holes (and that do read as zeroes) go as NBD_REPLY_TYPE_OFFSET_HOLE without their bytes.
fn encode_data(out: &mut Vec<u8>, mode: Mode, ctx: &ReqCtx, data: &[u8], holes: &[(u64, u64)]) {
    if mode == Mode::Simple {
        put_simple_reply(out, 0, ctx.cookie);
        out.extend_from_slice(data);
        return;
    }
    // Pieces: (start, end, is_hole) relative to the request, in order.
    let mut pieces: Vec<(usize, usize, bool)> = Vec::new();
    let push = |pieces: &mut Vec<(usize, usize, bool)>, a: usize, b: usize, hole: bool| {
        if a >= b {
            return;
        }
        match pieces.last_mut() {
            Some(last) if last.2 == hole && last.1 == a => last.1 = b,
            _ => pieces.push((a, b, hole)),
        }
    };
    let mut pos = 0usize;
    for &(off, len) in holes {
        let a = usize::try_from(off.saturating_sub(ctx.offset)).unwrap_or(usize::MAX);
        let b = usize::try_from(off.saturating_add(len).saturating_sub(ctx.offset))
            .unwrap_or(usize::MAX)
            .min(data.len());
        if a < pos || a >= b {
            continue;
        }
        push(&mut pieces, pos, a, false);
        // A hole that no longer reads as zeroes (a racing write) goes as data.
        let zero = data.get(a..b).is_some_and(is_zero);
        push(&mut pieces, a, b, zero);
        pos = b;
    }
    push(&mut pieces, pos, data.len(), false);
    let n = pieces.len();
    for (i, (a, b, hole)) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let off = ctx.offset + a as u64;
        if hole {
            chunk_header(out, mode, flags, REPLY_TYPE_OFFSET_HOLE, ctx, 12);
            out.extend_from_slice(&off.to_be_bytes());
            // Bounded by the 32 MiB request size.
            out.extend_from_slice(&((b - a) as u32).to_be_bytes());
        } else {
            chunk_header(
                out,
                mode,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                ctx,
                8 + (b - a) as u64,
            );
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(data.get(a..b).unwrap_or(&[]));
        }
    }
}
