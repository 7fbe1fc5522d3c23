//! iSCSI PDUs (RFC 7143 §11): the 48-byte basic header segment, additional header segments, the
//! data segment and the optional CRC32C digests. Pure encode/decode plus one blocking reader;
//! nothing here knows about sessions or SCSI.

use std::io::{self, Read, Write};

use crate::error::{IscsiError, Result};

/// Size of the basic header segment.
pub const BHS_BYTES: usize = 48;
/// Size of a header or data digest.
pub const DIGEST_BYTES: usize = 4;
/// Largest AHS the target accepts (the field allows 1020 bytes; we only use extended CDBs).
pub const MAX_AHS_BYTES: usize = 1020;
/// The reserved "no task" tag.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Opcodes an initiator sends (low six bits of byte 0).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK_REQ: u8 = 0x10;
    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TMF_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MSG: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

/// The basic header segment, kept as raw bytes with typed accessors.
#[derive(Clone, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_BYTES]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs {{ opcode: {:#04x}, flags: {:#04x}, itt: {:#010x}, data: {} }}",
            self.opcode(),
            self.flags(),
            self.itt(),
            self.data_len()
        )
    }
}

fn be32(b: &[u8; BHS_BYTES], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_BYTES])
    }
}

impl Bhs {
    /// A header with `opcode` and `flags` (byte 1) set and everything else zero.
    pub fn new(opcode: u8, flags: u8) -> Bhs {
        let mut b = [0; BHS_BYTES];
        b[0] = opcode & 0x3f;
        b[1] = flags;
        Bhs(b)
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The I (immediate delivery) bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }
    pub fn data_len(&self) -> usize {
        (usize::from(self.0[5]) << 16) | (usize::from(self.0[6]) << 8) | usize::from(self.0[7])
    }
    pub fn set_data_len(&mut self, len: usize) {
        self.0[5] = (len >> 16) as u8;
        self.0[6] = (len >> 8) as u8;
        self.0[7] = len as u8;
    }
    pub fn lun(&self) -> u64 {
        u64::from_be_bytes([
            self.0[8], self.0[9], self.0[10], self.0[11], self.0[12], self.0[13], self.0[14],
            self.0[15],
        ])
    }
    pub fn set_lun(&mut self, lun: u64) {
        self.0[8..16].copy_from_slice(&lun.to_be_bytes());
    }
    pub fn itt(&self) -> u32 {
        be32(&self.0, 16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v)
    }
    /// A big-endian word at byte `at` (20, 24, ... 44).
    pub fn u32_at(&self, at: usize) -> u32 {
        be32(&self.0, at)
    }
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    /// CmdSN of an initiator PDU (byte 24).
    pub fn cmd_sn(&self) -> u32 {
        be32(&self.0, 24)
    }
    /// ExpStatSN of an initiator PDU (byte 28).
    pub fn exp_stat_sn(&self) -> u32 {
        be32(&self.0, 28)
    }
}

/// A whole PDU as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

/// What the reader enforces while decoding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest data segment accepted (our MaxRecvDataSegmentLength).
    pub max_data: usize,
    pub header_digest: bool,
    pub data_digest: bool,
}

/// CRC32C as iSCSI uses it (RFC 7143 §13.1), sent little-endian on the wire.
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut c = 0;
    for p in parts {
        c = crc32c::crc32c_append(c, p);
    }
    c
}

/// Bytes of padding after a data segment of `len` bytes.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Read one PDU. `Ok(None)` on a clean end of stream before the first byte of a header.
pub fn read_pdu<R: Read>(r: &mut R, lim: &Limits) -> Result<Option<Pdu>> {
    let mut bhs = [0u8; BHS_BYTES];
    let mut got = 0;
    while got < BHS_BYTES {
        match r.read(&mut bhs[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(IscsiError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(IscsiError::from_read(e)),
        }
    }
    let bhs = Bhs(bhs);
    let ahs_len = bhs.ahs_len();
    if ahs_len > MAX_AHS_BYTES {
        return Err(IscsiError::AhsTooLong(ahs_len));
    }
    let data_len = bhs.data_len();
    if data_len > lim.max_data {
        return Err(IscsiError::DataTooLong {
            len: data_len,
            max: lim.max_data,
        });
    }
    let mut ahs = vec![0; ahs_len];
    r.read_exact(&mut ahs).map_err(IscsiError::from_read)?;
    if lim.header_digest {
        let mut d = [0; DIGEST_BYTES];
        r.read_exact(&mut d).map_err(IscsiError::from_read)?;
        let got = u32::from_le_bytes(d);
        let want = crc32c(&[&bhs.0, &ahs]);
        if got != want {
            return Err(IscsiError::HeaderDigest { got, want });
        }
    }
    let padded = data_len + pad_len(data_len);
    let mut data = vec![0; padded];
    r.read_exact(&mut data).map_err(IscsiError::from_read)?;
    if lim.data_digest && data_len > 0 {
        let mut d = [0; DIGEST_BYTES];
        r.read_exact(&mut d).map_err(IscsiError::from_read)?;
        let got = u32::from_le_bytes(d);
        let want = crc32c(&[&data]);
        if got != want {
            data.truncate(data_len);
            return Err(IscsiError::DataDigest {
                got,
                want,
                pdu: Box::new(Pdu {
                    bhs,
                    ahs,
                    data: Vec::new(),
                }),
            });
        }
    }
    data.truncate(data_len);
    Ok(Some(Pdu { bhs, ahs, data }))
}

/// Encode a target PDU (no AHS) with optional digests into `out`.
pub fn encode_pdu(
    out: &mut Vec<u8>,
    bhs: &Bhs,
    data: &[u8],
    header_digest: bool,
    data_digest: bool,
) {
    // Writing to a Vec cannot fail.
    let _ = write_pdu(out, bhs, data, header_digest, data_digest);
}

/// Write a target PDU (no AHS) with optional digests to `w`, piece by piece (no staging copy).
pub fn write_pdu<W: Write>(
    w: &mut W,
    bhs: &Bhs,
    data: &[u8],
    header_digest: bool,
    data_digest: bool,
) -> io::Result<()> {
    let mut bhs = bhs.clone();
    bhs.0[4] = 0;
    bhs.set_data_len(data.len());
    w.write_all(&bhs.0)?;
    if header_digest {
        w.write_all(&crc32c(&[&bhs.0]).to_le_bytes())?;
    }
    if !data.is_empty() {
        let pad = [0u8; 3];
        let pad = &pad[..pad_len(data.len())];
        w.write_all(data)?;
        w.write_all(pad)?;
        if data_digest {
            w.write_all(&crc32c(&[data, pad]).to_le_bytes())?;
        }
    }
    Ok(())
}

/// SCSI Command PDU fields (RFC 7143 §11.3).
#[derive(Debug, Clone)]
pub struct ScsiCmd {
    pub read: bool,
    pub write: bool,
    /// Task attribute (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub edtl: u32,
    pub cmd_sn: u32,
    /// The CDB: 16 bytes from the BHS, plus an extended CDB from the AHS when present.
    pub cdb: Vec<u8>,
}

impl ScsiCmd {
    /// Decode a SCSI Command; `Err` carries the reject reason.
    pub fn parse(p: &Pdu) -> std::result::Result<ScsiCmd, u8> {
        let b = &p.bhs;
        let mut cdb = b.0[32..48].to_vec();
        // AHS: 2-byte length, 1-byte type, 1 reserved, then the value. Type 1 = extended CDB.
        let mut ahs = &p.ahs[..];
        while ahs.len() >= 4 {
            let len = usize::from(u16::from_be_bytes([ahs[0], ahs[1]]));
            let kind = ahs[2];
            let total = (3 + len).div_ceil(4) * 4;
            if total > ahs.len() || len == 0 {
                return Err(reject::INVALID_PDU_FIELD);
            }
            if kind == 1 {
                cdb.extend_from_slice(&ahs[4..3 + len]);
            }
            ahs = &ahs[total..];
        }
        Ok(ScsiCmd {
            read: b.flags() & 0x40 != 0,
            write: b.flags() & 0x20 != 0,
            attr: b.flags() & 0x07,
            lun: b.lun(),
            itt: b.itt(),
            edtl: b.u32_at(20),
            cmd_sn: b.cmd_sn(),
            cdb,
        })
    }
}

/// The 8-byte LUN field for a flat single-level LUN number (SAM-5 peripheral addressing).
pub fn encode_lun(lun: u16) -> u64 {
    if lun < 256 {
        u64::from(lun) << 48
    } else {
        (0x4000 | u64::from(lun & 0x3fff)) << 48
    }
}

/// The LUN number of an 8-byte LUN field, if it uses peripheral or flat addressing.
pub fn decode_lun(raw: u64) -> Option<u16> {
    let first = (raw >> 48) as u16;
    if raw & 0x0000_ffff_ffff_ffff != 0 {
        return None;
    }
    match first >> 14 {
        0 if first >> 8 == 0 => Some(first & 0xff),
        1 => Some(first & 0x3fff),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(hd: bool, dd: bool) -> Limits {
        Limits {
            max_data: 8192,
            header_digest: hd,
            data_digest: dd,
        }
    }

    #[test]
    fn crc32c_matches_rfc_vector() {
        // RFC 3720 B.4: 32 bytes of zeroes -> aa 36 91 8a (little-endian on the wire).
        assert_eq!(
            crc32c(&[&[0u8; 32]]).to_le_bytes(),
            [0xaa, 0x36, 0x91, 0x8a]
        );
        assert_eq!(
            crc32c(&[&[0xffu8; 32]]).to_le_bytes(),
            [0x43, 0xab, 0xa8, 0x62]
        );
    }

    #[test]
    fn roundtrip_with_digests_and_padding() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut b = Bhs::new(op::NOP_IN, 0x80);
            b.set_itt(7);
            let mut wire = Vec::new();
            encode_pdu(&mut wire, &b, b"hello", hd, dd);
            assert_eq!(wire.len() % 4, 0);
            let p = read_pdu(&mut &wire[..], &lim(hd, dd)).unwrap().unwrap();
            assert_eq!(p.bhs.itt(), 7);
            assert_eq!(p.data, b"hello");
        }
    }

    #[test]
    fn rejects_bad_digest_and_lengths() {
        let b = Bhs::new(op::NOP_OUT, 0x80);
        let mut wire = Vec::new();
        encode_pdu(&mut wire, &b, b"abcd", true, true);
        let mut bad = wire.clone();
        bad[3] ^= 1;
        assert!(matches!(
            read_pdu(&mut &bad[..], &lim(true, true)),
            Err(IscsiError::HeaderDigest { .. })
        ));
        let mut bad = wire.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(matches!(
            read_pdu(&mut &bad[..], &lim(true, true)),
            Err(IscsiError::DataDigest { .. })
        ));
        let mut big = Bhs::new(op::NOP_OUT, 0x80);
        big.set_data_len(8193);
        assert!(matches!(
            read_pdu(&mut &big.0[..], &lim(false, false)),
            Err(IscsiError::DataTooLong { .. })
        ));
        assert!(matches!(
            read_pdu(&mut &wire[..10], &lim(false, false)),
            Err(IscsiError::Truncated)
        ));
        assert!(read_pdu(&mut &[][..], &lim(false, false))
            .unwrap()
            .is_none());
    }

    #[test]
    fn scsi_cmd_with_extended_cdb() {
        let mut b = Bhs::new(op::SCSI_CMD, 0xc1);
        b.set_u32(20, 4096);
        b.0[32] = 0x7f;
        let ahs = vec![
            0, 17, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0,
        ];
        b.0[4] = (ahs.len() / 4) as u8;
        let p = Pdu {
            bhs: b,
            ahs: ahs[..20].to_vec(),
            data: vec![],
        };
        let c = ScsiCmd::parse(&p).unwrap();
        assert!(c.read && !c.write);
        assert_eq!(c.cdb.len(), 32);
        assert_eq!(c.edtl, 4096);
    }

    #[test]
    fn lun_encoding() {
        assert_eq!(decode_lun(encode_lun(0)), Some(0));
        assert_eq!(decode_lun(encode_lun(5)), Some(5));
        assert_eq!(decode_lun(encode_lun(300)), Some(300));
        assert_eq!(decode_lun(1), None);
    }
}
