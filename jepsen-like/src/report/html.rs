//! `report.html`: one self-contained page — verdicts, the fault timeline, and an inline SVG
//! of every op's latency over time (ok / fail / info coloured, fault intervals shaded), like
//! Jepsen's latency-raw plot. Pure: data in, text out.

use std::fmt::Write as _;

use crate::client::{OpRecord, Outcome};
use crate::nemesis::{FaultOutcome, NemesisKind};

/// Plot geometry.
const W: f64 = 1100.0;
const H: f64 = 460.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 44.0;
/// At most this many points are drawn (evenly sampled beyond it), so the page stays light.
pub const MAX_POINTS: usize = 40_000;

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn outcome_color(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "#2b8a3e",
        Outcome::Fail => "#d62728",
        Outcome::Info => "#f08c00",
    }
}

pub fn fault_color(k: NemesisKind) -> &'static str {
    match k {
        NemesisKind::Kill => "#e03131",
        NemesisKind::Pause => "#1971c2",
        NemesisKind::Partition => "#7048e8",
        NemesisKind::Membership => "#2f9e44",
        NemesisKind::Net => "#e8590c",
        NemesisKind::Clock => "#0c8599",
    }
}

/// The latency plot. `end` is the run's length in ns (the x axis).
pub fn latency_svg(ops: &[OpRecord], faults: &[FaultOutcome], end: u64) -> String {
    let end_s = (end as f64 / 1e9).max(1.0);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x = |ns: u64| LEFT + (ns as f64 / 1e9) / end_s * plot_w;
    let lat_ms = |o: &OpRecord| (o.complete.saturating_sub(o.invoke) as f64 / 1e6).max(0.1);
    let max_ms = ops.iter().map(lat_ms).fold(1000.0_f64, f64::max);
    let (lo, hi) = (0.1_f64.log10(), max_ms.log10().ceil());
    let y = |ms: f64| TOP + plot_h - (ms.max(0.1).log10() - lo) / (hi - lo) * plot_h;

    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#999"/>"##
    );
    // Fault intervals.
    for f in faults {
        let (Some(a), Some(b)) = (f.start, f.stop) else {
            continue;
        };
        let (xa, xb) = (x(a), x(b).max(x(a) + 1.0));
        let _ = write!(
            s,
            r#"<rect class="fault" x="{xa:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="{}" fill-opacity="0.13"><title>{}</title></rect>"#,
            xb - xa,
            fault_color(f.kind),
            escape(&f.detail)
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{}" font-size="10">{}</text>"#,
            xa + 2.0,
            TOP - 6.0,
            fault_color(f.kind),
            f.kind
        );
    }
    // Axes: decades of latency, every 10 s (or so) of time.
    let mut d = lo.ceil() as i32;
    while f64::from(d) <= hi {
        let ms = 10f64.powi(d);
        let yy = y(ms);
        let label = if ms < 1.0 {
            format!("{ms}")
        } else {
            format!("{ms:.0}")
        };
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0
        );
        d += 1;
    }
    let step = if end_s > 300.0 {
        60.0
    } else if end_s > 60.0 {
        20.0
    } else {
        10.0
    };
    let mut t = 0.0;
    while t <= end_s {
        let xx = LEFT + t / end_s * plot_w;
        let _ = write!(
            s,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t:.0}</text>"#,
            H - BOTTOM + 16.0
        );
        t += step;
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time (s)</text><text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">latency (ms, log)</text>"#,
        LEFT + plot_w / 2.0,
        H - 8.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    // Points, info last so they stay visible.
    let stride = ops.len().div_ceil(MAX_POINTS).max(1);
    for outcome in [Outcome::Ok, Outcome::Fail, Outcome::Info] {
        let _ = write!(
            s,
            r#"<g fill="{}" fill-opacity="0.6">"#,
            outcome_color(outcome)
        );
        for o in ops.iter().step_by(stride).filter(|o| o.outcome == outcome) {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="1.6"/>"#,
                x(o.invoke),
                y(lat_ms(o))
            );
        }
        s.push_str("</g>");
    }
    // Legend.
    let mut lx = LEFT + 8.0;
    for (label, color) in [
        ("ok", outcome_color(Outcome::Ok)),
        ("fail", outcome_color(Outcome::Fail)),
        ("info", outcome_color(Outcome::Info)),
    ] {
        let _ = write!(
            s,
            r#"<circle cx="{lx:.1}" cy="{:.1}" r="4" fill="{color}"/><text x="{:.1}" y="{:.1}">{label}</text>"#,
            TOP + 12.0,
            lx + 7.0,
            TOP + 16.0
        );
        lx += 48.0;
    }
    s.push_str("</svg>");
    s
}

/// One verdict row of the page.
pub struct VerdictRow {
    pub name: String,
    pub valid: bool,
    pub line: String,
}

/// What the page shows.
pub struct Page<'a> {
    pub title: &'a str,
    pub verdicts: &'a [VerdictRow],
    pub facts: &'a [(String, String)],
    pub ops: &'a [OpRecord],
    pub faults: &'a [FaultOutcome],
    /// Each anomaly as text (shown preformatted).
    pub anomalies: &'a [String],
    /// Length of the x axis, ns.
    pub end: u64,
}

/// The whole page.
pub fn page(p: &Page<'_>) -> String {
    let Page {
        title,
        verdicts,
        facts,
        ops,
        faults,
        anomalies,
        end,
    } = *p;
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;margin:8px 0 20px}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}}\
         .valid{{color:#2b8a3e;font-weight:bold}}.invalid{{color:#d62728;font-weight:bold}}</style></head><body>\n",
        escape(title)
    );
    let _ = writeln!(s, "<h1>{}</h1>", escape(title));
    s.push_str("<table><tr><th>check</th><th>verdict</th></tr>\n");
    for v in verdicts {
        let class = if v.valid { "valid" } else { "invalid" };
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td class=\"{class}\">{}</td></tr>",
            escape(&v.name),
            escape(&v.line)
        );
    }
    s.push_str("</table>\n<table>\n");
    for (k, v) in facts {
        let _ = writeln!(s, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    s.push_str("</table>\n<h2>Latency over time</h2>\n");
    s.push_str(&latency_svg(ops, faults, end));
    s.push_str("\n<h2>Faults</h2>\n<table><tr><th>#</th><th>kind</th><th>what</th><th>start (s)</th><th>stop (s)</th><th>note</th></tr>\n");
    let secs = |t: Option<u64>| t.map_or("—".to_owned(), |t| format!("{:.2}", t as f64 / 1e9));
    for f in faults {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td style=\"color:{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            f.id,
            fault_color(f.kind),
            f.kind,
            escape(&f.detail),
            secs(f.start),
            secs(f.stop),
            escape(f.error.as_deref().unwrap_or(""))
        );
    }
    s.push_str("</table>\n");
    if !anomalies.is_empty() {
        let _ = writeln!(s, "<h2>Anomalies ({})</h2>", anomalies.len());
        for a in anomalies {
            let _ = writeln!(s, "<pre>{}</pre>", escape(a));
        }
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(invoke_ms: u64, lat_ms: u64, outcome: Outcome) -> OpRecord {
        OpRecord {
            workload: "register".into(),
            f: "read".into(),
            process: 1,
            node: 1,
            invoke: invoke_ms * 1_000_000,
            complete: (invoke_ms + lat_ms) * 1_000_000,
            outcome,
            error: None,
        }
    }

    fn fault() -> FaultOutcome {
        FaultOutcome {
            id: 0,
            kind: NemesisKind::Partition,
            detail: "isolate <n2> & co".into(),
            nodes: vec![2],
            start: Some(2_000_000_000),
            stop: Some(4_000_000_000),
            injected: true,
            error: None,
        }
    }

    #[test]
    fn the_plot_has_one_point_per_op_a_band_per_fault_and_escapes_text() {
        let ops = vec![
            op(10, 5, Outcome::Ok),
            op(2500, 3000, Outcome::Info),
            op(3000, 1, Outcome::Fail),
        ];
        let svg = latency_svg(&ops, &[fault()], 10_000_000_000);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        // 3 ops + 3 legend dots.
        assert_eq!(svg.matches("<circle").count(), 6);
        assert_eq!(svg.matches(r#"class="fault""#).count(), 1);
        assert!(svg.contains("isolate &lt;n2&gt; &amp; co"));
        assert!(svg.contains(outcome_color(Outcome::Info)));
        // The band spans 2 s..4 s of a 10 s axis: x = 64 + 0.2 * 1020.
        assert!(svg.contains(r#"x="268.0""#), "{svg}");
    }

    #[test]
    fn large_histories_are_sampled() {
        let ops: Vec<OpRecord> = (0..(MAX_POINTS as u64 * 3))
            .map(|i| op(i, 2, Outcome::Ok))
            .collect();
        let svg = latency_svg(&ops, &[], 200_000_000_000);
        assert!(svg.matches("<circle").count() <= MAX_POINTS + 3);
    }

    #[test]
    fn the_page_lists_verdicts_and_faults() {
        let rows = [VerdictRow {
            name: "register".into(),
            valid: false,
            line: "invalid: key \"r1\"".into(),
        }];
        let html = page(&Page {
            title: "run <1>",
            verdicts: &rows,
            facts: &[("seed".into(), "7".into())],
            ops: &[op(1, 1, Outcome::Ok)],
            faults: &[fault()],
            anomalies: &["key \"r1\" is not linearizable".into()],
            end: 5_000_000_000,
        });
        assert!(html.contains("<title>run &lt;1&gt;</title>"));
        assert!(html.contains(r#"<td class="invalid">invalid: key &quot;r1&quot;</td>"#));
        assert!(html.contains("<td>2.00</td><td>4.00</td>"));
        assert!(html.contains("<svg"));
        assert!(html.contains("<pre>key &quot;r1&quot; is not linearizable</pre>"));
    }
}
