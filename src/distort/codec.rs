//! Codec round trips: JPEG (jpeg-encoder, decoded with `image`) and H.264 intra coding
//! through GStreamer (`x264enc` at a fixed quantiser, decoded by `avdec_h264`).

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::Image;

/// Why a codec round trip failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The JPEG encoder refused the picture.
    #[error("JPEG encode: {0}")]
    JpegEncode(#[source] jpeg_encoder::EncodingError),
    /// The JPEG just written could not be decoded.
    #[error("JPEG decode: {0}")]
    JpegDecode(#[source] image::ImageError),
    /// A quantiser x264enc would silently ignore.
    #[error("H.264 quantiser {0}: x264enc accepts 0..=50")]
    Quantiser(u32),
    /// GStreamer could not be initialised.
    #[error("H.264 round trip: GStreamer: {0}")]
    Init(#[source] gst::glib::Error),
    /// The pipeline could not be built (a plugin is missing).
    #[error(
        "H.264 round trip needs x264enc (gstreamer1.0-plugins-ugly) and avdec_h264 \
         (gstreamer1.0-libav): {0}"
    )]
    Pipeline(#[source] gst::glib::Error),
    /// A step of the running pipeline failed; `step` names it.
    #[error("H.264 {step}: {message}")]
    H264 {
        /// The step: pipeline, push, EOS, pull, map.
        step: &'static str,
        /// What GStreamer said.
        message: String,
    },
}

impl CodecError {
    fn h264(step: &'static str, message: impl std::fmt::Display) -> Self {
        Self::H264 {
            step,
            message: message.to_string(),
        }
    }
}

/// Encodes at `quality` (1..=100) and decodes again.
pub fn jpeg_roundtrip(img: &Image, quality: u8) -> Result<Image, CodecError> {
    let mut buf = Vec::new();
    jpeg_encoder::Encoder::new(&mut buf, quality)
        .encode(
            &img.to_rgb8(),
            img.w as u16,
            img.h as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .map_err(CodecError::JpegEncode)?;
    let dec = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
        .map_err(CodecError::JpegDecode)?
        .to_rgb8();
    Ok(Image::from_rgb8(img.w, img.h, dec.as_raw()))
}

/// Encodes one frame with H.264 at quantiser `qp` (0..=50) and decodes it again.
/// Odd sizes are padded by edge replication for 4:2:0 and cropped back.
pub fn h264_roundtrip(img: &Image, qp: u32) -> Result<Image, CodecError> {
    // x264enc's `quantizer` property stops at 50; a larger value is not clamped but
    // ignored with a warning, leaving the default (21): an almost clean picture.
    if qp > 50 {
        return Err(CodecError::Quantiser(qp));
    }
    gst::init().map_err(CodecError::Init)?;
    let (w, h) = (img.w + img.w % 2, img.h + img.h % 2);
    // GStreamer's packed RGB rows start on 4-byte boundaries: a width whose rows are not
    // a multiple of 4 bytes (e.g. 614 px) needs the padding, or the frame is misread.
    let stride = (w * 3 + 3) & !3;
    let mut rgb = vec![0u8; stride * h];
    for y in 0..h {
        let row = &mut rgb[y * stride..][..w * 3];
        for x in 0..w {
            let (sx, sy) = (x.min(img.w - 1), y.min(img.h - 1));
            for (d, v) in row[x * 3..][..3]
                .iter_mut()
                .zip(&img.px[(sy * img.w + sx) * 3..][..3])
            {
                *d = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    let launch = format!(
        "appsrc name=src format=time caps=video/x-raw,format=RGB,width={w},height={h},framerate=25/1 \
         ! videoconvert ! video/x-raw,format=I420 \
         ! x264enc pass=quant quantizer={qp} speed-preset=medium key-int-max=1 \
         ! avdec_h264 ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
    );
    let pipeline = gst::parse::launch(&launch)
        .map_err(CodecError::Pipeline)?
        .downcast::<gst::Pipeline>()
        .map_err(|_| CodecError::h264("pipeline", "not a pipeline"))?;
    let src = pipeline
        .by_name("src")
        .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
        .ok_or_else(|| CodecError::h264("pipeline", "no appsrc"))?;
    let sink = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or_else(|| CodecError::h264("pipeline", "no appsink"))?;
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| CodecError::h264("pipeline", e))?;
    let mut buffer = gst::Buffer::from_mut_slice(rgb);
    buffer
        .get_mut()
        .expect("a new buffer is writable")
        .set_pts(gst::ClockTime::ZERO);
    let result = (|| {
        src.push_buffer(buffer)
            .map_err(|e| CodecError::h264("push", e))?;
        src.end_of_stream()
            .map_err(|e| CodecError::h264("EOS", e))?;
        let sample = sink
            .try_pull_sample(gst::ClockTime::from_seconds(30))
            .ok_or_else(|| CodecError::h264("round trip", "produced no frame"))?;
        let buf = sample
            .buffer()
            .ok_or_else(|| CodecError::h264("pull", "no buffer"))?;
        let info = sample
            .caps()
            .and_then(|c| gstreamer_video::VideoInfo::from_caps(c).ok())
            .ok_or_else(|| CodecError::h264("pull", "no caps"))?;
        let map = buf.map_readable().map_err(|e| CodecError::h264("map", e))?;
        let stride = info.stride()[0] as usize;
        let mut px = Vec::with_capacity(img.w * img.h * 3);
        for y in 0..img.h {
            px.extend(
                map[y * stride..][..img.w * 3]
                    .iter()
                    .map(|v| *v as f32 / 255.0),
            );
        }
        Ok(Image {
            w: img.w,
            h: img.h,
            px,
        })
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth picture with some texture, `w` x `h`.
    fn picture(w: usize, h: usize) -> Image {
        let px = (0..w * h * 3)
            .map(|i| {
                let (x, y, c) = ((i / 3) % w, (i / 3) / w, i % 3);
                let t = (x as f32 * 0.2).sin() * (y as f32 * 0.15).cos() * 0.2;
                (0.2 + 0.5 * x as f32 / w as f32 + t + c as f32 * 0.1).clamp(0.0, 1.0)
            })
            .collect();
        Image { w, h, px }
    }

    /// Widths whose RGB rows are not a multiple of 4 bytes (and odd sizes) come back as
    /// the same picture, not a shifted or blank one (614 px wide once gave a flat green).
    #[test]
    fn h264_keeps_the_picture_at_any_width() {
        for (w, h) in [(64, 48), (614, 38), (577, 33), (70, 41)] {
            let img = picture(w, h);
            let out = h264_roundtrip(&img, 30).expect("H.264 round trip");
            assert_eq!((out.w, out.h), (w, h));
            let mad = out
                .px
                .iter()
                .zip(&img.px)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / img.px.len() as f32;
            assert!(mad < 0.03, "{w}x{h}: mean abs difference {mad}");
        }
    }
}
