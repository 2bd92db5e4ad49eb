//! Synthetic distortions in the spirit of KADID-10k: 13 types at 5 levels each,
//! deterministic for a given seed, for meta-prompt pre-training tasks and for
//! evaluation sets (`streamiq distort`).
//!
//! One more type, [`Kind::ColorCast`], is outside the default set ([`Kind::ALL`]) and
//! only made when asked for ([`Kind::EXTRA`]): it is the family reserved for few-shot
//! recalibration evidence, so the shipped model is never trained on it.
//!
//! Images are RGB, `f32` in 0..=1, row-major `[h][w][3]`. Level 1 is mild, level 5
//! severe; the quality target written to the CSV decreases with the level. Each kind's
//! parameter at each level comes from `src/distort/levels.toml` ([`params`]), the table
//! the training scripts read too.

pub mod codec;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

pub use codec::CodecError;

/// Why a distortion set could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DistortError {
    /// A source picture could not be read or decoded.
    #[error("{}: {source}", path.display())]
    Read {
        /// The picture.
        path: PathBuf,
        /// Why.
        source: image::ImageError,
    },
    /// A distorted picture could not be encoded or written.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: image::ImageError,
    },
    /// The output directory or the label file could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A codec round trip failed for one picture, kind and level.
    #[error("{key}: {source}")]
    Codec {
        /// `source stem/kind/level`.
        key: String,
        /// Why.
        source: CodecError,
    },
}

/// The parameter table, `src/distort/levels.toml`, as compiled in.
pub const LEVELS_TOML: &str = include_str!("levels.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelsFile {
    levels: HashMap<String, [f64; LEVELS as usize]>,
    extra_levels: HashMap<String, [f64; LEVELS as usize]>,
}

static PARAMS: LazyLock<HashMap<String, [f64; LEVELS as usize]>> = LazyLock::new(|| {
    let file: LevelsFile = toml::from_str(LEVELS_TOML).expect("src/distort/levels.toml parses");
    file.levels.into_iter().chain(file.extra_levels).collect()
});

/// The parameter of `kind` at levels 1..=5, from `src/distort/levels.toml` (a unit test
/// checks that every kind has its row there).
pub fn params(kind: Kind) -> [f64; LEVELS as usize] {
    *PARAMS
        .get(kind.name())
        .unwrap_or_else(|| panic!("src/distort/levels.toml has no row {}", kind.name()))
}

/// An RGB image in 0..=1.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Width.
    pub w: usize,
    /// Height.
    pub h: usize,
    /// `h * w * 3` values, row-major, RGB.
    pub px: Vec<f32>,
}

impl Image {
    /// From 8-bit RGB.
    pub fn from_rgb8(w: usize, h: usize, data: &[u8]) -> Self {
        Self {
            w,
            h,
            px: data.iter().map(|v| *v as f32 / 255.0).collect(),
        }
    }

    /// To 8-bit RGB (rounded, clamped).
    pub fn to_rgb8(&self) -> Vec<u8> {
        self.px
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }

    fn map(&self, f: impl Fn(f32) -> f32) -> Self {
        Self {
            w: self.w,
            h: self.h,
            px: self.px.iter().map(|v| f(*v).clamp(0.0, 1.0)).collect(),
        }
    }

    fn at(&self, x: isize, y: isize, c: usize) -> f32 {
        let x = x.clamp(0, self.w as isize - 1) as usize;
        let y = y.clamp(0, self.h as isize - 1) as usize;
        self.px[(y * self.w + x) * 3 + c]
    }
}

/// A distortion family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Gaussian blur.
    GaussianBlur,
    /// Linear motion blur at a seeded angle.
    MotionBlur,
    /// Additive white Gaussian noise.
    GaussianNoise,
    /// Salt-and-pepper noise.
    ImpulseNoise,
    /// JPEG compression (blockiness, ringing).
    Jpeg,
    /// H.264 intra coding at a high quantiser (video-codec blockiness), via GStreamer.
    H264,
    /// Down-scaling then up-scaling.
    Rescale,
    /// Contrast reduction.
    Contrast,
    /// Brightness shift (over- or under-exposure, alternating by source).
    Brightness,
    /// Colour saturation loss.
    Desaturate,
    /// Quantisation to few levels (banding).
    Quantize,
    /// Over-sharpening (halos, ringing).
    Oversharpen,
    /// Pixelation (nearest-neighbour blocks).
    Pixelate,
    /// Colour cast (white-balance error): per-channel gains towards a seeded warm,
    /// cool, green or magenta direction. Not in [`Kind::ALL`]; see [`Kind::EXTRA`].
    ColorCast,
}

impl Kind {
    /// The default set: every standard kind, in a stable order (what `streamiq
    /// distort` makes when `--kinds` is not given).
    pub const ALL: [Kind; 13] = [
        Kind::GaussianBlur,
        Kind::MotionBlur,
        Kind::GaussianNoise,
        Kind::ImpulseNoise,
        Kind::Jpeg,
        Kind::H264,
        Kind::Rescale,
        Kind::Contrast,
        Kind::Brightness,
        Kind::Desaturate,
        Kind::Quantize,
        Kind::Oversharpen,
        Kind::Pixelate,
    ];

    /// Kinds only made when asked for with `--kinds`: families held out of the default
    /// set (and so out of training), reserved for few-shot recalibration evidence.
    pub const EXTRA: [Kind; 1] = [Kind::ColorCast];

    /// The name used in file names and the CSV.
    pub fn name(self) -> &'static str {
        match self {
            Kind::GaussianBlur => "gaussian_blur",
            Kind::MotionBlur => "motion_blur",
            Kind::GaussianNoise => "gaussian_noise",
            Kind::ImpulseNoise => "impulse_noise",
            Kind::Jpeg => "jpeg",
            Kind::H264 => "h264",
            Kind::Rescale => "rescale",
            Kind::Contrast => "contrast",
            Kind::Brightness => "brightness",
            Kind::Desaturate => "desaturate",
            Kind::Quantize => "quantize",
            Kind::Oversharpen => "oversharpen",
            Kind::Pixelate => "pixelate",
            Kind::ColorCast => "color_cast",
        }
    }

    /// Parses a name (of a kind in [`Kind::ALL`] or [`Kind::EXTRA`]).
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .chain(Kind::EXTRA)
            .find(|k| k.name() == s)
    }
}

/// Levels per kind.
pub const LEVELS: u8 = 5;

/// Quality target for a level: 1.0 for the pristine image (level 0) down to 1/6 at 5.
pub fn quality_target(level: u8) -> f64 {
    1.0 - level as f64 / (LEVELS as f64 + 1.0)
}

/// Applies `kind` at `level` (1..=5) with the parameter [`params`] gives it. `rng`
/// drives noise and angles.
pub fn apply(
    img: &Image,
    kind: Kind,
    level: u8,
    rng: &mut fastrand::Rng,
) -> Result<Image, CodecError> {
    assert!((1..=LEVELS).contains(&level), "level 1..=5");
    let p = params(kind)[(level - 1) as usize];
    // (The file's decimals are read as f64; as f32 they are the values the table
    // held as f32 literals. Integer parameters are whole numbers.)
    let (pf, pi) = (p as f32, p as usize);
    Ok(match kind {
        Kind::GaussianBlur => gaussian_blur(img, pf),
        Kind::MotionBlur => {
            let angle = rng.f32() * std::f32::consts::PI;
            motion_blur(img, pi, angle)
        }
        Kind::GaussianNoise => {
            let sigma = pf;
            Image {
                w: img.w,
                h: img.h,
                px: img
                    .px
                    .iter()
                    .map(|v| (v + sigma * gauss(rng)).clamp(0.0, 1.0))
                    .collect(),
            }
        }
        Kind::ImpulseNoise => {
            let mut out = img.clone();
            for px in out.px.chunks_exact_mut(3) {
                if rng.f32() < pf {
                    let v = if rng.bool() { 1.0 } else { 0.0 };
                    px.fill(v);
                }
            }
            out
        }
        Kind::Jpeg => codec::jpeg_roundtrip(img, pi as u8)?,
        Kind::H264 => codec::h264_roundtrip(img, pi as u32)?,
        Kind::Rescale => rescale(img, pf),
        Kind::Contrast => {
            let k = pf;
            let mean = img.px.iter().sum::<f32>() / img.px.len().max(1) as f32;
            img.map(|v| mean + k * (v - mean))
        }
        Kind::Brightness => {
            let d = pf;
            // Alternate over- and under-exposure by image so both appear in a set.
            let up = img.px.len().is_multiple_of(2) || rng.bool();
            let g: f32 = if up { 1.0 - d } else { 1.0 + 2.0 * d };
            img.map(|v| v.powf(g) + if up { d * 0.5 } else { 0.0 })
        }
        Kind::Desaturate => {
            let k = pf;
            let mut out = img.clone();
            for px in out.px.chunks_exact_mut(3) {
                let y = 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2];
                for c in px.iter_mut() {
                    *c = y + k * (*c - y);
                }
            }
            out
        }
        Kind::Quantize => {
            let n = pf;
            img.map(|v| (v * (n - 1.0)).round() / (n - 1.0))
        }
        Kind::Oversharpen => {
            let amount = pf;
            let soft = gaussian_blur(img, 1.5);
            Image {
                w: img.w,
                h: img.h,
                px: img
                    .px
                    .iter()
                    .zip(&soft.px)
                    .map(|(v, s)| (v + amount * (v - s)).clamp(0.0, 1.0))
                    .collect(),
            }
        }
        Kind::Pixelate => pixelate(img, pi),
        Kind::ColorCast => {
            let s = pf;
            let dir = cast_direction(rng);
            let mut out = img.clone();
            for px in out.px.chunks_exact_mut(3) {
                for (v, d) in px.iter_mut().zip(dir) {
                    *v = (*v * (1.0 + s * d)).clamp(0.0, 1.0);
                }
            }
            out
        }
    })
}

/// Per-channel (RGB) gain directions of [`Kind::ColorCast`]: warm, cool, green, magenta.
const CAST_DIRECTIONS: [[f32; 3]; 4] = [
    [1.0, 0.0, -1.0],
    [-1.0, 0.0, 1.0],
    [-0.5, 1.0, -0.5],
    [0.5, -1.0, 0.5],
];

/// Draws the colour-cast direction (the first draw of `rng` for [`Kind::ColorCast`]).
fn cast_direction(rng: &mut fastrand::Rng) -> [f32; 3] {
    CAST_DIRECTIONS[rng.usize(..CAST_DIRECTIONS.len())]
}

fn gauss(rng: &mut fastrand::Rng) -> f32 {
    // Box-Muller.
    let u = rng.f32().max(1e-7);
    let v = rng.f32();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
}

fn convolve_1d(img: &Image, kernel: &[f32], horizontal: bool) -> Image {
    let r = (kernel.len() / 2) as isize;
    let mut out = vec![0.0; img.px.len()];
    for y in 0..img.h {
        for x in 0..img.w {
            for c in 0..3 {
                let mut acc = 0.0;
                for (i, k) in kernel.iter().enumerate() {
                    let d = i as isize - r;
                    acc += k * if horizontal {
                        img.at(x as isize + d, y as isize, c)
                    } else {
                        img.at(x as isize, y as isize + d, c)
                    };
                }
                out[(y * img.w + x) * 3 + c] = acc;
            }
        }
    }
    Image {
        w: img.w,
        h: img.h,
        px: out,
    }
}

/// Separable Gaussian blur.
pub fn gaussian_blur(img: &Image, sigma: f32) -> Image {
    let r = (3.0 * sigma).ceil() as isize;
    let mut k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    convolve_1d(&convolve_1d(img, &k, true), &k, false)
}

fn motion_blur(img: &Image, len: usize, angle: f32) -> Image {
    let (dx, dy) = (angle.cos(), angle.sin());
    let half = (len as f32 - 1.0) / 2.0;
    let mut out = vec![0.0; img.px.len()];
    for y in 0..img.h {
        for x in 0..img.w {
            for c in 0..3 {
                let mut acc = 0.0;
                for i in 0..len {
                    let t = i as f32 - half;
                    acc += img.at(
                        (x as f32 + t * dx).round() as isize,
                        (y as f32 + t * dy).round() as isize,
                        c,
                    );
                }
                out[(y * img.w + x) * 3 + c] = acc / len as f32;
            }
        }
    }
    Image {
        w: img.w,
        h: img.h,
        px: out,
    }
}

/// Bilinear resize.
pub fn resize(img: &Image, w: usize, h: usize) -> Image {
    let mut px = Vec::with_capacity(w * h * 3);
    let sx = img.w as f32 / w as f32;
    let sy = img.h as f32 / h as f32;
    for y in 0..h {
        let fy = ((y as f32 + 0.5) * sy - 0.5).max(0.0);
        let (y0, ty) = (fy.floor() as isize, fy.fract());
        for x in 0..w {
            let fx = ((x as f32 + 0.5) * sx - 0.5).max(0.0);
            let (x0, tx) = (fx.floor() as isize, fx.fract());
            for c in 0..3 {
                let a = img.at(x0, y0, c) * (1.0 - tx) + img.at(x0 + 1, y0, c) * tx;
                let b = img.at(x0, y0 + 1, c) * (1.0 - tx) + img.at(x0 + 1, y0 + 1, c) * tx;
                px.push(a * (1.0 - ty) + b * ty);
            }
        }
    }
    Image { w, h, px }
}

/// Area-averaging downscale by an integer-ish factor, then bilinear back up.
fn rescale(img: &Image, factor: f32) -> Image {
    let (w, h) = (
        ((img.w as f32 / factor).round() as usize).max(1),
        ((img.h as f32 / factor).round() as usize).max(1),
    );
    let small = resize(&gaussian_blur(img, factor * 0.5), w, h);
    resize(&small, img.w, img.h)
}

fn pixelate(img: &Image, block: usize) -> Image {
    let mut out = img.clone();
    for by in (0..img.h).step_by(block) {
        for bx in (0..img.w).step_by(block) {
            let (ey, ex) = ((by + block).min(img.h), (bx + block).min(img.w));
            let n = ((ey - by) * (ex - bx)) as f32;
            let mut mean = [0.0f32; 3];
            for y in by..ey {
                for x in bx..ex {
                    for (c, m) in mean.iter_mut().enumerate() {
                        *m += img.px[(y * img.w + x) * 3 + c] / n;
                    }
                }
            }
            for y in by..ey {
                for x in bx..ex {
                    out.px[(y * img.w + x) * 3..][..3].copy_from_slice(&mean);
                }
            }
        }
    }
    out
}

/// One row of the distortion CSV.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Image path relative to the output directory.
    pub path: String,
    /// Quality target (decreasing with level).
    pub mos: f64,
    /// Distortion kind (`reference` for the pristine image).
    pub kind: String,
    /// Level 0..=5.
    pub level: u8,
    /// Source image stem.
    pub source: String,
}

/// Options of `streamiq distort`.
#[derive(Debug, Clone)]
pub struct DistortOptions {
    /// Source images.
    pub sources: Vec<PathBuf>,
    /// Output directory (images/ and labels.csv).
    pub out: PathBuf,
    /// Seed.
    pub seed: u64,
    /// Shorter side of the working size.
    pub size: u32,
    /// Kinds to produce.
    pub kinds: Vec<Kind>,
}

/// Loads an image, resized so that its shorter side is `size`.
pub fn load(path: &Path, size: u32) -> Result<Image, DistortError> {
    let img = image::open(path)
        .map_err(|source| DistortError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let s = size as f32 / w.min(h) as f32;
    // Even sizes keep 4:2:0 codecs (H.264) exact.
    let (nw, nh) = (
        ((w as f32 * s).round() as u32 / 2 * 2).max(2),
        ((h as f32 * s).round() as u32 / 2 * 2).max(2),
    );
    let img = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    Ok(Image::from_rgb8(nw as usize, nh as usize, img.as_raw()))
}

fn save(img: &Image, path: &Path) -> Result<(), DistortError> {
    image::save_buffer(
        path,
        &img.to_rgb8(),
        img.w as u32,
        img.h as u32,
        image::ColorType::Rgb8,
    )
    .map_err(|source| DistortError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Writes `out/images/*.png` and `out/labels.csv` (columns path, mos, type, level,
/// source); `progress` is told each finished source. Returns the rows.
pub fn write_set(
    opts: &DistortOptions,
    progress: impl Fn(usize, usize),
) -> Result<Vec<Row>, DistortError> {
    let dir = opts.out.join("images");
    std::fs::create_dir_all(&dir).map_err(|source| DistortError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut rows = Vec::new();
    for (i, src) in opts.sources.iter().enumerate() {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image")
            .to_string();
        let img = load(src, opts.size)?;
        let name = format!("{stem}_reference_0.png");
        save(&img, &dir.join(&name))?;
        rows.push(Row {
            path: format!("images/{name}"),
            mos: quality_target(0),
            kind: "reference".into(),
            level: 0,
            source: stem.clone(),
        });
        for &kind in &opts.kinds {
            for level in 1..=LEVELS {
                let key = format!("{stem}/{}/{level}", kind.name());
                let mut rng = fastrand::Rng::with_seed(opts.seed ^ stable_hash(&key));
                let out = apply(&img, kind, level, &mut rng)
                    .map_err(|source| DistortError::Codec { key, source })?;
                let name = format!("{stem}_{}_{level}.png", kind.name());
                save(&out, &dir.join(&name))?;
                rows.push(Row {
                    path: format!("images/{name}"),
                    mos: quality_target(level),
                    kind: kind.name().into(),
                    level,
                    source: stem.clone(),
                });
            }
        }
        progress(i + 1, opts.sources.len());
    }
    let mut csv = String::from("path,mos,type,level,source\n");
    for r in &rows {
        let _ = writeln!(
            csv,
            "{},{:.6},{},{},{}",
            r.path, r.mos, r.kind, r.level, r.source
        );
    }
    let p = opts.out.join("labels.csv");
    std::fs::write(&p, csv).map_err(|source| DistortError::Io { path: p, source })?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_image() -> Image {
        let (w, h) = (48, 32);
        let px = (0..w * h * 3)
            .map(|i| {
                let (x, y) = ((i / 3) % w, (i / 3) / w);
                (((x / 6 + y / 6) % 2) as f32 * 0.6 + 0.2 + (i % 3) as f32 * 0.05).min(1.0)
            })
            .collect();
        Image { w, h, px }
    }

    fn energy(img: &Image) -> f32 {
        // Mean absolute horizontal gradient.
        let mut s = 0.0;
        for y in 0..img.h {
            for x in 1..img.w {
                s += (img.px[(y * img.w + x) * 3] - img.px[(y * img.w + x - 1) * 3]).abs();
            }
        }
        s / (img.w * img.h) as f32
    }

    #[test]
    fn deterministic_for_a_seed() {
        let img = test_image();
        for kind in Kind::ALL.into_iter().chain(Kind::EXTRA) {
            if kind == Kind::H264 {
                continue; // needs GStreamer; covered by the integration test
            }
            let a = apply(&img, kind, 3, &mut fastrand::Rng::with_seed(7)).unwrap();
            let b = apply(&img, kind, 3, &mut fastrand::Rng::with_seed(7)).unwrap();
            assert_eq!(a, b, "{kind:?}");
            assert_eq!((a.w, a.h), (img.w, img.h));
            assert_ne!(a, img, "{kind:?} changed nothing at level 3");
        }
    }

    #[test]
    fn blur_strength_grows_with_level() {
        let img = test_image();
        let e: Vec<f32> = (1..=5)
            .map(|l| {
                energy(
                    &apply(
                        &img,
                        Kind::GaussianBlur,
                        l,
                        &mut fastrand::Rng::with_seed(1),
                    )
                    .unwrap(),
                )
            })
            .collect();
        assert!(e.windows(2).all(|w| w[1] < w[0]), "{e:?}");
        assert!(e[0] < energy(&img));
    }

    /// Every kind moves the picture further from the source at level 5 than at level 1
    /// (caught an H.264 quantiser that x264enc silently ignored).
    #[test]
    fn severe_levels_change_more_than_mild_ones() {
        // A 64x64 picture with texture and edges, big enough for the codecs' blocks.
        let (w, h) = (64, 64);
        let px = (0..w * h * 3)
            .map(|i| {
                let (x, y, c) = ((i / 3) % w, (i / 3) / w, i % 3);
                let checker = ((x / 8 + y / 8) % 2) as f32 * 0.4;
                let wave = ((x as f32 * 0.9).sin() * (y as f32 * 0.7).cos()) * 0.15;
                (0.3 + checker + wave + c as f32 * 0.05).clamp(0.0, 1.0)
            })
            .collect();
        let img = Image { w, h, px };
        let mad = |a: &Image| {
            a.px.iter()
                .zip(&img.px)
                .map(|(u, v)| (u - v).abs())
                .sum::<f32>()
                / a.px.len() as f32
        };
        for kind in Kind::ALL.into_iter().chain(Kind::EXTRA) {
            let d: Vec<f32> = [1, 5]
                .into_iter()
                .map(|level| {
                    let mut rng = fastrand::Rng::with_seed(7);
                    mad(&apply(&img, kind, level, &mut rng).expect("distortion applies"))
                })
                .collect();
            assert!(
                d[1] > d[0] * 1.5,
                "{}: level 1 {} vs level 5 {}",
                kind.name(),
                d[0],
                d[1]
            );
        }
    }

    /// Every kind has its row in levels.toml, in `Kind::ALL` order (the training
    /// scripts index kinds by the file's order) and then `Kind::EXTRA`, under the right
    /// table; integer parameters are whole numbers; no row is unknown.
    #[test]
    fn levels_file_has_every_kind_in_order() {
        let file: LevelsFile = toml::from_str(LEVELS_TOML).unwrap();
        let rows: Vec<&str> = LEVELS_TOML
            .lines()
            .filter_map(|l| l.split_once(" = [").map(|(name, _)| name.trim()))
            .collect();
        let kinds: Vec<&str> = Kind::ALL
            .into_iter()
            .chain(Kind::EXTRA)
            .map(Kind::name)
            .collect();
        assert_eq!(rows, kinds);
        for k in Kind::ALL {
            assert!(file.levels.contains_key(k.name()), "{}", k.name());
        }
        for k in Kind::EXTRA {
            assert!(file.extra_levels.contains_key(k.name()), "{}", k.name());
        }
        assert_eq!(
            file.levels.len() + file.extra_levels.len(),
            kinds.len(),
            "unknown rows"
        );
        for k in [
            Kind::MotionBlur,
            Kind::Jpeg,
            Kind::H264,
            Kind::Quantize,
            Kind::Pixelate,
        ] {
            assert!(
                params(k).iter().all(|v| v.fract() == 0.0 && *v >= 1.0),
                "{}",
                k.name()
            );
        }
        // The f32 the daemon uses is the nearest f32 to the decimal in the file.
        for k in kinds.iter().filter_map(|n| Kind::from_name(n)) {
            for v in params(k) {
                let text = format!("{v}");
                assert_eq!(
                    v as f32,
                    text.parse::<f32>().unwrap(),
                    "{} {text}",
                    k.name()
                );
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for k in Kind::ALL.into_iter().chain(Kind::EXTRA) {
            assert_eq!(Kind::from_name(k.name()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
        assert_eq!(Kind::from_name("no_such_kind"), None);
        assert!(quality_target(1) > quality_target(5));
    }

    fn channel_means(img: &Image) -> [f32; 3] {
        let mut m = [0.0f32; 3];
        for px in img.px.chunks_exact(3) {
            for (m, v) in m.iter_mut().zip(px) {
                *m += v;
            }
        }
        m.map(|v| v / (img.w * img.h) as f32)
    }

    #[test]
    fn color_cast_is_extra_seeded_and_grows_with_level() {
        assert!(!Kind::ALL.contains(&Kind::ColorCast));
        assert_eq!(Kind::EXTRA, [Kind::ColorCast]);
        assert_eq!(Kind::from_name("color_cast"), Some(Kind::ColorCast));
        let img = test_image();
        let base = channel_means(&img);
        let mut seen = std::collections::HashSet::new();
        for seed in 0..32u64 {
            let dir = cast_direction(&mut fastrand::Rng::with_seed(seed));
            seen.insert(dir.map(f32::to_bits));
            let mut last = 0.0f32;
            for level in 1..=LEVELS {
                let a = apply(
                    &img,
                    Kind::ColorCast,
                    level,
                    &mut fastrand::Rng::with_seed(seed),
                )
                .unwrap();
                let b = apply(
                    &img,
                    Kind::ColorCast,
                    level,
                    &mut fastrand::Rng::with_seed(seed),
                )
                .unwrap();
                assert_eq!(a, b, "seed {seed} level {level}: not deterministic");
                assert!(a.px.iter().all(|v| (0.0..=1.0).contains(v)));
                let m = channel_means(&a);
                let delta: Vec<f32> = m.iter().zip(base).map(|(m, b)| m - b).collect();
                for c in 0..3 {
                    if dir[c] == 0.0 {
                        assert_eq!(delta[c], 0.0, "seed {seed} level {level} channel {c}");
                    } else {
                        assert!(
                            delta[c] * dir[c] > 0.0,
                            "seed {seed} level {level}: {delta:?} not along {dir:?}"
                        );
                    }
                }
                let along: f32 = delta.iter().zip(dir).map(|(d, u)| d * u).sum();
                assert!(
                    along > last,
                    "seed {seed} level {level}: {along} <= {last} along {dir:?}"
                );
                last = along;
            }
        }
        assert_eq!(
            seen.len(),
            CAST_DIRECTIONS.len(),
            "every direction is drawn"
        );
    }
}
