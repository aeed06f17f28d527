//! The timeline chart of a run, hand-written SVG: faults as bands, the leader over
//! time as a line across one row per node id, and every submit as a dot at its
//! acknowledgement latency (log scale).

use crate::history::{Recorded, SubmitOutcome};
use crate::report::Report;
use std::collections::BTreeSet;
use std::fmt::Write as _;

const WIDTH: f64 = 1100.0;
const LEFT: f64 = 110.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const ROW: f64 = 22.0;
const LAT_HEIGHT: f64 = 220.0;
/// Latency axis: 10 ms to 20 s, log scale.
const LAT_MIN_MS: f64 = 10.0;
const LAT_MAX_MS: f64 = 20_000.0;

fn family_colour(family: &str) -> &'static str {
    match family {
        "kill" => "#d62728",
        "pause" => "#9467bd",
        "partition" => "#ff7f0e",
        "network" => "#17becf",
        _ => "#8c564b",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart.
pub fn timeline(r: &Report, rec: &Recorded) -> String {
    let end_ms = rec
        .ops
        .iter()
        .flat_map(|o| o.attempts.iter().map(|a| a.end_ms))
        .chain(rec.observations.iter().map(|o| o.at_ms))
        .chain(rec.faults.iter().map(|f| f.end_ms))
        .max()
        .unwrap_or(1)
        .max(r.healed_ms + 1) as f64;
    let t0 = r.window_start_ms as f64;
    let span = (end_ms - t0).max(1.0);
    let x = |ms: f64| LEFT + (ms - t0).max(0.0) / span * (WIDTH - LEFT - RIGHT);
    let ids: Vec<u64> = rec
        .observations
        .iter()
        .map(|o| o.node)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let leader_top = TOP + 20.0;
    let leader_h = ROW * ids.len().max(1) as f64;
    let lat_top = leader_top + leader_h + 40.0;
    let height = lat_top + LAT_HEIGHT + 60.0;
    let row_y =
        |id: u64| leader_top + ROW * (ids.iter().position(|i| *i == id).unwrap_or(0) as f64 + 0.5);
    let lat_y = |ms: f64| {
        let f = (ms.clamp(LAT_MIN_MS, LAT_MAX_MS).ln() - LAT_MIN_MS.ln())
            / (LAT_MAX_MS.ln() - LAT_MIN_MS.ln());
        lat_top + LAT_HEIGHT * (1.0 - f)
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="14" font-weight="bold">mesh-chaos {} seed {}: {}</text>"#,
        esc(&r.scenario),
        r.seed,
        if r.outcome == "pass" { "PASS" } else { "FAIL" }
    );
    // Fault bands over the whole height.
    for f in &rec.faults {
        let (x0, x1) = (x(f.start_ms as f64), x(f.end_ms as f64));
        let colour = family_colour(f.fault.family());
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="{colour}" fill-opacity="0.15" stroke="{colour}" stroke-opacity="0.5"><title>{}: {}</title></rect>"#,
            (x1 - x0).max(1.0),
            height - TOP - 40.0,
            esc(&f.name),
            esc(f.effect.as_deref().unwrap_or("no effect"))
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{colour}" font-size="10">{}</text>"#,
            x0 + 2.0,
            TOP + 10.0,
            esc(&f.name)
        );
    }
    // The healed line.
    let xh = x(r.healed_ms as f64);
    let _ = writeln!(
        s,
        r#"<line x1="{xh:.1}" y1="{TOP}" x2="{xh:.1}" y2="{:.1}" stroke="green" stroke-dasharray="4 3"/>"#,
        height - 40.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" fill="green" font-size="10">healed</text>"#,
        xh + 3.0,
        height - 44.0
    );
    // Leader rows.
    let _ = writeln!(
        s,
        r#"<text x="8" y="{:.1}" font-weight="bold">leader</text>"#,
        leader_top - 4.0
    );
    for id in &ids {
        let y = row_y(*id);
        let _ = writeln!(
            s,
            r##"<text x="8" y="{:.1}">node id {id}</text><line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            y + 4.0,
            WIDTH - RIGHT
        );
    }
    let changes = &r.leadership;
    for (k, c) in changes.iter().enumerate() {
        let x0 = x(c.at_ms as f64);
        let x1 = changes.get(k + 1).map_or(x(end_ms), |n| x(n.at_ms as f64));
        let y = row_y(c.leader);
        let _ = writeln!(
            s,
            r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="#1f77b4" stroke-width="5"><title>term {} led by node id {}</title></line>"##,
            c.term, c.leader
        );
        if let Some(next) = changes.get(k + 1) {
            let _ = writeln!(
                s,
                r##"<line x1="{x1:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{:.1}" stroke="#1f77b4" stroke-width="1"/>"##,
                row_y(next.leader)
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#1f77b4">t{}</text>"##,
            x0 + 2.0,
            y - 5.0,
            c.term
        );
    }
    // Latency panel.
    let _ = writeln!(
        s,
        r#"<text x="8" y="{:.1}" font-weight="bold">submit latency</text>"#,
        lat_top - 6.0
    );
    for ms in [10.0, 100.0, 1000.0, 10_000.0] {
        let y = lat_y(ms);
        let label = if ms >= 1000.0 {
            format!("{} s", ms / 1000.0)
        } else {
            format!("{ms} ms")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for op in &rec.ops {
        for a in &op.attempts {
            let (colour, what) = match &a.outcome {
                SubmitOutcome::Ack { .. } => ("#2ca02c", "acknowledged".to_string()),
                SubmitOutcome::Ambiguous { why } => ("#ff7f0e", format!("ambiguous: {why}")),
                SubmitOutcome::Failed { why } => ("#d62728", format!("failed: {why}")),
            };
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.2" fill="{colour}"><title>{} ({} ms) to node{}: {}</title></circle>"#,
                x(a.start_ms as f64),
                lat_y((a.end_ms - a.start_ms) as f64),
                esc(&op.key),
                a.end_ms - a.start_ms,
                a.node_index + 1,
                esc(&what)
            );
        }
    }
    // Time axis.
    let axis_y = height - 40.0;
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="black"/>"#,
        WIDTH - RIGHT
    );
    let step = if span > 120_000.0 {
        20_000.0
    } else if span > 40_000.0 {
        10_000.0
    } else {
        5_000.0
    };
    let mut t = 0.0;
    while t <= span {
        let xt = x(t0 + t);
        let _ = writeln!(
            s,
            r#"<line x1="{xt:.1}" y1="{axis_y:.1}" x2="{xt:.1}" y2="{:.1}" stroke="black"/><text x="{xt:.1}" y="{:.1}" text-anchor="middle">{} s</text>"#,
            axis_y + 4.0,
            axis_y + 16.0,
            t / 1000.0
        );
        t += step;
    }
    // Legend.
    let ly = height - 10.0;
    let mut lx = LEFT;
    for (label, colour) in [
        ("kill", "kill"),
        ("pause", "pause"),
        ("partition", "partition"),
        ("latency/loss", "network"),
        ("disk", "disk"),
    ] {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{}" fill-opacity="0.4"/><text x="{:.1}" y="{ly:.1}">{label}</text>"#,
            ly - 9.0,
            family_colour(colour),
            lx + 14.0
        );
        lx += 90.0;
    }
    for (label, colour) in [
        ("acknowledged", "#2ca02c"),
        ("ambiguous", "#ff7f0e"),
        ("failed", "#d62728"),
    ] {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"/><text x="{:.1}" y="{ly:.1}">{label}</text>"#,
            lx + 4.0,
            ly - 4.0,
            lx + 12.0
        );
        lx += 100.0;
    }
    s.push_str("</svg>\n");
    s
}
