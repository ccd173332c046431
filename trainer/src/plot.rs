//! Loss and validation-accuracy curves of a run: a small SVG (opens in any browser) and
//! the same picture as a PNG.

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

/// The same two panels as a PNG, drawn pixel by pixel (labels in a 3x5 bitmap font).
pub fn png(losses: &[(u64, f64)], evals: &[(u64, EvalReport)]) -> image::RgbImage {
    let loss: Vec<(f64, f64)> = losses.iter().map(|&(s, l)| (s as f64, l)).collect();
    let acc: Vec<(f64, f64)> = evals.iter().map(|(s, r)| (*s as f64, r.accuracy)).collect();
    let mut canvas = image::RgbImage::from_pixel((2.0 * W) as u32, H as u32, WHITE);
    raster_panel(&mut canvas, 0.0, "training loss", &loss, [31, 119, 180]);
    raster_panel(&mut canvas, W, "validation accuracy", &acc, [214, 39, 40]);
    canvas
}

const WHITE: image::Rgb<u8> = image::Rgb([255, 255, 255]);
const GREY: [u8; 3] = [136, 136, 136];
const INK: [u8; 3] = [40, 40, 40];

fn raster_panel(
    img: &mut image::RgbImage,
    left: f64,
    title: &str,
    points: &[(f64, f64)],
    color: [u8; 3],
) {
    let (x_lo, x_hi, y_lo, y_hi) = (left + PAD, left + W - PAD, PAD, H - PAD);
    for (a, b) in [
        ((x_lo, y_lo), (x_hi, y_lo)),
        ((x_hi, y_lo), (x_hi, y_hi)),
        ((x_hi, y_hi), (x_lo, y_hi)),
        ((x_lo, y_hi), (x_lo, y_lo)),
    ] {
        segment(img, a, b, GREY, 0);
    }
    text(img, left + W / 2.0, 8.0, title, INK, true);
    if points.is_empty() {
        return;
    }
    let (x0, x1) = bounds(points.iter().map(|p| p.0));
    let (y0, y1) = bounds(points.iter().map(|p| p.1));
    let at = |&(x, y): &(f64, f64)| {
        (
            x_lo + (x - x0) / (x1 - x0) * (x_hi - x_lo),
            y_hi - (y - y0) / (y1 - y0) * (y_hi - y_lo),
        )
    };
    for pair in points.windows(2) {
        segment(img, at(&pair[0]), at(&pair[1]), color, 1);
    }
    if points.len() <= 50 {
        for p in points {
            let c = at(p);
            segment(img, c, c, color, 2);
        }
    }
    text(img, x_lo, y_hi + 6.0, &format!("{y0:.3}"), INK, false);
    text(img, x_lo, y_lo - 14.0, &format!("{y1:.3}"), INK, false);
    let steps = format!("step {x1:.0}");
    text(
        img,
        x_hi - 8.0 * steps.len() as f64,
        y_hi + 6.0,
        &steps,
        INK,
        false,
    );
}

/// A line from `a` to `b`, `radius` pixels thick either side.
fn segment(img: &mut image::RgbImage, a: (f64, f64), b: (f64, f64), color: [u8; 3], radius: i64) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        for dx in -radius..=radius {
            for dy in -radius..=radius {
                put(img, x.round() as i64 + dx, y.round() as i64 + dy, color);
            }
        }
    }
}

fn put(img: &mut image::RgbImage, x: i64, y: i64, color: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, image::Rgb(color));
    }
}

/// Text at twice the font's size (8 pixels a character); `centred` on `x`, else from it.
fn text(img: &mut image::RgbImage, x: f64, y: f64, s: &str, color: [u8; 3], centred: bool) {
    let start = if centred { x - 4.0 * s.len() as f64 } else { x } as i64;
    for (i, c) in s.chars().enumerate() {
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..3 {
                if bits & (0b100 >> col) != 0 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        put(
                            img,
                            start + 8 * i as i64 + 2 * col + dx,
                            y as i64 + 2 * row as i64 + dy,
                            color,
                        );
                    }
                }
            }
        }
    }
}

/// Rows of 3 pixels; characters outside the labels' alphabet are blank.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'a' => [0, 3, 5, 5, 3],
        'c' => [0, 3, 4, 4, 3],
        'd' => [1, 3, 5, 5, 3],
        'e' => [2, 5, 7, 4, 3],
        'g' => [3, 5, 3, 1, 6],
        'i' => [2, 0, 2, 2, 2],
        'l' => [2, 2, 2, 2, 3],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 2, 5, 5, 2],
        'p' => [0, 6, 5, 6, 4],
        'r' => [0, 5, 6, 4, 4],
        's' => [0, 3, 6, 3, 6],
        't' => [2, 7, 2, 2, 3],
        'u' => [0, 5, 5, 5, 3],
        'v' => [0, 5, 5, 5, 2],
        'y' => [5, 5, 3, 1, 6],
        _ => [0; 5],
    }
}
