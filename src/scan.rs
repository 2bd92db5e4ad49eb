//! File scan mode for CDN / VOD pipelines: decode files as fast as scoring allows
//! (backpressure, no drops, no pacing), score every frame (or `--sample-fps`), and
//! report per file: frames scored, mean / min / p5 score, black, freeze and bars segments.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

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
    /// Files decoded at once (`-j`); one model scores them all, in shared batches.
    pub jobs: usize,
    /// Keep every scored frame in its file's report ([`FileReport::frames`]).
    pub per_frame: bool,
}

impl ScanOptions {
    /// Every frame of `files`, one at a time, no gates, no per-frame rows.
    pub fn files(files: Vec<PathBuf>) -> Self {
        Self {
            files,
            sample_fps: None,
            gates: ScanGates::default(),
            jobs: 1,
            per_frame: false,
        }
    }
}

/// One scored frame of a file (`scan --per-frame`).
#[derive(Debug, Clone)]
pub struct FrameRow {
    /// Stream time of the frame, seconds (`None` when the decoder gave none).
    pub pts: Option<f64>,
    /// Quality score.
    pub score: f32,
    /// Score of each attribute pair, in the prompt set's order.
    pub attributes: Vec<f32>,
    /// Whether the picture itself was black, still (the same as the picture that began
    /// its still run) or colour bars; a segment needs such frames for `qc.min_duration`.
    pub flags: PerKind<bool>,
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
    /// Every scored frame in stream order, with [`ScanOptions::per_frame`] (not printed).
    #[serde(skip)]
    pub frames: Vec<FrameRow>,
}

/// Writes each kind's segments as a `{kind}_segments` field.
fn segments_as_fields<S: serde::Serializer>(
    segments: &PerKind<Vec<Segment>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    segments.named("_segments", |v| v).serialize(s)
}

/// What a scan tells its caller while it runs (all on the calling thread).
pub trait ScanObserver {
    /// The model is loaded: the prompt set's attribute names, in order.
    fn started(&mut self, _attributes: &[String]) {}
    /// About five times a second: frames scored so far, over all files.
    fn progress(&mut self, _frames_scored: u64) {}
    /// A file's report, as soon as its last frame is scored (files end in any order
    /// when [`ScanOptions::jobs`] > 1).
    fn finished(&mut self, _report: &FileReport) {}
}

impl ScanObserver for () {}

/// Scores and frame counts of one file.
#[derive(Default, Clone)]
struct FileScores {
    scores: Vec<f32>,
    attributes: BTreeMap<String, f64>,
    embedding_sum: Vec<f32>,
    rows: Vec<FrameRow>,
    /// Frames handed to the scorer.
    sent: usize,
    /// Of those, frames scored or dropped.
    done: usize,
}

struct ScanSink {
    files: Mutex<Vec<FileScores>>,
    /// Signalled whenever frames are scored or dropped.
    progress: Condvar,
    /// Picture flags of frames not yet scored (with `per_frame`), by frame id.
    flags: Mutex<HashMap<u64, PerKind<bool>>>,
    per_frame: bool,
    scored: AtomicU64,
}

impl ScanSink {
    fn files(&self) -> MutexGuard<'_, Vec<FileScores>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a frame handed to the scorer for file `i`.
    fn sent(&self, i: usize) {
        self.files()[i].sent += 1;
    }

    /// Waits until every frame handed over for file `i` is scored or dropped, and
    /// takes its scores.
    fn take_when_done(&self, i: usize) -> FileScores {
        let mut files = self.files();
        while files[i].done < files[i].sent {
            files = self.progress.wait(files).unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut files[i])
    }
}

impl ScoreSink for ScanSink {
    fn publish(&self, frames: Vec<ScoredFrame>, prompts: &PromptSet) {
        let mut flags = if self.per_frame {
            Some(self.flags.lock().unwrap_or_else(|e| e.into_inner()))
        } else {
            None
        };
        let mut files = self.files();
        self.scored
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        for sf in frames {
            let file = &mut files[sf.frame.stream];
            file.done += 1;
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
            if let Some(flags) = flags.as_mut() {
                file.rows.push(FrameRow {
                    pts: sf.frame.pts,
                    score: sf.score,
                    flags: flags.remove(&sf.frame.id).unwrap_or_default(),
                    attributes: sf.attributes,
                });
            }
        }
        drop(files);
        self.progress.notify_all();
    }

    fn dropped(&self, frames: &[Frame], reason: DropReason) {
        tracing::error!(
            frames = frames.len(),
            reason = reason.as_str(),
            "Frames not scored"
        );
        let mut files = self.files();
        for f in frames {
            files[f.stream].done += 1;
        }
        drop(files);
        if self.per_frame {
            let mut flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
            frames.iter().for_each(|f| {
                flags.remove(&f.id);
            });
        }
        self.progress.notify_all();
    }
}

/// Scans the files and returns one report per file, in order.
pub fn scan(settings: &Settings, opts: &ScanOptions) -> Result<Vec<FileReport>, Error> {
    scan_with(settings, opts, &mut ())
}

/// Batches of frames `scan` lets wait for the scorer (at most `scorer.queue_capacity`).
pub const SCAN_BATCHES_AHEAD: usize = 4;

/// Scans the files, `opts.jobs` at a time with one engine, telling `observer` of each
/// report as its file ends; returns the reports in the order of `opts.files`.
pub fn scan_with(
    settings: &Settings,
    opts: &ScanOptions,
    observer: &mut dyn ScanObserver,
) -> Result<Vec<FileReport>, Error> {
    pipeline::init()?;
    let loaded = crate::score::load(&settings.model, &settings.scorer.backend)?;
    let bundle = loaded.bundle.clone();
    let attribute_names: Vec<String> = loaded
        .prompts
        .attributes
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    let prompts = Arc::new(ArcSwap::from_pointee(loaded.prompts.clone()));
    // Scan's metrics are its own registry, never exported: the engine and the per-file
    // detectors count into it as the daemon's do.
    let metrics = Arc::new(Metrics::new());
    let sink = Arc::new(ScanSink {
        files: Mutex::new(vec![FileScores::default(); opts.files.len()]),
        progress: Condvar::new(),
        flags: Mutex::new(HashMap::new()),
        per_frame: opts.per_frame,
        scored: AtomicU64::new(0),
    });
    // Files are read no faster than they are scored (backpressure), so frames beyond a
    // few batches ahead only cost memory: a working frame for crops is about 1 MB.
    let mut scorer = settings.scorer.clone();
    scorer.queue_capacity = scorer.queue_capacity.min(
        scorer
            .max_batch
            .saturating_mul(std::num::NonZeroUsize::new(SCAN_BATCHES_AHEAD).expect("nonzero")),
    );
    let engine = Engine::start(loaded, prompts, &scorer, sink.clone(), metrics.clone())
        .map_err(|e| Error::runtime("starting the scoring threads", e))?;
    observer.started(&attribute_names);
    let handoff = engine.handoff();
    let spec = PipelineSpec {
        source: Source::Uri(String::new()),
        sample_fps: opts.sample_fps,
        keyframes: false,
        realtime: false,
        input_size: bundle.manifest.input.size,
        resize: bundle.manifest.input.resize,
        views: settings.scorer.views,
    };
    let stall_timeout = settings
        .qc
        .stall_timeout
        .max(std::time::Duration::from_secs(10));
    let next = AtomicUsize::new(0);
    let (tx, rx) = crossbeam_channel::unbounded::<(usize, FileReport)>();
    let mut reports: Vec<Option<FileReport>> = vec![None; opts.files.len()];
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.clamp(1, opts.files.len().max(1)) {
            let (tx, sink, handoff, spec, metrics) = (
                tx.clone(),
                sink.clone(),
                handoff.clone(),
                spec.clone(),
                metrics.clone(),
            );
            let next = &next;
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = opts.files.get(i) else { break };
                    let state = Arc::new(StreamState::new(
                        i,
                        &format!("file{i}"),
                        &path.display().to_string(),
                        metrics.stream(&format!("file{i}")),
                        &settings.qc,
                        1,
                    ));
                    let err =
                        scan_file(path, spec.clone(), &state, &sink, &handoff, stall_timeout).err();
                    if let Some(e) = &err {
                        tracing::error!(path = %path.display(), error = %e, "Cannot read file");
                    }
                    let scores = sink.take_when_done(i);
                    let r = report(
                        path,
                        scores,
                        state.segments(),
                        err.map(|e| e.to_string()),
                        &opts.gates,
                    );
                    if tx.send((i, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok((i, r)) => {
                    observer.progress(sink.scored.load(Ordering::Relaxed));
                    observer.finished(&r);
                    reports[i] = Some(r);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    observer.progress(sink.scored.load(Ordering::Relaxed))
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    drop(handoff);
    engine.stop();
    Ok(reports
        .into_iter()
        .map(|r| r.expect("every file is reported"))
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
        mut rows,
        ..
    } = file;
    rows.sort_by(|a, b| {
        a.pts
            .unwrap_or(f64::MAX)
            .total_cmp(&b.pts.unwrap_or(f64::MAX))
    });
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
        frames: rows,
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
    state: &Arc<StreamState>,
    sink: &Arc<ScanSink>,
    handoff: &Handoff,
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
        let (st, sink, handoff) = (state.clone(), sink.clone(), handoff.clone());
        // Frames waiting for room in the queue (a busy scorer) are progress, not a stall.
        let waiting = Arc::new(AtomicUsize::new(0));
        let deliver = {
            let waiting = waiting.clone();
            move |mut frame: Frame| {
                frame.stream = st.index;
                let flags = st.on_arrival(&frame);
                if sink.per_frame {
                    sink.flags
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(frame.id, flags);
                }
                waiting.fetch_add(1, Ordering::Relaxed);
                // Counted before the send: the scorer may finish the frame before `send`
                // returns. A send that fails (the scorer gone) ends the scan anyway.
                sink.sent(st.index);
                let sent = handoff.send(frame);
                if !sent {
                    sink.files()[st.index].sent -= 1;
                }
                waiting.fetch_sub(1, Ordering::Relaxed);
                sent
            }
        };
        let pipe = pipeline::build(&state.id, &spec, deliver)
            .map_err(|e| ScanError::Pipeline(e.to_string()))?;
        result = run_to_end(&pipe, state, &waiting, stall_timeout);
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

/// The header row of `scan --format csv` (with its newline): per file its scores, per
/// segment kind the number of segments, their total and their longest duration
/// (seconds), one `attr_<name>` column per attribute pair, the error, whether it failed
/// and the failed gates.
pub fn csv_header(attributes: &[String]) -> String {
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
    header.extend(attributes.iter().map(|a| format!("attr_{a}")));
    header.extend(["error", "failed", "failed_gates"].map(String::from));
    header.join(",") + "\n"
}

fn num(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v:.6}"))
}

/// One file's row under [`csv_header`] (with its newline). Fields are quoted and
/// formula-neutralised as label exports are ([`crate::csv::field`]); failed gates are
/// `;`-separated.
pub fn csv_row(r: &FileReport, attributes: &[String]) -> String {
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
    row.extend(attributes.iter().map(|a| num(r.attributes.get(a).copied())));
    row.push(crate::csv::field(r.error.as_deref().unwrap_or("")));
    row.push(r.failed.to_string());
    row.push(crate::csv::field(&r.failed_gates.join(";")));
    row.join(",") + "\n"
}

/// The header row of `scan --per-frame` (with its newline): the file, the frame's
/// stream time (`pts`, seconds), its score, one `attr_<name>` column per attribute
/// pair, and 0/1 columns `black`, `freeze` and `bars` ([`FrameRow::flags`]).
pub fn per_frame_header(attributes: &[String]) -> String {
    let mut header: Vec<String> = ["path", "pts", "score"].map(String::from).to_vec();
    header.extend(attributes.iter().map(|a| format!("attr_{a}")));
    header.extend(SegmentKind::ALL.map(|k| k.name().to_string()));
    header.join(",") + "\n"
}

/// A file's frames under [`per_frame_header`], one line each.
pub fn per_frame_rows(r: &FileReport) -> String {
    use std::fmt::Write;
    let path = crate::csv::field(&r.path);
    let mut out = String::new();
    for f in &r.frames {
        let _ = write!(out, "{path},{},{:.6}", num(f.pts), f.score);
        for a in &f.attributes {
            let _ = write!(out, ",{a:.6}");
        }
        for (_, on) in f.flags.iter() {
            let _ = write!(out, ",{}", u8::from(*on));
        }
        out.push('\n');
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
