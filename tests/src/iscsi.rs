//! A small raw iSCSI initiator for the end-to-end tests: it logs in (no authentication),
//! negotiates digests, sends SCSI commands with immediate data or R2T-solicited Data-Out, and
//! can put arbitrary bytes on the wire for the hostile-input tests. Standard library only; it is
//! deliberately independent of the target's own codec.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const BHS: usize = 48;

/// CRC32C (Castagnoli), bitwise: slow but independent of the target's implementation.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PDU as received.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub bhs: [u8; BHS],
    pub data: Vec<u8>,
}

impl Pdu {
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[at],
            self.bhs[at + 1],
            self.bhs[at + 2],
            self.bhs[at + 3],
        ])
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
}

/// Outcome of a SCSI command.
#[derive(Debug, Clone, Default)]
pub struct ScsiResult {
    pub status: u8,
    pub data: Vec<u8>,
    pub sense: Vec<u8>,
    /// 0x04 overflow, 0x02 underflow (flags of the response).
    pub residual_flags: u8,
    pub residual: u32,
}

impl ScsiResult {
    pub fn sense_key(&self) -> Option<u8> {
        self.sense.get(2).map(|k| k & 0x0f)
    }
    pub fn asc(&self) -> Option<(u8, u8)> {
        Some((*self.sense.get(12)?, *self.sense.get(13)?))
    }
}

/// One connection of the raw initiator.
pub struct Initiator {
    pub stream: TcpStream,
    pub header_digest: bool,
    pub data_digest: bool,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
    /// The target's MaxRecvDataSegmentLength.
    pub target_mrdsl: usize,
    pub isid: [u8; 6],
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

impl Initiator {
    pub fn connect(port: u16) -> io::Result<Initiator> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        Ok(Initiator {
            stream,
            header_digest: false,
            data_digest: false,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            target_mrdsl: 8192,
            isid: [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a],
        })
    }

    /// Send a PDU with the negotiated digests.
    pub fn send(&mut self, bhs: &[u8; BHS], data: &[u8]) -> io::Result<()> {
        let mut b = *bhs;
        b[5] = (data.len() >> 16) as u8;
        b[6] = (data.len() >> 8) as u8;
        b[7] = data.len() as u8;
        let mut out = b.to_vec();
        if self.header_digest {
            out.extend_from_slice(&crc32c(&b).to_le_bytes());
        }
        if !data.is_empty() {
            let mut d = data.to_vec();
            d.resize(data.len() + pad(data.len()), 0);
            out.extend_from_slice(&d);
            if self.data_digest {
                out.extend_from_slice(&crc32c(&d).to_le_bytes());
            }
        }
        self.stream.write_all(&out)
    }

    /// Read one PDU (digests checked).
    pub fn recv(&mut self) -> io::Result<Pdu> {
        let mut bhs = [0u8; BHS];
        self.stream.read_exact(&mut bhs)?;
        let ahs = usize::from(bhs[4]) * 4;
        let len = (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]);
        let mut skip = vec![0; ahs];
        self.stream.read_exact(&mut skip)?;
        if self.header_digest {
            let mut d = [0; 4];
            self.stream.read_exact(&mut d)?;
            assert_eq!(
                u32::from_le_bytes(d),
                crc32c(&bhs),
                "bad header digest from target"
            );
        }
        let mut data = vec![0; len + pad(len)];
        self.stream.read_exact(&mut data)?;
        if self.data_digest && len > 0 {
            let mut d = [0; 4];
            self.stream.read_exact(&mut d)?;
            assert_eq!(
                u32::from_le_bytes(d),
                crc32c(&data),
                "bad data digest from target"
            );
        }
        data.truncate(len);
        let p = Pdu { bhs, data };
        // Status-bearing PDUs advance ExpStatSN.
        let status = match p.opcode() {
            0x21 | 0x22 | 0x24 | 0x26 | 0x3f => true,
            0x25 => p.bhs[1] & 0x01 != 0,
            0x20 => p.itt() != 0xffff_ffff,
            _ => false,
        };
        if status {
            self.exp_stat_sn = p.u32_at(24).wrapping_add(1);
        }
        Ok(p)
    }

    fn next_itt(&mut self) -> u32 {
        self.itt = self.itt.wrapping_add(1);
        self.itt
    }

    /// Log in to `target` (or a discovery session when `None`) with the given operational
    /// keys; returns the final login response.
    pub fn login(&mut self, target: Option<&str>, keys: &[(&str, &str)]) -> io::Result<Pdu> {
        let mut text = String::new();
        text.push_str("InitiatorName=iqn.2026-11.io.ingot.test:raw\0");
        match target {
            Some(t) => {
                text.push_str("SessionType=Normal\0");
                text.push_str(&format!("TargetName={t}\0"));
            }
            None => text.push_str("SessionType=Discovery\0"),
        }
        text.push_str("AuthMethod=None\0");
        let itt = self.next_itt();
        let mut b = [0u8; BHS];
        b[0] = 0x43;
        b[1] = 0x81; // T, CSG 0, NSG 1
        b[8..14].copy_from_slice(&self.isid);
        put32(&mut b, 16, itt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        self.send(&b, text.as_bytes())?;
        let r = self.recv()?;
        if r.opcode() != 0x23 || r.bhs[36] != 0 {
            return Ok(r);
        }
        self.exp_stat_sn = r.u32_at(24).wrapping_add(1);
        let mut text = String::new();
        for (k, v) in keys {
            text.push_str(&format!("{k}={v}\0"));
        }
        b[1] = 0x87; // T, CSG 1, NSG 3
        put32(&mut b, 28, self.exp_stat_sn);
        self.send(&b, text.as_bytes())?;
        let r = self.recv()?;
        if r.opcode() == 0x23 && r.bhs[36] == 0 {
            self.exp_stat_sn = r.u32_at(24).wrapping_add(1);
            let reply = String::from_utf8_lossy(&r.data).to_string();
            for kv in reply.split('\0') {
                if let Some((k, v)) = kv.split_once('=') {
                    match (k, v) {
                        ("HeaderDigest", "CRC32C") => self.header_digest = true,
                        ("DataDigest", "CRC32C") => self.data_digest = true,
                        ("MaxRecvDataSegmentLength", n) => {
                            self.target_mrdsl = n.parse().unwrap_or(8192)
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(r)
    }

    /// Send one Login Request with the given flags (T, C, CSG, NSG in byte 1) and keys, and
    /// return the Login Response. Every PDU of one login carries the same ITT.
    pub fn login_pdu(&mut self, flags: u8, keys: &[(&str, &str)]) -> io::Result<Pdu> {
        let mut text = String::new();
        for (k, v) in keys {
            text.push_str(&format!("{k}={v}\0"));
        }
        let mut b = [0u8; BHS];
        b[0] = 0x43;
        b[1] = flags;
        b[8..14].copy_from_slice(&self.isid);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        self.send(&b, text.as_bytes())?;
        let r = self.recv()?;
        if r.opcode() == 0x23 && r.bhs[36] == 0 {
            self.exp_stat_sn = r.u32_at(24).wrapping_add(1);
        }
        Ok(r)
    }

    /// Log in to `target` with ImmediateData and no digests; panics on failure.
    pub fn login_normal(port: u16, target: &str) -> Initiator {
        let mut i = Initiator::connect(port).expect("connect to the iSCSI target");
        let r = i
            .login(
                Some(target),
                &[
                    ("HeaderDigest", "None"),
                    ("DataDigest", "None"),
                    ("ImmediateData", "Yes"),
                    ("InitialR2T", "Yes"),
                    ("MaxRecvDataSegmentLength", "65536"),
                    ("FirstBurstLength", "65536"),
                    ("MaxBurstLength", "262144"),
                ],
            )
            .expect("login");
        assert_eq!(r.bhs[36..38], [0, 0], "login to {target} failed");
        assert_eq!(r.bhs[1] & 0x03, 3, "login did not reach full feature phase");
        i
    }

    /// A SCSI Command BHS (LUN 0, simple task attribute).
    pub fn command_bhs(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool) -> [u8; BHS] {
        let itt = self.next_itt();
        let mut b = [0u8; BHS];
        b[0] = 0x01;
        b[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 0x01;
        put32(&mut b, 16, itt);
        put32(&mut b, 20, edtl);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        b[32..32 + cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
        b
    }

    /// Run one SCSI command to completion: immediate data up to the first burst, the rest on R2T.
    pub fn scsi(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> io::Result<ScsiResult> {
        let write = !data_out.is_empty();
        let edtl = if write {
            data_out.len() as u32
        } else {
            read_len
        };
        let b = self.command_bhs(cdb, edtl, read_len > 0, write);
        // Immediate data up to the first burst; with InitialR2T=Yes the rest waits for R2Ts
        // (the F bit stays set: no unsolicited Data-Out follows).
        let imm = data_out.len().min(self.target_mrdsl).min(65536);
        let itt = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
        self.send(&b, &data_out[..imm])?;
        let mut res = ScsiResult::default();
        loop {
            let p = self.recv()?;
            match p.opcode() {
                0x31 => {
                    // R2T: send the requested range in MRDSL-sized Data-Out PDUs.
                    let ttt = p.u32_at(20);
                    let off = p.u32_at(40) as usize;
                    let len = p.u32_at(44) as usize;
                    let mut sent = 0;
                    let mut sn = 0;
                    while sent < len {
                        let n = (len - sent).min(self.target_mrdsl);
                        let mut d = [0u8; BHS];
                        d[0] = 0x05;
                        d[1] = if sent + n == len { 0x80 } else { 0 };
                        put32(&mut d, 16, itt);
                        put32(&mut d, 20, ttt);
                        put32(&mut d, 28, self.exp_stat_sn);
                        put32(&mut d, 36, sn);
                        put32(&mut d, 40, (off + sent) as u32);
                        let chunk = data_out[off + sent..off + sent + n].to_vec();
                        self.send(&d, &chunk)?;
                        sent += n;
                        sn += 1;
                    }
                }
                0x25 => {
                    res.data.extend_from_slice(&p.data);
                    if p.bhs[1] & 0x01 != 0 {
                        res.status = p.bhs[3];
                        res.residual_flags = p.bhs[1] & 0x06;
                        res.residual = p.u32_at(44);
                        return Ok(res);
                    }
                }
                0x21 => {
                    res.status = p.bhs[3];
                    res.residual_flags = p.bhs[1] & 0x06;
                    res.residual = p.u32_at(44);
                    if p.data.len() >= 2 {
                        let n = usize::from(u16::from_be_bytes([p.data[0], p.data[1]]));
                        res.sense = p.data[2..(2 + n).min(p.data.len())].to_vec();
                    }
                    return Ok(res);
                }
                0x20 => {
                    // A NOP-In ping from the target: answer it.
                    if p.itt() == 0xffff_ffff {
                        let mut n = [0u8; BHS];
                        n[0] = 0x40;
                        n[1] = 0x80;
                        put32(&mut n, 16, 0xffff_ffff);
                        n[20..24].copy_from_slice(&p.bhs[20..24]);
                        put32(&mut n, 24, self.cmd_sn);
                        put32(&mut n, 28, self.exp_stat_sn);
                        self.send(&n, &[])?;
                    }
                }
                op => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected PDU opcode {op:#04x} for a SCSI command"),
                    ))
                }
            }
        }
    }

    pub fn read10(&mut self, lba: u32, blocks: u16) -> io::Result<ScsiResult> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.scsi(&cdb, &[], u32::from(blocks) * 512)
    }

    pub fn write10(&mut self, lba: u32, data: &[u8]) -> io::Result<ScsiResult> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&((data.len() / 512) as u16).to_be_bytes());
        self.scsi(&cdb, data, 0)
    }

    pub fn test_unit_ready(&mut self) -> io::Result<ScsiResult> {
        self.scsi(&[0u8; 6], &[], 0)
    }

    /// SYNCHRONIZE CACHE (10) of the whole volume.
    pub fn sync_cache(&mut self) -> io::Result<ScsiResult> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x35;
        self.scsi(&cdb, &[], 0)
    }

    /// Logout (close the session); returns the response.
    pub fn logout(&mut self) -> io::Result<Pdu> {
        let itt = self.next_itt();
        let mut b = [0u8; BHS];
        b[0] = 0x46;
        b[1] = 0x80;
        put32(&mut b, 16, itt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        self.send(&b, &[])?;
        self.recv()
    }

    /// True when the target closed the connection (EOF or reset) within the read timeout.
    pub fn closed_by_target(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }
}
