//! Laying a record out and sealing it into its chain. A record is a header area (the
//! [`RecordHeader`] and its entries, padded to 4 KiB), then whole-block raw payloads, then
//! packed (compressed) groups, padded to 4 KiB; its MAC binds it to the chain's segment use
//! and offset (see `format::RecordSeal`). What goes into the entries is the shard's business.

use std::sync::atomic::Ordering;

use crate::api::BLOCK_BYTES;
use crate::format::{RecordHeader, RecordKind, RecordSeal, IO_ALIGN};
use crate::io::AlignedBuf;
use crate::log::{Chain, VoidAt};

const BLOCK: usize = BLOCK_BYTES as usize;

/// Where each part of a record lies, in bytes from its start.
pub(crate) struct Layout {
    pub(crate) entry_count: usize,
    pub(crate) entry_bytes: usize,
    /// Header and entries, padded to 4 KiB: the raw payloads start here.
    pub(crate) header_bytes: usize,
    raw_count: usize,
    /// Start of each packed group.
    pub(crate) packed_at: Vec<usize>,
    pub(crate) record_bytes: usize,
}

impl Layout {
    pub(crate) fn new(
        entry_count: usize,
        entry_bytes: usize,
        raw_count: usize,
        packed_lens: impl Iterator<Item = usize>,
    ) -> Layout {
        let header_bytes = RecordHeader::header_area(entry_count, entry_bytes);
        let mut data_end = header_bytes + raw_count * BLOCK;
        let mut packed_at = Vec::new();
        for len in packed_lens {
            packed_at.push(data_end);
            data_end += len;
        }
        Layout {
            entry_count,
            entry_bytes,
            header_bytes,
            raw_count,
            packed_at,
            record_bytes: data_end.next_multiple_of(IO_ALIGN),
        }
    }

    /// Start of raw payload `k`.
    pub(crate) fn raw_at(&self, k: usize) -> usize {
        self.header_bytes + k * BLOCK
    }

    /// Where entry `i` is encoded.
    pub(crate) fn entry_at(&self, i: usize) -> usize {
        RecordHeader::BYTES + i * self.entry_bytes
    }

    /// The record's buffer with its payloads in place: the header area and the tail after the
    /// last payload zeroed, nothing left uninitialised. `b` is a buffer of `record_bytes`
    /// whose contents do not matter (from `IoQueue::write_buf`).
    pub(crate) fn fill(
        &self,
        mut b: AlignedBuf,
        raw: &[&[u8]],
        packed: &[impl AsRef<[u8]>],
    ) -> AlignedBuf {
        assert_eq!(
            b.len(),
            self.record_bytes,
            "a buffer of the record's length"
        );
        assert_eq!(raw.len(), self.raw_count, "raw payloads as laid out");
        assert_eq!(
            packed.len(),
            self.packed_at.len(),
            "packed groups as laid out"
        );
        // SAFETY: the header area is zeroed here, every raw and packed payload is copied in
        // below (the asserts bound them by the layout) and the tail past the last payload is
        // zeroed, so all `record_bytes` are initialised before the first slice access.
        unsafe {
            let base = b.as_mut_ptr();
            std::ptr::write_bytes(base, 0, self.header_bytes);
            let mut at = self.header_bytes;
            for r in raw {
                assert_eq!(r.len(), BLOCK, "raw payloads are whole blocks");
                std::ptr::copy_nonoverlapping(r.as_ptr(), base.add(at), BLOCK);
                at += BLOCK;
            }
            for p in packed {
                let p = p.as_ref();
                assert!(
                    at + p.len() <= self.record_bytes,
                    "packed group past the record"
                );
                std::ptr::copy_nonoverlapping(p.as_ptr(), base.add(at), p.len());
                at += p.len();
            }
            std::ptr::write_bytes(base.add(at), 0, self.record_bytes - at);
            b
        }
    }
}

/// A sealed record's place: where to write it, and what a `Void` over it must say should the
/// write fail.
pub(crate) struct Placed {
    pub(crate) dev: u16,
    pub(crate) at: u64,
    pub(crate) seq: u64,
    pub(crate) shard_seq: u64,
    pub(crate) void: VoidAt,
}

impl Chain {
    /// Seal the record in `buf` (its entries encoded) at the chain's current position, which
    /// `make_room` made sure holds it, and move the position past it.
    pub(crate) fn seal(&mut self, buf: &mut AlignedBuf, kind: RecordKind, l: &Layout) -> Placed {
        // Borrowed, not cloned: a clone per record bumped a reference count both workers share.
        let ctx = &*self.ctx;
        let seq = ctx.seq.fetch_add(1, Ordering::AcqRel);
        let shard_seq = self.pos.shard_seq;
        self.pos.shard_seq += 1;
        let durable = ctx.shard_stats[self.id]
            .durable_shard_seq
            .load(Ordering::Acquire);
        let segment = self.pos.segment;
        let offset = self.pos.offset;
        let nonce = self.nonce();
        RecordHeader {
            kind,
            seq,
            shard_seq,
            epoch: ctx.epoch,
            segment,
            entry_count: l.entry_count as u32,
            record_bytes: l.record_bytes as u32,
            header_bytes: l.header_bytes as u32,
            durable_shard_seq: durable,
            shard: self.id as u16,
            version: crate::format::FORMAT_VERSION as u16,
        }
        .encode_and_seal(
            &mut buf[..l.header_bytes],
            l.entry_bytes,
            &RecordSeal {
                key: &ctx.log_key,
                nonce,
                offset,
            },
        );
        self.pos.offset += l.record_bytes as u32;
        let (dev, base) = ctx.geo.locate(segment);
        let at = base + u64::from(offset);
        Placed {
            dev,
            at,
            seq,
            shard_seq,
            void: VoidAt {
                dev,
                at,
                seq,
                shard_seq,
                segment,
                offset,
                record_bytes: l.record_bytes as u32,
                nonce,
            },
        }
    }
}
