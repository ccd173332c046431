//! A small PNG line chart (no plotting dependency): an RGB canvas, lines, a 5x7 bitmap
//! font for labels, and a PNG encoder over `miniz_oxide`'s deflate.

use std::path::Path;

use crate::error::{Error, Result};

pub type Rgb = [u8; 3];

pub const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
    [127, 127, 127],
    [188, 189, 34],
];

const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];

/// One curve: a name for the legend and (x, y) points; gaps are `None`.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, Option<f64>)>,
}

/// A chart panel: title and visible ranges.
pub struct Panel {
    pub title: String,
    pub x: (f64, f64),
    pub y: (f64, f64),
    pub x_step: f64,
    pub y_step: f64,
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, width: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(
                x - width / 2,
                y - width / 2,
                x + (width - 1) / 2,
                y + (width - 1) / 2,
                c,
            );
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `text` with its top-left corner at (x, y); glyphs are 6*scale wide.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: Rgb) {
        for (k, ch) in text.chars().enumerate() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let gx = x + (k as i64 * 6 + col) * scale;
                        let gy = y + r as i64 * scale;
                        self.rect(gx, gy, gx + scale - 1, gy + scale - 1, c);
                    }
                }
            }
        }
    }
}

fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 6 * scale
}

fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        _ => [0; 7],
    }
}

fn fmt_tick(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn draw_panel(
    cv: &mut Canvas,
    area: (i64, i64, i64, i64),
    panel: &Panel,
    series: &[Series],
    y_label: &str,
) {
    let (left, top, right, bottom) = area;
    let (x0, x1) = panel.x;
    let (y0, y1) = panel.y;
    let sx = |x: f64| left + ((x - x0) / (x1 - x0) * (right - left) as f64).round() as i64;
    let sy = |y: f64| bottom - ((y - y0) / (y1 - y0) * (bottom - top) as f64).round() as i64;
    let mut v = x0;
    while v <= x1 + 1e-9 {
        cv.line((sx(v), top), (sx(v), bottom), GRID, 1);
        let label = fmt_tick(v);
        cv.text(
            sx(v) - text_width(&label, 2) / 2,
            bottom + 8,
            &label,
            2,
            BLACK,
        );
        v += panel.x_step;
    }
    let mut v = y0;
    while v <= y1 + 1e-9 {
        cv.line((left, sy(v)), (right, sy(v)), GRID, 1);
        let label = fmt_tick(v);
        cv.text(
            left - 8 - text_width(&label, 2),
            sy(v) - 7,
            &label,
            2,
            BLACK,
        );
        v += panel.y_step;
    }
    cv.line((left, bottom), (right, bottom), BLACK, 2);
    cv.line((left, top), (left, bottom), BLACK, 2);
    cv.text(
        (left + right) / 2 - text_width(&panel.title, 2) / 2,
        top - 26,
        &panel.title,
        2,
        BLACK,
    );
    let xl = "ARRIVED GPU DEMAND (% OF CAPACITY)";
    cv.text(
        (left + right) / 2 - text_width(xl, 2) / 2,
        bottom + 32,
        xl,
        2,
        BLACK,
    );
    cv.text(left - 70, top - 26, y_label, 2, BLACK);
    for (k, s) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &s.points {
            let Some(y) = y.filter(|_| x >= x0 && x <= x1) else {
                prev = None;
                continue;
            };
            let p = (sx(x), sy(y.clamp(y0, y1)));
            if let Some(q) = prev {
                cv.line(q, p, color, 3);
            }
            prev = Some(p);
        }
    }
}

/// Writes a chart with one panel per entry of `panels` side by side, and a legend.
pub fn line_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    panels: &[Panel],
    series: &[Series],
) -> Result<()> {
    let (pw, ph) = (720i64, 560i64);
    let legend_h = 40 + 28 * series.len().div_ceil(4) as i64;
    let w = pw * panels.len() as i64;
    let h = ph + legend_h + 50;
    let mut cv = Canvas::new(w as usize, h as usize);
    cv.text(20, 14, title, 3, BLACK);
    for (i, panel) in panels.iter().enumerate() {
        let x = i as i64 * pw;
        draw_panel(
            &mut cv,
            (x + 100, 100, x + pw - 30, ph - 20),
            panel,
            series,
            y_label,
        );
    }
    let ly = ph + 50;
    for (k, s) in series.iter().enumerate() {
        let lx = 100 + (k % 4) as i64 * 330;
        let y = ly + (k / 4) as i64 * 28;
        cv.line((lx, y + 7), (lx + 40, y + 7), PALETTE[k % PALETTE.len()], 5);
        cv.text(lx + 50, y, &s.name, 2, BLACK);
    }
    std::fs::write(path, encode_png(cv.w, cv.h, &cv.px)).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// 8-bit RGB PNG, no filtering (flat chart colours compress well as they are).
pub fn encode_png(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (w * 3 + 1));
    for row in rgb.chunks(w * 3) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 9),
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_is_well_formed() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        let png = encode_png(2, 1, &[255, 0, 0, 0, 0, 255]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        let idat = &png[41..41 + idat_len];
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(idat).unwrap();
        assert_eq!(raw, vec![0, 255, 0, 0, 0, 0, 255]);
    }
}
