//! Loss and validation-accuracy curves of a run as a small SVG (opens in any browser).

use crate::evaluate::EvalReport;

const W: f64 = 420.0;
const H: f64 = 260.0;
const PAD: f64 = 40.0;

/// Two panels side by side: training loss per step, validation accuracy per evaluation.
pub fn svg(losses: &[(u64, f64)], evals: &[(u64, EvalReport)]) -> String {
    let loss: Vec<(f64, f64)> = losses.iter().map(|&(s, l)| (s as f64, l)).collect();
    let acc: Vec<(f64, f64)> = evals.iter().map(|(s, r)| (*s as f64, r.accuracy)).collect();
    format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{H}' font-family='sans-serif' font-size='11'>\n\
         <rect width='100%' height='100%' fill='white'/>\n{}\n<g transform='translate({W},0)'>{}</g>\n</svg>\n",
        2.0 * W,
        panel("training loss", &loss, "#1f77b4"),
        panel("validation accuracy", &acc, "#d62728"),
    )
}

fn panel(title: &str, points: &[(f64, f64)], color: &str) -> String {
    let mut out = format!(
        "<text x='{}' y='16' text-anchor='middle' font-size='13'>{title}</text>\
         <rect x='{PAD}' y='{PAD}' width='{}' height='{}' fill='none' stroke='#888'/>",
        W / 2.0,
        W - 2.0 * PAD,
        H - 2.0 * PAD
    );
    if points.is_empty() {
        return out;
    }
    let (x0, x1) = bounds(points.iter().map(|p| p.0));
    let (y0, y1) = bounds(points.iter().map(|p| p.1));
    let sx = |x: f64| PAD + (x - x0) / (x1 - x0) * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - (y - y0) / (y1 - y0) * (H - 2.0 * PAD);
    let line: Vec<String> = points
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
        .collect();
    out += &format!(
        "<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{}'/>",
        line.join(" ")
    );
    for &(x, y) in points.iter().filter(|_| points.len() <= 50) {
        out += &format!(
            "<circle cx='{:.1}' cy='{:.1}' r='2' fill='{color}'/>",
            sx(x),
            sy(y)
        );
    }
    out += &format!(
        "<text x='{PAD}' y='{}'>{y0:.3}</text><text x='{PAD}' y='{}'>{y1:.3}</text>\
         <text x='{}' y='{}' text-anchor='end'>step {x1:.0}</text>",
        H - PAD + 14.0,
        PAD - 4.0,
        W - PAD,
        H - PAD + 14.0
    );
    out
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    }
}
