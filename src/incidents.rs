//! Incident frames for labelling: the frames around each black, freeze, colour-bars and
//! quality-low onset, and each stream's lowest-scoring frame of every period, kept on
//! disk at the source's resolution (capped) so that they outlive the recent-frame ring
//! and raters judge the artefacts the model was asked about, not the model's view.
//!
//! ```text
//! pipeline tee ─▶ native appsink ─▶ Tracker::native (a copy of the last few decoded
//!   frames, as decoded: no conversion until an incident needs one)
//! StreamState: segment onset / quality crossing / new lowest score ─▶ Tracker
//!   ─▶ Job (native frames + the scored frames of the same pts) ─▶ writer thread
//!   ─▶ DIR/ID/{incident.json, frame-N.png (native, capped), frame-N.model.png (as scored)}
//!   ─▶ oldest incidents deleted past labels.incidents_max / labels.incidents_max_mib
//! ```
//!
//! An incident's frames are listed and served by `/api/v1/incidents` and labelled like
//! recent frames (`POST /api/v1/labels` with `incident` and `frame`): the label gets the
//! embedding and score the frame had when it was scored.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gstreamer as gst;
use gstreamer_video as gst_video;
use gstreamer_video::VideoFrameExt as _;
use serde::{Deserialize, Serialize};

use crate::frame::{RgbImage, ScoredFrame};
use crate::labels::Provenance;

/// `[labels]` incident keys, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentSettings {
    /// `labels.incidents_dir`.
    pub dir: PathBuf,
    /// `labels.incidents_max`: incidents kept at most (0: none kept, no native frames).
    pub max_count: usize,
    /// `labels.incidents_max_mib`, in bytes.
    pub max_bytes: u64,
    /// `labels.incident_max_px`: the longer side of a stored native frame at most.
    pub max_px: u32,
    /// `labels.incident_quality_below`: a stream's quality mean falling below this is an
    /// incident.
    pub quality_below: f64,
    /// `labels.incident_lowest_every`: each stream's lowest-scoring frame of every such
    /// period is kept.
    pub lowest_every: Duration,
}

/// Frames kept from before an onset (the onset's own and the one after come too).
const BEFORE: usize = 2;
/// Decoded frames held per stream to find the frames of an onset or a low score.
const RING: usize = 4;
/// One incident of a kind per stream at most this often (a flapping detector).
const MIN_INTERVAL: Duration = Duration::from_secs(60);
/// Incidents waiting for the writer; more are dropped (and counted).
const QUEUE: usize = 8;

/// What started an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKind {
    /// A black segment began.
    Black,
    /// A freeze began.
    Freeze,
    /// Colour bars began.
    Bars,
    /// The quality mean fell below `labels.incident_quality_below`.
    QualityLow,
    /// The period's lowest-scoring frame.
    Lowest,
}

impl IncidentKind {
    /// Every kind, in index order.
    pub const ALL: [Self; 5] = [
        Self::Black,
        Self::Freeze,
        Self::Bars,
        Self::QualityLow,
        Self::Lowest,
    ];

    /// The name in ids, JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Black => "black",
            Self::Freeze => "freeze",
            Self::Bars => "bars",
            Self::QualityLow => "quality_low",
            Self::Lowest => "lowest",
        }
    }

    /// The incident kind of a segment kind's onset.
    pub fn of_segment(kind: crate::qc::SegmentKind) -> Self {
        match kind {
            crate::qc::SegmentKind::Black => Self::Black,
            crate::qc::SegmentKind::Freeze => Self::Freeze,
            crate::qc::SegmentKind::Bars => Self::Bars,
        }
    }
}

/// A decoded frame as the source delivered it, before the model's scaling (copied out
/// of the decoder's buffers).
pub struct NativeFrame {
    /// Stream time, seconds.
    pub pts: Option<f64>,
    /// The pixels, in `info`'s format.
    pub buffer: gst::Buffer,
    /// Format and size.
    pub info: gst_video::VideoInfo,
}

/// One frame of an incident as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IncidentFrame {
    /// Index in the incident (file `frame-N.png`).
    pub n: usize,
    /// Stream time, seconds.
    pub pts: Option<f64>,
    /// Stored size.
    pub width: u32,
    /// Stored size.
    pub height: u32,
    /// Whether this is the onset's frame (or the lowest-scoring one).
    pub onset: bool,
    /// What the frame had when it was scored, if it was found scored.
    pub scored: Option<ScoredInfo>,
}

/// What a frame had when it was scored (so a label on it needs no model).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoredInfo {
    /// The label store's run id of the daemon that scored it: frame ids count within a
    /// run, so a label on the frame after a restart is stored under this run, never on
    /// a frame of the new run that has the same id. Absent in incidents kept before it
    /// was recorded ([`ScoredInfo::label_run_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The daemon's frame id.
    pub frame_id: u64,
    /// Quality score.
    pub score: f32,
    /// Prompt-set version.
    pub prompt_version: u64,
    /// The image embedding.
    pub embedding: Vec<f32>,
    /// The encoder that computed it.
    pub provenance: Provenance,
}

impl ScoredInfo {
    /// The run a label on this frame of incident `incident_id` is stored under: the run
    /// that scored it, or, for an incident kept before runs were recorded, one of the
    /// incident's own (`incident-` and 16 hex digits of its id's sha256), which no
    /// daemon run ever has.
    pub fn label_run_id(&self, incident_id: &str) -> String {
        use sha2::{Digest, Sha256};
        match &self.run_id {
            Some(run) => run.clone(),
            None => {
                let digest = Sha256::digest(incident_id.as_bytes());
                format!("incident-{}", hex::encode(&digest[..8]))
            }
        }
    }
}

/// `incident.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Incident {
    /// Directory name: `UNIXMS-STREAM-KIND`.
    pub id: String,
    /// Stream id.
    pub stream: String,
    /// What started it.
    pub kind: IncidentKind,
    /// Wall-clock time of the onset, unix seconds.
    pub at: f64,
    /// The stream's quality mean at the onset.
    pub quality: Option<f64>,
    /// The frames, oldest first.
    pub frames: Vec<IncidentFrame>,
}

struct Job {
    stream: String,
    kind: IncidentKind,
    at: SystemTime,
    quality: Option<f64>,
    /// (native frame, scored frame of the same pts, is the onset frame).
    frames: Vec<(Arc<NativeFrame>, Option<Arc<ScoredFrame>>, bool)>,
}

/// The incident directory and its writer thread.
pub struct IncidentStore {
    settings: IncidentSettings,
    provenance: Provenance,
    /// The label store's run id (frame ids count within it).
    run_id: String,
    tx: crossbeam_channel::Sender<Job>,
    metrics: Arc<crate::metrics::Metrics>,
    lock: Mutex<()>,
}

/// An incident id as written by this module (and nothing that could leave the directory).
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl IncidentStore {
    /// Creates the directory and starts the writer thread. `run_id` is the label
    /// store's ([`crate::labels::LabelStore::run_id`]), recorded with each scored frame.
    pub fn open(
        settings: IncidentSettings,
        provenance: Provenance,
        run_id: String,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, std::io::Error> {
        std::fs::create_dir_all(&settings.dir)?;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE);
        let store = Arc::new(Self {
            settings,
            provenance,
            run_id,
            tx,
            metrics,
            lock: Mutex::new(()),
        });
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("incidents".into())
            .spawn(move || {
                for job in rx {
                    let Some(store) = weak.upgrade() else { break };
                    let (stream, kind) = (job.stream.clone(), job.kind);
                    match store.write(job) {
                        Ok(id) => {
                            tracing::info!(%stream, kind = kind.name(), id, "Incident frames kept");
                            store
                                .metrics
                                .incidents
                                .with_label_values(&[stream.as_str(), kind.name()])
                                .inc();
                        }
                        Err(e) => {
                            tracing::error!(%stream, kind = kind.name(), error = %e, "Cannot keep incident frames")
                        }
                    }
                }
            })?;
        store.enforce_bounds()?;
        Ok(store)
    }

    /// The settings.
    pub fn settings(&self) -> &IncidentSettings {
        &self.settings
    }

    fn guard(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&self, job: Job) {
        if self.tx.try_send(job).is_err() {
            self.metrics.incidents_dropped.inc();
        }
    }

    fn write(&self, job: Job) -> Result<String, String> {
        let at_ms = job
            .at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let id = format!("{at_ms:013}-{}-{}", job.stream, job.kind.name());
        if !valid_id(&id) {
            return Err(format!("incident id {id:?}"));
        }
        let tmp = self.settings.dir.join(format!(".tmp-{id}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut frames = Vec::new();
        for (n, (native, scored, onset)) in job.frames.iter().enumerate() {
            let img = to_rgb(native, self.settings.max_px)?;
            let path = tmp.join(format!("frame-{n}.png"));
            std::fs::write(&path, crate::labels::encode_frame_png(&img))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(sf) = scored {
                let path = tmp.join(format!("frame-{n}.model.png"));
                std::fs::write(&path, crate::labels::encode_frame_png(&sf.frame.image))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            frames.push(IncidentFrame {
                n,
                pts: native.pts,
                width: img.width as u32,
                height: img.height as u32,
                onset: *onset,
                scored: scored.as_ref().map(|sf| ScoredInfo {
                    run_id: Some(self.run_id.clone()),
                    frame_id: sf.frame.id,
                    score: sf.score,
                    prompt_version: sf.prompt_version,
                    embedding: sf.embedding.clone(),
                    provenance: self.provenance.clone(),
                }),
            });
        }
        let incident = Incident {
            id: id.clone(),
            stream: job.stream,
            kind: job.kind,
            at: crate::state::unix_seconds(job.at),
            quality: job.quality,
            frames,
        };
        let json = serde_json::to_vec_pretty(&incident).expect("an incident serialises");
        std::fs::write(tmp.join("incident.json"), json).map_err(|e| e.to_string())?;
        {
            let _g = self.guard();
            let dest = self.settings.dir.join(&id);
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        }
        self.enforce_bounds().map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// Deletes the oldest incidents until at most `max_count` and `max_bytes` remain.
    fn enforce_bounds(&self) -> Result<(), std::io::Error> {
        let _g = self.guard();
        let mut all: Vec<(String, u64)> = Vec::new();
        for e in std::fs::read_dir(&self.settings.dir)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !valid_id(&name) || !e.path().is_dir() {
                continue;
            }
            let bytes = std::fs::read_dir(e.path())?
                .flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum();
            all.push((name, bytes));
        }
        all.sort();
        let mut total: u64 = all.iter().map(|(_, b)| b).sum();
        let mut count = all.len();
        for (name, bytes) in &all {
            if count <= self.settings.max_count && total <= self.settings.max_bytes {
                break;
            }
            std::fs::remove_dir_all(self.settings.dir.join(name))?;
            total -= bytes;
            count -= 1;
        }
        self.metrics.incident_bytes.set(total as i64);
        Ok(())
    }

    /// Every incident kept, newest first.
    pub fn list(&self) -> Vec<Incident> {
        let _g = self.guard();
        let Ok(dir) = std::fs::read_dir(&self.settings.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| valid_id(n))
            .collect();
        names.sort_unstable_by(|a, b| b.cmp(a));
        names.iter().filter_map(|n| self.read(n)).collect()
    }

    /// One incident by id.
    pub fn get(&self, id: &str) -> Option<Incident> {
        valid_id(id).then(|| self.read(id)).flatten()
    }

    fn read(&self, id: &str) -> Option<Incident> {
        let text = std::fs::read(self.settings.dir.join(id).join("incident.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The stored PNG of frame `n` of incident `id`: native (`model = false`) or as
    /// scored.
    pub fn frame_png(&self, id: &str, n: usize, model: bool) -> Option<Vec<u8>> {
        if !valid_id(id) {
            return None;
        }
        let name = if model {
            format!("frame-{n}.model.png")
        } else {
            format!("frame-{n}.png")
        };
        std::fs::read(self.settings.dir.join(id).join(name)).ok()
    }
}

/// Converts a native frame to RGB, its display size (pixel aspect applied) scaled so
/// that the longer side is at most `max_px`.
fn to_rgb(f: &NativeFrame, max_px: u32) -> Result<RgbImage, String> {
    let info = &f.info;
    let par = info.par();
    let display_w = (u64::from(info.width()) * par.numer().max(1) as u64
        / par.denom().max(1) as u64)
        .max(1) as f64;
    let h = f64::from(info.height().max(1));
    let scale = (f64::from(max_px) / display_w.max(h)).min(1.0);
    let (ow, oh) = (
        ((display_w * scale).round() as u32).max(2),
        ((h * scale).round() as u32).max(2),
    );
    let out_info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, ow, oh)
        .fps(info.fps())
        .interlace_mode(info.interlace_mode())
        .build()
        .map_err(|e| e.to_string())?;
    let conv = gst_video::VideoConverter::new(info, &out_info, None).map_err(|e| e.to_string())?;
    let src = gst_video::VideoFrame::from_buffer_readable(f.buffer.clone(), info)
        .map_err(|_| "the native frame cannot be mapped".to_string())?;
    let out = gst::Buffer::with_size(out_info.size()).map_err(|e| e.to_string())?;
    let mut dest = gst_video::VideoFrame::from_buffer_writable(out, &out_info)
        .map_err(|_| "no output frame".to_string())?;
    conv.frame(&src, &mut dest);
    let stride = dest.plane_stride()[0] as usize;
    let data = dest.plane_data(0).map_err(|e| e.to_string())?;
    let (w, h) = (ow as usize, oh as usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        rgb.extend_from_slice(&data[y * stride..y * stride + w * 3]);
    }
    Ok(RgbImage::from_packed(w, h, rgb))
}

struct Pending {
    kind: IncidentKind,
    at: SystemTime,
    quality: Option<f64>,
    onset_pts: Option<f64>,
    frames: Vec<Arc<NativeFrame>>,
}

struct Lowest {
    since: Instant,
    best: Option<(Arc<NativeFrame>, Arc<ScoredFrame>)>,
}

/// One stream's incident capture: its last decoded frames, incidents waiting for the
/// frame after their onset, the quality crossing and the period's lowest score.
pub struct Tracker {
    store: Arc<IncidentStore>,
    stream: String,
    ring: Mutex<VecDeque<Arc<NativeFrame>>>,
    pending: Mutex<Vec<Pending>>,
    last: Mutex<[Option<Instant>; IncidentKind::ALL.len()]>,
    below: Mutex<bool>,
    lowest: Mutex<Lowest>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn same_pts(a: Option<f64>, b: Option<f64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if (a - b).abs() < 1e-6)
}

impl Tracker {
    /// A tracker for `stream` writing to `store`.
    pub fn new(store: Arc<IncidentStore>, stream: &str) -> Self {
        Self {
            store,
            stream: stream.to_string(),
            ring: Mutex::new(VecDeque::with_capacity(RING)),
            pending: Mutex::new(Vec::new()),
            last: Mutex::new([None; IncidentKind::ALL.len()]),
            below: Mutex::new(false),
            lowest: Mutex::new(Lowest {
                since: Instant::now(),
                best: None,
            }),
        }
    }

    /// A decoded frame arrived (after the model's copy of it). Completes the incidents
    /// that were waiting for a frame after their onset; `scored` finds a frame the model
    /// has scored by pts.
    pub fn native(&self, f: NativeFrame, scored: impl Fn(Option<f64>) -> Option<Arc<ScoredFrame>>) {
        let f = Arc::new(f);
        {
            let mut ring = lock(&self.ring);
            if ring.len() == RING {
                ring.pop_front();
            }
            ring.push_back(f.clone());
        }
        let mut pending = lock(&self.pending);
        let mut i = 0;
        while i < pending.len() {
            let p = &mut pending[i];
            p.frames.push(f.clone());
            let after_onset = match (f.pts, p.onset_pts) {
                (Some(t), Some(onset)) => t > onset + 1e-6,
                _ => p.frames.len() >= BEFORE + 2,
            };
            if after_onset || p.frames.len() > RING + 4 {
                let p = pending.swap_remove(i);
                self.complete(p, &scored);
            } else {
                i += 1;
            }
        }
    }

    fn complete(&self, p: Pending, scored: &impl Fn(Option<f64>) -> Option<Arc<ScoredFrame>>) {
        // The frames up to the onset (at most BEFORE before it), the onset's, one after.
        let mut frames: Vec<Arc<NativeFrame>> = Vec::new();
        for f in p.frames {
            if !frames
                .iter()
                .any(|g| same_pts(g.pts, f.pts) && f.pts.is_some())
            {
                frames.push(f);
            }
        }
        let onset_idx = frames
            .iter()
            .position(|f| same_pts(f.pts, p.onset_pts))
            .unwrap_or(frames.len().saturating_sub(2));
        let start = onset_idx.saturating_sub(BEFORE);
        let end = (onset_idx + 2).min(frames.len());
        let job = Job {
            stream: self.stream.clone(),
            kind: p.kind,
            at: p.at,
            quality: p.quality,
            frames: frames[start..end]
                .iter()
                .enumerate()
                .map(|(k, f)| (f.clone(), scored(f.pts), start + k == onset_idx))
                .collect(),
        };
        self.store.submit(job);
    }

    /// Whether an incident of `kind` may start now (one per kind per minute).
    fn may_start(&self, kind: IncidentKind) -> bool {
        let mut last = lock(&self.last);
        let slot = &mut last[kind as usize];
        if slot.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
            return false;
        }
        *slot = Some(Instant::now());
        true
    }

    /// An onset at the frame of stream time `pts` (its decoded copy arrives next).
    pub fn onset(&self, kind: IncidentKind, pts: Option<f64>, quality: Option<f64>) {
        if !self.may_start(kind) {
            return;
        }
        let frames: Vec<Arc<NativeFrame>> = lock(&self.ring).iter().cloned().collect();
        lock(&self.pending).push(Pending {
            kind,
            at: SystemTime::now(),
            quality,
            onset_pts: pts,
            frames,
        });
    }

    /// A frame was scored; `quality` is the stream's mean after it. Starts a quality-low
    /// incident on the crossing, and keeps the period's lowest-scoring frame.
    pub fn scored(&self, sf: &Arc<ScoredFrame>, quality: Option<f64>) {
        let threshold = self.store.settings.quality_below;
        if let Some(q) = quality {
            let mut below = lock(&self.below);
            if !*below && q < threshold {
                *below = true;
                drop(below);
                // Its decoded copy is in the ring already: complete at once.
                if self.may_start(IncidentKind::QualityLow) {
                    let frames: Vec<Arc<NativeFrame>> = lock(&self.ring).iter().cloned().collect();
                    let p = Pending {
                        kind: IncidentKind::QualityLow,
                        at: SystemTime::now(),
                        quality: Some(q),
                        onset_pts: sf.frame.pts,
                        frames,
                    };
                    lock(&self.pending).push(p);
                }
            } else if *below && q > threshold + 0.05 {
                *below = false;
            }
        }
        let mut lowest = lock(&self.lowest);
        if lowest.since.elapsed() >= self.store.settings.lowest_every {
            if let Some((native, sf)) = lowest.best.take() {
                let pts = native.pts;
                self.store.submit(Job {
                    stream: self.stream.clone(),
                    kind: IncidentKind::Lowest,
                    at: sf.frame.captured,
                    quality: Some(f64::from(sf.score)),
                    frames: vec![(native, Some(sf), true)],
                });
                tracing::debug!(stream = %self.stream, pts, "Lowest-scoring frame of the period kept");
            }
            lowest.since = Instant::now();
        }
        if lowest.best.as_ref().is_none_or(|(_, b)| sf.score < b.score)
            && let Some(native) = lock(&self.ring)
                .iter()
                .rev()
                .find(|f| same_pts(f.pts, sf.frame.pts))
                .cloned()
        {
            lowest.best = Some((native, sf.clone()));
        }
    }
}

/// Where a stream's decoded frames go ([`crate::ingest::pipeline::build`]).
pub type NativeSink = Arc<dyn Fn(NativeFrame) + Send + Sync>;

/// Builds a [`NativeFrame`] from an appsink sample: the buffer copied (decoders reuse
/// theirs) with its stream time.
pub fn native_from_sample(sample: &gst::Sample) -> Option<NativeFrame> {
    let caps = sample.caps()?;
    let info = gst_video::VideoInfo::from_caps(caps).ok()?;
    let buffer = sample.buffer()?;
    let pts = buffer.pts().map(|pts| {
        sample
            .segment()
            .and_then(|s| s.downcast_ref::<gst::ClockTime>())
            .and_then(|s| s.to_stream_time(pts))
            .unwrap_or(pts)
            .nseconds() as f64
            / 1e9
    });
    Some(NativeFrame {
        pts,
        buffer: buffer.copy_deep().ok()?,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An incident kept before runs were recorded reads as it was written; a label on it
    /// goes to a run of the incident's own: valid, stable, different per incident.
    #[test]
    fn scored_frames_without_a_run_get_one_of_their_incident() {
        let old = r#"{"frame_id": 7, "score": 0.5, "prompt_version": 0, "embedding": [1.0],
            "provenance": {"bundle": "b", "model_sha256": "aa"}}"#;
        let s: ScoredInfo = serde_json::from_str(old).unwrap();
        assert_eq!(s.run_id, None);
        let a = s.label_run_id("1796650000000-cam-black");
        assert!(crate::labels::store::valid_run_id(&a), "{a}");
        assert!(a.starts_with("incident-") && a.len() == 25, "{a}");
        assert_eq!(a, s.label_run_id("1796650000000-cam-black"));
        assert_ne!(a, s.label_run_id("1796650000000-cam-freeze"));
        let s = ScoredInfo {
            run_id: Some("00ff00ff00ff00ff".into()),
            ..s
        };
        assert_eq!(
            s.label_run_id("1796650000000-cam-black"),
            "00ff00ff00ff00ff"
        );
        // Written with its run, and read back.
        let back: ScoredInfo = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
