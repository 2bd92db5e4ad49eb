//! JPEG thumbnails of scored frames, for the stream and label routes.

use crate::frame::{RgbImage, ScoredFrame};
use crate::score::preprocess::Normaliser;

/// The frame as scored, as JPEG: the centre region the model saw for `global`
/// views, the whole working frame for `crops:N` and `mixed:N`.
pub fn encode_jpeg(sf: &ScoredFrame, normaliser: &Normaliser) -> Vec<u8> {
    encode_image_jpeg(&sf.frame.image, normaliser)
}

/// [`encode_jpeg`] of a working-size frame.
pub fn encode_image_jpeg(img: &RgbImage, normaliser: &Normaliser) -> Vec<u8> {
    let (x0, y0, w, h) = if normaliser.is_global() {
        let s = normaliser.size();
        let (x0, y0) = normaliser.crop_origin(img);
        (x0, y0, s.min(img.width), s.min(img.height))
    } else {
        (0, 0, img.width, img.height)
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in y0..y0 + h {
        rgb.extend_from_slice(&img.row(y)[3 * x0..3 * (x0 + w)]);
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 85)
        .encode(&rgb, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
        .expect("encoding into memory does not fail");
    out
}
