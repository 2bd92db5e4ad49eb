//! The unit that flows from ingest to scoring: one sampled RGB frame, still in the
//! GStreamer buffer it was decoded into (no copy), with its stream, times and the QC
//! statistics ingest computed for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use gstreamer as gst;

static NEXT_FRAME_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique, increasing frame id (used by the API and the label store).
pub fn next_frame_id() -> u64 {
    NEXT_FRAME_ID.fetch_add(1, Ordering::Relaxed)
}

/// Packed RGB pixels: a mapped GStreamer buffer or an owned vector.
pub enum Pixels {
    /// The appsink's buffer, mapped read-only.
    Mapped(gst::buffer::MappedBuffer<gst::buffer::Readable>),
    /// Pixels owned by Rust (still images, tests).
    Owned(Vec<u8>),
}

impl Pixels {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m.as_slice(),
            Self::Owned(v) => v,
        }
    }
}

/// An RGB image with a row stride, as GStreamer lays it out.
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Bytes per row (at least 3 * width).
    pub stride: usize,
    /// The pixels.
    pub pixels: Pixels,
}

/// BT.601 luma of one packed RGB pixel in 1/256 steps: 77 R + 150 G + 29 B (the weights
/// sum to 256, so the result lies in 0..=255 * 256).
pub fn luma256(px: &[u8]) -> u32 {
    77 * px[0] as u32 + 150 * px[1] as u32 + 29 * px[2] as u32
}

impl RgbImage {
    /// Row `y` as packed RGB bytes.
    pub fn row(&self, y: usize) -> &[u8] {
        let start = y * self.stride;
        &self.pixels.as_slice()[start..start + 3 * self.width]
    }

    /// An image from tightly packed RGB bytes.
    pub fn from_packed(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * 3, "packed RGB size");
        Self {
            width,
            height,
            stride: width * 3,
            pixels: Pixels::Owned(data),
        }
    }
}

/// One sampled frame on its way to the model.
pub struct Frame {
    /// Process-unique id.
    pub id: u64,
    /// Index of the stream (or scanned file) it came from.
    pub stream: usize,
    /// Stream time in seconds (buffer PTS), if known.
    pub pts: Option<f64>,
    /// Wall-clock capture time.
    pub captured: SystemTime,
    /// When the appsink handed it over (for latency).
    pub arrived: Instant,
    /// Buffer duration in seconds, if known.
    pub duration: Option<f64>,
    /// The pixels at the model's working size (shared with the freeze detector).
    pub image: Arc<RgbImage>,
}

/// A frame with its scores, as published to per-stream state and the recent-frame ring.
pub struct ScoredFrame {
    /// The frame.
    pub frame: Frame,
    /// Quality score in [0, 1].
    pub score: f32,
    /// Attribute scores, in the prompt set's attribute order.
    pub attributes: Vec<f32>,
    /// L2-normalised image embedding (cached for labelling).
    pub embedding: Vec<f32>,
    /// Version of the prompt set that scored it.
    pub prompt_version: u64,
}
