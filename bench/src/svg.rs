//! Bar charts as SVG, written by hand: one panel per measurement, one bar per server.

use std::fmt::Write;

/// One panel: a title, a unit, and one value per series (NaN: not measured).
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub values: Vec<f64>,
}

const PALETTE: [&str; 8] = [
    "#d9480f", "#1c7ed6", "#37b24d", "#ae3ec9", "#f59f00", "#495057", "#0ca678", "#e64980",
];

const PANEL_W: f64 = 300.0;
const PANEL_H: f64 = 230.0;
const COLUMNS: usize = 4;
const TOP: f64 = 70.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Short human form of a value: 123, 4.5k, 1.2M.
pub fn short(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Render panels in a grid with a legend naming `series` (first series first).
pub fn chart(title: &str, subtitle: &str, series: &[String], panels: &[Panel]) -> String {
    let rows = panels.len().div_ceil(COLUMNS).max(1);
    let cols = panels.len().clamp(1, COLUMNS);
    let width = cols as f64 * PANEL_W + 20.0;
    let height = TOP + rows as f64 * PANEL_H + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="16" font-weight="bold">{}</text><text x="10" y="40" font-size="11" fill="#555">{}</text>"##,
        escape(title),
        escape(subtitle)
    );
    let mut lx = 10.0;
    for (i, name) in series.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="50" width="10" height="10" fill="{}"/><text x="{}" y="59" font-size="11">{}</text>"#,
            PALETTE[i % PALETTE.len()],
            lx + 14.0,
            escape(name)
        );
        lx += 24.0 + 6.5 * name.len() as f64;
    }
    for (p_i, p) in panels.iter().enumerate() {
        let x0 = 10.0 + (p_i % COLUMNS) as f64 * PANEL_W;
        let y0 = TOP + (p_i / COLUMNS) as f64 * PANEL_H;
        let plot_top = y0 + 38.0;
        let plot_h = PANEL_H - 70.0;
        let base = plot_top + plot_h;
        let max = p
            .values
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="12" font-weight="bold">{}</text><text x="{}" y="{}" font-size="10" fill="#555">{}</text><line x1="{x0}" y1="{base}" x2="{}" y2="{base}" stroke="#999"/>"##,
            x0 + 4.0,
            y0 + 16.0,
            escape(&p.title),
            x0 + 4.0,
            y0 + 29.0,
            escape(&p.unit),
            x0 + PANEL_W - 20.0
        );
        let n = p.values.len().max(1) as f64;
        let slot = (PANEL_W - 30.0) / n;
        let bar_w = (slot * 0.7).min(40.0);
        for (i, v) in p.values.iter().enumerate() {
            let cx = x0 + 5.0 + slot * (i as f64 + 0.5);
            let h = if v.is_finite() { v / max * plot_h } else { 0.0 };
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{bar_w:.1}" height="{h:.1}" fill="{}"><title>{}: {}</title></rect><text x="{cx:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
                cx - bar_w / 2.0,
                base - h,
                PALETTE[i % PALETTE.len()],
                escape(series.get(i).map(String::as_str).unwrap_or("")),
                short(*v),
                base - h - 3.0,
                short(*v)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_well_formed() {
        let svg = chart(
            "t <&>",
            "sub",
            &["a".into(), "b".into()],
            &[Panel {
                title: "p".into(),
                unit: "IOPS".into(),
                values: vec![1.0, f64::NAN],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert_eq!(short(12345.0), "12k");
    }
}
