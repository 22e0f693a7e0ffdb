//! The fusion comparison as a chart: an SVG of horizontal bars (one panel per figure, one bar per
//! strategy, each the ratio to the baseline), and an HTML page with the table and the chart.

use std::fmt::Write;

use crate::compare::{ratios, Row, Settings, COLUMNS};

const PALETTE: [&str; 8] = [
    "#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf",
];
const WIDTH: f64 = 760.0;
const LABEL_W: f64 = 230.0;
const BAR_H: f64 = 16.0;
const PANEL_GAP: f64 = 34.0;

/// The chart as a standalone SVG document.
pub fn svg(rows: &[Row], title: &str) -> String {
    let panel_h = rows.len() as f64 * (BAR_H + 4.0);
    let height = 40.0 + COLUMNS.len() as f64 * (panel_h + PANEL_GAP);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let all: Vec<Vec<f64>> = rows.iter().map(|r| ratios(rows, r)).collect();
    let bar_w = WIDTH - LABEL_W - 70.0;
    for (c, column) in COLUMNS.iter().enumerate() {
        let top = 40.0 + c as f64 * (panel_h + PANEL_GAP);
        let max = all
            .iter()
            .map(|r| r[c])
            .filter(|v| v.is_finite())
            .fold(1.2f64, f64::max);
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-weight="bold">{} — ratio to {} ({} is better)</text>"#,
            top + 12.0,
            escape(column.name),
            escape(&rows[0].strategy),
            if column.lower_is_better {
                "lower"
            } else {
                "higher"
            }
        );
        for (i, (row, r)) in rows.iter().zip(&all).enumerate() {
            let y = top + 20.0 + i as f64 * (BAR_H + 4.0);
            let v = if r[c].is_finite() { r[c] } else { 0.0 };
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL_W - 8.0,
                y + BAR_H - 4.0,
                escape(&row.strategy)
            );
            let _ = writeln!(
                s,
                r#"<rect x="{LABEL_W}" y="{y}" width="{:.1}" height="{BAR_H}" fill="{}"/>"#,
                v / max * bar_w,
                PALETTE[i % PALETTE.len()]
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{v:.2}</text>"#,
                LABEL_W + v / max * bar_w + 4.0,
                y + BAR_H - 4.0
            );
        }
        // The baseline, 1.0.
        let x = LABEL_W + bar_w / max;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#000" stroke-dasharray="3,3"/>"##,
            top + 16.0,
            top + 20.0 + panel_h
        );
    }
    s += "</svg>\n";
    s
}

/// An HTML page with the table (figures and ratios) and the chart.
pub fn html(rows: &[Row], settings: &Settings, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>body{{font-family:sans-serif}} \
         table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} \
         td:first-child{{text-align:left}}</style></head><body>\n<h1>{t}</h1>",
        t = escape(title)
    );
    let _ = writeln!(
        s,
        "<p>{} threads, prefill of {} tokens, decode of {} tokens, {} alternating rounds (best speed shown; speed ratios are medians of per-round ratios); ratios to {} in parentheses.</p>",
        settings.threads, settings.prompt_len, settings.gen, settings.rounds, escape(&rows[0].strategy)
    );
    s += "<table><tr><th>strategy</th><th>kernels</th>";
    for column in &COLUMNS {
        let _ = write!(s, "<th>{}</th>", escape(column.name));
    }
    s += "</tr>\n";
    for row in rows {
        let r = ratios(rows, row);
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td>",
            escape(&row.strategy),
            row.kernels
        );
        let values = [
            format!("{:.1}", row.kernels_per_layer),
            row.traffic.bytes().to_string(),
            format!("{:.2}", row.compile_s),
            format!("{:.1}", row.prefill_tok_s),
            format!("{:.1}", row.decode_tok_s),
        ];
        for (v, ratio) in values.iter().zip(&r) {
            let _ = write!(s, "<td>{v} ({ratio:.2})</td>");
        }
        s += "</tr>\n";
    }
    s += "</table>\n";
    s += &svg(rows, title);
    s += "</body></html>\n";
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
