//! The stream registry: the daemon's streams at run time. Adding, replacing or removing
//! a stream starts, restarts or stops only that stream's pipeline (its supervisor
//! thread); every other stream keeps running and counting. A config reload and the
//! runtime streams API are calls on it ([`StreamRegistry::apply`],
//! [`StreamRegistry::add`], [`StreamRegistry::remove`]).
//!
//! Each stream lives in a slot, the index frames carry ([`crate::frame::Frame::stream`]);
//! slots are read without locks by the scoring engine's sink and by HTTP. A removed
//! stream's slot is never reused, so frames of it still in the queue find no stream and
//! are dropped; a replaced stream keeps its slot and its metric series.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::{QcSettings, Source, StreamSettings, Views};
use crate::frame::{Frame, ScoredFrame};
use crate::ingest::supervisor::{Backoff, Supervision, supervise};
use crate::ingest::{Handoff, PipelineSpec};
use crate::metrics::{DropReason, Metrics};
use crate::score::ScoreSink;
use crate::score::bundle::ResizeRule;
use crate::score::prompts::PromptSet;
use crate::state::StreamState;

/// What every stream's pipeline and state are built with, besides its own settings.
#[derive(Clone)]
pub struct StreamContext {
    /// The metrics registry (per-stream children are resolved from it).
    pub metrics: Arc<Metrics>,
    /// QC thresholds.
    pub qc: QcSettings,
    /// Recent scored frames kept per stream.
    pub recent_frames: usize,
    /// The model's input side.
    pub input_size: u32,
    /// How frames are brought to the input size.
    pub resize: ResizeRule,
    /// How the model looks at each frame.
    pub views: Views,
    /// The daemon's shutdown; each stream runs under a child of it.
    pub shutdown: CancellationToken,
    /// Where streams keep incident frames, if they do.
    pub incidents: Option<Arc<crate::incidents::IncidentStore>>,
}

/// Why a registry change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// `add` of an id that is already running.
    #[error("stream {0:?} already exists")]
    Exists(String),
    /// `replace` or `remove` of an id that is not running.
    #[error("no stream {0:?}")]
    NotFound(String),
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The supervisor thread could not be started.
    #[error("cannot start the supervisor thread of stream {id:?}: {message}")]
    Spawn {
        /// The stream.
        id: String,
        /// Why.
        message: String,
    },
}

/// What [`StreamRegistry::apply`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Streams started.
    pub added: Vec<String>,
    /// Streams whose settings changed, restarted.
    pub restarted: Vec<String>,
    /// Streams stopped and removed.
    pub removed: Vec<String>,
    /// Streams left running untouched.
    pub unchanged: Vec<String>,
}

/// A running stream: its settings, its state and its supervisor.
struct Running {
    settings: StreamSettings,
    state: Arc<StreamState>,
    stop: CancellationToken,
    thread: JoinHandle<()>,
}

impl Running {
    /// Stops the supervisor (its pipeline goes to EOS and Null) and waits for it.
    fn stop(self) -> Arc<StreamState> {
        self.stop.cancel();
        let _ = self.thread.join();
        self.state
    }
}

/// The streams by slot, read without locks (by the engine's sink and by HTTP through
/// the registry); written only by the registry.
#[derive(Default)]
pub struct StreamSlots(ArcSwap<Vec<Option<Arc<StreamState>>>>);

impl StreamSlots {
    /// The stream in `slot`, if it is still registered.
    pub fn get(&self, slot: usize) -> Option<Arc<StreamState>> {
        self.0.load().get(slot).cloned().flatten()
    }

    /// Every registered stream, in slot order.
    pub fn all(&self) -> Vec<Arc<StreamState>> {
        self.0.load().iter().flatten().cloned().collect()
    }

    fn next_slot(&self) -> usize {
        self.0.load().len()
    }

    fn set(&self, slot: usize, state: Option<Arc<StreamState>>) {
        self.0.rcu(|slots| {
            let mut next = Vec::clone(slots);
            if next.len() <= slot {
                next.resize(slot + 1, None);
            }
            next[slot] = state.clone();
            next
        });
    }
}

/// The daemon's streams, by id and by slot.
pub struct StreamRegistry {
    ctx: StreamContext,
    handoff: Mutex<Option<Handoff>>,
    slots: Arc<StreamSlots>,
    running: Mutex<BTreeMap<String, Running>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The source as shown in the API (credentials removed by [`StreamState::new`]).
fn source_text(source: &Source) -> &str {
    match source {
        Source::Uri(u) => u,
        Source::Pipeline(p) => p,
    }
}

impl StreamRegistry {
    /// An empty registry over `slots` whose streams send frames to `handoff`.
    pub fn new(ctx: StreamContext, slots: Arc<StreamSlots>, handoff: Handoff) -> Self {
        Self {
            ctx,
            handoff: Mutex::new(Some(handoff)),
            slots,
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// The stream `id`, if registered.
    pub fn get(&self, id: &str) -> Option<Arc<StreamState>> {
        self.all().into_iter().find(|s| s.id == id)
    }

    /// Every registered stream, in the order they were first added.
    pub fn all(&self) -> Vec<Arc<StreamState>> {
        self.slots.all()
    }

    /// How many streams are registered.
    pub fn len(&self) -> usize {
        lock(&self.running).len()
    }

    /// Whether no stream is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The settings stream `id` runs with.
    pub fn settings(&self, id: &str) -> Option<StreamSettings> {
        lock(&self.running).get(id).map(|r| r.settings.clone())
    }

    /// Starts a new stream; refused if its id is already running.
    pub fn add(&self, settings: StreamSettings) -> Result<(), RegistryError> {
        let mut running = lock(&self.running);
        if running.contains_key(&settings.id) {
            return Err(RegistryError::Exists(settings.id));
        }
        let slot = self.slots.next_slot();
        let r = self.start(slot, settings)?;
        self.slots.set(slot, Some(r.state.clone()));
        tracing::info!(stream = %r.settings.id, "Stream added");
        running.insert(r.settings.id.clone(), r);
        Ok(())
    }

    /// Restarts stream `settings.id` with new settings, in its slot; its metric series
    /// go on counting. Refused if the id is not running.
    pub fn replace(&self, settings: StreamSettings) -> Result<(), RegistryError> {
        let mut running = lock(&self.running);
        let old = running
            .remove(&settings.id)
            .ok_or_else(|| RegistryError::NotFound(settings.id.clone()))?;
        let slot = old.state.index;
        old.stop();
        match self.start(slot, settings) {
            Ok(r) => {
                self.slots.set(slot, Some(r.state.clone()));
                tracing::info!(stream = %r.settings.id, "Stream restarted with new settings");
                running.insert(r.settings.id.clone(), r);
                Ok(())
            }
            Err(e) => {
                self.slots.set(slot, None);
                Err(e)
            }
        }
    }

    /// Stops stream `id` and removes it and its metric series. Refused if not running.
    pub fn remove(&self, id: &str) -> Result<(), RegistryError> {
        let old = lock(&self.running)
            .remove(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        let slot = old.state.index;
        let state = old.stop();
        self.slots.set(slot, None);
        self.ctx.metrics.remove_stream(id, &state.attribute_names());
        tracing::info!(stream = %id, "Stream removed");
        Ok(())
    }

    /// Makes the running streams match `desired`: starts new ids, restarts those whose
    /// settings changed, removes those no longer listed, and leaves the rest alone.
    /// Stops at the first stream that cannot be started, with the changes so far made.
    pub fn apply(&self, desired: &[StreamSettings]) -> Result<ApplyReport, RegistryError> {
        let mut report = ApplyReport::default();
        let current: Vec<String> = lock(&self.running).keys().cloned().collect();
        for id in current {
            if !desired.iter().any(|s| s.id == id) {
                self.remove(&id)?;
                report.removed.push(id);
            }
        }
        for s in desired {
            match self.settings(&s.id) {
                None => {
                    self.add(s.clone())?;
                    report.added.push(s.id.clone());
                }
                Some(old) if old != *s => {
                    self.replace(s.clone())?;
                    report.restarted.push(s.id.clone());
                }
                Some(_) => report.unchanged.push(s.id.clone()),
            }
        }
        Ok(report)
    }

    /// Stops every stream and lets go of the queue, so the scoring engine can drain and
    /// stop. Called once, at shutdown; later changes are refused.
    pub fn shutdown(&self) {
        let mut running = lock(&self.running);
        lock(&self.handoff).take();
        let all = std::mem::take(&mut *running);
        for r in all.values() {
            r.stop.cancel();
        }
        for (_, r) in all {
            r.stop();
        }
    }

    fn start(&self, slot: usize, settings: StreamSettings) -> Result<Running, RegistryError> {
        let handoff = lock(&self.handoff)
            .clone()
            .ok_or(RegistryError::ShuttingDown)?;
        let ctx = &self.ctx;
        let metrics = ctx.metrics.stream(&settings.id);
        metrics
            .quality_drop_threshold
            .set(settings.quality_drop_threshold);
        let state = StreamState::new(
            slot,
            &settings.id,
            source_text(&settings.source),
            metrics,
            &ctx.qc,
            ctx.recent_frames,
        );
        let state = Arc::new(match &ctx.incidents {
            Some(store) => state.with_incidents(store.clone()),
            None => state,
        });
        let sup = Supervision {
            spec: PipelineSpec {
                source: settings.source.clone(),
                sample_fps: settings.sample_fps,
                keyframes: settings.keyframes,
                realtime: settings.realtime,
                input_size: ctx.input_size,
                resize: ctx.resize,
                views: ctx.views,
            },
            stall_timeout: ctx.qc.stall_timeout,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            handoff,
            restart_on_eos: settings.restart_on_eos,
        };
        let stop = ctx.shutdown.child_token();
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("ingest-{}", settings.id))
                .spawn(move || supervise(state, sup, stop))
                .map_err(|e| RegistryError::Spawn {
                    id: settings.id.clone(),
                    message: e.to_string(),
                })?
        };
        Ok(Running {
            settings,
            state,
            stop,
            thread,
        })
    }
}

/// The daemon's [`ScoreSink`]: scores and drops land in the stream of their slot.
pub struct StreamSink {
    slots: Arc<StreamSlots>,
    metrics: Arc<Metrics>,
}

impl StreamSink {
    /// A sink over the registry's slots.
    pub fn new(slots: Arc<StreamSlots>, metrics: Arc<Metrics>) -> Self {
        Self { slots, metrics }
    }
}

impl ScoreSink for StreamSink {
    fn publish(&self, frames: Vec<ScoredFrame>, prompts: &PromptSet) {
        let names: Vec<String> = prompts.attributes.iter().map(|(n, _)| n.clone()).collect();
        for sf in frames {
            let latency = sf.frame.arrived.elapsed().as_secs_f64();
            if let Some(st) = self.slots.get(sf.frame.stream) {
                st.publish(sf, &names);
            }
            self.metrics.frame_latency.observe(latency);
        }
    }

    fn dropped(&self, frames: &[Frame], reason: DropReason) {
        for f in frames {
            if let Some(st) = self.slots.get(f.stream) {
                st.metrics.dropped(reason, 1);
            }
        }
    }
}
