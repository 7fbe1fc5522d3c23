//! PostgreSQL-like 8 KiB heap pages filled with generated declaration-line rows: the data a
//! database volume holds, for compression and hashing benches (random bytes would say nothing
//! about compression, blank-padded rows would flatter it).

use crate::gen::{Rng, HS_CODES};

/// PostgreSQL's page size.
pub const PG_PAGE_BYTES: usize = 8192;
const PAGE_HEADER_BYTES: usize = 24;
const LINE_POINTER_BYTES: usize = 4;
const TUPLE_HEADER_BYTES: usize = 24;

const WORDS: &[&str] = &[
    "assorted",
    "cartons",
    "pallets",
    "cotton",
    "steel",
    "model",
    "retail",
    "packed",
    "export",
    "quality",
    "industrial",
    "bundles",
    "premium",
    "heavy",
    "duty",
    "boxes",
    "mixed",
    "colours",
];

/// One row as PostgreSQL lays it out: fixed-width integers, numerics as base-10000 digits,
/// text with a 1-byte varlena header.
fn row(rng: &mut Rng, decl_id: u64, line_no: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(160);
    r.extend_from_slice(&decl_id.to_le_bytes());
    r.extend_from_slice(&line_no.to_le_bytes());
    let (code, desc, _, vpk) = HS_CODES[rng.below(HS_CODES.len() as u64) as usize];
    let text = |r: &mut Vec<u8>, s: &str| {
        r.push(((s.len() + 1) << 1 | 1) as u8);
        r.extend_from_slice(s.as_bytes());
    };
    text(&mut r, code);
    let goods = format!(
        "{}, {} {}, {} pce in {} {}",
        desc.split(',').next().unwrap_or(desc),
        WORDS[rng.below(WORDS.len() as u64) as usize],
        WORDS[rng.below(WORDS.len() as u64) as usize],
        1 + rng.below(5000),
        1 + rng.below(80),
        WORDS[rng.below(WORDS.len() as u64) as usize],
    );
    text(&mut r, &goods[..goods.len().min(120)]);
    text(
        &mut r,
        ["CN", "US", "TR", "IN", "VN", "JP"][rng.below(6) as usize],
    );
    // Three numerics: header + digits.
    for v in [
        rng.lognormal(vpk * 100.0, 1.0),
        rng.lognormal(50.0, 1.2),
        rng.lognormal(55.0, 1.2),
    ] {
        r.extend_from_slice(&[0x0b, 0x80]);
        let mut x = (v * 100.0) as u64;
        for _ in 0..3 {
            r.extend_from_slice(&((x % 10000) as u16).to_le_bytes());
            x /= 10000;
        }
    }
    r.extend_from_slice(&(rng.below(100_000) as u32).to_le_bytes());
    text(&mut r, ["PCE", "KGM", "PR", "SET"][rng.below(4) as usize]);
    text(&mut r, if rng.chance(0.15) { "300" } else { "100" });
    r
}

/// A heap page: header, line pointers growing up, tuples growing down from the end, free space
/// (zeroes) between, as a table loaded by COPY leaves it.
pub fn heap_page(rng: &mut Rng, first_decl: u64) -> Vec<u8> {
    let mut page = vec![0u8; PG_PAGE_BYTES];
    let mut lower = PAGE_HEADER_BYTES;
    let mut upper = PG_PAGE_BYTES;
    let mut decl = first_decl;
    let mut line_no = 1;
    loop {
        let body = row(rng, decl, line_no);
        let len = TUPLE_HEADER_BYTES + body.len();
        let aligned = len.next_multiple_of(8);
        if upper - aligned < lower + LINE_POINTER_BYTES {
            break;
        }
        upper -= aligned;
        // Tuple header: xmin, xmax, ctid, infomask, hoff.
        let xmin = 1000 + (decl / 50) as u32;
        page[upper..upper + 4].copy_from_slice(&xmin.to_le_bytes());
        page[upper + 12..upper + 16].copy_from_slice(&(decl as u32).to_le_bytes());
        page[upper + 20] = 0x02;
        page[upper + 22] = TUPLE_HEADER_BYTES as u8;
        page[upper + TUPLE_HEADER_BYTES..upper + len].copy_from_slice(&body);
        let lp = (upper as u32) | (1 << 15) | ((len as u32) << 17);
        page[lower..lower + 4].copy_from_slice(&lp.to_le_bytes());
        lower += LINE_POINTER_BYTES;
        line_no += 1;
        if rng.chance(0.2) {
            decl += 1;
            line_no = 1;
        }
    }
    // Page header: LSN, checksum, flags, lower, upper, special, version, prune xid.
    page[0..8].copy_from_slice(&(0x1_6000_0000u64 + first_decl * 8192).to_le_bytes());
    page[12..14].copy_from_slice(&(lower as u16).to_le_bytes());
    page[14..16].copy_from_slice(&(upper as u16).to_le_bytes());
    page[16..18].copy_from_slice(&(PG_PAGE_BYTES as u16).to_le_bytes());
    page[18..20].copy_from_slice(&0x2004u16.to_le_bytes());
    page
}

/// `bytes` of consecutive heap pages (a multiple of 4 KiB).
pub fn heap_bytes(seed: u64, bytes: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(bytes + PG_PAGE_BYTES);
    let mut decl = 1 + seed * 1000;
    while out.len() < bytes {
        out.extend_from_slice(&heap_page(&mut rng, decl));
        decl += 40;
    }
    out.truncate(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_full_and_varied() {
        let p = heap_bytes(1, 16384);
        assert_eq!(p.len(), 16384);
        let zeros = p.iter().filter(|b| **b == 0).count();
        assert!(zeros < p.len() / 2, "{zeros} zero bytes");
        assert_ne!(p[..4096], p[8192..12288]);
    }
}
