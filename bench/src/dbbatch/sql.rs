//! The batch's SQL: schema, index build, risk rules and the scored result.

/// Tables as a legacy customs system has them: no constraints until the load is done.
pub const SCHEMA: &str = r#"
CREATE TABLE hs_reference (
    hs_code text, chapter int, description text, duty_rate numeric(5,2),
    typical_value_per_kg numeric(12,2));
CREATE TABLE traders (
    trader_id int, eori text, name text, country text, city text, registered_on date,
    aeo_certified boolean);
CREATE TABLE declarations (
    decl_id bigint, mrn text, trader_id int, lodged_at timestamp, customs_office text,
    procedure_code text, origin_country text, dispatch_country text, port_of_loading text,
    port_of_discharge text, transport_mode smallint, transshipment_port text, incoterm text,
    currency text, invoice_total numeric(14,2), gross_mass_kg numeric(12,3), container_no text,
    packages int);
CREATE TABLE declaration_lines (
    decl_id bigint, line_no int, hs_code text, goods_description text, origin_country text,
    declared_value numeric(14,2), net_mass_kg numeric(12,3), gross_mass_kg numeric(12,3),
    quantity int, unit text, preference text);
"#;

/// Files loaded by COPY, in order: (table, file).
pub const COPY_FILES: [(&str, &str); 4] = [
    ("hs_reference", "hs_reference.csv"),
    ("traders", "traders.csv"),
    ("declarations", "declarations.csv"),
    ("declaration_lines", "lines.csv"),
];

pub const INDEXES: &str = r#"
ALTER TABLE hs_reference ADD PRIMARY KEY (hs_code);
ALTER TABLE traders ADD PRIMARY KEY (trader_id);
ALTER TABLE declarations ADD PRIMARY KEY (decl_id);
ALTER TABLE declaration_lines ADD PRIMARY KEY (decl_id, line_no);
CREATE INDEX declarations_trader_lodged ON declarations (trader_id, lodged_at);
CREATE INDEX declarations_origin_route ON declarations (origin_country, transshipment_port);
CREATE UNIQUE INDEX declarations_mrn ON declarations (mrn);
CREATE INDEX lines_hs ON declaration_lines (hs_code);
CREATE INDEX lines_origin ON declaration_lines (origin_country, hs_code);
"#;

/// Risk rules: each inserts its hits; then one scored, ranked result table and the trade
/// statistics that read every line. The last statement prints a digest that must be the same
/// on every server (same data, same answers).
pub const QUERIES: &str = r#"
CREATE TABLE risk_hits (decl_id bigint, rule text, score int, detail text);

-- R1 undervaluation: value per kg far below the median of its HS code.
INSERT INTO risk_hits
SELECT l.decl_id, 'undervaluation', 40,
       l.hs_code || ': ' || round(l.declared_value / l.net_mass_kg, 2) || '/kg, median '
       || round(m.median_per_kg::numeric, 2)
FROM declaration_lines l
JOIN (SELECT hs_code,
             percentile_cont(0.5) WITHIN GROUP (ORDER BY declared_value / net_mass_kg) AS median_per_kg
      FROM declaration_lines WHERE net_mass_kg > 0 GROUP BY hs_code) m USING (hs_code)
WHERE l.net_mass_kg > 0 AND l.declared_value / l.net_mass_kg < 0.25 * m.median_per_kg;

-- R2 mass mismatch: header gross mass against the sum of its lines.
INSERT INTO risk_hits
SELECT d.decl_id, 'mass_mismatch', 25,
       'declared ' || d.gross_mass_kg || ' kg, lines ' || round(s.gross, 3) || ' kg'
FROM declarations d
JOIN (SELECT decl_id, sum(gross_mass_kg) AS gross FROM declaration_lines GROUP BY decl_id) s
  USING (decl_id)
WHERE abs(d.gross_mass_kg - s.gross) > 0.1 * greatest(s.gross, 1);

-- R3 circumvention route: sensitive goods shipped through a hub, dispatched from a country
-- other than their origin.
INSERT INTO risk_hits
SELECT DISTINCT ON (d.decl_id) d.decl_id, 'circumvention_route', 30,
       l.origin_country || ' goods (' || h.description || ') via ' || d.transshipment_port
FROM declarations d
JOIN declaration_lines l USING (decl_id)
JOIN hs_reference h USING (hs_code)
WHERE h.chapter IN (72, 73, 76, 85) AND d.transshipment_port IS NOT NULL
  AND d.dispatch_country <> l.origin_country
ORDER BY d.decl_id, l.line_no;

-- R4 velocity spike: a trader's weekly count far above its trailing average.
WITH weekly AS (
    SELECT trader_id, date_trunc('week', lodged_at) AS week, count(*) AS n
    FROM declarations GROUP BY 1, 2),
trend AS (
    SELECT trader_id, week, n,
           avg(n) OVER (PARTITION BY trader_id ORDER BY week
                        ROWS BETWEEN 6 PRECEDING AND 1 PRECEDING) AS base
    FROM weekly)
INSERT INTO risk_hits
SELECT d.decl_id, 'velocity_spike', 20,
       'week of ' || t.week::date || ': ' || t.n || ' declarations, trailing ' || round(t.base, 1)
FROM trend t
JOIN declarations d ON d.trader_id = t.trader_id AND date_trunc('week', d.lodged_at) = t.week
WHERE t.base IS NOT NULL AND t.n >= 6 AND t.n > 4 * t.base;

-- R5 split consignments: one trader, one day, several declarations just under 150 EUR.
INSERT INTO risk_hits
SELECT decl_id, 'split_consignment', 15, same_day || ' low-value declarations on ' || day
FROM (SELECT decl_id, lodged_at::date AS day,
             count(*) OVER (PARTITION BY trader_id, lodged_at::date) AS same_day
      FROM declarations
      WHERE currency = 'EUR' AND invoice_total BETWEEN 100 AND 150) x
WHERE same_day >= 3;

-- R6 new trader, high value: registered within 90 days, invoice above the 98th percentile.
INSERT INTO risk_hits
SELECT d.decl_id, 'new_trader_high_value', 20,
       t.name || ' registered ' || t.registered_on || ', invoice ' || d.invoice_total || ' ' || d.currency
FROM declarations d
JOIN traders t USING (trader_id)
CROSS JOIN (SELECT percentile_cont(0.98) WITHIN GROUP (ORDER BY invoice_total) AS p98
            FROM declarations) q
WHERE d.lodged_at < t.registered_on + interval '90 days' AND d.invoice_total > q.p98;

-- The scored result: one row per declaration with hits, ranked within its office.
CREATE TABLE risk_scores AS
SELECT d.decl_id, d.mrn, d.customs_office, d.trader_id, tr.name AS trader_name,
       sum(h.score) AS score,
       string_agg(h.rule, ',' ORDER BY h.rule) AS rules,
       rank() OVER (PARTITION BY d.customs_office ORDER BY sum(h.score) DESC, d.decl_id) AS office_rank
FROM risk_hits h
JOIN declarations d USING (decl_id)
JOIN traders tr USING (trader_id)
GROUP BY d.decl_id, d.mrn, d.customs_office, d.trader_id, tr.name;

-- Trade statistics over every line (a cold read of the largest table).
CREATE TABLE trade_stats AS
SELECT date_trunc('month', d.lodged_at) AS month, l.origin_country, h.chapter,
       count(*) AS lines, sum(l.declared_value) AS value, sum(l.net_mass_kg) AS net_kg,
       sum(l.declared_value * h.duty_rate / 100) AS duty_estimate,
       sum(l.declared_value) / nullif(sum(sum(l.declared_value)) OVER (PARTITION BY date_trunc('month', d.lodged_at)), 0) AS month_share
FROM declaration_lines l
JOIN declarations d USING (decl_id)
JOIN hs_reference h USING (hs_code)
GROUP BY 1, 2, 3;

-- Selection for physical control: top 20 per office.
SELECT count(*) AS selected FROM risk_scores WHERE office_rank <= 20;
SELECT 'digest ' || (SELECT count(*) FROM risk_hits) || ' hits ('
       || (SELECT string_agg(rule || ' ' || n, ', ' ORDER BY rule)
           FROM (SELECT rule, count(*) AS n FROM risk_hits GROUP BY rule) r) || '), '
       || (SELECT count(*) FROM risk_scores) || ' scored, '
       || (SELECT sum(score) FROM risk_scores) || ' points, '
       || (SELECT count(*) FROM trade_stats) || ' stat rows' AS digest;
"#;
