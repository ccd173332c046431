//! From decoded pixels to the model's input: every image is resampled once, through one
//! affine map that composes torchvision's training transforms (random resized crop,
//! horizontal flip, small rotation) with the resize to `imageSize`, then colour jitter
//! and ImageNet normalisation. Grey images become three equal channels. Evaluation
//! resizes the whole image, without randomness.

use ringmaster_crds::Augmentation;

use crate::rng::TrainRng;

/// The ImageNet statistics torchvision and timm normalise pretrained ResNets with.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decoded pixels: `channels` (1 or 3) interleaved u8 values per pixel, row-major.
pub struct Pixels<'a> {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: &'a [u8],
}

impl Pixels<'_> {
    /// Channel `c` at (x, y), in [0, 1]; grey images answer every channel.
    fn at(&self, x: usize, y: usize, c: usize) -> f32 {
        let c = if self.channels == 1 { 0 } else { c };
        f32::from(self.data[(y * self.width + x) * self.channels + c]) / 255.0
    }

    /// Bilinear sample at a continuous position (pixel centres at +0.5); black outside.
    fn sample(&self, x: f32, y: f32, c: usize) -> f32 {
        let (w, h) = (self.width as f32, self.height as f32);
        if !(0.0..w).contains(&x) || !(0.0..h).contains(&y) {
            return 0.0;
        }
        let (fx, fy) = ((x - 0.5).max(0.0), (y - 0.5).max(0.0));
        let (x0, y0) = (fx as usize, fy as usize);
        let (x1, y1) = ((x0 + 1).min(self.width - 1), (y0 + 1).min(self.height - 1));
        let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
        let top = self.at(x0, y0, c) * (1.0 - ax) + self.at(x1, y0, c) * ax;
        let bottom = self.at(x0, y1, c) * (1.0 - ax) + self.at(x1, y1, c) * ax;
        top * (1.0 - ay) + bottom * ay
    }
}

/// The resampling and colour choices for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Draw {
    /// Crop box in source pixels.
    crop: [f32; 4],
    flip: bool,
    /// Radians.
    rotation: f32,
    brightness: f32,
    contrast: f32,
}

impl Draw {
    fn whole(width: usize, height: usize) -> Self {
        Self {
            crop: [0.0, 0.0, width as f32, height as f32],
            flip: false,
            rotation: 0.0,
            brightness: 1.0,
            contrast: 1.0,
        }
    }

    fn random(width: usize, height: usize, aug: &Augmentation, rng: &mut TrainRng) -> Self {
        let mut uniform = |lo: f32, hi: f32| lo + (hi - lo) * (rng.next_signed() + 1.0) / 2.0;
        let (w, h) = (width as f32, height as f32);
        let mut crop = [0.0, 0.0, w, h];
        // torchvision's RandomResizedCrop: an area fraction and a log-uniform aspect
        // ratio, ten tries to fit, else the whole image.
        if aug.min_crop_scale < 1.0 {
            for _ in 0..10 {
                let area = w * h * uniform(aug.min_crop_scale as f32, 1.0);
                let ratio = uniform((3.0f32 / 4.0).ln(), (4.0f32 / 3.0).ln()).exp();
                let (cw, ch) = ((area * ratio).sqrt(), (area / ratio).sqrt());
                if cw <= w && ch <= h {
                    crop = [uniform(0.0, w - cw), uniform(0.0, h - ch), cw, ch];
                    break;
                }
            }
        }
        let jitter = aug.color_jitter as f32;
        let degrees = aug.max_rotation_degrees as f32;
        Self {
            crop,
            flip: aug.horizontal_flip && uniform(0.0, 1.0) < 0.5,
            rotation: uniform(-degrees, degrees).to_radians(),
            brightness: uniform(1.0 - jitter, 1.0 + jitter),
            contrast: uniform(1.0 - jitter, 1.0 + jitter),
        }
    }
}

/// Turns decoded images into `size` x `size` normalised CHW tensors.
#[derive(Debug, Clone)]
pub struct Transform {
    pub size: usize,
    /// Random training transforms; None resizes only.
    pub augmentation: Option<Augmentation>,
}

impl Transform {
    /// Values per output image (3 x size x size).
    pub fn output_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// Writes `image` into `out` (CHW, `output_len()` values); `rng` draws the random
    /// transforms when training augments.
    pub fn apply(&self, image: &Pixels, rng: Option<&mut TrainRng>, out: &mut [f32]) {
        let draw = match (&self.augmentation, rng) {
            (Some(aug), Some(rng)) => Draw::random(image.width, image.height, aug, rng),
            _ => Draw::whole(image.width, image.height),
        };
        self.resample(image, &draw, out);
    }

    fn resample(&self, image: &Pixels, draw: &Draw, out: &mut [f32]) {
        let s = self.size;
        let [x0, y0, cw, ch] = draw.crop;
        let (sin, cos) = draw.rotation.sin_cos();
        let plane = s * s;
        for v in 0..s {
            for u in 0..s {
                // Output pixel centre as a fraction of the crop, flipped, then rotated
                // about the crop's centre in source pixels.
                let mut fx = (u as f32 + 0.5) / s as f32;
                if draw.flip {
                    fx = 1.0 - fx;
                }
                let fy = (v as f32 + 0.5) / s as f32;
                let (dx, dy) = ((fx - 0.5) * cw, (fy - 0.5) * ch);
                let x = x0 + cw / 2.0 + dx * cos - dy * sin;
                let y = y0 + ch / 2.0 + dx * sin + dy * cos;
                for c in 0..3 {
                    out[c * plane + v * s + u] = image.sample(x, y, c);
                }
            }
        }
        // Colour jitter: brightness scales, contrast blends with the mean grey level.
        if draw.brightness != 1.0 || draw.contrast != 1.0 {
            let grey: f32 = (0..plane)
                .map(|i| 0.299 * out[i] + 0.587 * out[plane + i] + 0.114 * out[2 * plane + i])
                .sum::<f32>()
                / plane as f32
                * draw.brightness;
            for value in out.iter_mut() {
                let bright = (*value * draw.brightness).clamp(0.0, 1.0);
                *value = (grey + (bright - grey) * draw.contrast).clamp(0.0, 1.0);
            }
        }
        for (c, channel) in out.chunks_mut(plane).enumerate() {
            for value in channel {
                *value = (*value - MEAN[c]) / STD[c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalised(value: f32, c: usize) -> f32 {
        (value - MEAN[c]) / STD[c]
    }

    #[test]
    fn evaluation_resizes_grey_to_three_normalised_channels() {
        // A 2x2 grey image: left column black, right column white.
        let data = [0u8, 255, 0, 255];
        let image = Pixels {
            width: 2,
            height: 2,
            channels: 1,
            data: &data,
        };
        let t = Transform {
            size: 4,
            augmentation: None,
        };
        let mut out = vec![0.0; t.output_len()];
        t.apply(&image, None, &mut out);
        for c in 0..3 {
            let row = &out[c * 16..c * 16 + 4];
            assert!((row[0] - normalised(0.0, c)).abs() < 1e-6, "{row:?}");
            assert!((row[3] - normalised(1.0, c)).abs() < 1e-6, "{row:?}");
            assert!(row[1] < row[2], "a ramp between the columns: {row:?}");
        }
    }

    #[test]
    fn augmentation_follows_the_seed_and_flips() {
        let data: Vec<u8> = (0..64 * 48 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let image = Pixels {
            width: 64,
            height: 48,
            channels: 3,
            data: &data,
        };
        let aug = Augmentation {
            min_crop_scale: 0.3,
            horizontal_flip: true,
            color_jitter: 0.4,
            max_rotation_degrees: 10.0,
        };
        let t = Transform {
            size: 16,
            augmentation: Some(aug.clone()),
        };
        let run = |seed| {
            let mut out = vec![0.0; t.output_len()];
            t.apply(&image, Some(&mut TrainRng::new(seed)), &mut out);
            out
        };
        assert_eq!(run(3), run(3), "same seed, same image");
        assert_ne!(run(3), run(4));
        assert!(run(3).iter().all(|v| v.is_finite()));

        // A flip alone mirrors each row.
        let flip_only = Transform {
            size: 8,
            augmentation: Some(Augmentation {
                min_crop_scale: 1.0,
                horizontal_flip: true,
                color_jitter: 0.0,
                max_rotation_degrees: 0.0,
            }),
        };
        let plain = Transform {
            size: 8,
            augmentation: None,
        };
        let mut straight = vec![0.0; plain.output_len()];
        plain.apply(&image, None, &mut straight);
        let mut seed = 0;
        let flipped = loop {
            let mut rng = TrainRng::new(seed);
            let draw = Draw::random(64, 48, flip_only.augmentation.as_ref().unwrap(), &mut rng);
            if draw.flip {
                let mut out = vec![0.0; flip_only.output_len()];
                flip_only.apply(&image, Some(&mut TrainRng::new(seed)), &mut out);
                break out;
            }
            seed += 1;
        };
        for row in 0..8 {
            let a = &straight[row * 8..row * 8 + 8];
            let b: Vec<f32> = flipped[row * 8..row * 8 + 8]
                .iter()
                .rev()
                .copied()
                .collect();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "row {row}: {a:?} vs {b:?}");
            }
        }
    }
}
