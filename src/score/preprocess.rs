//! Pixels -> model input. GStreamer already scaled the frame (shorter side to the
//! model's size, or both sides for `squash`); what is left is the centre crop and
//! per-channel normalisation, done in one pass with a lookup table straight into the
//! batch tensor.

use crate::config::Views;
use crate::frame::{RgbImage, luma256};
use crate::score::bundle::{InputSpec, ResizeRule};

/// For `crops:N`, frames are delivered with their shorter side at most this many times
/// the model's input size (native resolution when smaller), so each crop sees the
/// picture at native or moderately reduced scale. 2 rather than 3: on 1080-px frames
/// the shipped model ranks distortions better with crops of a 448-px frame than of a
/// 672-px one, at every crop count tried (models/README.md).
pub const CROP_SCALE: u32 = 2;

/// The working frame's longer side is at most this many times its shorter side: wider
/// than any real format (32:9 is 3.6), so only a broken or hostile source (2048x8, a
/// pixel aspect of 1000:1) is squeezed, instead of making frames of tens of megabytes.
pub const MAX_ASPECT: u32 = 4;

/// For `crops:N` and `mixed:N`, the grid holds this many candidate regions per crop scored.
pub const CANDIDATES_PER_CROP: usize = 2;

/// For `mixed:N`, the whole frame's share of the frame's score and embedding; the N
/// crops share the rest equally. The whole frame ranks exposure, colour and content
/// better, the crops blur and compression once a frame is much larger than the model's
/// input; of the shares measured (0.15 to 0.6, models/README.md) a quarter kept most of
/// both: the crops' ranking at 1080 px within 0.015 and the whole frame's gain on
/// 384-px pictures by more than half.
pub const MIXED_GLOBAL_WEIGHT: f32 = 0.25;

/// Normalisation lookup tables: `lut[c][v] = (v / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone)]
pub struct Normaliser {
    size: usize,
    lut: [[f32; 256]; 3],
    views: Views,
    resize: ResizeRule,
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
            resize: input.resize,
        }
    }

    /// Model inputs per frame (1 for `global`, N for `crops:N`, N + 1 for `mixed:N`).
    pub fn views_per_frame(&self) -> usize {
        usize::from(self.views.has_global()) + self.views.crops()
    }

    /// Each view's share of the frame's score and embedding, in the order
    /// [`Normaliser::write_views`] writes them (they sum to 1).
    pub fn view_weights(&self) -> Vec<f32> {
        let crops = self.views.crops();
        match self.views {
            Views::Global => vec![1.0],
            Views::Crops(_) => vec![1.0 / crops as f32; crops],
            Views::Mixed(_) => std::iter::once(MIXED_GLOBAL_WEIGHT)
                .chain(std::iter::repeat_n(
                    (1.0 - MIXED_GLOBAL_WEIGHT) / crops as f32,
                    crops,
                ))
                .collect(),
        }
    }

    /// Whether the model sees one centred region (`global`) rather than crops.
    pub fn is_global(&self) -> bool {
        self.views == Views::Global
    }

    /// Top-left corners of the `size x size` regions the model sees in `img` at native
    /// scale: the centre for `global`; for `crops:N` and the crops of `mixed:N`, the N
    /// most detailed (largest luma standard deviation) of `CANDIDATES_PER_CROP * N`
    /// regions spread over the frame, in grid order. Flat regions (sky, a soft
    /// background, letterbox bars) say little about blur or compression and pull a
    /// clean frame's score down (models/README.md).
    pub fn view_origins(&self, img: &RgbImage) -> Vec<(usize, usize)> {
        let n = match self.views {
            Views::Global => return vec![self.crop_origin(img)],
            Views::Crops(n) | Views::Mixed(n) => n.get(),
        };
        let grid = self.grid_origins(img, CANDIDATES_PER_CROP * n);
        let detail: Vec<f64> = grid
            .iter()
            .map(|&(x, y)| self.luma_spread(img, x, y))
            .collect();
        let mut order: Vec<usize> = (0..grid.len()).collect();
        order.sort_by(|&a, &b| detail[b].total_cmp(&detail[a]).then(a.cmp(&b)));
        order.truncate(n);
        order.sort_unstable();
        order.into_iter().map(|i| grid[i]).collect()
    }

    /// `k` regions spread evenly over a grid of about `img`'s aspect ratio (row-major,
    /// deterministic; corners included).
    pub fn grid_origins(&self, img: &RgbImage, k: usize) -> Vec<(usize, usize)> {
        let s = self.size;
        let aspect = img.width as f64 / img.height.max(1) as f64;
        let cols = ((k as f64 * aspect).sqrt().round() as usize).clamp(1, k.max(1));
        let rows = k.div_ceil(cols);
        let (free_x, free_y) = (img.width.saturating_sub(s), img.height.saturating_sub(s));
        let spread = |i: usize, k: usize, free: usize| {
            if k == 1 { free / 2 } else { free * i / (k - 1) }
        };
        (0..k)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                // The last row may hold fewer regions: spread those over the full width too.
                let in_row = if r == rows - 1 { k - r * cols } else { cols };
                (spread(c, in_row, free_x), spread(r, rows, free_y))
            })
            .collect()
    }

    /// Standard deviation of the luma (BT.601 weights, 0-255) of the region at `(x0, y0)`.
    fn luma_spread(&self, img: &RgbImage, x0: usize, y0: usize) -> f64 {
        let w = self.size.min(img.width.saturating_sub(x0));
        let h = self.size.min(img.height.saturating_sub(y0));
        let (mut sum, mut squares) = (0u64, 0u64);
        for y in y0..y0 + h {
            // A row's sums fit in 32 bits (65,025 per pixel, rows far below 66,000
            // pixels), which lets the compiler use vector lanes of 32 bits.
            let (mut s, mut q) = (0u32, 0u32);
            for px in img.row(y)[3 * x0..3 * (x0 + w)].chunks_exact(3) {
                let l = luma256(px) >> 8;
                s += l;
                q += l * l;
            }
            sum += u64::from(s);
            squares += u64::from(q);
        }
        let count = (w * h) as u64;
        if count == 0 {
            return 0.0;
        }
        let mean = sum as f64 / count as f64;
        (squares as f64 / count as f64 - mean * mean)
            .max(0.0)
            .sqrt()
    }

    /// Writes every view of `img` (`views_per_frame` planes of `[3, size, size]`): for
    /// `mixed:N` the whole frame first, reduced to the input size, then the crops.
    pub fn write_views(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = self.plane_len();
        let out = if matches!(self.views, Views::Mixed(_)) {
            let (whole, rest) = out.split_at_mut(plane);
            self.write_reduced(img, whole);
            rest
        } else {
            out
        };
        for ((x0, y0), o) in self
            .view_origins(img)
            .into_iter()
            .zip(out.chunks_exact_mut(plane))
        {
            self.write_at(img, x0, y0, o);
        }
    }

    /// Writes the region the manifest's resize rule makes of a whole frame (the centred
    /// square for `shorter_side_crop`, everything for `squash`), area-averaged down to
    /// `size x size`: what `global` views see, from a frame delivered larger for crops.
    pub fn write_reduced(&self, img: &RgbImage, out: &mut [f32]) {
        let s = self.size;
        assert_eq!(out.len(), self.plane_len(), "output plane size");
        let (x0, y0, w, h) = match self.resize {
            ResizeRule::Squash => (0, 0, img.width, img.height),
            ResizeRule::ShorterSideCrop => {
                let m = img.width.min(img.height);
                ((img.width - m) / 2, (img.height - m) / 2, m, m)
            }
        };
        if w == 0 || h == 0 {
            out.fill(0.0);
            return;
        }
        // Source span [start, end) of each output column / row; at least one pixel.
        let spans = |len: usize, origin: usize| -> Vec<(usize, usize)> {
            (0..s)
                .map(|i| {
                    let a = origin + i * len / s;
                    (a, (origin + (i + 1) * len / s).max(a + 1))
                })
                .collect()
        };
        let (xs, ys) = (spans(w, x0), spans(h, y0));
        // The tables are affine in the 0-255 value: lut[v] = lut[0] + v * (lut[1] - lut[0]).
        let affine: [(f32, f32); 3] =
            std::array::from_fn(|c| (self.lut[c][0], self.lut[c][1] - self.lut[c][0]));
        let (r, rest) = out.split_at_mut(s * s);
        let (g, b) = rest.split_at_mut(s * s);
        let mut sums = vec![[0u32; 3]; s];
        for (oy, &(ya, yb)) in ys.iter().enumerate() {
            sums.iter_mut().for_each(|v| *v = [0; 3]);
            for y in ya..yb {
                let row = img.row(y);
                for (acc, &(xa, xb)) in sums.iter_mut().zip(&xs) {
                    for px in row[3 * xa..3 * xb].chunks_exact(3) {
                        acc[0] += u32::from(px[0]);
                        acc[1] += u32::from(px[1]);
                        acc[2] += u32::from(px[2]);
                    }
                }
            }
            for (ox, (acc, &(xa, xb))) in sums.iter().zip(&xs).enumerate() {
                let n = ((xb - xa) * (yb - ya)) as f32;
                let o = oy * s + ox;
                for (plane, (c, &(base, step))) in [&mut *r, &mut *g, &mut *b]
                    .into_iter()
                    .zip(affine.iter().enumerate())
                {
                    plane[o] = base + step * acc[c] as f32 / n;
                }
            }
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
/// pixel aspect ratio `par` (numerator, denominator). For `crops:N` and `mixed:N` the shorter side
/// is the native one, capped at `CROP_SCALE` times the input size (never below it). The
/// longer side is capped at [`MAX_ASPECT`] times the shorter.
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
        Views::Crops(_) | Views::Mixed(_) => ResizeRule::ShorterSideCrop,
    };
    let size = match views {
        Views::Global => size,
        Views::Crops(_) | Views::Mixed(_) => width.min(height).clamp(size, CROP_SCALE * size),
    };
    match rule {
        ResizeRule::Squash => (size, size),
        ResizeRule::ShorterSideCrop => {
            let (pn, pd) = (par.0.max(1) as f64, par.1.max(1) as f64);
            let dw = width.max(1) as f64 * pn / pd;
            let dh = height.max(1) as f64;
            let s = size as f64;
            let long = |ratio: f64| ((ratio * s).round() as u32).clamp(size, MAX_ASPECT * size);
            if dw >= dh {
                (long(dw / dh), size)
            } else {
                (size, long(dh / dw))
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
        // 1080p: shorter side capped at 2 x 224; 400p: native; tiny: never below 224.
        let big = working_size(ResizeRule::Squash, c, 224, 1920, 1080, (1, 1));
        assert_eq!(big, (796, 448));
        assert_eq!(working_size(r, c, 224, 712, 400, (1, 1)), (712, 400));
        assert_eq!(working_size(r, c, 224, 160, 120, (1, 1)), (299, 224));
        // A hostile shape or pixel aspect: the longer side stays within 4x the shorter.
        assert_eq!(working_size(r, g, 224, 2048, 8, (1, 1)), (896, 224));
        assert_eq!(working_size(r, g, 224, 8, 2048, (1, 1)), (224, 896));
        assert_eq!(working_size(r, g, 224, 640, 480, (1000, 1)), (896, 224));
        assert_eq!(working_size(r, c, 224, 4096, 16, (1, 1)), (896, 224));
        assert_eq!(
            working_size(r, g, 224, 3840, 1080, (1, 1)),
            (796, 224),
            "32:9 kept"
        );
    }

    #[test]
    fn crops_cover_the_frame_inside_its_bounds() {
        let five = Views::Crops(std::num::NonZeroUsize::new(5).unwrap());
        let n = Normaliser::new(&spec(4), five);
        let img = RgbImage::from_packed(16, 8, (0..16 * 8 * 3).map(|i| (i % 251) as u8).collect());
        let o = n.grid_origins(&img, 5);
        assert_eq!(o.len(), 5);
        assert!(o.iter().all(|&(x, y)| x + 4 <= 16 && y + 4 <= 8), "{o:?}");
        assert!(
            o.contains(&(0, 0)) && o.contains(&(12, 4)),
            "corners covered: {o:?}"
        );
        let o = n.view_origins(&img);
        assert_eq!(o.len(), 5, "{o:?}");
        let mut out = vec![0.0; 5 * n.plane_len()];
        n.write_views(&img, &mut out);
        let mut one = vec![0.0; n.plane_len()];
        let (x, y) = o[4];
        n.write_at(&img, x, y, &mut one);
        assert_eq!(&out[4 * n.plane_len()..], &one[..]);
    }

    #[test]
    fn crops_are_the_most_detailed_regions() {
        // 32x8: the left half flat grey, the right half a checkerboard. Of the 2 x 2
        // candidates of crops:2 (8x8 each, a 4 x 1 grid), the two on the right are kept.
        let mut data = Vec::new();
        for y in 0..8usize {
            for x in 0..32usize {
                let v = if x < 16 {
                    128
                } else if (x + y) % 2 == 0 {
                    40
                } else {
                    220
                };
                data.extend([v, v, v]);
            }
        }
        let img = RgbImage::from_packed(32, 8, data);
        let two = Views::Crops(std::num::NonZeroUsize::new(2).unwrap());
        let n = Normaliser::new(&spec(8), two);
        assert_eq!(n.grid_origins(&img, 4), [(0, 0), (8, 0), (16, 0), (24, 0)]);
        assert_eq!(n.view_origins(&img), [(16, 0), (24, 0)]);
        // A flat frame keeps the first regions of the grid (deterministic).
        let flat = RgbImage::from_packed(32, 8, vec![90; 32 * 8 * 3]);
        assert_eq!(n.view_origins(&flat), [(0, 0), (8, 0)]);
        assert!(Normaliser::new(&spec(8), Views::Global).is_global() && !n.is_global());
    }

    #[test]
    fn mixed_views_are_the_reduced_frame_then_the_crops() {
        // 16x8 frame for an input of 4: the whole-frame view is the centred 8x8 square
        // averaged in 2x2 blocks; then the crops, as crops:2 writes them.
        let data: Vec<u8> = (0..16 * 8)
            .flat_map(|i| {
                let (x, y) = (i % 16, i / 16);
                [(x * 10) as u8, (y * 20) as u8, 7]
            })
            .collect();
        let img = RgbImage::from_packed(16, 8, data);
        let two = std::num::NonZeroUsize::new(2).unwrap();
        let mixed = Normaliser::new(&spec(4), Views::Mixed(two));
        let crops = Normaliser::new(&spec(4), Views::Crops(two));
        assert_eq!(mixed.views_per_frame(), 3);
        assert_eq!(mixed.view_weights(), [0.25, 0.375, 0.375]);
        assert_eq!(crops.view_weights(), [0.5, 0.5]);
        assert!(!mixed.is_global());
        let plane = mixed.plane_len();
        let mut out = vec![f32::NAN; 3 * plane];
        mixed.write_views(&img, &mut out);
        let mut want = vec![0.0; 2 * plane];
        crops.write_views(&img, &mut want);
        assert_eq!(&out[plane..], &want[..], "the crops follow the whole frame");
        // Whole-frame pixel (1, 2): source x 6..8 (mean 65), y 4..6 (mean 90), blue 7;
        // spec: (v / 255 - 0.5) / [0.5, 0.25, 1.0].
        let expect = |v: f32, c: usize| (v / 255.0 - 0.5) / [0.5, 0.25, 1.0][c];
        let (s, o) = (4, 2 * 4 + 1);
        for (c, v) in [65.0, 90.0, 7.0].into_iter().enumerate() {
            let got = out[c * s * s + o];
            assert!((got - expect(v, c)).abs() < 1e-5, "channel {c}: {got}");
        }
        // `squash` models see the whole frame: x 4..8 (mean 55) for column 1.
        let squash = InputSpec {
            resize: ResizeRule::Squash,
            ..spec(4)
        };
        let mut whole = vec![0.0; plane];
        Normaliser::new(&squash, Views::Mixed(two)).write_reduced(&img, &mut whole);
        assert!((whole[o] - expect(55.0, 0)).abs() < 1e-5, "{}", whole[o]);
        // Frames are delivered at crop size for mixed views too.
        let hd = working_size(
            ResizeRule::Squash,
            Views::Mixed(two),
            224,
            1920,
            1080,
            (1, 1),
        );
        assert_eq!(hd, (796, 448));
    }
}
