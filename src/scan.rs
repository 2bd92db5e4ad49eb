//! File scan mode for CDN / VOD pipelines: decode files as fast as scoring allows
//! (backpressure, no drops, no pacing), score every frame (or `--sample-fps`), and
//! report per file: frames scored, mean / min / p5 score, black, freeze and bars segments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use gstreamer as gst;
use gstreamer::prelude::*;
use serde::Serialize;

use crate::config::{ScanGates, Settings, Source};
use crate::error::Error;
use crate::frame::{Frame, ScoredFrame};
use crate::ingest::{Handoff, PipelineSpec, pipeline};
use crate::metrics::{DropReason, Metrics};
use crate::qc::{PerKind, Segment, SegmentKind};
use crate::score::prompts::PromptSet;
use crate::score::{Engine, ScoreSink};
use crate::state::StreamState;

/// Options of `streamiq scan`.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Files to scan.
    pub files: Vec<PathBuf>,
    /// Frames per second to sample; `None` = every frame.
    pub sample_fps: Option<f64>,
    /// What fails a file (exit code 1).
    pub gates: ScanGates,
}

/// The report for one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// The file as given.
    pub path: String,
    /// Frames scored.
    pub frames_scored: usize,
    /// Mean score (null when nothing was scored).
    pub mean_score: Option<f64>,
    /// Lowest score.
    pub min_score: Option<f64>,
    /// 5th percentile score.
    pub p5_score: Option<f64>,
    /// Mean score of each attribute pair, if the prompt set has them.
    pub attributes: BTreeMap<String, f64>,
    /// The file's image embedding: the normalised mean over its frames (not printed).
    #[serde(skip)]
    pub embedding: Option<Vec<f32>>,
    /// Segments per kind, seconds: `black_segments`, `freeze_segments`,
    /// `bars_segments` in JSON.
    #[serde(serialize_with = "segments_as_fields", flatten)]
    pub segments: PerKind<Vec<Segment>>,
    /// Why the file could not be read, if it could not.
    pub error: Option<String>,
    /// The gates the file failed: `mean_below`, `p5_below`, or a segment kind
    /// (`black`, `freeze`, `bars`) whose longest segment reached its limit.
    pub failed_gates: Vec<&'static str>,
    /// Whether any gate failed.
    pub failed: bool,
}

/// Writes each kind's segments as a `{kind}_segments` field.
fn segments_as_fields<S: serde::Serializer>(
    segments: &PerKind<Vec<Segment>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    segments.named("_segments", |v| v).serialize(s)
}

/// Scores per file, and attribute sums per file.
#[derive(Default, Clone)]
struct FileScores {
    scores: Vec<f32>,
    attributes: BTreeMap<String, f64>,
    embedding_sum: Vec<f32>,
}

struct ScanSink {
    files: Mutex<Vec<FileScores>>,
}

impl ScoreSink for ScanSink {
    fn publish(&self, frames: Vec<ScoredFrame>, prompts: &PromptSet) {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        for sf in frames {
            let file = &mut files[sf.frame.stream];
            file.scores.push(sf.score);
            if file.embedding_sum.is_empty() {
                file.embedding_sum = vec![0.0; sf.embedding.len()];
            }
            for (a, b) in file.embedding_sum.iter_mut().zip(&sf.embedding) {
                *a += b;
            }
            for ((name, _), v) in prompts.attributes.iter().zip(&sf.attributes) {
                *file.attributes.entry(name.clone()).or_default() += *v as f64;
            }
        }
    }

    fn dropped(&self, frames: &[Frame], reason: DropReason) {
        tracing::error!(
            frames = frames.len(),
            reason = reason.as_str(),
            "Frames not scored"
        );
    }
}

/// Scans the files and returns one report per file, in order.
pub fn scan(settings: &Settings, opts: &ScanOptions) -> Result<Vec<FileReport>, Error> {
    pipeline::init()?;
    let loaded = crate::score::load(&settings.model)?;
    let bundle = loaded.bundle.clone();
    let prompts = Arc::new(ArcSwap::from_pointee(loaded.prompts.clone()));
    // Scan's metrics are its own registry, never exported: the engine and the per-file
    // detectors count into it as the daemon's do.
    let metrics = Arc::new(Metrics::new());
    let states: Vec<Arc<StreamState>> = opts
        .files
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Arc::new(StreamState::new(
                i,
                &format!("file{i}"),
                &p.display().to_string(),
                metrics.stream(&format!("file{i}")),
                &settings.qc,
                1,
            ))
        })
        .collect();
    let sink = Arc::new(ScanSink {
        files: Mutex::new(vec![FileScores::default(); opts.files.len()]),
    });
    let engine = Engine::start(loaded, prompts, &settings.scorer, sink.clone(), metrics)
        .map_err(|e| Error::runtime("starting the scoring threads", e))?;
    let handoff = engine.handoff();
    let mut errors: Vec<Option<String>> = Vec::with_capacity(opts.files.len());
    for (path, state) in opts.files.iter().zip(&states) {
        let spec = PipelineSpec {
            source: Source::Uri(String::new()),
            sample_fps: opts.sample_fps,
            realtime: false,
            input_size: bundle.manifest.input.size,
            resize: bundle.manifest.input.resize,
            views: settings.scorer.views,
        };
        let err = scan_file(
            path,
            spec,
            state.clone(),
            handoff.clone(),
            settings
                .qc
                .stall_timeout
                .max(std::time::Duration::from_secs(10)),
        )
        .err();
        if let Some(e) = &err {
            tracing::error!(path = %path.display(), error = %e, "Cannot read file");
        }
        errors.push(err.map(|e| e.to_string()));
    }
    drop(handoff);
    engine.stop();
    let scores = std::mem::take(&mut *sink.files.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(opts
        .files
        .iter()
        .zip(states)
        .zip(scores)
        .zip(errors)
        .map(|(((path, state), scores), error)| {
            let segments = state.segments();
            report(path, scores, segments, error, &opts.gates)
        })
        .collect())
}

fn report(
    path: &Path,
    file: FileScores,
    segments: PerKind<Vec<Segment>>,
    error: Option<String>,
    gates: &ScanGates,
) -> FileReport {
    let FileScores {
        mut scores,
        mut attributes,
        mut embedding_sum,
    } = file;
    let embedding =
        crate::score::prompts::normalise_in_place(&mut embedding_sum).then_some(embedding_sum);
    scores.sort_by(f32::total_cmp);
    let n = scores.len();
    attributes.values_mut().for_each(|v| *v /= n.max(1) as f64);
    let mean = (n > 0).then(|| scores.iter().map(|s| *s as f64).sum::<f64>() / n as f64);
    let p5 = (n > 0).then(|| scores[((n - 1) as f64 * 0.05).round() as usize] as f64);
    let below =
        |v: Option<f64>, limit: Option<f64>| matches!((v, limit), (Some(v), Some(t)) if v < t);
    let mut failed_gates = Vec::new();
    if below(mean, gates.mean_below) {
        failed_gates.push("mean_below");
    }
    if below(p5, gates.p5_below) {
        failed_gates.push("p5_below");
    }
    for (kind, limit) in gates.segment_at_least.iter() {
        let longest = segments[kind]
            .iter()
            .map(Segment::duration)
            .fold(0.0, f64::max);
        if limit.is_some_and(|l| longest >= l.as_secs_f64() - 1e-6) {
            failed_gates.push(kind.name());
        }
    }
    FileReport {
        path: path.display().to_string(),
        frames_scored: n,
        mean_score: mean,
        min_score: scores.first().map(|s| *s as f64),
        p5_score: p5,
        attributes,
        embedding,
        segments,
        error,
        failed: !failed_gates.is_empty(),
        failed_gates,
    }
}

/// Why a file's pipeline did not reach its end.
enum RunError {
    /// No frame and no message for the stall timeout.
    Stalled,
    /// An error message from the pipeline.
    Failed(String),
}

/// Why a file could not be scanned to its end (the JSON line's `error`).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The file cannot be read or resolved.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The path names something other than a regular file.
    #[error("not a regular file")]
    NotAFile,
    /// The path cannot be written as a file URI.
    #[error("{0}")]
    Uri(String),
    /// The pipeline could not be built.
    #[error("{0}")]
    Pipeline(String),
    /// No frame and no pipeline message for the stall timeout.
    #[error("stalled: no frame for {} ms", .0.as_millis())]
    Stalled(std::time::Duration),
    /// The pipeline reported an error (decoder, demuxer, missing plug-in).
    #[error("{0}")]
    Failed(String),
    /// The file ended without one decoded video frame.
    #[error("no video frames decoded")]
    NoFrames,
}

/// Decodes one file to its end, feeding frames to `handoff` with backpressure.
fn scan_file(
    path: &Path,
    mut spec: PipelineSpec,
    state: Arc<StreamState>,
    handoff: Handoff,
    stall_timeout: std::time::Duration,
) -> Result<(), ScanError> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(ScanError::NotAFile);
    }
    let abs = std::fs::canonicalize(path)?;
    let uri = gst::glib::filename_to_uri(&abs, None).map_err(|e| ScanError::Uri(e.to_string()))?;
    spec.source = Source::Uri(uri.to_string());
    // A pipeline that stalls before its first frame (a rare start-up race in GStreamer's
    // decoder bins) is rebuilt once; one that stalls later is reported, never waited on.
    let mut result = Err(RunError::Stalled);
    for _attempt in 0..2 {
        let st = state.clone();
        let handoff = handoff.clone();
        // Frames waiting for room in the queue (a busy scorer) are progress, not a stall.
        let waiting = Arc::new(AtomicUsize::new(0));
        let deliver = {
            let waiting = waiting.clone();
            move |mut frame: Frame| {
                frame.stream = st.index;
                st.on_arrival(&frame);
                waiting.fetch_add(1, Ordering::Relaxed);
                let sent = handoff.send(frame);
                waiting.fetch_sub(1, Ordering::Relaxed);
                sent
            }
        };
        let pipe = pipeline::build(&state.id, &spec, deliver)
            .map_err(|e| ScanError::Pipeline(e.to_string()))?;
        result = run_to_end(&pipe, &state, &waiting, stall_timeout);
        let _ = pipe.set_state(gst::State::Null);
        let retry = matches!(result, Err(RunError::Stalled)) && state.metrics.decoded.get() == 0;
        if !retry {
            break;
        }
        tracing::warn!(path = %path.display(), "Pipeline stalled before its first frame; rebuilding it");
    }
    state.finish_segments();
    result.map_err(|e| match e {
        RunError::Stalled => ScanError::Stalled(stall_timeout),
        RunError::Failed(m) => ScanError::Failed(m),
    })?;
    if state.metrics.decoded.get() == 0 {
        return Err(ScanError::NoFrames);
    }
    Ok(())
}

fn run_to_end(
    pipe: &gst::Pipeline,
    state: &StreamState,
    waiting: &AtomicUsize,
    stall_timeout: std::time::Duration,
) -> Result<(), RunError> {
    pipe.set_state(gst::State::Playing)
        .map_err(|_| RunError::Failed("pipeline refused to start".to_string()))?;
    let bus = pipe.bus().expect("a pipeline has a bus");
    let mut last_activity = std::time::Instant::now();
    loop {
        match bus.timed_pop(gst::ClockTime::from_mseconds(100)) {
            Some(msg) => match msg.view() {
                gst::MessageView::Eos(_) => return Ok(()),
                gst::MessageView::Error(e) => {
                    let detail = e.debug().map(|d| format!(" ({d})")).unwrap_or_default();
                    let short = detail
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(200)
                        .collect::<String>();
                    return Err(RunError::Failed(format!("{}{}", e.error(), short)));
                }
                _ => last_activity = std::time::Instant::now(),
            },
            None => {
                // Frames waiting on backpressure count as activity: the scorer is busy.
                if waiting.load(Ordering::Relaxed) > 0 {
                    last_activity = std::time::Instant::now();
                } else if state.idle_for(last_activity) > stall_timeout {
                    return Err(RunError::Stalled);
                }
            }
        }
    }
}

/// One human-readable block per file.
pub fn format_text(r: &FileReport) -> String {
    use std::fmt::Write;
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let mut s = String::new();
    let _ = writeln!(s, "{}", r.path);
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  error: {e}");
    }
    let _ = writeln!(
        s,
        "  frames {}  mean {}  min {}  p5 {}{}",
        r.frames_scored,
        f(r.mean_score),
        f(r.min_score),
        f(r.p5_score),
        if r.failed {
            format!("  FAILED: {}", r.failed_gates.join(", "))
        } else {
            String::new()
        }
    );
    for (kind, segs) in r.segments.iter() {
        let kind = kind.name();
        for seg in segs {
            let _ = writeln!(
                s,
                "  {kind} {:.2}s - {:.2}s ({:.2}s)",
                seg.start,
                seg.end,
                seg.duration()
            );
        }
    }
    s
}

/// The reports as CSV with a header row: one row per file with its scores, per segment
/// kind the number of segments, their total and their longest duration (seconds), one
/// `attr_<name>` column per attribute pair any report has, the error, whether it failed
/// and the failed gates (`;`-separated). Fields are quoted and formula-neutralised as
/// label exports are ([`crate::csv::field`]).
pub fn to_csv(reports: &[FileReport]) -> String {
    use std::fmt::Write;
    let attrs: std::collections::BTreeSet<&String> =
        reports.iter().flat_map(|r| r.attributes.keys()).collect();
    let mut header: Vec<String> = [
        "path",
        "frames_scored",
        "mean_score",
        "min_score",
        "p5_score",
    ]
    .map(String::from)
    .to_vec();
    for kind in SegmentKind::ALL {
        for col in ["segments", "seconds", "longest_seconds"] {
            header.push(format!("{}_{col}", kind.name()));
        }
    }
    header.extend(attrs.iter().map(|a| format!("attr_{a}")));
    header.extend(["error", "failed", "failed_gates"].map(String::from));
    let mut out = header.join(",");
    out.push('\n');
    let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for r in reports {
        let mut row = vec![
            crate::csv::field(&r.path),
            r.frames_scored.to_string(),
            num(r.mean_score),
            num(r.min_score),
            num(r.p5_score),
        ];
        for kind in SegmentKind::ALL {
            let segs = &r.segments[kind];
            let total: f64 = segs.iter().map(Segment::duration).sum();
            let longest = segs.iter().map(Segment::duration).fold(0.0, f64::max);
            row.push(segs.len().to_string());
            row.push(format!("{total:.3}"));
            row.push(format!("{longest:.3}"));
        }
        row.extend(attrs.iter().map(|a| num(r.attributes.get(*a).copied())));
        row.push(crate::csv::field(r.error.as_deref().unwrap_or("")));
        row.push(r.failed.to_string());
        row.push(crate::csv::field(&r.failed_gates.join(";")));
        let _ = writeln!(out, "{}", row.join(","));
    }
    out
}

/// Exit code for a set of reports: 2 if any file was unreadable, else 1 if any failed
/// a gate, else 0.
pub fn exit_code(reports: &[FileReport]) -> i32 {
    if reports.iter().any(|r| r.error.is_some()) {
        2
    } else if reports.iter().any(|r| r.failed) {
        1
    } else {
        0
    }
}
