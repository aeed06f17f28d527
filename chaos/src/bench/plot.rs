//! The latency-against-throughput chart of docs/benchmarks.md: one line per system,
//! one point per client count, p50 and p99 (log-log axes), as a standalone SVG.

use super::Point;

const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// Decades covering `lo..hi` (log10 bounds).
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let lo = lo.max(1e-3).log10().floor();
    let hi = hi.max(1e-3).log10().ceil().max(lo + 1.0);
    (lo, hi)
}

/// The chart for Mesh's points (per-exec submits and `submit-stream`) and etcd's.
pub fn latency_throughput(mesh: &[Point], stream: &[Point], etcd: &[Point]) -> String {
    let all: Vec<&Point> = mesh.iter().chain(stream).chain(etcd).collect();
    let (x0, x1) = decades(
        all.iter()
            .map(|p| p.ops_per_sec.median)
            .fold(f64::MAX, f64::min),
        all.iter().map(|p| p.ops_per_sec.median).fold(0.0, f64::max),
    );
    let (y0, y1) = decades(
        all.iter().map(|p| p.p50_ms.median).fold(f64::MAX, f64::min),
        all.iter().map(|p| p.p99_ms.median).fold(0.0, f64::max),
    );
    let x = |v: f64| LEFT + (v.max(1e-3).log10() - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let y = |v: f64| H - BOTTOM - (v.max(1e-3).log10() - y0) / (y1 - y0) * (H - TOP - BOTTOM);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">Commit latency against throughput, 3 nodes, 1 KiB payload (clients 1, 16, 256)</text>\n",
        W / 2.0
    );
    for d in (x0 as i32)..=(x1 as i32) {
        let px = x(10f64.powi(d));
        s.push_str(&format!(
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            H - BOTTOM,
            H - BOTTOM + 16.0,
            10f64.powi(d)
        ));
    }
    for d in (y0 as i32)..=(y1 as i32) {
        let py = y(10f64.powi(d));
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            10f64.powi(d)
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">committed operations per second (log)</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">latency, ms (log)</text>\n",
        (LEFT + W - RIGHT) / 2.0,
        H - 18.0,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0
    ));
    let series = [
        ("Mesh submit p50", mesh, "#1f77b4", false),
        ("Mesh submit p99", mesh, "#1f77b4", true),
        ("Mesh submit-stream p50", stream, "#2ca02c", false),
        ("Mesh submit-stream p99", stream, "#2ca02c", true),
        ("etcd p50", etcd, "#d62728", false),
        ("etcd p99", etcd, "#d62728", true),
    ];
    for (k, (name, points, colour, p99)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64, usize)> = points
            .iter()
            .map(|p| {
                let lat = if *p99 {
                    p.p99_ms.median
                } else {
                    p.p50_ms.median
                };
                (x(p.ops_per_sec.median), y(lat), p.clients)
            })
            .collect();
        let dash = if *p99 {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let path: Vec<String> = pts
            .iter()
            .map(|(a, b, _)| format!("{a:.1},{b:.1}"))
            .collect();
        s.push_str(&format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/>\n",
            path.join(" ")
        ));
        for (px, py, clients) in &pts {
            s.push_str(&format!(
                "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"4\" fill=\"{colour}\"><title>{name}, {clients} clients</title></circle>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{clients}</text>\n",
                px + 6.0,
                py - 6.0
            ));
        }
        let ly = TOP + 14.0 + 16.0 * k as f64;
        s.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\">{name}</text>\n",
            LEFT + 10.0,
            LEFT + 40.0,
            LEFT + 46.0,
            ly + 4.0
        ));
    }
    s.push_str("</svg>\n");
    s
}
