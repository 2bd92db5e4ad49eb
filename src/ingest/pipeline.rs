//! One GStreamer pipeline per stream:
//!
//! ```text
//! uridecodebin3 uri=… (uridecodebin for file: URIs) | <launch line>
//!   -> queue (leaky for live sources) -> [sampling probe] -> videoconvertscale
//!   -> capsfilter (RGB at the model's working size) -> appsink
//! ```
//!
//! Sampling (`sample_fps`) is a buffer probe on the queue's output ([`FpsSampler`]):
//! a buffer is kept when its timestamp reaches the next sampling time, or, for a source
//! that gives no timestamps (`multipartdemux ! jpegdec`), by the wall clock; dropped
//! frames are never converted. With `sample = "keyframes"` a probe on every video
//! decoder's input drops delta units before they are decoded, so only key frames cost
//! decoding; the fps sampler then still bounds the rate (a stream of key frames only).
//!
//! The working size is set when the decoder's caps are known: shorter side to the
//! model's input size (aspect kept) for `shorter_side_crop`, or exactly square for
//! `squash`; GStreamer does the scaling and colour conversion. The appsink callback
//! wraps each buffer in a [`Frame`] without copying the pixels and hands it on.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use crate::config::{Source, Views};
use crate::frame::{Frame, Pixels, RgbImage, next_frame_id};
use crate::score::bundle::ResizeRule;
use crate::score::preprocess::working_size;

/// A pipeline that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// GStreamer could not be initialised.
    #[error("GStreamer: {0}")]
    Init(String),
    /// An element is not installed.
    #[error(
        "GStreamer element {0:?} is not installed (Debian: gstreamer1.0-plugins-base/good/bad, gstreamer1.0-libav)"
    )]
    MissingElement(&'static str),
    /// The launch line does not parse.
    #[error("launch line: {0}")]
    Launch(String),
    /// Elements could not be linked or the pipeline refused to start.
    #[error("{0}")]
    Pipeline(String),
}

/// What a pipeline needs to know besides its source.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// Where frames come from.
    pub source: Source,
    /// Frames per second to keep; `None` = every frame.
    pub sample_fps: Option<f64>,
    /// Only key units reach the decoders.
    pub keyframes: bool,
    /// Real-time pacing (a non-live source: clock sync at the sink; a live one: a leaky
    /// queue, no sync, see [`configure_live`]) or as fast as possible.
    pub realtime: bool,
    /// Model input side.
    pub input_size: u32,
    /// How frames are brought to the input size.
    pub resize: ResizeRule,
    /// How the model looks at each frame (decides the working size).
    pub views: Views,
}

/// Name of the appsink in every pipeline.
pub const SINK_NAME: &str = "streamiq-sink";

/// Name of the queue in front of the frame chain.
pub const QUEUE_NAME: &str = "streamiq-queue";

/// For a live source (known once the pipeline reports no preroll): live sources pace
/// themselves, so clock sync at the appsink would only add latency (and drop late
/// frames), and a slow consumer must not hold the source back, so the queue drops its
/// oldest frames instead of blocking. A non-live source read in real time keeps the
/// blocking queue: the appsink's clock sync is what paces it (a leaky queue would let
/// it run ahead at full speed, dropping frames and stalling the sink).
pub fn configure_live(pipeline: &gst::Pipeline) {
    if let Some(sink) = pipeline.by_name(SINK_NAME) {
        sink.set_property("sync", false);
    }
    if let Some(queue) = pipeline.by_name(QUEUE_NAME) {
        queue.set_property_from_str("leaky", "downstream");
    }
}

/// Initialises GStreamer once.
pub fn init() -> Result<(), IngestError> {
    gst::init().map_err(|e| IngestError::Init(e.to_string()))
}

fn make(factory: &'static str) -> Result<gst::Element, IngestError> {
    gst::ElementFactory::make(factory)
        .build()
        .map_err(|_| IngestError::MissingElement(factory))
}

/// Builds the pipeline; `deliver` gets every sampled frame (stream index unset: 0)
/// and returns false when frames are no longer wanted.
pub fn build(
    name: &str,
    spec: &PipelineSpec,
    deliver: impl Fn(Frame) -> bool + Send + Sync + 'static,
) -> Result<gst::Pipeline, IngestError> {
    build_with_native(name, spec, deliver, None)
}

/// [`build`], and with `native` a second branch after the sampling: a `tee` hands every
/// sampled frame, as decoded (no conversion, no scaling), to `native` as well, through
/// an appsink that never blocks the stream (incident frames, [`crate::incidents`]).
pub fn build_with_native(
    name: &str,
    spec: &PipelineSpec,
    deliver: impl Fn(Frame) -> bool + Send + Sync + 'static,
    native: Option<crate::incidents::NativeSink>,
) -> Result<gst::Pipeline, IngestError> {
    let pipeline = gst::Pipeline::with_name(name);
    let queue = gst::ElementFactory::make("queue")
        .name(QUEUE_NAME)
        .build()
        .map_err(|_| IngestError::MissingElement("queue"))?;
    queue.set_property("max-size-buffers", 4u32);
    queue.set_property("max-size-bytes", 0u32);
    queue.set_property("max-size-time", 0u64);
    let convert = make("videoconvertscale")?;
    // 8-bit YUV to 8-bit RGB needs no dithering; it only costs time.
    convert.set_property_from_str("dither", "none");
    let filter = make("capsfilter")?;
    filter.set_property("caps", base_caps(None));
    let sink = gst_app::AppSink::builder()
        .name(SINK_NAME)
        .sync(spec.realtime)
        .max_buffers(2)
        .drop(false)
        .build();

    let tee = match native {
        Some(_) => Some(make("tee")?),
        None => None,
    };
    let mut chain: Vec<&gst::Element> = vec![&queue];
    chain.extend(tee.as_ref());
    chain.extend([&convert, &filter, sink.upcast_ref()]);
    pipeline
        .add_many(chain.iter().copied())
        .map_err(|e| IngestError::Pipeline(e.to_string()))?;
    gst::Element::link_many(chain.iter().copied())
        .map_err(|e| IngestError::Pipeline(format!("linking the frame chain: {e}")))?;
    if let (Some(tee), Some(native)) = (&tee, native) {
        // The tee pushes to the model's branch first (linked first), then here, in the
        // same streaming thread: this sink keeps only the newest frame and never waits.
        let native_sink = gst_app::AppSink::builder()
            .name("native")
            .sync(false)
            .max_buffers(1)
            .drop(true)
            .build();
        native_sink.set_property("async", false);
        native_sink.set_property("enable-last-sample", false);
        pipeline
            .add(&native_sink)
            .map_err(|e| IngestError::Pipeline(e.to_string()))?;
        tee.link(&native_sink)
            .map_err(|e| IngestError::Pipeline(format!("linking the native branch: {e}")))?;
        native_sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    if let Some(f) = crate::incidents::native_from_sample(&sample) {
                        native(f);
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
    }

    add_source(&pipeline, &spec.source, &queue)?;
    size_on_caps(&convert, &filter, spec);
    if let Some(fps) = spec.sample_fps
        && let Some(pad) = queue.static_pad("src")
    {
        let sampler = std::sync::Mutex::new(FpsSampler::new(fps));
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            let mut sampler = sampler.lock().unwrap_or_else(|e| e.into_inner());
            let keep = info.buffer().is_none_or(|b| {
                sampler.keep(
                    b.pts().map(|t| t.nseconds()),
                    b.duration().map(|d| d.nseconds()),
                    Instant::now(),
                )
            });
            if keep {
                gst::PadProbeReturn::Ok
            } else {
                gst::PadProbeReturn::Drop
            }
        });
    }
    if spec.keyframes {
        key_frames_only(&pipeline, name);
    }
    let sample_fps = if spec.keyframes {
        None
    } else {
        spec.sample_fps
    };
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let mut frame = frame_from_sample(sink)?;
                // A sampled frame stands for the interval until the next one.
                if let Some(fps) = sample_fps {
                    frame.duration = Some(1.0 / fps);
                }
                if deliver(frame) {
                    Ok(gst::FlowSuccess::Ok)
                } else {
                    Err(gst::FlowError::Eos)
                }
            })
            .build(),
    );
    Ok(pipeline)
}

fn base_caps(size: Option<(u32, u32)>) -> gst::Caps {
    let mut caps = gst::Caps::builder("video/x-raw")
        .field("format", "RGB")
        .field("pixel-aspect-ratio", gst::Fraction::new(1, 1));
    if let Some((w, h)) = size {
        caps = caps.field("width", w as i32).field("height", h as i32);
    }
    caps.build()
}

/// Sets the capsfilter's size from the decoded caps before the scaler sees them.
fn size_on_caps(convert: &gst::Element, filter: &gst::Element, spec: &PipelineSpec) {
    let Some(pad) = convert.static_pad("sink") else {
        return;
    };
    let filter = filter.downgrade();
    let (size, rule, views) = (spec.input_size, spec.resize, spec.views);
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        if let Some(gst::PadProbeData::Event(ev)) = &info.data
            && let gst::EventView::Caps(c) = ev.view()
            && let Ok(vi) = gst_video::VideoInfo::from_caps(c.caps())
            && let Some(filter) = filter.upgrade()
        {
            let par = vi.par();
            let wh = working_size(
                rule,
                views,
                size,
                vi.width(),
                vi.height(),
                (par.numer(), par.denom()),
            );
            filter.set_property("caps", base_caps(Some(wh)));
        }
        gst::PadProbeReturn::Ok
    });
}

fn add_source(
    pipeline: &gst::Pipeline,
    source: &Source,
    queue: &gst::Element,
) -> Result<(), IngestError> {
    match source {
        Source::Uri(uri) => {
            // decodebin3 in GStreamer 1.22 now and then never finishes stream selection
            // on a local file (about one still image in a hundred when many are opened
            // one after another in one process): no frame, no error, no end of stream.
            // Local files do not need its stream switching; decodebin (v2) is reliable there.
            let dec = make(if is_file_uri(uri) {
                "uridecodebin"
            } else {
                "uridecodebin3"
            })?;
            dec.set_property("uri", uri);
            pipeline
                .add(&dec)
                .map_err(|e| IngestError::Pipeline(e.to_string()))?;
            let queue = queue.downgrade();
            dec.connect_pad_added(move |_, pad| {
                let Some(queue) = queue.upgrade() else { return };
                let Some(sink) = queue.static_pad("sink") else {
                    return;
                };
                if sink.is_linked() || !is_video(pad) {
                    return;
                }
                if let Err(e) = pad.link(&sink) {
                    tracing::warn!(pad = %pad.name(), error = ?e, "Cannot link decoded video");
                }
            });
        }
        Source::Pipeline(launch) => {
            // A launch line may end in a caps filter ("... ! video/x-raw,width=640"),
            // which gst-launch syntax only accepts between two elements.
            let ends_in_caps = launch
                .rsplit('!')
                .next()
                .is_some_and(|last| last.trim_start().starts_with("video/"));
            let text = if ends_in_caps {
                format!("{launch} ! identity silent=true")
            } else {
                launch.clone()
            };
            // Only the output is ghosted: ghosting unlinked pads would also ghost the
            // sink pad of an element that waits for a demuxer's pad (`multipartdemux !
            // jpegdec`), which then could never be linked to it (not-linked).
            let bin = gst::parse::bin_from_description(&text, false)
                .map_err(|e| IngestError::Launch(e.to_string()))?;
            let out = bin
                .find_unlinked_pad(gst::PadDirection::Src)
                .ok_or_else(|| {
                    IngestError::Launch(format!("{launch:?} does not end in raw video"))
                })?;
            let ghost = gst::GhostPad::builder_with_target(&out)
                .map_err(|e| IngestError::Pipeline(e.to_string()))?
                .name("src")
                .build();
            bin.add_pad(&ghost)
                .map_err(|e| IngestError::Pipeline(e.to_string()))?;
            pipeline
                .add(&bin)
                .map_err(|e| IngestError::Pipeline(e.to_string()))?;
            bin.link(queue).map_err(|_| {
                IngestError::Launch(format!("{launch:?} does not end in raw video"))
            })?;
        }
    }
    Ok(())
}

fn is_file_uri(uri: &str) -> bool {
    uri.get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("file:"))
}

fn is_video(pad: &gst::Pad) -> bool {
    if pad.name().starts_with("video") {
        return true;
    }
    let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
    caps.structure(0)
        .is_some_and(|s| s.name().starts_with("video/"))
}

fn frame_from_sample(sink: &gst_app::AppSink) -> Result<Frame, gst::FlowError> {
    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
    let caps = sample.caps().ok_or(gst::FlowError::NotNegotiated)?;
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|_| gst::FlowError::NotNegotiated)?;
    let buffer = sample.buffer_owned().ok_or(gst::FlowError::Error)?;
    let (width, height) = (info.width() as usize, info.height() as usize);
    let (stride, offset) = match buffer.meta::<gst_video::VideoMeta>() {
        Some(m) => (m.stride()[0] as usize, m.offset()[0]),
        None => (info.stride()[0] as usize, info.offset()[0]),
    };
    let pts = buffer.pts().map(|pts| {
        sample
            .segment()
            .and_then(|s| s.downcast_ref::<gst::ClockTime>())
            .and_then(|s| s.to_stream_time(pts))
            .unwrap_or(pts)
            .nseconds() as f64
            / 1e9
    });
    let duration = buffer.duration().map(|d| d.nseconds() as f64 / 1e9);
    let mapped = buffer
        .into_mapped_buffer_readable()
        .map_err(|_| gst::FlowError::Error)?;
    let pixels = if offset == 0 {
        Pixels::Mapped(mapped)
    } else {
        Pixels::Owned(mapped.as_slice()[offset..].to_vec())
    };
    if stride < 3 * width || pixels.as_slice().len() < stride * (height - 1) + 3 * width {
        return Err(gst::FlowError::Error);
    }
    Ok(Frame {
        id: next_frame_id(),
        stream: 0,
        pts,
        duration,
        captured: SystemTime::now(),
        arrived: Instant::now(),
        image: Arc::new(RgbImage {
            width,
            height,
            stride,
            pixels,
        }),
    })
}

/// Keeps about `fps` buffers per second ([`build`]'s sampling probe): a buffer whose
/// timestamp reaches the next sampling time (half a frame early counts) is kept and the
/// next time moves on by one interval, or to one interval after the buffer when the
/// stream jumped ahead; a jump backwards (a new segment) starts over. A buffer without a
/// timestamp is sampled by the wall clock instead.
pub struct FpsSampler {
    interval: u64,
    next: Option<u64>,
    wall_next: Option<Instant>,
}

impl FpsSampler {
    /// A sampler for `fps` frames per second (> 0).
    pub fn new(fps: f64) -> Self {
        Self {
            interval: (1e9 / fps).round().max(1.0) as u64,
            next: None,
            wall_next: None,
        }
    }

    /// Whether to keep a buffer of timestamp `pts` and duration `duration` (ns),
    /// arriving at `now`.
    pub fn keep(&mut self, pts: Option<u64>, duration: Option<u64>, now: Instant) -> bool {
        let Some(t) = pts else {
            let step = std::time::Duration::from_nanos(self.interval);
            return match self.wall_next {
                Some(n) if now < n => false,
                Some(n) if now < n + step => {
                    self.wall_next = Some(n + step);
                    true
                }
                _ => {
                    self.wall_next = Some(now + step);
                    true
                }
            };
        };
        let early = duration.unwrap_or(0) / 2;
        match self.next {
            Some(n) if t + early < n && n - t <= 2 * self.interval => false,
            Some(n) if t + early >= n && t < n + self.interval => {
                self.next = Some(n + self.interval);
                true
            }
            _ => {
                self.next = Some(t + self.interval);
                true
            }
        }
    }
}

thread_local! {
    /// Set while [`key_frame_probe`] chains a key frame itself (its probe lets it by).
    static CHAINING_KEY_FRAME: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The probe on a video decoder's sink pad in key-frame mode. A delta unit is taken and
/// released (reported handled: returning Drop from a decoder's sink-pad probe makes
/// GStreamer 1.22 log a critical, an unref of NULL, for every buffer). A key frame is
/// chained into the decoder here and followed by a still-frame event, which makes the
/// decoder drain: a decoder that reorders (H.264 with B-frames) would otherwise hold each
/// picture until two more key frames arrive, seconds behind on a 2-s GOP.
fn key_frame_probe(pad: &gst::Pad, info: &mut gst::PadProbeInfo) -> gst::PadProbeReturn {
    if CHAINING_KEY_FRAME.with(|c| c.get()) {
        return gst::PadProbeReturn::Ok;
    }
    let Some(gst::PadProbeData::Buffer(buffer)) = info.data.take() else {
        return gst::PadProbeReturn::Ok;
    };
    if buffer.flags().contains(gst::BufferFlags::DELTA_UNIT) {
        drop(buffer);
        info.flow_res = Ok(gst::FlowSuccess::Ok);
        return gst::PadProbeReturn::Handled;
    }
    CHAINING_KEY_FRAME.with(|c| c.set(true));
    let flow = pad.chain(buffer);
    CHAINING_KEY_FRAME.with(|c| c.set(false));
    if flow.is_ok() {
        pad.send_event(gst_video::StillFrameEvent::builder(true).build());
    }
    info.flow_res = flow;
    gst::PadProbeReturn::Handled
}

/// Drops delta units at the input of every video decoder of `pipeline`, now and as
/// decode bins add them, so only key frames are decoded. Warns when the first frame
/// arrives with no decoder found (raw sources: sampling stays at `sample_fps`).
fn key_frames_only(pipeline: &gst::Pipeline, name: &str) {
    fn watch(element: &gst::Element) -> bool {
        let is_video_decoder = element.factory().is_some_and(|f| {
            let klass = f.metadata(gst::ELEMENT_METADATA_KLASS).unwrap_or_default();
            klass.contains("Decoder") && klass.contains("Video")
        });
        if !is_video_decoder {
            return false;
        }
        if let Some(pad) = element.static_pad("sink") {
            pad.add_probe(gst::PadProbeType::BUFFER, key_frame_probe);
        }
        true
    }
    let found = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut it = pipeline.iterate_recurse();
    while let Ok(Some(e)) = it.next() {
        if watch(&e) {
            found.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    {
        let found = found.clone();
        pipeline.connect_deep_element_added(move |_, _, e| {
            if watch(e) {
                found.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    if let Some(pad) = pipeline
        .by_name(SINK_NAME)
        .and_then(|s| s.static_pad("sink"))
    {
        let name = name.to_string();
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            if !found.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(stream = %name, "sample = \"keyframes\": no video decoder in this pipeline; sampling at sample_fps");
            }
            gst::PadProbeReturn::Remove
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    fn kept(fps: f64, frame_ns: u64, frames: u64) -> Vec<u64> {
        let mut s = FpsSampler::new(fps);
        let now = Instant::now();
        (0..frames)
            .map(|i| i * frame_ns)
            .filter(|t| s.keep(Some(*t), Some(frame_ns), now))
            .collect()
    }

    #[test]
    fn timestamps_are_sampled_on_a_steady_cadence() {
        // 25 fps to 5 fps: every fifth frame, exactly.
        let k = kept(5.0, 40 * MS, 250);
        assert_eq!(k.len(), 50);
        assert!(k.iter().enumerate().all(|(i, t)| *t == i as u64 * 200 * MS));
        // 30 fps (33.33 ms, rounded down) to 5 fps: no drift, 50 in 10 s.
        assert_eq!(kept(5.0, 33_333_333, 300).len(), 50);
        // 2 fps from 25: 20 in 10 s.
        assert_eq!(kept(2.0, 40 * MS, 250).len(), 20);
        // Slower than the rate asked for: every frame.
        assert_eq!(kept(10.0, 200 * MS, 20).len(), 20);
    }

    #[test]
    fn jumps_and_missing_timestamps() {
        let now = Instant::now();
        let mut s = FpsSampler::new(1.0);
        assert!(s.keep(Some(0), None, now));
        assert!(!s.keep(Some(500 * MS), None, now));
        // A jump ahead (a gap in the source): kept, the cadence restarts there.
        assert!(s.keep(Some(10_000 * MS), None, now));
        assert!(!s.keep(Some(10_500 * MS), None, now));
        // A jump back (a new segment): starts over.
        assert!(s.keep(Some(100 * MS), None, now));
        assert!(!s.keep(Some(600 * MS), None, now));
        // No timestamps: the wall clock, one per second.
        let mut w = FpsSampler::new(1.0);
        assert!(w.keep(None, None, now));
        assert!(!w.keep(None, None, now + Duration::from_millis(500)));
        assert!(w.keep(None, None, now + Duration::from_millis(1000)));
        assert!(!w.keep(None, None, now + Duration::from_millis(1900)));
        assert!(w.keep(None, None, now + Duration::from_millis(2000)));
    }
}
