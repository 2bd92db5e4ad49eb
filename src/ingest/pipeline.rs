//! One GStreamer pipeline per stream:
//!
//! ```text
//! uridecodebin3 uri=… (uridecodebin for file: URIs) | <launch line>
//!   -> queue (leaky for live sources) -> videorate (sample_fps) -> videoconvertscale
//!   -> capsfilter (RGB at the model's working size) -> appsink
//! ```
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
    let rate = match spec.sample_fps {
        Some(_) => {
            let r = make("videorate")?;
            r.set_property("drop-only", true);
            Some(r)
        }
        None => None,
    };
    let convert = make("videoconvertscale")?;
    // 8-bit YUV to 8-bit RGB needs no dithering; it only costs time.
    convert.set_property_from_str("dither", "none");
    let filter = make("capsfilter")?;
    filter.set_property("caps", base_caps(spec.sample_fps, None));
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
    chain.extend(rate.as_ref());
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
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let frame = frame_from_sample(sink)?;
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

fn base_caps(sample_fps: Option<f64>, size: Option<(u32, u32)>) -> gst::Caps {
    let mut caps = gst::Caps::builder("video/x-raw")
        .field("format", "RGB")
        .field("pixel-aspect-ratio", gst::Fraction::new(1, 1));
    if let Some(fps) = sample_fps {
        let f = gst::Fraction::approximate_f64(fps).unwrap_or(gst::Fraction::new(2, 1));
        caps = caps.field("framerate", f);
    }
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
    let (size, rule, views, fps) = (spec.input_size, spec.resize, spec.views, spec.sample_fps);
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
            filter.set_property("caps", base_caps(fps, Some(wh)));
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
            let bin = gst::parse::bin_from_description(&text, true)
                .map_err(|e| IngestError::Launch(e.to_string()))?;
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
