//! Pixels -> model input. GStreamer already scaled the frame (shorter side to the
//! model's size, or both sides for `squash`); what is left is the centre crop and
//! per-channel normalisation, done in one pass with a lookup table straight into the
//! batch tensor.

use crate::config::Views;
use crate::frame::RgbImage;
use crate::score::bundle::{InputSpec, ResizeRule};

/// For `crops:N`, frames are delivered with their shorter side at most this many times
/// the model's input size (native resolution when smaller), so each crop sees the
/// picture at native or moderately reduced scale.
pub const CROP_SCALE: u32 = 3;

/// Normalisation lookup tables: `lut[c][v] = (v / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone)]
pub struct Normaliser {
    size: usize,
    lut: [[f32; 256]; 3],
    views: Views,
}

impl Normaliser {
    /// Tables for a manifest's `[input]`, looking at each frame as `views` says.
    pub fn new(input: &InputSpec, views: Views) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - input.mean[c]) / input.std[c];
            }
        }
        Self {
            size: input.size as usize,
            lut,
            views,
        }
    }

    /// Model inputs per frame (1, or N for `crops:N`).
    pub fn views_per_frame(&self) -> usize {
        match self.views {
            Views::Global => 1,
            Views::Crops(n) => n.get(),
        }
    }

    /// Top-left corners of the `size x size` regions the model sees in `img`: the centre
    /// for `global`; for `crops:N`, N regions spread evenly over a grid of about the
    /// frame's aspect ratio (row-major, deterministic).
    pub fn view_origins(&self, img: &RgbImage) -> Vec<(usize, usize)> {
        let n = match self.views {
            Views::Global => return vec![self.crop_origin(img)],
            Views::Crops(n) => n.get(),
        };
        let s = self.size;
        let aspect = img.width as f64 / img.height.max(1) as f64;
        let cols = ((n as f64 * aspect).sqrt().round() as usize).clamp(1, n);
        let rows = n.div_ceil(cols);
        let (free_x, free_y) = (img.width.saturating_sub(s), img.height.saturating_sub(s));
        let spread = |i: usize, k: usize, free: usize| {
            if k == 1 { free / 2 } else { free * i / (k - 1) }
        };
        (0..n)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                // The last row may hold fewer crops: spread those over the full width too.
                let in_row = if r == rows - 1 { n - r * cols } else { cols };
                (spread(c, in_row, free_x), spread(r, rows, free_y))
            })
            .collect()
    }

    /// Writes every view of `img` (`views_per_frame` planes of `[3, size, size]`).
    pub fn write_views(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = self.plane_len();
        for ((x0, y0), o) in self
            .view_origins(img)
            .into_iter()
            .zip(out.chunks_exact_mut(plane))
        {
            self.write_at(img, x0, y0, o);
        }
    }

    /// Square input side.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Floats one image takes in the batch tensor (3 * size * size).
    pub fn plane_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// The square region the model sees: `(x0, y0)` of the centred `size x size` crop.
    /// Images smaller than `size` are handled by [`Normaliser::write`] by clamping.
    pub fn crop_origin(&self, img: &RgbImage) -> (usize, usize) {
        (
            img.width.saturating_sub(self.size) / 2,
            img.height.saturating_sub(self.size) / 2,
        )
    }

    /// Writes `img` as `[3, size, size]` normalised floats into `out`.
    ///
    /// Pixels are sampled from the centred crop; an image smaller than `size` in some
    /// direction (a source that could not be scaled as asked) is sampled by nearest
    /// neighbour so that the output is always complete.
    pub fn write(&self, img: &RgbImage, out: &mut [f32]) {
        let (x0, y0) = self.crop_origin(img);
        self.write_at(img, x0, y0, out);
    }

    /// Writes the `size x size` region at `(x0, y0)`; see [`Normaliser::write`].
    pub fn write_at(&self, img: &RgbImage, x0: usize, y0: usize, out: &mut [f32]) {
        let s = self.size;
        assert_eq!(out.len(), self.plane_len(), "output plane size");
        let (r, rest) = out.split_at_mut(s * s);
        let (g, b) = rest.split_at_mut(s * s);
        if img.width >= x0 + s && img.height >= y0 + s {
            for y in 0..s {
                let row = &img.row(y0 + y)[3 * x0..3 * (x0 + s)];
                let o = y * s;
                for (x, px) in row.chunks_exact(3).enumerate() {
                    r[o + x] = self.lut[0][px[0] as usize];
                    g[o + x] = self.lut[1][px[1] as usize];
                    b[o + x] = self.lut[2][px[2] as usize];
                }
            }
        } else {
            for y in 0..s {
                let row = img.row(y * img.height / s);
                for x in 0..s {
                    let sx = 3 * (x * img.width / s);
                    let o = y * s + x;
                    r[o] = self.lut[0][row[sx] as usize];
                    g[o] = self.lut[1][row[sx + 1] as usize];
                    b[o] = self.lut[2][row[sx + 2] as usize];
                }
            }
        }
    }
}

/// Target frame size GStreamer should deliver for a source of `width x height` with
/// pixel aspect ratio `par` (numerator, denominator). For `crops:N` the shorter side
/// is the native one, capped at `CROP_SCALE` times the input size (never below it).
pub fn working_size(
    rule: ResizeRule,
    views: Views,
    size: u32,
    width: u32,
    height: u32,
    par: (i32, i32),
) -> (u32, u32) {
    let rule = match views {
        Views::Global => rule,
        Views::Crops(_) => ResizeRule::ShorterSideCrop,
    };
    let size = match views {
        Views::Global => size,
        Views::Crops(_) => width.min(height).clamp(size, CROP_SCALE * size),
    };
    match rule {
        ResizeRule::Squash => (size, size),
        ResizeRule::ShorterSideCrop => {
            let (pn, pd) = (par.0.max(1) as f64, par.1.max(1) as f64);
            let dw = width.max(1) as f64 * pn / pd;
            let dh = height.max(1) as f64;
            let s = size as f64;
            if dw >= dh {
                (((dw / dh * s).round() as u32).max(size), size)
            } else {
                (size, ((dh / dw * s).round() as u32).max(size))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u32) -> InputSpec {
        InputSpec {
            size,
            mean: [0.5, 0.5, 0.5],
            std: [0.5, 0.25, 1.0],
            resize: ResizeRule::ShorterSideCrop,
        }
    }

    #[test]
    fn centre_crop_and_normalise() {
        // 4x2 image, size 2: crop columns 1..3.
        let mut data = Vec::new();
        for y in 0..2u8 {
            for x in 0..4u8 {
                data.extend([x * 60, y * 255, 255]);
            }
        }
        let img = RgbImage::from_packed(4, 2, data);
        let n = Normaliser::new(&spec(2), Views::Global);
        let mut out = vec![0.0; n.plane_len()];
        n.write(&img, &mut out);
        let r = |v: f32| (v / 255.0 - 0.5) / 0.5;
        assert!((out[0] - r(60.0)).abs() < 1e-6);
        assert!((out[1] - r(120.0)).abs() < 1e-6);
        assert!((out[4] - (0.0 - 0.5) / 0.25).abs() < 1e-6); // g row 0
        assert!((out[6] - (1.0 - 0.5) / 0.25).abs() < 1e-6); // g row 1
        assert!((out[8] - 0.5).abs() < 1e-6); // b
    }

    #[test]
    fn small_images_are_sampled_not_read_past() {
        let img = RgbImage::from_packed(1, 1, vec![255, 0, 0]);
        let n = Normaliser::new(&spec(3), Views::Global);
        let mut out = vec![0.0; n.plane_len()];
        n.write(&img, &mut out);
        assert!(out[..9].iter().all(|v| (*v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn working_size_keeps_aspect() {
        let (r, g) = (ResizeRule::ShorterSideCrop, Views::Global);
        assert_eq!(working_size(r, g, 224, 1920, 1080, (1, 1)), (398, 224));
        assert_eq!(working_size(r, g, 224, 1080, 1920, (1, 1)), (224, 398));
        assert_eq!(working_size(r, g, 224, 720, 576, (16, 15)), (299, 224));
        let squash = working_size(ResizeRule::Squash, g, 224, 1920, 1080, (1, 1));
        assert_eq!(squash, (224, 224));
        let c = Views::Crops(std::num::NonZeroUsize::new(5).unwrap());
        // 1080p: shorter side capped at 3 x 224; 480p: native; tiny: never below 224.
        let big = working_size(ResizeRule::Squash, c, 224, 1920, 1080, (1, 1));
        assert_eq!(big, (1195, 672));
        assert_eq!(working_size(r, c, 224, 854, 480, (1, 1)), (854, 480));
        assert_eq!(working_size(r, c, 224, 160, 120, (1, 1)), (299, 224));
    }

    #[test]
    fn crops_cover_the_frame_inside_its_bounds() {
        let five = Views::Crops(std::num::NonZeroUsize::new(5).unwrap());
        let n = Normaliser::new(&spec(4), five);
        let img = RgbImage::from_packed(16, 8, (0..16 * 8 * 3).map(|i| (i % 251) as u8).collect());
        let o = n.view_origins(&img);
        assert_eq!(o.len(), 5);
        assert!(o.iter().all(|&(x, y)| x + 4 <= 16 && y + 4 <= 8), "{o:?}");
        assert!(
            o.contains(&(0, 0)) && o.contains(&(12, 4)),
            "corners covered: {o:?}"
        );
        let mut out = vec![0.0; 5 * n.plane_len()];
        n.write_views(&img, &mut out);
        let mut one = vec![0.0; n.plane_len()];
        let (x, y) = o[4];
        n.write_at(&img, x, y, &mut one);
        assert_eq!(&out[4 * n.plane_len()..], &one[..]);
    }
}
