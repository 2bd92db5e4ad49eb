//! Configuration: [`Config`] as read (TOML file layered over defaults and under
//! `STREAMIQ__SECTION__KEY` environment variables), validated once into [`Settings`].
//!
//! Every error names the key and the bad value, so that `streamiq check-config` can
//! print one line an operator can act on.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::qc::{PerKind, SegmentKind};

mod backend;
pub use backend::{Backend, Precision, TORCH_BUILT, TorchSettings};

/// A configuration that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or the environment could not be parsed (unknown key, wrong type, bad TOML).
    #[error("{path}: {message}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// What the parser said, with the key it was at.
        message: String,
    },
    /// A key holds a value outside what it accepts.
    #[error("{key} = {value}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `scorer.max_batch` or `streams[1].id`.
        key: String,
        /// The offending value as written.
        value: String,
        /// Why it is refused.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        key: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration file, as read.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP server.
    pub server: ServerConfig,
    /// Model bundle and execution.
    pub model: ModelConfig,
    /// Batching and scoring.
    pub scorer: ScorerConfig,
    /// Quality-control detectors.
    pub qc: QcConfig,
    /// Recent frames and the label store.
    pub labels: LabelsConfig,
    /// Few-shot adaptation (read by `streamiq-adapt`).
    pub adapt: AdaptConfig,
    /// The gates `streamiq scan` fails a file on (its flags override them).
    pub scan: ScanConfig,
    /// Sharding the streams over several daemons.
    pub cluster: crate::cluster::ClusterConfig,
    /// The streams to watch.
    pub streams: Vec<StreamConfig>,
}

/// `[scan]`: when `streamiq scan` fails a file (exit code 1). Unset = no such gate.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanConfig {
    /// Fail a file whose mean score is below this.
    pub fail_below: Option<f64>,
    /// Fail a file whose 5th-percentile score is below this.
    pub fail_below_p5: Option<f64>,
    /// Fail a file with a black segment at least this long ("3s").
    pub fail_on_black: Option<String>,
    /// Fail a file with a frozen segment at least this long.
    pub fail_on_freeze: Option<String>,
    /// Fail a file with colour bars at least this long.
    pub fail_on_bars: Option<String>,
}

/// Validated `[scan]`: the gates a scanned file must pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScanGates {
    /// Mean score below this fails (gate `mean_below`).
    pub mean_below: Option<f64>,
    /// 5th-percentile score below this fails (gate `p5_below`).
    pub p5_below: Option<f64>,
    /// A segment of a kind at least this long fails (gate named after the kind).
    pub segment_at_least: PerKind<Option<Duration>>,
}

impl ScanGates {
    /// Validates the `[scan]` keys (also used for the command line's flags, with
    /// `--fail-*` in place of `scan.fail_*` in errors).
    pub fn from_config(c: &ScanConfig, prefix: &str) -> Result<Self, ConfigError> {
        // Scores are in 0..1; a limit outside fails every file or none, which a
        // pipeline may want, but it must be a number.
        let score = |key: &str, v: Option<f64>| match v {
            Some(x) if !x.is_finite() => Err(ConfigError::invalid(
                format!("{prefix}{key}"),
                x,
                "must be a number (scores are within 0..1)",
            )),
            _ => Ok(v),
        };
        let mut segment_at_least = PerKind::default();
        for kind in SegmentKind::ALL {
            let value = match kind {
                SegmentKind::Black => &c.fail_on_black,
                SegmentKind::Freeze => &c.fail_on_freeze,
                SegmentKind::Bars => &c.fail_on_bars,
            };
            if let Some(v) = value {
                let key = format!("{prefix}fail_on_{}", kind.name());
                segment_at_least[kind] = Some(duration(&key, v)?);
            }
        }
        Ok(Self {
            mean_below: score("fail_below", c.fail_below)?,
            p5_below: score("fail_below_p5", c.fail_below_p5)?,
            segment_at_least,
        })
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address for /metrics, /healthz, /readyz, the API and the label page.
    pub listen: String,
    /// Bearer token for write routes; created with mode 0600 if missing.
    pub api_token_file: PathBuf,
    /// Longest time the ordered shutdown may take before the process exits anyway.
    pub shutdown_timeout: String,
    /// Open HTTP connections at most; more are closed at once.
    pub max_connections: usize,
    /// Open HTTP connections from one client address at most.
    pub max_connections_per_ip: usize,
    /// A connection must send a request's whole header within this time of becoming
    /// idle (its first request or the end of the previous one), or it is closed.
    pub header_timeout: String,
    /// A request (body included) must be answered within this time, or it gets a 408.
    pub request_timeout: String,
    /// `Host` names answered (no port); empty: loopback names on a loopback listen
    /// address, any name otherwise. Others get 421 (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Streams added through `POST /api/v1/streams`, kept across restarts.
    pub runtime_streams: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9790".into(),
            api_token_file: "state/api-token".into(),
            shutdown_timeout: "10s".into(),
            max_connections: 256,
            max_connections_per_ip: 32,
            header_timeout: "10s".into(),
            request_timeout: "30s".into(),
            allowed_hosts: Vec::new(),
            runtime_streams: "state/runtime-streams.toml".into(),
        }
    }
}

/// `[model]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model bundle directory.
    pub bundle: PathBuf,
    /// Versioned prompt sets written by `streamiq-adapt`.
    pub prompts_dir: PathBuf,
    /// Execution providers in order of preference: "tensorrt", "cuda", "cpu".
    pub execution: Vec<String>,
    /// ONNX Runtime intra-op threads; 0 = its default.
    pub intra_threads: usize,
    /// Path of `libonnxruntime.so`; empty = the one recorded at build time or `ORT_DYLIB_PATH`.
    pub onnxruntime_lib: PathBuf,
    /// ONNX Runtime: run the tower's graph with cheaper equivalents of its pooling
    /// (`score::rewrite`); false runs the file exactly as it is.
    pub graph_rewrites: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            bundle: "models/streamiq-tiny".into(),
            prompts_dir: "state/prompts".into(),
            execution: vec!["cpu".into()],
            intra_threads: 0,
            onnxruntime_lib: PathBuf::new(),
            graph_rewrites: true,
        }
    }
}

/// `[scorer]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScorerConfig {
    /// Largest batch handed to the model.
    pub max_batch: usize,
    /// Longest wait from a batch's first frame to its flush.
    pub max_wait: String,
    /// Frames the handoff queue holds.
    pub queue_capacity: usize,
    /// What a live source does when the queue is full: "drop_oldest" or "drop_newest".
    pub when_full: String,
    /// "global" (whole frame resized), "crops:N" or "mixed:N" (the whole frame and N crops).
    pub views: String,
    /// What runs the visual tower: "onnxruntime" (`visual.onnx`), "torch" (`visual.pt`;
    /// a build with the `torch` feature) or "kserve" (a KServe v2 gRPC server).
    pub backend: String,
    /// Torch backend: "cpu" or "cuda:N".
    pub device: String,
    /// Torch backend: "fp32", or "fp16" (CUDA autocast; needs a CUDA device).
    pub precision: String,
    /// Torch backend: a CUDA device that is missing or fails to load the tower runs the
    /// tower on the CPU instead of stopping the start.
    pub fallback_cpu: bool,
    /// KServe backend (`[scorer.kserve]`): the server and the model it serves.
    pub kserve: crate::score::kserve::KserveConfig,
}

impl Default for ScorerConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_wait: "20ms".into(),
            queue_capacity: 256,
            when_full: "drop_oldest".into(),
            views: "crops:4".into(),
            backend: "onnxruntime".into(),
            device: "cpu".into(),
            precision: "fp32".into(),
            fallback_cpu: false,
            kserve: Default::default(),
        }
    }
}

/// `[qc]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QcConfig {
    /// `streamiq_quality_score` is the mean over this window.
    pub window: String,
    /// A pixel is dark when its luma (0..1) is at most this.
    pub black_luma_max: f64,
    /// A frame is black when at least this share of its pixels is dark.
    pub black_pixel_ratio: f64,
    /// A black run becomes a segment once it has lasted this long.
    pub black_min_duration: String,
    /// Consecutive sampled frames whose mean absolute difference (0..1) is at most this are frozen.
    pub freeze_mad_max: f64,
    /// A frozen run becomes a segment once it has lasted this long.
    pub freeze_min_duration: String,
    /// Colour bars (SMPTE / EBU test pattern) become a segment once shown this long.
    pub bars_min_duration: String,
    /// No frame for this long: the stream is down and its pipeline is rebuilt.
    pub stall_timeout: String,
}

impl Default for QcConfig {
    fn default() -> Self {
        Self {
            window: "10s".into(),
            black_luma_max: 0.10,
            black_pixel_ratio: 0.98,
            black_min_duration: "2s".into(),
            freeze_mad_max: 0.002,
            freeze_min_duration: "2s".into(),
            bars_min_duration: "2s".into(),
            stall_timeout: "5s".into(),
        }
    }
}

/// `[labels]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelsConfig {
    /// SQLite label store.
    pub db: PathBuf,
    /// Recent scored frames kept per stream for labelling and thumbnails.
    pub recent_frames: usize,
    /// Labels the store may hold; a label beyond it is refused (507), nothing stored is
    /// ever deleted to make room.
    pub max_labels: u64,
    /// Labels accepted per minute, all clients together; more get 429 with Retry-After.
    pub max_per_minute: u32,
    /// Where incident frames are kept.
    pub incidents_dir: PathBuf,
    /// Incidents kept at most (the oldest go first); 0 keeps none.
    pub incidents_max: usize,
    /// Disk the incidents may take, MiB.
    pub incidents_max_mib: u64,
    /// Longer side of a kept frame at most, pixels.
    pub incident_max_px: u32,
    /// A stream's quality mean falling below this starts an incident.
    pub incident_quality_below: f64,
    /// Each stream's lowest-scoring frame of every such period is kept.
    pub incident_lowest_every: String,
}

impl Default for LabelsConfig {
    fn default() -> Self {
        Self {
            db: "state/labels.sqlite".into(),
            recent_frames: 200,
            max_labels: 100_000,
            max_per_minute: 120,
            incidents_dir: "state/incidents".into(),
            incidents_max: 200,
            incidents_max_mib: 2048,
            incident_max_px: 1920,
            incident_quality_below: 0.35,
            incident_lowest_every: "1h".into(),
        }
    }
}

/// `[adapt]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptConfig {
    /// Fewest labels an adaptation round needs.
    pub min_labels: usize,
    /// Share of labels held out for early stopping and promotion.
    pub holdout: f64,
    /// Gradient-regularisation strength; 0 disables it.
    pub lambda: f64,
    /// Upper bound on training epochs.
    pub max_epochs: usize,
    /// "cpu" or "cuda:N".
    pub device: String,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            min_labels: 20,
            holdout: 0.2,
            lambda: 5.0,
            max_epochs: 200,
            device: "cpu".into(),
        }
    }
}

/// `[[streams]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// `[a-z0-9_-]{1,64}`; the only per-stream metric label.
    pub id: String,
    /// A URI GStreamer can open (file, rtsp, srt, udp, http/hls).
    #[serde(default)]
    pub uri: Option<String>,
    /// A launch line ending in raw video, instead of `uri`.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// Frames per second to sample; 0 = every frame.
    #[serde(default = "default_sample_fps")]
    pub sample_fps: f64,
    /// "fps" (default: `sample_fps` frames per second, every one decoded) or
    /// "keyframes" (only key units reach the decoder, then at most `sample_fps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<String>,
    /// false: a file is read as fast as scoring allows (no drops, backpressure instead).
    #[serde(default = "default_true")]
    pub realtime: bool,
    /// What a source that is not live does at its end: "restart" (rebuild the pipeline
    /// with backoff) or "stop". Default: "stop" for `file:` URIs and `realtime = false`,
    /// "restart" for everything else (a TCP or HTTP server that closed, files that
    /// vanished under multifilesrc). Live sources always restart.
    #[serde(default)]
    pub on_eos: Option<String>,
    /// How far this stream's 5-minute mean quality may fall below its own 24-hour
    /// median before the QualityDropped alert fires (exported as
    /// `streamiq_quality_drop_threshold`).
    #[serde(default = "default_quality_drop")]
    pub quality_drop_threshold: f64,
}

fn default_quality_drop() -> f64 {
    0.15
}

fn default_sample_fps() -> f64 {
    2.0
}

fn default_true() -> bool {
    true
}

/// Where a stream's frames come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Opened with `uridecodebin3` (`uridecodebin` for `file:` URIs).
    Uri(String),
    /// A launch line that ends in raw video.
    Pipeline(String),
}

/// What a live source does when the handoff queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Evict the oldest queued frame to make room.
    DropOldest,
    /// Drop the frame that just arrived.
    DropNewest,
}

/// How each frame is looked at by the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Views {
    /// The whole frame, resized to the model's input.
    Global,
    /// N crops at (close to) native scale, the most detailed N of a grid of 2N, scores
    /// averaged.
    Crops(NonZeroUsize),
    /// The whole frame and N crops: the frame's score is a weighted mean of the
    /// whole-frame score and the crops' mean score (the whole frame's share is
    /// `score::preprocess::MIXED_GLOBAL_WEIGHT`).
    /// The whole frame carries content and exposure, the crops the fine artefacts a
    /// reduction to the model's input erases.
    Mixed(NonZeroUsize),
}

impl Views {
    /// Crops per frame (0 for `global`).
    pub fn crops(self) -> usize {
        match self {
            Views::Global => 0,
            Views::Crops(n) | Views::Mixed(n) => n.get(),
        }
    }

    /// Whether the model sees the whole frame (`global` and `mixed:N`).
    pub fn has_global(self) -> bool {
        !matches!(self, Views::Crops(_))
    }
}

impl std::fmt::Display for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Views::Global => f.write_str("global"),
            Views::Crops(n) => write!(f, "crops:{n}"),
            Views::Mixed(n) => write!(f, "mixed:{n}"),
        }
    }
}

/// One validated stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSettings {
    /// Metric label and API id.
    pub id: String,
    /// Frame source.
    pub source: Source,
    /// Sampling rate; `None` = every frame.
    pub sample_fps: Option<f64>,
    /// Only key units are decoded (`sample = "keyframes"`).
    pub keyframes: bool,
    /// Live pacing (drops by policy) or as fast as scoring allows (backpressure).
    pub realtime: bool,
    /// Rebuild the pipeline when a source that is not live reaches its end.
    pub restart_on_eos: bool,
    /// QualityDropped's margin below the stream's 24-hour median, in (0, 1].
    pub quality_drop_threshold: f64,
}

/// Validated `[scorer]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScorerSettings {
    /// Largest batch.
    pub max_batch: NonZeroUsize,
    /// Longest wait from a batch's first frame.
    pub max_wait: Duration,
    /// Handoff queue capacity.
    pub queue_capacity: NonZeroUsize,
    /// Full-queue policy for live sources.
    pub when_full: WhenFull,
    /// Views per frame.
    pub views: Views,
    /// The library (and its device) that runs the visual tower.
    pub backend: Backend,
}

/// Validated `[qc]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QcSettings {
    /// Quality window.
    pub window: Duration,
    /// Dark-pixel luma threshold, 0..1.
    pub black_luma_max: f32,
    /// Share of dark pixels that makes a frame black.
    pub black_pixel_ratio: f32,
    /// Frozen-frame MAD threshold, 0..1.
    pub freeze_mad_max: f32,
    /// Minimum duration of a segment, per kind (`qc.{kind}_min_duration`).
    pub min_duration: PerKind<Duration>,
    /// No-frame timeout.
    pub stall_timeout: Duration,
}

/// Validated `[model]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Prompt-set directory.
    pub prompts_dir: PathBuf,
    /// Execution providers in order.
    pub execution: Vec<ExecutionProvider>,
    /// ONNX Runtime intra-op threads (0 = default).
    pub intra_threads: usize,
    /// Explicit ONNX Runtime library, if configured.
    pub onnxruntime_lib: Option<PathBuf>,
    /// Whether the tower's graph is rewritten to cheaper equivalents as it loads.
    pub graph_rewrites: bool,
}

/// An ONNX Runtime execution provider streamiq knows how to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionProvider {
    /// NVIDIA TensorRT.
    TensorRt,
    /// NVIDIA CUDA.
    Cuda,
    /// The CPU (always available).
    Cpu,
}

impl ExecutionProvider {
    /// The name used in the config and in `streamiq_build_info{execution}`.
    pub fn name(self) -> &'static str {
        match self {
            Self::TensorRt => "tensorrt",
            Self::Cuda => "cuda",
            Self::Cpu => "cpu",
        }
    }
}

/// Limits that keep slow, idle or too many HTTP clients from using up the daemon's
/// file descriptors (which GStreamer sockets and the label store share).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpLimits {
    /// Open connections at most.
    pub max_connections: NonZeroUsize,
    /// Open connections from one client address at most.
    pub max_connections_per_ip: NonZeroUsize,
    /// Time to send a request's header, from the moment the connection is idle.
    pub header_timeout: Duration,
    /// Time to answer a request, body included.
    pub request_timeout: Duration,
}

/// Validated `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Bind address.
    pub listen: SocketAddr,
    /// Bearer-token file.
    pub api_token_file: PathBuf,
    /// Shutdown deadline.
    pub shutdown_timeout: Duration,
    /// Connection and time limits of the HTTP server.
    pub limits: HttpLimits,
    /// `server.allowed_hosts`, lower case.
    pub allowed_hosts: Vec<String>,
    /// `server.runtime_streams`.
    pub runtime_streams: PathBuf,
}

/// Where libtorch runs (`adapt.device` for the sidecar, `scorer.device` for the torch
/// backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchDevice {
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(u32),
}

impl TorchDevice {
    /// Parses `"cpu"` or `"cuda:N"`; the error names `key`.
    pub fn parse(key: &str, value: &str) -> Result<Self, ConfigError> {
        if value == "cpu" {
            return Ok(Self::Cpu);
        }
        value
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Self::Cuda)
            .ok_or_else(|| {
                ConfigError::invalid(key, format!("{value:?}"), "expected \"cpu\" or \"cuda:N\"")
            })
    }
}

impl std::fmt::Display for TorchDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Validated `[adapt]` (read by the sidecar, `streamiq-adapt`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptSettings {
    /// Fewest labels an adaptation round needs.
    pub min_labels: usize,
    /// Share of labels held out for early stopping and promotion, in (0, 1).
    pub holdout: f64,
    /// Gradient-regularisation strength, finite and >= 0.
    pub lambda: f64,
    /// Upper bound on training epochs.
    pub max_epochs: NonZeroUsize,
    /// Where libtorch runs.
    pub device: TorchDevice,
}

/// The validated configuration every stage is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// HTTP server.
    pub server: ServerSettings,
    /// Model.
    pub model: ModelSettings,
    /// Batching and scoring.
    pub scorer: ScorerSettings,
    /// QC detectors.
    pub qc: QcSettings,
    /// Recent frames kept per stream.
    pub recent_frames: NonZeroUsize,
    /// Label store path.
    pub labels_db: PathBuf,
    /// Bounds on what the label API stores.
    pub label_limits: LabelLimits,
    /// Incident frames (`labels.incident*`); `max_count` 0 keeps none.
    pub incidents: crate::incidents::IncidentSettings,
    /// Few-shot adaptation (the sidecar's).
    pub adapt: AdaptSettings,
    /// `streamiq scan`'s gates.
    pub scan: ScanGates,
    /// Which replica this daemon is; it watches only the streams that fall to it.
    pub cluster: crate::cluster::Cluster,
    /// The primary this replica forwards labels to and takes prompt sets from
    /// (`cluster.primary`), unless it is the primary or there is none.
    pub follow: Option<crate::cluster::Follow>,
    /// This daemon is the cluster's primary: it takes the labels replicas forward.
    pub cluster_primary: bool,
    /// Streams, in config order (all of them: [`cluster`](Self::cluster) picks this
    /// daemon's).
    pub streams: Vec<StreamSettings>,
}

impl Config {
    /// Reads `path` over the built-in defaults, with `STREAMIQ__SECTION__KEY` overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let parse = |e: config::ConfigError| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        };
        if !path.is_file() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "no such file".into(),
            });
        }
        config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("STREAMIQ")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("model.execution"),
            )
            .build()
            .map_err(parse)?
            .try_deserialize()
            .map_err(parse)
    }

    /// Parses TOML text (no environment), for tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<inline>".into(),
            message: e.to_string(),
        })
    }

    /// Validates into [`Settings`]; relative paths are kept relative to the working directory.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        self.settings()
    }

    /// Validates a borrowed configuration (the caller keeps it, e.g. to print it).
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let cluster = self.cluster.validate(crate::cluster::hostname)?;
        let follow = self.cluster.follow(&cluster, &self.server.api_token_file)?;
        let cluster_primary = self.cluster.is_primary(&cluster);
        if let Some(host) = self.cluster.primary_host() {
            let allowed = &self.server.allowed_hosts;
            if !allowed.is_empty() && !allowed.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
                return Err(ConfigError::invalid(
                    "cluster.primary",
                    self.cluster.primary.as_deref().unwrap_or_default(),
                    format!(
                        "its host {host:?} is not in server.allowed_hosts: the primary would \
                         refuse the replicas (421); add it there"
                    ),
                ));
            }
        }
        let server = ServerSettings {
            listen: self.server.listen.parse().map_err(|_| {
                ConfigError::invalid("server.listen", &self.server.listen, "expected IP:PORT")
            })?,
            api_token_file: self.server.api_token_file.clone(),
            shutdown_timeout: duration("server.shutdown_timeout", &self.server.shutdown_timeout)?,
            limits: self.validate_http_limits()?,
            allowed_hosts: self
                .server
                .allowed_hosts
                .iter()
                .map(|h| {
                    let name = h.trim().to_ascii_lowercase();
                    let hostname = !name.is_empty()
                        && name.len() <= 253
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
                    if hostname || name.parse::<std::net::IpAddr>().is_ok() {
                        Ok(name)
                    } else {
                        Err(ConfigError::invalid(
                            "server.allowed_hosts",
                            h,
                            "expected a host name or IP address, without port",
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
            runtime_streams: self.server.runtime_streams.clone(),
        };
        let model = self.validate_model()?;
        let scorer = self.validate_scorer()?;
        let qc = self.validate_qc()?;
        // Each kept frame holds its working-size picture (about 0.27 MB at 398x224, 1 MB
        // with crops): the cap bounds the memory a stream can take.
        let recent_frames = NonZeroUsize::new(self.labels.recent_frames)
            .filter(|n| n.get() <= MAX_RECENT_FRAMES)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "labels.recent_frames",
                    self.labels.recent_frames,
                    format!("must be within 1..={MAX_RECENT_FRAMES}"),
                )
            })?;
        let adapt = self.validate_adapt()?;
        let streams = self.validate_streams()?;
        Ok(Settings {
            server,
            model,
            scorer,
            qc,
            recent_frames,
            labels_db: self.labels.db.clone(),
            incidents: self.validate_incidents()?,
            label_limits: LabelLimits {
                max_labels: NonZeroU64::new(self.labels.max_labels).ok_or_else(|| {
                    ConfigError::invalid("labels.max_labels", 0, "must be at least 1")
                })?,
                max_per_minute: NonZeroU32::new(self.labels.max_per_minute).ok_or_else(|| {
                    ConfigError::invalid("labels.max_per_minute", 0, "must be at least 1")
                })?,
            },
            adapt,
            scan: ScanGates::from_config(&self.scan, "scan.")?,
            cluster,
            follow,
            cluster_primary,
            streams,
        })
    }

    fn validate_incidents(&self) -> Result<crate::incidents::IncidentSettings, ConfigError> {
        let l = &self.labels;
        if !(64..=8192).contains(&l.incident_max_px) {
            return Err(ConfigError::invalid(
                "labels.incident_max_px",
                l.incident_max_px,
                "must be within 64..=8192",
            ));
        }
        if !(l.incident_quality_below >= 0.0 && l.incident_quality_below <= 1.0) {
            return Err(ConfigError::invalid(
                "labels.incident_quality_below",
                l.incident_quality_below,
                "must be within 0..=1",
            ));
        }
        if l.incidents_max_mib == 0 || l.incidents_max_mib > 1 << 30 {
            return Err(ConfigError::invalid(
                "labels.incidents_max_mib",
                l.incidents_max_mib,
                "must be at least 1",
            ));
        }
        let lowest_every = duration("labels.incident_lowest_every", &l.incident_lowest_every)?;
        if lowest_every < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "labels.incident_lowest_every",
                &l.incident_lowest_every,
                "must be at least 1s",
            ));
        }
        Ok(crate::incidents::IncidentSettings {
            dir: l.incidents_dir.clone(),
            max_count: l.incidents_max,
            max_bytes: l.incidents_max_mib << 20,
            max_px: l.incident_max_px,
            quality_below: l.incident_quality_below,
            lowest_every,
        })
    }

    fn validate_http_limits(&self) -> Result<HttpLimits, ConfigError> {
        let s = &self.server;
        let count = |key: &str, n: usize| {
            NonZeroUsize::new(n).ok_or_else(|| ConfigError::invalid(key, 0, "must be at least 1"))
        };
        let positive = |key: &str, value: &str| {
            let d = duration(key, value)?;
            if d.is_zero() {
                return Err(ConfigError::invalid(
                    key,
                    format!("{value:?}"),
                    "must be above 0",
                ));
            }
            Ok(d)
        };
        Ok(HttpLimits {
            max_connections: count("server.max_connections", s.max_connections)?,
            max_connections_per_ip: count(
                "server.max_connections_per_ip",
                s.max_connections_per_ip,
            )?,
            header_timeout: positive("server.header_timeout", &s.header_timeout)?,
            request_timeout: positive("server.request_timeout", &s.request_timeout)?,
        })
    }

    fn validate_model(&self) -> Result<ModelSettings, ConfigError> {
        let m = &self.model;
        if m.execution.is_empty() {
            return Err(ConfigError::invalid(
                "model.execution",
                "[]",
                "name at least one provider",
            ));
        }
        let execution = m
            .execution
            .iter()
            .map(|e| match e.as_str() {
                "tensorrt" => Ok(ExecutionProvider::TensorRt),
                "cuda" => Ok(ExecutionProvider::Cuda),
                "cpu" => Ok(ExecutionProvider::Cpu),
                other => Err(ConfigError::invalid(
                    "model.execution",
                    format!("{other:?}"),
                    "expected \"tensorrt\", \"cuda\" or \"cpu\"",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ModelSettings {
            bundle: m.bundle.clone(),
            prompts_dir: m.prompts_dir.clone(),
            execution,
            intra_threads: m.intra_threads,
            onnxruntime_lib: (!m.onnxruntime_lib.as_os_str().is_empty())
                .then(|| m.onnxruntime_lib.clone()),
            graph_rewrites: m.graph_rewrites,
        })
    }

    fn validate_scorer(&self) -> Result<ScorerSettings, ConfigError> {
        let s = &self.scorer;
        let nz = |key: &str, v: usize| {
            NonZeroUsize::new(v).ok_or_else(|| ConfigError::invalid(key, v, "must be at least 1"))
        };
        let when_full = match s.when_full.as_str() {
            "drop_oldest" => WhenFull::DropOldest,
            "drop_newest" => WhenFull::DropNewest,
            other => {
                return Err(ConfigError::invalid(
                    "scorer.when_full",
                    format!("{other:?}"),
                    "expected \"drop_oldest\" or \"drop_newest\"",
                ));
            }
        };
        let views = parse_views(&s.views)?;
        Ok(ScorerSettings {
            max_batch: nz("scorer.max_batch", s.max_batch)?,
            max_wait: duration("scorer.max_wait", &s.max_wait)?,
            queue_capacity: nz("scorer.queue_capacity", s.queue_capacity)?,
            when_full,
            views,
            backend: backend::parse_backend(s)?,
        })
    }

    fn validate_qc(&self) -> Result<QcSettings, ConfigError> {
        let q = &self.qc;
        let unit = |key: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(v as f32)
            } else {
                Err(ConfigError::invalid(key, v, "must be within 0..1"))
            }
        };
        let window = duration("qc.window", &q.window)?;
        if window.is_zero() {
            return Err(ConfigError::invalid("qc.window", &q.window, "must be > 0"));
        }
        let stall_timeout = duration("qc.stall_timeout", &q.stall_timeout)?;
        if stall_timeout < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "qc.stall_timeout",
                &q.stall_timeout,
                "must be at least 100ms",
            ));
        }
        let mut min_duration = PerKind::<Duration>::default();
        for kind in SegmentKind::ALL {
            let value = match kind {
                SegmentKind::Black => &q.black_min_duration,
                SegmentKind::Freeze => &q.freeze_min_duration,
                SegmentKind::Bars => &q.bars_min_duration,
            };
            min_duration[kind] = duration(&format!("qc.{}_min_duration", kind.name()), value)?;
        }
        Ok(QcSettings {
            window,
            black_luma_max: unit("qc.black_luma_max", q.black_luma_max)?,
            black_pixel_ratio: unit("qc.black_pixel_ratio", q.black_pixel_ratio)?,
            freeze_mad_max: unit("qc.freeze_mad_max", q.freeze_mad_max)?,
            min_duration,
            stall_timeout,
        })
    }

    fn validate_adapt(&self) -> Result<AdaptSettings, ConfigError> {
        let a = &self.adapt;
        if !(a.holdout > 0.0 && a.holdout < 1.0) {
            return Err(ConfigError::invalid(
                "adapt.holdout",
                a.holdout,
                "must be within (0, 1)",
            ));
        }
        if !(a.lambda >= 0.0 && a.lambda.is_finite()) {
            return Err(ConfigError::invalid(
                "adapt.lambda",
                a.lambda,
                "must be finite and >= 0",
            ));
        }
        let max_epochs = NonZeroUsize::new(a.max_epochs)
            .ok_or_else(|| ConfigError::invalid("adapt.max_epochs", 0, "must be at least 1"))?;
        Ok(AdaptSettings {
            min_labels: a.min_labels,
            holdout: a.holdout,
            lambda: a.lambda,
            max_epochs,
            device: TorchDevice::parse("adapt.device", &a.device)?,
        })
    }

    /// Validates stream tables alone, as a config file holding only them would be.
    pub fn validate_stream_list(
        streams: &[StreamConfig],
    ) -> Result<Vec<StreamSettings>, ConfigError> {
        Config {
            streams: streams.to_vec(),
            ..Config::default()
        }
        .validate_streams()
    }

    fn validate_streams(&self) -> Result<Vec<StreamSettings>, ConfigError> {
        // Each daemon watches at most MAX_STREAMS; a sharded list may be longer (what
        // one replica gets is checked again when its streams start).
        let cap = MAX_STREAMS * self.cluster.replicas.max(1) as usize;
        if self.streams.len() > cap {
            return Err(ConfigError::invalid(
                "streams",
                format!("{} streams", self.streams.len()),
                format!(
                    "at most {MAX_STREAMS} per daemon (each has a thread and a pipeline); \
                     split them over several daemons (cluster.replicas)"
                ),
            ));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(self.streams.len());
        for (i, s) in self.streams.iter().enumerate() {
            let key = |k: &str| format!("streams[{i}].{k}");
            if !valid_stream_id(&s.id) {
                return Err(ConfigError::invalid(
                    key("id"),
                    format!("{:?}", s.id),
                    "expected [a-z0-9_-]{1,64}",
                ));
            }
            if !seen.insert(s.id.clone()) {
                return Err(ConfigError::invalid(
                    key("id"),
                    format!("{:?}", s.id),
                    "duplicate stream id",
                ));
            }
            let source = match (&s.uri, &s.pipeline) {
                (Some(u), None) if u.contains("://") => Source::Uri(u.clone()),
                (Some(u), None) => {
                    return Err(ConfigError::invalid(
                        key("uri"),
                        format!("{u:?}"),
                        "expected a URI such as file:///path or rtsp://host/path",
                    ));
                }
                (None, Some(p)) if !p.trim().is_empty() => Source::Pipeline(p.clone()),
                (None, Some(p)) => {
                    return Err(ConfigError::invalid(
                        key("pipeline"),
                        format!("{p:?}"),
                        "empty launch line",
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        key("uri"),
                        "(with pipeline)",
                        "set either uri or pipeline, not both",
                    ));
                }
                (None, None) => {
                    return Err(ConfigError::invalid(
                        format!("streams[{i}]"),
                        &s.id,
                        "needs a uri or a pipeline",
                    ));
                }
            };
            let restart_on_eos = match s.on_eos.as_deref() {
                None => s.realtime && !matches!(&source, Source::Uri(u) if u.starts_with("file:")),
                Some("restart") => true,
                Some("stop") => false,
                Some(other) => {
                    return Err(ConfigError::invalid(
                        key("on_eos"),
                        format!("{other:?}"),
                        "expected \"restart\" or \"stop\"",
                    ));
                }
            };
            out.push(StreamSettings {
                id: s.id.clone(),
                source,
                sample_fps: sample_fps(&key("sample_fps"), s.sample_fps)?,
                keyframes: match s.sample.as_deref() {
                    None | Some("fps") => false,
                    Some("keyframes") => true,
                    Some(other) => {
                        return Err(ConfigError::invalid(
                            key("sample"),
                            format!("{other:?}"),
                            "expected \"fps\" or \"keyframes\"",
                        ));
                    }
                },
                realtime: s.realtime,
                restart_on_eos,
                quality_drop_threshold: if s.quality_drop_threshold > 0.0
                    && s.quality_drop_threshold <= 1.0
                {
                    s.quality_drop_threshold
                } else {
                    return Err(ConfigError::invalid(
                        key("quality_drop_threshold"),
                        s.quality_drop_threshold,
                        "must be within (0, 1]",
                    ));
                },
            });
        }
        Ok(out)
    }
}

/// `[labels]` bounds on the label API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelLimits {
    /// `labels.max_labels`.
    pub max_labels: NonZeroU64,
    /// `labels.max_per_minute`.
    pub max_per_minute: NonZeroU32,
}

/// Streams one daemon runs at most.
pub const MAX_STREAMS: usize = 512;

/// Most recent frames kept per stream (`labels.recent_frames`).
pub const MAX_RECENT_FRAMES: usize = 1000;

/// The one sampling-rate rule (config and `scan --sample-fps`): 0 means every frame
/// (`None`), otherwise up to 240 frames per second.
pub fn sample_fps(key: &str, value: f64) -> Result<Option<f64>, ConfigError> {
    if !(0.0..=240.0).contains(&value) {
        return Err(ConfigError::invalid(
            key,
            value,
            "must be within 0..240 (0 = every frame)",
        ));
    }
    Ok((value > 0.0).then_some(value))
}

/// Whether `id` matches `[a-z0-9_-]{1,64}`.
pub fn valid_stream_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Parses a duration such as "250ms", "10s" or "6h".
pub fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("{value:?}"),
            format!("{e}; expected e.g. \"250ms\", \"10s\", \"6h\""),
        )
    })
}

fn parse_views(v: &str) -> Result<Views, ConfigError> {
    if v == "global" {
        return Ok(Views::Global);
    }
    let count = |n: &str| {
        n.parse::<usize>()
            .ok()
            .and_then(|n| NonZeroUsize::new(n).filter(|n| n.get() <= 64))
    };
    v.strip_prefix("crops:")
        .and_then(count)
        .map(Views::Crops)
        .or_else(|| v.strip_prefix("mixed:").and_then(count).map(Views::Mixed))
        .ok_or_else(|| {
            ConfigError::invalid(
                "scorer.views",
                format!("{v:?}"),
                "expected \"global\", \"crops:N\" or \"mixed:N\" with N in 1..=64",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> String {
        "[[streams]]\nid = \"a\"\npipeline = \"videotestsrc is-live=true\"\n".to_string()
    }

    fn err(text: &str) -> String {
        match Config::from_toml(text).and_then(Config::validate) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_validate() {
        let s = Config::from_toml(&base()).unwrap().validate().unwrap();
        assert_eq!(s.scorer.max_batch.get(), 8);
        assert_eq!(s.scorer.max_wait, Duration::from_millis(20));
        assert_eq!(s.qc.window, Duration::from_secs(10));
        assert_eq!(s.streams[0].sample_fps, Some(2.0));
        assert_eq!(s.server.listen.port(), 9790);
        assert!(s.model.graph_rewrites);
        let off = Config::from_toml(&format!("[model]\ngraph_rewrites = false\n{}", base()))
            .unwrap()
            .validate()
            .unwrap();
        assert!(!off.model.graph_rewrites);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("[scorer]\nmax_bach = 3\n{}", base()));
        assert!(e.contains("max_bach"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err(&format!("[scorer]\nmax_batch = \"many\"\n{}", base()));
        assert!(e.contains("max_batch") || e.contains("integer"), "{e}");
    }

    #[test]
    fn duplicate_stream_id_is_refused() {
        let e = err(&format!("{}{}", base(), base()));
        assert!(
            e.contains("streams[1].id") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[scorer]\nmax_wait = \"soon\"\n", "scorer.max_wait"),
            ("[scorer]\nwhen_full = \"block\"\n", "scorer.when_full"),
            ("[scorer]\nviews = \"crops:0\"\n", "scorer.views"),
            (
                "[server]\nallowed_hosts = [\"qc.example\"]\n[cluster]\nreplicas = 2\n\
                 replica = 1\nprimary = \"http://streamiq-0.streamiq:9790\"\n",
                "cluster.primary",
            ),
            ("[qc]\nblack_luma_max = 2.0\n", "qc.black_luma_max"),
            ("[model]\nexecution = [\"gpu\"]\n", "model.execution"),
            ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
            ("[adapt]\ndevice = \"tpu\"\n", "adapt.device"),
            ("[labels]\nrecent_frames = 100000\n", "labels.recent_frames"),
            ("[labels]\nmax_labels = 0\n", "labels.max_labels"),
            ("[labels]\nmax_per_minute = 0\n", "labels.max_per_minute"),
            ("[labels]\nincident_max_px = 10\n", "labels.incident_max_px"),
            (
                "[labels]\nincident_quality_below = 2.0\n",
                "labels.incident_quality_below",
            ),
            (
                "[labels]\nincident_lowest_every = \"soon\"\n",
                "labels.incident_lowest_every",
            ),
            (
                "[labels]\nincidents_max_mib = 0\n",
                "labels.incidents_max_mib",
            ),
            (
                "[server]\nallowed_hosts = [\"a.example:80\"]\n",
                "server.allowed_hosts",
            ),
            ("[server]\nmax_connections = 0\n", "server.max_connections"),
            (
                "[server]\nheader_timeout = \"0s\"\n",
                "server.header_timeout",
            ),
        ] {
            let e = err(&format!("{text}{}", base()));
            assert!(e.starts_with(key), "{key}: {e}");
        }
        let e = err("[[streams]]\nid = \"Bad Id\"\npipeline = \"x\"\n");
        assert!(e.starts_with("streams[0].id"), "{e}");
        let e = err("[[streams]]\nid = \"a\"\n");
        assert!(e.contains("needs a uri or a pipeline"), "{e}");
        let e = err("[[streams]]\nid = \"a\"\nuri = \"/tmp/x.mp4\"\n");
        assert!(e.starts_with("streams[0].uri"), "{e}");
        let many: String = (0..=MAX_STREAMS)
            .map(|i| format!("[[streams]]\nid = \"s{i}\"\npipeline = \"videotestsrc\"\n"))
            .collect();
        let e = err(&many);
        assert!(e.starts_with("streams") && e.contains("at most 512"), "{e}");
    }

    #[test]
    fn views_parse() {
        assert_eq!(parse_views("global").unwrap(), Views::Global);
        assert_eq!(
            parse_views("crops:5").unwrap(),
            Views::Crops(NonZeroUsize::new(5).unwrap())
        );
        let mixed = parse_views("mixed:4").unwrap();
        assert_eq!(mixed, Views::Mixed(NonZeroUsize::new(4).unwrap()));
        assert_eq!((mixed.crops(), mixed.has_global()), (4, true));
        for v in ["global", "crops:3", "mixed:4"] {
            assert_eq!(parse_views(v).unwrap().to_string(), v, "round trip");
        }
        for bad in [
            "mixed:0", "mixed:65", "mixed:", "mixed", "crops:x", "Global",
        ] {
            let e = parse_views(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("scorer.views") && e.contains("mixed:N"),
                "{bad}: {e}"
            );
        }
    }
}

/// Property tests: no input, however malformed, makes loading or validating panic;
/// a bad one always gets an error.
#[cfg(test)]
mod props {
    use super::Config;
    use proptest::prelude::*;

    const SECTIONS: &[&str] = &[
        "server",
        "model",
        "scorer",
        "qc",
        "labels",
        "adapt",
        "[streams]",
        "junk",
    ];
    const KEYS: &[&str] = &[
        "listen",
        "api_token_file",
        "shutdown_timeout",
        "max_connections",
        "max_connections_per_ip",
        "header_timeout",
        "request_timeout",
        "allowed_hosts",
        "runtime_streams",
        "bundle",
        "prompts_dir",
        "execution",
        "intra_threads",
        "graph_rewrites",
        "max_batch",
        "max_wait",
        "queue_capacity",
        "when_full",
        "views",
        "backend",
        "precision",
        "fallback_cpu",
        "window",
        "black_luma_max",
        "black_pixel_ratio",
        "black_min_duration",
        "freeze_mad_max",
        "freeze_min_duration",
        "bars_min_duration",
        "stall_timeout",
        "db",
        "recent_frames",
        "max_labels",
        "max_per_minute",
        "incidents_dir",
        "incidents_max",
        "incidents_max_mib",
        "incident_max_px",
        "incident_quality_below",
        "incident_lowest_every",
        "min_labels",
        "holdout",
        "lambda",
        "max_epochs",
        "device",
        "id",
        "uri",
        "pipeline",
        "sample_fps",
        "sample",
        "realtime",
        "on_eos",
        "nope",
    ];

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            any::<bool>().prop_map(|b| b.to_string()),
            "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
            prop::collection::vec("[a-z:0-9]{0,8}", 0..4).prop_map(|v| format!("{v:?}")),
            Just("\"crops:0\"".to_string()),
            Just("\"99999999999999999999s\"".to_string()),
            Just("\"-1s\"".to_string()),
        ]
    }

    fn document() -> impl Strategy<Value = String> {
        prop::collection::vec(
            (
                prop::sample::select(SECTIONS),
                prop::collection::vec((prop::sample::select(KEYS), value()), 0..6),
            ),
            0..6,
        )
        .prop_map(|sections| {
            let mut text = String::new();
            for (section, pairs) in sections {
                text.push_str(&format!("[{section}]\n"));
                for (k, v) in pairs {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            text
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_config_text_loads_or_names_an_error(text in document()) {
            if let Err(e) = Config::from_toml(&text).and_then(Config::validate) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        #[test]
        fn any_bytes_as_config_never_panic(text in "\\PC{0,200}") {
            let _ = Config::from_toml(&text).and_then(Config::validate);
        }
    }
}
