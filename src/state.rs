//! Per-stream runtime state, shared by ingest (frame arrivals, QC), the model thread
//! (scores) and HTTP (reads): quality windows, black/freeze detectors and segment
//! history, the recent-frame ring, supervisor status, and the stream's metrics.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::QcSettings;
use crate::frame::{Frame, RgbImage, ScoredFrame};
use crate::metrics::StreamMetrics;
use crate::qc::{PerKind, PictureDetectors, QcEvents, QualityWindow, Segment, Transition};

/// Closed segments kept per kind for the API.
const SEGMENT_HISTORY: usize = 1000;

/// What the supervisor is doing with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Pipeline being built.
    Starting,
    /// Playing and delivering frames.
    Playing,
    /// Waiting before a rebuild.
    Backoff,
    /// A finite source ended.
    Finished,
    /// Shut down.
    Stopped,
}

/// Supervisor status, for the API.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Current phase.
    pub phase: Phase,
    /// The last error or restart reason, if any.
    pub last_error: Option<String>,
    /// Pipeline rebuilds so far.
    pub restarts: u64,
}

/// QC state guarded by one lock.
pub struct Qc {
    /// Mean quality over the window.
    pub window: QualityWindow,
    /// Per-attribute windows, by name.
    pub attributes: Vec<(String, QualityWindow)>,
    /// Picture-segment detectors (black, freeze, bars).
    pub detectors: PictureDetectors<Arc<RgbImage>>,
    /// Closed segments per kind (most recent last).
    pub history: PerKind<VecDeque<Segment>>,
}

/// One stream's shared state.
pub struct StreamState {
    /// Index in the config.
    pub index: usize,
    /// Stream id (metric label).
    pub id: String,
    /// Source, with every credential removed ([`crate::redact`]), for the API.
    pub source: String,
    /// Metric children.
    pub metrics: StreamMetrics,
    qc_settings: QcSettings,
    qc: Mutex<Qc>,
    ring: Mutex<VecDeque<Arc<ScoredFrame>>>,
    ring_capacity: usize,
    status: Mutex<Status>,
    /// Milliseconds since `epoch` of the last frame that reached the appsink (0 = none).
    last_arrival_ms: AtomicU64,
    epoch: Instant,
    /// Scored frames per second, smoothed (f64 bits).
    fps_bits: AtomicU64,
    last_scored: Mutex<Option<Instant>>,
    /// Incident capture, when incidents are kept.
    incidents: Option<crate::incidents::Tracker>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StreamState {
    /// Fresh state for a stream.
    pub fn new(
        index: usize,
        id: &str,
        source: &str,
        metrics: StreamMetrics,
        qc: &QcSettings,
        ring_capacity: usize,
    ) -> Self {
        Self {
            index,
            id: id.to_string(),
            source: crate::redact::redact(source),
            metrics,
            qc_settings: qc.clone(),
            qc: Mutex::new(Self::fresh_qc(qc)),
            ring: Mutex::new(VecDeque::with_capacity(ring_capacity.min(1024))),
            ring_capacity,
            status: Mutex::new(Status {
                phase: Phase::Starting,
                last_error: None,
                restarts: 0,
            }),
            last_arrival_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            fps_bits: AtomicU64::new(0f64.to_bits()),
            last_scored: Mutex::new(None),
            incidents: None,
        }
    }

    /// The state, also keeping incident frames in `store` ([`crate::incidents`]).
    pub fn with_incidents(mut self, store: Arc<crate::incidents::IncidentStore>) -> Self {
        self.incidents = Some(crate::incidents::Tracker::new(store, &self.id));
        self
    }

    /// Whether incident frames are kept (the pipeline then has a native branch).
    pub fn keeps_incidents(&self) -> bool {
        self.incidents.is_some()
    }

    /// A sampled frame as decoded (the pipeline's native branch), for incidents.
    pub fn on_native(&self, f: crate::incidents::NativeFrame) {
        if let Some(t) = &self.incidents {
            t.native(f, |pts| self.find_by_pts(pts));
        }
    }

    /// The newest recent frame of stream time `pts`.
    fn find_by_pts(&self, pts: Option<f64>) -> Option<Arc<ScoredFrame>> {
        let pts = pts?;
        lock(&self.ring)
            .iter()
            .rev()
            .find(|f| f.frame.pts.is_some_and(|p| (p - pts).abs() < 1e-6))
            .cloned()
    }

    fn fresh_qc(qc: &QcSettings) -> Qc {
        Qc {
            window: QualityWindow::new(qc.window),
            attributes: Vec::new(),
            detectors: PictureDetectors::new(qc),
            history: PerKind::default(),
        }
    }

    /// Called by ingest for every sampled frame, before it is queued: counts it,
    /// marks the stream up and runs the black / freeze detectors. Returns what the
    /// picture was by itself ([`PictureDetectors::flags`]).
    pub fn on_arrival(&self, frame: &Frame) -> PerKind<bool> {
        self.metrics.decoded.inc();
        self.metrics.up.set(1);
        let ms = frame.arrived.duration_since(self.epoch).as_millis() as u64;
        self.last_arrival_ms.store(ms.max(1), Ordering::Relaxed);
        let t = frame.pts.unwrap_or_else(|| ms as f64 / 1000.0);
        let mut qc = lock(&self.qc);
        let ev = qc.detectors.update(t, frame.duration, frame.image.clone());
        if let Some(tracker) = &self.incidents {
            for (kind, tr) in ev.iter() {
                if matches!(tr, Transition::Started { .. }) {
                    let kind = crate::incidents::IncidentKind::of_segment(kind);
                    tracker.onset(kind, frame.pts, qc.window.mean());
                }
            }
        }
        self.apply(&mut qc, ev);
        qc.detectors.flags().clone()
    }

    fn apply(&self, qc: &mut Qc, ev: QcEvents) {
        let m = &self.metrics;
        for (kind, tr) in ev.iter() {
            let name = kind.name();
            match *tr {
                Transition::None => {}
                Transition::Started { start } => {
                    m.segment_active[kind].set(1);
                    m.segment_events[kind].inc();
                    tracing::info!(stream = %self.id, start, kind = name, "Segment started");
                }
                Transition::Ended(seg) => {
                    m.segment_active[kind].set(0);
                    tracing::info!(stream = %self.id, start = seg.start, end = seg.end, kind = name, "Segment ended");
                    let history = &mut qc.history[kind];
                    if history.len() == SEGMENT_HISTORY {
                        history.pop_front();
                    }
                    history.push_back(seg);
                }
            }
        }
    }

    /// Closes open segments (end of input or pipeline restart) and forgets the anchor.
    pub fn finish_segments(&self) {
        let mut qc = lock(&self.qc);
        let ev = qc.detectors.finish();
        self.apply(&mut qc, ev);
        qc.detectors = PictureDetectors::new(&self.qc_settings);
    }

    /// Time since the last frame arrived, or since `since` if none has.
    pub fn idle_for(&self, since: Instant) -> Duration {
        let ms = self.last_arrival_ms.load(Ordering::Relaxed);
        let last = if ms == 0 {
            since
        } else {
            (self.epoch + Duration::from_millis(ms)).max(since)
        };
        Instant::now().saturating_duration_since(last)
    }

    /// Whether any frame arrived after `since`.
    pub fn had_frame_since(&self, since: Instant) -> bool {
        let ms = self.last_arrival_ms.load(Ordering::Relaxed);
        ms != 0 && self.epoch + Duration::from_millis(ms) >= since
    }

    /// Publishes one scored frame: window means, metrics and the recent-frame ring.
    pub fn publish(&self, sf: ScoredFrame, attribute_names: &[String]) -> Arc<ScoredFrame> {
        let now = Instant::now();
        let m = &self.metrics;
        m.scored.inc();
        let quality = {
            let mut qc = lock(&self.qc);
            qc.window.push(now, sf.score);
            if let Some(mean) = qc.window.mean() {
                m.quality.set(mean);
            }
            if qc.attributes.len() != attribute_names.len()
                || qc
                    .attributes
                    .iter()
                    .zip(attribute_names)
                    .any(|(a, n)| &a.0 != n)
            {
                qc.attributes = attribute_names
                    .iter()
                    .map(|n| (n.clone(), QualityWindow::new(self.qc_settings.window)))
                    .collect();
            }
            for ((name, w), s) in qc.attributes.iter_mut().zip(&sf.attributes) {
                w.push(now, *s);
                if let Some(mean) = w.mean() {
                    m.attribute(name).set(mean);
                }
            }
            qc.window.mean()
        };
        let unix = sf
            .frame
            .captured
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        m.last_frame.set(unix);
        self.update_fps(now);
        let sf = Arc::new(sf);
        {
            let mut ring = lock(&self.ring);
            if ring.len() == self.ring_capacity {
                ring.pop_front();
            }
            ring.push_back(sf.clone());
        }
        if let Some(t) = &self.incidents {
            t.scored(&sf, quality);
        }
        sf
    }

    fn update_fps(&self, now: Instant) {
        let mut last = lock(&self.last_scored);
        if let Some(prev) = last.replace(now) {
            let dt = now.duration_since(prev).as_secs_f64().max(1e-4);
            let old = f64::from_bits(self.fps_bits.load(Ordering::Relaxed));
            let inst = 1.0 / dt;
            let new = if old == 0.0 {
                inst
            } else {
                0.9 * old + 0.1 * inst
            };
            self.fps_bits.store(new.to_bits(), Ordering::Relaxed);
        }
    }

    /// Smoothed scored frames per second.
    pub fn fps(&self) -> f64 {
        let stale = lock(&self.last_scored).is_none_or(|t| t.elapsed() > Duration::from_secs(5));
        if stale {
            0.0
        } else {
            f64::from_bits(self.fps_bits.load(Ordering::Relaxed))
        }
    }

    /// Sets the supervisor phase (and error, if given; the supervisor has removed any
    /// credential from it, as from the log).
    pub fn set_phase(&self, phase: Phase, error: Option<String>) {
        let mut s = lock(&self.status);
        s.phase = phase;
        if error.is_some() {
            s.last_error = error;
        }
        if phase != Phase::Playing {
            self.metrics.up.set(0);
        }
    }

    /// Counts a pipeline rebuild.
    pub fn count_restart(&self) {
        lock(&self.status).restarts += 1;
        self.metrics.restarts.inc();
    }

    /// The supervisor status.
    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// The attribute names this stream has published (its `streamiq_quality_attribute`
    /// series).
    pub fn attribute_names(&self) -> Vec<String> {
        lock(&self.qc)
            .attributes
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Window mean quality, if any frame was scored within the window.
    pub fn quality(&self) -> Option<f64> {
        lock(&self.qc).window.mean()
    }

    /// Which segments are active now, per kind.
    pub fn alarms(&self) -> PerKind<bool> {
        let qc = lock(&self.qc);
        PerKind::from_fn(|k| qc.detectors.is_active(k))
    }

    /// Closed segments, per kind.
    pub fn segments(&self) -> PerKind<Vec<Segment>> {
        lock(&self.qc)
            .history
            .map(|_, h| h.iter().copied().collect())
    }

    /// Recent scored frames, oldest first.
    pub fn recent(&self) -> Vec<Arc<ScoredFrame>> {
        lock(&self.ring).iter().cloned().collect()
    }

    /// A recent frame by id.
    pub fn find(&self, frame_id: u64) -> Option<Arc<ScoredFrame>> {
        let ring = lock(&self.ring);
        ring.binary_search_by_key(&frame_id, |f| f.frame.id)
            .ok()
            .map(|i| ring[i].clone())
    }
}

/// Seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}
