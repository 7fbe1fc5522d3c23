//! Deterministic generator of customs declarations for the nightly risk batch: traders, HS codes,
//! declarations and their line items, with values that look real (varied text, skewed values,
//! correlated masses) and a few planted anomalies for the risk rules to find.
//!
//! Output: CSV files for `COPY` and a legacy-style SQL script (single-row INSERTs, a commit every
//! few rows) for the first declarations.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Result;

/// Declarations per unit of `--scale`.
pub const DECLARATIONS_PER_SCALE: f64 = 40_000.0;

/// A small, fast, deterministic PRNG (SplitMix64): the same seed gives the same data everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    /// Pick from `(weight, item)` pairs.
    pub fn weighted<'a, T>(&mut self, xs: &'a [(u32, T)]) -> &'a T {
        let total: u32 = xs.iter().map(|x| x.0).sum();
        let mut r = self.below(u64::from(total)) as u32;
        for (w, x) in xs {
            if r < *w {
                return x;
            }
            r -= w;
        }
        &xs[xs.len() - 1].1
    }
    /// Log-normal around `median` with spread `sigma`.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        // Box-Muller.
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        let n = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        median * (sigma * n).exp()
    }
}

/// HS subheading, description, duty rate %, typical value per kg (EUR).
pub const HS_CODES: &[(&str, &str, f64, f64)] = &[
    ("0306.17", "Frozen shrimps and prawns", 12.0, 9.0),
    (
        "0402.21",
        "Milk powder, unsweetened, fat content above 1.5%",
        0.0,
        4.0,
    ),
    ("0803.90", "Bananas, fresh", 16.0, 0.9),
    ("0901.21", "Coffee, roasted, not decaffeinated", 7.5, 9.0),
    ("1006.30", "Rice, semi-milled or wholly milled", 12.0, 0.7),
    (
        "1806.32",
        "Chocolate in blocks or bars, not filled",
        8.3,
        7.0,
    ),
    ("2009.11", "Orange juice, frozen", 15.2, 1.8),
    (
        "2204.21",
        "Wine of fresh grapes, in containers of 2 l or less",
        3.2,
        4.5,
    ),
    ("2402.20", "Cigarettes containing tobacco", 57.6, 60.0),
    (
        "2710.19",
        "Lubricating oils and other medium oils",
        3.7,
        1.8,
    ),
    (
        "2933.39",
        "Heterocyclic compounds with nitrogen hetero-atoms",
        6.5,
        40.0,
    ),
    (
        "3004.90",
        "Medicaments, packaged for retail sale",
        0.0,
        85.0,
    ),
    ("3304.99", "Beauty or make-up preparations", 0.0, 25.0),
    ("3808.91", "Insecticides, put up for retail sale", 6.0, 9.0),
    (
        "3923.21",
        "Sacks and bags of polymers of ethylene",
        6.5,
        3.0,
    ),
    ("3926.90", "Other articles of plastics", 6.5, 6.0),
    (
        "4011.10",
        "New pneumatic tyres of rubber, for motor cars",
        4.5,
        4.0,
    ),
    (
        "4202.21",
        "Handbags with outer surface of leather",
        3.0,
        120.0,
    ),
    (
        "4418.20",
        "Doors and their frames and thresholds, of wood",
        3.0,
        3.0,
    ),
    ("5208.52", "Printed plain-weave cotton fabrics", 8.0, 12.0),
    (
        "6109.10",
        "T-shirts, singlets and other vests, knitted, of cotton",
        12.0,
        22.0,
    ),
    (
        "6110.20",
        "Jerseys, pullovers and cardigans, of cotton",
        12.0,
        28.0,
    ),
    (
        "6203.42",
        "Men's trousers and shorts, of cotton",
        12.0,
        25.0,
    ),
    (
        "6403.99",
        "Footwear with rubber soles and leather uppers",
        8.0,
        35.0,
    ),
    ("6404.11", "Sports footwear with textile uppers", 16.9, 30.0),
    (
        "6911.10",
        "Tableware and kitchenware, of porcelain",
        12.0,
        4.0,
    ),
    (
        "7113.19",
        "Articles of jewellery of precious metal",
        2.5,
        4000.0,
    ),
    (
        "7208.51",
        "Flat-rolled iron, hot-rolled, thicker than 10 mm",
        0.0,
        0.7,
    ),
    (
        "7210.49",
        "Flat-rolled iron, plated or coated with zinc",
        0.0,
        0.9,
    ),
    (
        "7304.19",
        "Line pipe of a kind used for oil or gas pipelines",
        0.0,
        1.4,
    ),
    (
        "7318.15",
        "Threaded screws and bolts, of iron or steel",
        3.7,
        2.5,
    ),
    (
        "7606.12",
        "Aluminium alloy plates, sheets and strip",
        7.5,
        3.2,
    ),
    (
        "8414.51",
        "Table, floor, wall, window or ceiling fans",
        3.2,
        9.0,
    ),
    (
        "8418.10",
        "Combined refrigerator-freezers with separate doors",
        1.9,
        6.0,
    ),
    (
        "8450.11",
        "Fully-automatic household washing machines",
        2.7,
        5.0,
    ),
    (
        "8471.30",
        "Portable automatic data-processing machines",
        0.0,
        250.0,
    ),
    ("8504.40", "Static converters", 0.0, 30.0),
    ("8507.60", "Lithium-ion accumulators", 2.7, 20.0),
    ("8517.13", "Smartphones", 0.0, 900.0),
    (
        "8523.51",
        "Solid-state non-volatile storage devices",
        0.0,
        400.0,
    ),
    (
        "8528.72",
        "Reception apparatus for television, colour",
        14.0,
        25.0,
    ),
    (
        "8541.43",
        "Photovoltaic cells assembled in modules",
        0.0,
        6.0,
    ),
    (
        "8703.80",
        "Motor vehicles with only an electric motor",
        10.0,
        18.0,
    ),
    (
        "8708.99",
        "Parts and accessories of motor vehicles",
        4.5,
        8.0,
    ),
    (
        "8711.60",
        "Cycles and motorcycles with an electric motor",
        6.0,
        35.0,
    ),
    (
        "9018.39",
        "Needles, catheters, cannulae and the like",
        0.0,
        60.0,
    ),
    (
        "9102.11",
        "Wrist-watches, electrically operated, mechanical display",
        4.5,
        500.0,
    ),
    ("9403.60", "Wooden furniture", 0.0, 3.5),
    (
        "9503.00",
        "Toys, reduced-size models and puzzles",
        0.0,
        12.0,
    ),
    (
        "9506.91",
        "Articles and equipment for gymnastics or athletics",
        2.7,
        5.0,
    ),
];

/// Chapters under anti-dumping or origin scrutiny (steel, aluminium, solar, e-bikes).
pub const SENSITIVE_CHAPTERS: [u32; 4] = [72, 73, 76, 85];

const ORIGINS: &[(u32, &str)] = &[
    (35, "CN"),
    (8, "US"),
    (6, "TR"),
    (6, "IN"),
    (5, "VN"),
    (4, "JP"),
    (4, "KR"),
    (3, "TW"),
    (3, "BR"),
    (3, "TH"),
    (3, "GB"),
    (2, "CH"),
    (2, "MY"),
    (2, "BD"),
    (2, "MA"),
    (2, "MX"),
    (2, "ID"),
    (1, "ZA"),
    (1, "EG"),
    (1, "NO"),
];

/// (country, port code, city)
const PORTS_OF_LOADING: &[(&str, &str)] = &[
    ("CN", "CNSHA"),
    ("CN", "CNNGB"),
    ("CN", "CNYTN"),
    ("CN", "CNTAO"),
    ("US", "USNYC"),
    ("US", "USSAV"),
    ("TR", "TRMER"),
    ("IN", "INNSA"),
    ("VN", "VNSGN"),
    ("JP", "JPYOK"),
    ("KR", "KRPUS"),
    ("TW", "TWKHH"),
    ("BR", "BRSSZ"),
    ("TH", "THLCH"),
    ("GB", "GBFXT"),
    ("CH", "CHBSL"),
    ("MY", "MYPKG"),
    ("BD", "BDCGP"),
    ("MA", "MAPTM"),
    ("MX", "MXZLO"),
    ("ID", "IDTPP"),
    ("ZA", "ZADUR"),
    ("EG", "EGPSD"),
    ("NO", "NOOSL"),
];

const HUBS: &[(&str, &str)] = &[
    ("AE", "AEJEA"),
    ("SG", "SGSIN"),
    ("MY", "MYPKG"),
    ("TR", "TRMER"),
];

/// EU customs offices of entry and their ports of discharge.
const OFFICES: &[(u32, (&str, &str))] = &[
    (30, ("NL000396", "NLRTM")),
    (20, ("DE004851", "DEHAM")),
    (15, ("BEANR000", "BEANR")),
    (8, ("ESVLC001", "ESVLC")),
    (6, ("IT261100", "ITGOA")),
    (6, ("FR000720", "FRLEH")),
    (5, ("PL322010", "PLGDN")),
    (4, ("GRPIR001", "GRPIR")),
    (3, ("SI000501", "SIKOP")),
    (3, ("DK002300", "DKAAR")),
];

const TRADER_COUNTRIES: &[(&str, &[&str], &[&str])] = &[
    (
        "DE",
        &["GmbH", "GmbH & Co. KG", "AG"],
        &[
            "Hamburg",
            "Bremen",
            "Duisburg",
            "München",
            "Frankfurt am Main",
            "Stuttgart",
        ],
    ),
    (
        "NL",
        &["B.V.", "N.V."],
        &["Rotterdam", "Venlo", "Tilburg", "Eindhoven", "Amsterdam"],
    ),
    (
        "BE",
        &["BV", "NV", "SRL"],
        &["Antwerpen", "Gent", "Liège", "Zeebrugge"],
    ),
    (
        "FR",
        &["SAS", "SARL", "SA"],
        &["Le Havre", "Lyon", "Marseille", "Lille"],
    ),
    (
        "IT",
        &["S.r.l.", "S.p.A."],
        &["Genova", "Milano", "Verona", "Bologna"],
    ),
    (
        "ES",
        &["S.L.", "S.A."],
        &["Valencia", "Barcelona", "Zaragoza", "Madrid"],
    ),
    (
        "PL",
        &["Sp. z o.o.", "S.A."],
        &["Gdańsk", "Poznań", "Łódź", "Warszawa"],
    ),
    ("DK", &["A/S", "ApS"], &["Aarhus", "Kolding", "Padborg"]),
    ("CZ", &["s.r.o.", "a.s."], &["Praha", "Brno", "Ostrava"]),
    ("AT", &["GmbH"], &["Wien", "Linz", "Graz"]),
];

const NAME_HEADS: &[&str] = &[
    "Nord", "Süd", "Ost", "West", "Baltic", "Hanse", "Alpen", "Danub", "Rhein", "Medi", "Atlas",
    "Orion", "Polar", "Sino", "Indo", "Euro", "Trans", "Global", "Pacific", "Silk", "Amber",
    "Delta", "Meridian", "Kestrel", "Vega", "Corvus", "Linden", "Birk", "Falk", "Mistral",
];
const NAME_TAILS: &[&str] = &[
    "trade", "log", "tex", "tec", "com", "mar", "port", "star", "line", "way", "freight", "import",
    "handel", "cargo", "supply", "vision",
];
const NAME_KINDS: &[&str] = &[
    "Trading",
    "Import Export",
    "Logistics",
    "Distribution",
    "Wholesale",
    "Handelsgesellschaft",
    "International",
    "Sourcing",
    "Retail Supply",
    "",
];

const ADJECTIVES: &[&str] = &[
    "assorted",
    "mixed colours",
    "grade A",
    "export quality",
    "boxed",
    "bulk",
    "premium",
    "standard",
    "new",
    "retail packed",
    "industrial",
    "private label",
    "season 2024",
    "high density",
    "eco",
    "lightweight",
    "heavy duty",
    "compact",
];
const PACKAGING: &[&str] = &[
    "cartons", "pallets", "crates", "drums", "bags", "rolls", "bundles", "cases", "boxes",
];
const UNITS: &[&str] = &["PCE", "KGM", "PR", "LTR", "MTK", "SET"];
const INCOTERMS: &[(u32, &str)] = &[
    (30, "FOB"),
    (25, "CIF"),
    (15, "EXW"),
    (12, "FCA"),
    (10, "DAP"),
    (5, "CFR"),
    (3, "DDP"),
];
const PROCEDURES: &[(u32, &str)] = &[(70, "4000"), (15, "4200"), (10, "5100"), (5, "7100")];
const CONTAINER_OWNERS: &[&str] = &[
    "MSKU", "MSCU", "CMAU", "HLXU", "OOLU", "TGHU", "CSNU", "EGHU", "TCNU", "FCIU",
];

/// How much to generate.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub declarations: u64,
    /// The first this many declarations are loaded legacy-style; the rest by COPY.
    pub legacy_declarations: u64,
    /// Rows per transaction in the legacy load.
    pub commit_every: u64,
}

impl Size {
    pub fn from_scale(scale: f64, commit_every: u64) -> Size {
        let declarations = ((DECLARATIONS_PER_SCALE * scale).round() as u64).max(100);
        Size {
            declarations,
            // The legacy load is bound by commit latency: capped so that large scales grow
            // the bulk phases, not the run time of this one.
            legacy_declarations: (declarations / 20).clamp(10, 4000),
            commit_every: commit_every.max(1),
        }
    }

    pub fn traders(&self) -> u64 {
        (self.declarations / 20).max(20)
    }
}

/// Row counts of what was generated.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counts {
    pub traders: u64,
    pub declarations: u64,
    pub lines: u64,
    pub legacy_rows: u64,
    pub csv_bytes: u64,
}

fn csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

fn sql_str(out: &mut String, s: &str) {
    out.push('\'');
    out.push_str(&s.replace('\'', "''"));
    out.push('\'');
}

/// One value of a row, written as CSV or as a SQL literal.
enum V<'a> {
    S(&'a str),
    Null,
    Raw(String),
}

fn emit_csv(out: &mut String, vals: &[V<'_>]) {
    for (i, v) in vals.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match v {
            V::S(s) => csv_field(out, s),
            V::Null => {}
            V::Raw(r) => out.push_str(r),
        }
    }
    out.push('\n');
}

fn emit_sql(out: &mut String, table: &str, vals: &[V<'_>]) {
    let _ = write!(out, "INSERT INTO {table} VALUES (");
    for (i, v) in vals.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match v {
            V::S(s) => sql_str(out, s),
            V::Null => out.push_str("NULL"),
            V::Raw(r) => {
                out.push('\'');
                out.push_str(r);
                out.push('\'');
            }
        }
    }
    out.push_str(");\n");
}

struct Trader {
    country: &'static str,
    registered_day: i64,
    /// Trader sends a burst of declarations in one week.
    burst_week: Option<i64>,
    /// Trader splits consignments under the low-value threshold.
    splitter: bool,
    /// Usual origin and HS chapter mix.
    origin: &'static str,
    hs_bias: usize,
}

/// Days since 2024-01-01 to a date string.
fn date(day: i64) -> String {
    const MONTHS: [i64; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let (mut y, mut d) = (2024i64, day);
    loop {
        let len = if y % 4 == 0 { 366 } else { 365 };
        if d < 0 {
            y -= 1;
            d += if y % 4 == 0 { 366 } else { 365 };
        } else if d >= len {
            d -= len;
            y += 1;
        } else {
            break;
        }
    }
    let mut m = 0;
    while m < 12 {
        let ml = if m == 1 && y % 4 != 0 { 28 } else { MONTHS[m] };
        if d < ml {
            break;
        }
        d -= ml;
        m += 1;
    }
    format!("{y:04}-{:02}-{:02}", m + 1, d + 1)
}

/// Days covered by the batch window.
const WINDOW_DAYS: i64 = 91;

/// Write `traders.csv`, `hs_reference.csv`, `declarations.csv`, `lines.csv` (COPY part) and
/// `legacy.sql` (the first declarations, single-row INSERTs, COMMIT every few rows) into `dir`.
pub fn generate(dir: &Path, size: Size, seed: u64) -> Result<Counts> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng::new(seed);
    let mut counts = Counts::default();

    // Reference data.
    let mut hs = String::new();
    for (code, desc, duty, vpk) in HS_CODES {
        let chapter = &code[..2];
        let _ = write!(hs, "{code},{},", chapter.trim_start_matches('0'));
        csv_field(&mut hs, desc);
        let _ = writeln!(hs, ",{duty:.2},{vpk:.2}");
    }
    std::fs::write(dir.join("hs_reference.csv"), &hs)?;

    // Traders.
    let n_traders = size.traders();
    let mut traders = Vec::with_capacity(n_traders as usize);
    let mut tw = BufWriter::new(File::create(dir.join("traders.csv"))?);
    let mut line = String::new();
    for id in 1..=n_traders {
        let (country, forms, cities) = rng.pick(TRADER_COUNTRIES);
        let name = format!(
            "{}{} {}{}",
            rng.pick(NAME_HEADS),
            rng.pick(NAME_TAILS),
            {
                let k = rng.pick(NAME_KINDS);
                if k.is_empty() {
                    String::new()
                } else {
                    format!("{k} ")
                }
            },
            rng.pick(forms)
        );
        let new_trader = rng.chance(0.05);
        let registered_day = if new_trader {
            rng.below(60) as i64
        } else {
            -(rng.below(6000) as i64) - 100
        };
        let eori = format!("{country}{:012}", rng.below(1_000_000_000_000));
        let t = Trader {
            country,
            registered_day,
            burst_week: rng.chance(0.03).then(|| 2 + rng.below(10) as i64),
            splitter: rng.chance(0.01),
            origin: rng.weighted::<&str>(ORIGINS),
            hs_bias: rng.below(HS_CODES.len() as u64) as usize,
        };
        line.clear();
        let _ = write!(line, "{id},{eori},");
        csv_field(&mut line, &name);
        let _ = writeln!(
            line,
            ",{},{},{},{}",
            t.country,
            rng.pick(cities),
            date(t.registered_day),
            if rng.chance(0.2) { "t" } else { "f" }
        );
        tw.write_all(line.as_bytes())?;
        counts.csv_bytes += line.len() as u64;
        traders.push(t);
    }
    tw.flush()?;
    counts.traders = n_traders;

    let mut dw = BufWriter::new(File::create(dir.join("declarations.csv"))?);
    let mut lw = BufWriter::new(File::create(dir.join("lines.csv"))?);
    let mut sqlw = BufWriter::new(File::create(dir.join("legacy.sql"))?);
    sqlw.write_all(b"\\set ON_ERROR_STOP 1\nBEGIN;\n")?;
    let mut rows_in_tx = 0u64;
    let mut buf = String::new();
    let mut decl_id = 0u64;
    // Splitters send several small consignments on one day: queue them.
    let mut pending_split: Vec<(usize, i64)> = Vec::new();
    while decl_id < size.declarations {
        decl_id += 1;
        let (ti, day, split) = if let Some((ti, day)) = pending_split.pop() {
            (ti, day, true)
        } else {
            let ti = rng.below(n_traders) as usize;
            let t = &traders[ti];
            let day = match t.burst_week {
                Some(w) if rng.chance(0.6) => w * 7 + rng.below(7) as i64,
                _ => rng.below(WINDOW_DAYS as u64) as i64,
            };
            let day = day.max(t.registered_day);
            if t.splitter && rng.chance(0.5) {
                for _ in 0..(2 + rng.below(4)) {
                    pending_split.push((ti, day));
                }
                (ti, day, true)
            } else {
                (ti, day, false)
            }
        };
        let t = &traders[ti];
        let legacy = decl_id <= size.legacy_declarations;
        let &(office, discharge) = rng.weighted(OFFICES);
        let origin = if rng.chance(0.7) {
            t.origin
        } else {
            *rng.weighted(ORIGINS)
        };
        let mode = *rng.weighted(&[(70, 1u8), (20, 4u8), (10, 3u8)]);
        let loading = PORTS_OF_LOADING
            .iter()
            .filter(|p| p.0 == origin)
            .map(|p| p.1)
            .next()
            .unwrap_or("CNSHA");
        let n_lines = if split {
            1
        } else {
            1 + (rng.lognormal(3.0, 0.7) as u64).min(40)
        };
        // Lines first: the header's totals are their sums.
        let mut line_rows: Vec<[String; 11]> = Vec::new();
        let mut total_value = 0.0;
        let mut total_gross = 0.0;
        let mut sensitive = false;
        for ln in 1..=n_lines {
            let hi = if rng.chance(0.5) {
                (t.hs_bias + rng.below(3) as usize) % HS_CODES.len()
            } else {
                rng.below(HS_CODES.len() as u64) as usize
            };
            let (code, desc, _duty, vpk) = HS_CODES[hi];
            let chapter: u32 = code[..2].parse().unwrap_or(0);
            sensitive |= SENSITIVE_CHAPTERS.contains(&chapter);
            let net = if split {
                rng.lognormal(4.0, 0.5)
            } else {
                rng.lognormal(800.0 / vpk.sqrt(), 1.1).max(0.2)
            };
            let mut value = net * rng.lognormal(vpk, 0.35);
            if split {
                value = 120.0 + rng.unit() * 29.0;
            } else if rng.chance(0.004) {
                value *= 0.05 + rng.unit() * 0.1; // undervalued
            }
            let gross = net * (1.04 + rng.unit() * 0.12);
            let qty = ((net / (0.2 + rng.unit() * 3.0)).ceil() as u64).max(1);
            let short_desc = desc.split(',').next().unwrap_or(desc);
            let goods = format!(
                "{short_desc}, {}, {} {} in {} {}{}",
                rng.pick(ADJECTIVES),
                qty,
                rng.pick(UNITS).to_lowercase(),
                1 + qty / (10 + rng.below(90)),
                rng.pick(PACKAGING),
                if rng.chance(0.3) {
                    format!(
                        ", model {}-{}",
                        rng.pick(NAME_HEADS).to_uppercase(),
                        100 + rng.below(9900)
                    )
                } else {
                    String::new()
                }
            );
            let line_origin = if rng.chance(0.9) {
                origin
            } else {
                *rng.weighted(ORIGINS)
            };
            total_value += value;
            total_gross += gross;
            line_rows.push([
                decl_id.to_string(),
                ln.to_string(),
                code.to_string(),
                goods,
                line_origin.to_string(),
                format!("{value:.2}"),
                format!("{net:.3}"),
                format!("{gross:.3}"),
                qty.to_string(),
                rng.pick(UNITS).to_string(),
                if rng.chance(0.15) {
                    "300".into()
                } else {
                    "100".into()
                },
            ]);
        }
        // Routing: some sensitive goods go through a hub and are dispatched from there.
        let (dispatch, hub) = if sensitive && origin == "CN" && rng.chance(0.1) || rng.chance(0.01)
        {
            let (c, p) = rng.pick(HUBS);
            (*c, Some(*p))
        } else {
            (origin, None)
        };
        let declared_gross = if rng.chance(0.01) {
            total_gross * (1.3 + rng.unit())
        } else {
            total_gross * (1.0 + rng.unit() * 0.02)
        };
        let currency = if split {
            "EUR"
        } else {
            *rng.weighted(&[(50, "EUR"), (44, "USD"), (4, "GBP"), (2, "CNY")])
        };
        let secs = rng.below(86_400);
        let lodged = format!(
            "{} {:02}:{:02}:{:02}",
            date(day),
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
        let mrn = format!(
            "24{}{}{:011}{}",
            &office[..2],
            &office[2..6],
            decl_id * 7919 % 100_000_000_000,
            (b'A' + (decl_id % 26) as u8) as char
        );
        let container = if mode == 1 {
            format!("{}{:07}", rng.pick(CONTAINER_OWNERS), rng.below(10_000_000))
        } else {
            String::new()
        };
        let packages = n_lines * (1 + rng.below(30));
        let d_vals = [
            V::Raw(decl_id.to_string()),
            V::S(&mrn),
            V::Raw((ti + 1).to_string()),
            V::S(&lodged),
            V::S(office),
            V::S(rng.weighted::<&str>(PROCEDURES)),
            V::S(origin),
            V::S(dispatch),
            V::S(loading),
            V::S(discharge),
            V::Raw(mode.to_string()),
            hub.map(V::S).unwrap_or(V::Null),
            V::S(rng.weighted::<&str>(INCOTERMS)),
            V::S(currency),
            V::Raw(format!("{total_value:.2}")),
            V::Raw(format!("{declared_gross:.3}")),
            if container.is_empty() {
                V::Null
            } else {
                V::S(&container)
            },
            V::Raw(packages.to_string()),
        ];
        buf.clear();
        if legacy {
            emit_sql(&mut buf, "declarations", &d_vals);
        } else {
            emit_csv(&mut buf, &d_vals);
        }
        counts.csv_bytes += buf.len() as u64;
        if legacy {
            sqlw.write_all(buf.as_bytes())?;
            counts.legacy_rows += 1;
            rows_in_tx += 1;
        } else {
            dw.write_all(buf.as_bytes())?;
        }
        for r in &line_rows {
            let vals: Vec<V<'_>> = r
                .iter()
                .enumerate()
                .map(|(i, s)| match i {
                    0 | 1 | 5 | 6 | 7 | 8 => V::Raw(s.clone()),
                    _ => V::S(s),
                })
                .collect();
            buf.clear();
            if legacy {
                emit_sql(&mut buf, "declaration_lines", &vals);
                sqlw.write_all(buf.as_bytes())?;
                counts.legacy_rows += 1;
                rows_in_tx += 1;
                if rows_in_tx >= size.commit_every {
                    sqlw.write_all(b"COMMIT;\nBEGIN;\n")?;
                    rows_in_tx = 0;
                }
            } else {
                emit_csv(&mut buf, &vals);
                lw.write_all(buf.as_bytes())?;
            }
            counts.csv_bytes += buf.len() as u64;
        }
        counts.lines += n_lines;
    }
    sqlw.write_all(b"COMMIT;\n")?;
    sqlw.flush()?;
    dw.flush()?;
    lw.flush()?;
    counts.declarations = decl_id;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_realistic() {
        let a = tempfile_dir("a");
        let b = tempfile_dir("b");
        let size = Size {
            declarations: 300,
            legacy_declarations: 20,
            commit_every: 5,
        };
        let ca = generate(&a, size, 1).unwrap();
        let cb = generate(&b, size, 1).unwrap();
        assert_eq!(ca.lines, cb.lines);
        for f in ["traders.csv", "declarations.csv", "lines.csv", "legacy.sql"] {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
                "{f}"
            );
        }
        let lines = std::fs::read_to_string(a.join("lines.csv")).unwrap();
        assert!(!lines.contains("   "), "no blank padding");
        let sql = std::fs::read_to_string(a.join("legacy.sql")).unwrap();
        assert!(sql.matches("COMMIT;").count() >= ca.legacy_rows as usize / 5);
        assert_eq!(date(0), "2024-01-01");
        assert_eq!(date(60), "2024-03-01");
        assert_eq!(date(-1), "2023-12-31");
        let _ = std::fs::remove_dir_all(a);
        let _ = std::fs::remove_dir_all(b);
    }

    fn tempfile_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ingot-gen-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }
}
