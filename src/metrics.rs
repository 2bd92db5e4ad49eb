//! Every Prometheus metric streamiq exports, declared once (names as in README.md, "Metrics").
//! Per-stream children are resolved once per stream into [`StreamMetrics`] so the hot
//! path does no label lookups.

use crate::qc::PerKind;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Reasons a frame is dropped before it is scored (`streamiq_frames_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The handoff queue was full.
    QueueFull,
    /// Inference failed for its batch (or produced a non-finite output).
    Error,
    /// The remote scorer (`scorer.backend = "kserve"`) was unreachable or too slow.
    ScorerUnavailable,
}

// `DropReason::ALL[i] as usize == i`, checked at compile time.
const _: () = {
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i] as usize == i);
        i += 1;
    }
};

impl DropReason {
    /// Every reason, in the order APIs list them and of declaration (`reason as usize`
    /// indexes the per-stream counters).
    pub const ALL: [Self; 3] = [Self::QueueFull, Self::Error, Self::ScorerUnavailable];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Error => "error",
            Self::ScorerUnavailable => "scorer_unavailable",
        }
    }
}

/// The metrics of a replica that follows the cluster's primary
/// ([`Metrics::register_follower`]).
#[derive(Clone)]
pub struct FollowerMetrics {
    /// `streamiq_cluster_primary_up`.
    pub primary_up: IntGauge,
    /// `streamiq_cluster_labels_queued`.
    pub labels_queued: IntGauge,
    /// `streamiq_cluster_labels_refused`.
    pub labels_refused: IntGauge,
    /// `streamiq_cluster_labels_forwarded_total`.
    pub labels_forwarded: IntCounter,
    /// `streamiq_cluster_sync_errors_total{kind}`.
    pub sync_errors: IntCounterVec,
    /// `streamiq_cluster_last_sync_timestamp_seconds`.
    pub last_sync: Gauge,
}

impl FollowerMetrics {
    /// The `kind` values of `streamiq_cluster_sync_errors_total`.
    pub const ERROR_KINDS: [&'static str; 6] = [
        "unreachable",
        "unauthorized",
        "refused",
        "checksum",
        "rejected",
        "local",
    ];
}

/// The registry and every metric family.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    build_info: IntGaugeVec,
    stream_up: IntGaugeVec,
    restarts: IntCounterVec,
    decoded: IntCounterVec,
    scored: IntCounterVec,
    dropped: IntCounterVec,
    quality: GaugeVec,
    quality_drop_threshold: GaugeVec,
    attribute: GaugeVec,
    segment_active: PerKind<IntGaugeVec>,
    segment_events: PerKind<IntCounterVec>,
    last_frame: GaugeVec,
    /// Frames per model call.
    pub batch_size: Histogram,
    /// Seconds per model call.
    pub inference_duration: Histogram,
    /// Appsink arrival to score published.
    pub frame_latency: Histogram,
    /// Frames waiting in the handoff queue.
    pub queue_depth: IntGauge,
    /// Active prompt-set version.
    pub prompt_version: IntGauge,
    /// Labels stored.
    pub labels_total: IntCounter,
    /// Incidents kept on disk, by stream and kind.
    pub incidents: IntCounterVec,
    /// Incidents not kept because the writer was behind.
    pub incidents_dropped: IntCounter,
    /// Bytes of the incident directory.
    pub incident_bytes: IntGauge,
    /// Execution providers that failed to load, by provider.
    pub provider_failures: IntCounterVec,
    /// Prompt sets refused at load or reload, by reason.
    pub prompt_rejects: IntCounterVec,
    /// 1 while the daemon scores with the bundle's own prompt set because the promoted
    /// one was adapted for another visual tower (refused at start), else 0.
    pub prompt_model_mismatch: IntGauge,
    /// Model calls that failed, by error kind.
    pub inference_errors: IntCounterVec,
    /// Open HTTP connections.
    pub http_connections: IntGauge,
    /// HTTP connections closed at once for being over a connection limit.
    pub http_connections_rejected: IntCounter,
    /// 1 if the last configuration reload (or the start) succeeded, else 0.
    pub config_reload_successful: IntGauge,
    /// Unix time of the last successful configuration load (start or reload).
    pub config_reload_success_time: Gauge,
    cluster_info: IntGaugeVec,
    /// Configured streams that other replicas watch (`[cluster]`).
    pub cluster_streams_elsewhere: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone()))
        .expect("metric names are unique and valid");
    m
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn fgauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    reg(
        r,
        GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    reg(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric"),
    )
}

impl Metrics {
    /// Creates and registers every metric, and the process collector
    /// (`process_resident_memory_bytes`, `process_open_fds`, `process_cpu_seconds_total`,
    /// `process_threads`, ...).
    pub fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once");
        let s = &["stream"];
        let latency_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Self {
            build_info: gauge(
                &r,
                "streamiq_build_info",
                "Build, the ONNX Runtime and GStreamer it runs with, and the active execution provider (always 1).",
                &["version", "revision", "onnxruntime", "gstreamer", "execution"],
            ),
            stream_up: gauge(
                &r,
                "streamiq_stream_up",
                "1 while the stream delivers frames.",
                s,
            ),
            restarts: counter(
                &r,
                "streamiq_stream_restarts_total",
                "Pipeline rebuilds after an error, EOS or stall.",
                s,
            ),
            decoded: counter(
                &r,
                "streamiq_frames_decoded_total",
                "Sampled frames that reached the appsink.",
                s,
            ),
            scored: counter(
                &r,
                "streamiq_frames_scored_total",
                "Frames the model scored.",
                s,
            ),
            dropped: counter(
                &r,
                "streamiq_frames_dropped_total",
                "Frames dropped before scoring, by reason.",
                &["stream", "reason"],
            ),
            quality: fgauge(
                &r,
                "streamiq_quality_score",
                "Mean quality score over qc.window, in [0,1].",
                s,
            ),
            quality_drop_threshold: fgauge(
                &r,
                "streamiq_quality_drop_threshold",
                "How far the 5-minute mean quality may fall below its 24-hour median before QualityDropped fires ([[streams]] quality_drop_threshold).",
                s,
            ),
            attribute: fgauge(
                &r,
                "streamiq_quality_attribute",
                "Mean attribute score over qc.window, in [0,1].",
                &["stream", "attribute"],
            ),
            segment_active: PerKind::from_fn(|k| {
                let name = format!("streamiq_{}_active", k.name());
                gauge(&r, &name, &format!("1 during {}.", k.describe()), s)
            }),
            segment_events: PerKind::from_fn(|k| {
                let name = format!("streamiq_{}_events_total", k.name());
                let help = format!("Segments of {} seen.", k.describe());
                counter(&r, &name, &help, s)
            }),
            last_frame: fgauge(
                &r,
                "streamiq_last_frame_timestamp_seconds",
                "Unix time of the last scored frame.",
                s,
            ),
            batch_size: histogram(
                &r,
                "streamiq_batch_size",
                "Frames per model call.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            inference_duration: histogram(
                &r,
                "streamiq_inference_duration_seconds",
                "Duration of one model call.",
                latency_buckets.clone(),
            ),
            frame_latency: histogram(
                &r,
                "streamiq_frame_latency_seconds",
                "Appsink arrival to score published.",
                latency_buckets.clone(),
            ),
            queue_depth: reg(
                &r,
                IntGauge::new(
                    "streamiq_queue_depth",
                    "Frames waiting in the handoff queue.",
                )
                .expect("valid metric"),
            ),
            prompt_version: reg(
                &r,
                IntGauge::new(
                    "streamiq_prompt_version",
                    "Version number of the active prompt set.",
                )
                .expect("valid metric"),
            ),
            labels_total: reg(
                &r,
                IntCounter::new("streamiq_labels_total", "Labels stored.").expect("valid metric"),
            ),
            incidents: counter(
                &r,
                "streamiq_incidents_total",
                "Incidents whose frames were kept on disk for labelling.",
                &["stream", "kind"],
            ),
            incidents_dropped: reg(
                &r,
                IntCounter::new(
                    "streamiq_incidents_dropped_total",
                    "Incidents not kept because the incident writer was behind.",
                )
                .expect("valid metric"),
            ),
            incident_bytes: reg(
                &r,
                IntGauge::new(
                    "streamiq_incident_bytes",
                    "Bytes of incident frames kept on disk.",
                )
                .expect("valid metric"),
            ),
            provider_failures: counter(
                &r,
                "streamiq_execution_provider_failures_total",
                "Execution providers that failed to load.",
                &["provider"],
            ),
            prompt_rejects: counter(
                &r,
                "streamiq_prompt_rejects_total",
                "Prompt sets refused at load or reload.",
                &["reason"],
            ),
            prompt_model_mismatch: reg(
                &r,
                IntGauge::new(
                    "streamiq_prompt_set_model_mismatch",
                    "1 while the promoted prompt set is refused for having been adapted for \
                     another visual tower and the bundle's own set (version 0) scores instead.",
                )
                .expect("valid metric"),
            ),
            inference_errors: counter(
                &r,
                "streamiq_inference_errors_total",
                "Model calls that failed, by error kind.",
                &["kind"],
            ),
            http_connections: reg(
                &r,
                IntGauge::new("streamiq_http_connections", "Open HTTP connections.")
                    .expect("valid metric"),
            ),
            http_connections_rejected: reg(
                &r,
                IntCounter::new(
                    "streamiq_http_connections_rejected_total",
                    "HTTP connections closed at once for being over server.max_connections or server.max_connections_per_ip.",
                )
                .expect("valid metric"),
            ),
            config_reload_successful: reg(
                &r,
                IntGauge::new(
                    "streamiq_config_last_reload_successful",
                    "Whether the last configuration reload attempt was successful.",
                )
                .expect("valid metric"),
            ),
            config_reload_success_time: reg(
                &r,
                Gauge::new(
                    "streamiq_config_last_reload_success_timestamp_seconds",
                    "Timestamp of the last successful configuration reload.",
                )
                .expect("valid metric"),
            ),
            cluster_info: gauge(
                &r,
                "streamiq_cluster_info",
                "This daemon's replica index and the replica count it shards the streams with (always 1).",
                &["replica", "replicas"],
            ),
            cluster_streams_elsewhere: reg(
                &r,
                IntGauge::new(
                    "streamiq_cluster_streams_elsewhere",
                    "Streams of the configuration file that other replicas watch (cluster.replicas).",
                )
                .expect("valid metric"),
            ),
            registry: r,
        }
    }

    /// Sets `streamiq_build_info{version, revision, onnxruntime, gstreamer, execution} = 1`
    /// (only one provider is active). `revision` is the source's git commit at build
    /// time ("unknown" outside a checkout).
    pub fn set_build_info(&self, onnxruntime: &str, gstreamer: &str, execution: &str) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                env!("STREAMIQ_REVISION"),
                onnxruntime,
                gstreamer,
                execution,
            ])
            .set(1);
    }

    /// Sets `streamiq_cluster_info{replica, replicas} = 1`.
    pub fn set_cluster(&self, cluster: crate::cluster::Cluster) {
        self.cluster_info.reset();
        self.cluster_info
            .with_label_values(&[cluster.replica.to_string(), cluster.replicas.to_string()])
            .set(1);
    }

    /// Registers and returns the metrics of a replica that follows the cluster's
    /// primary (`cluster.primary`); call once. Other daemons export none of them.
    pub fn register_follower(&self) -> FollowerMetrics {
        let r = &self.registry;
        let one = |name: &str, help: &str| reg(r, IntGauge::new(name, help).expect("valid metric"));
        let errors = counter(
            r,
            "streamiq_cluster_sync_errors_total",
            "Failed exchanges with the cluster's primary, by kind: unreachable (no answer, or a server error), unauthorized (401/403: another token), refused (it answered that it cannot take a label or give its prompt set), checksum (a prompt set that did not match its sha256), rejected (a prompt set this replica cannot use), local (this replica's own token file or label store).",
            &["kind"],
        );
        for kind in FollowerMetrics::ERROR_KINDS {
            errors.with_label_values(&[kind]);
        }
        FollowerMetrics {
            primary_up: one(
                "streamiq_cluster_primary_up",
                "1 when the cluster's primary (cluster.primary) answered the last exchange as a primary of this cluster (not: no answer, a server error, another token, another replica).",
            ),
            labels_queued: one(
                "streamiq_cluster_labels_queued",
                "Labels stored on this replica that wait to be sent to the cluster's primary.",
            ),
            labels_refused: one(
                "streamiq_cluster_labels_refused",
                "Labels stored on this replica that the cluster's primary refused (sent again when the replica restarts).",
            ),
            labels_forwarded: reg(
                r,
                IntCounter::new(
                    "streamiq_cluster_labels_forwarded_total",
                    "Labels the cluster's primary stored from this replica.",
                )
                .expect("valid metric"),
            ),
            sync_errors: errors,
            last_sync: reg(
                r,
                Gauge::new(
                    "streamiq_cluster_last_sync_timestamp_seconds",
                    "When this replica last exchanged labels and the prompt set with the primary successfully.",
                )
                .expect("valid metric"),
            ),
        }
    }

    /// Resolves the per-stream children for `stream`, creating every series at 0.
    pub fn stream(&self, stream: &str) -> StreamMetrics {
        let dropped = |r: DropReason| self.dropped.with_label_values(&[stream, r.as_str()]);
        StreamMetrics {
            up: self.stream_up.with_label_values(&[stream]),
            restarts: self.restarts.with_label_values(&[stream]),
            decoded: self.decoded.with_label_values(&[stream]),
            scored: self.scored.with_label_values(&[stream]),
            dropped: DropReason::ALL.map(dropped),
            quality: self.quality.with_label_values(&[stream]),
            quality_drop_threshold: self.quality_drop_threshold.with_label_values(&[stream]),
            segment_active: self
                .segment_active
                .map(|_, m| m.with_label_values(&[stream])),
            segment_events: self
                .segment_events
                .map(|_, m| m.with_label_values(&[stream])),
            last_frame: self.last_frame.with_label_values(&[stream]),
            attribute_family: self.attribute.clone(),
            stream: stream.to_string(),
        }
    }

    /// Removes every series of `stream` (a stream taken out at run time), including its
    /// `attributes`' series.
    pub fn remove_stream(&self, stream: &str, attributes: &[String]) {
        let one = [stream];
        let _ = self.stream_up.remove_label_values(&one);
        let _ = self.restarts.remove_label_values(&one);
        let _ = self.decoded.remove_label_values(&one);
        let _ = self.scored.remove_label_values(&one);
        let _ = self.quality.remove_label_values(&one);
        let _ = self.quality_drop_threshold.remove_label_values(&one);
        let _ = self.last_frame.remove_label_values(&one);
        for (_, m) in self.segment_active.iter() {
            let _ = m.remove_label_values(&one);
        }
        for (_, m) in self.segment_events.iter() {
            let _ = m.remove_label_values(&one);
        }
        for r in DropReason::ALL {
            let _ = self.dropped.remove_label_values(&[stream, r.as_str()]);
        }
        for a in attributes {
            let _ = self.attribute.remove_label_values(&[stream, a.as_str()]);
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One stream's metric children.
#[derive(Clone)]
pub struct StreamMetrics {
    /// `streamiq_stream_up`.
    pub up: IntGauge,
    /// `streamiq_stream_restarts_total`.
    pub restarts: IntCounter,
    /// `streamiq_frames_decoded_total`.
    pub decoded: IntCounter,
    /// `streamiq_frames_scored_total`.
    pub scored: IntCounter,
    /// Indexed by `DropReason as usize` (the order of [`DropReason::ALL`]).
    dropped: [IntCounter; DropReason::ALL.len()],
    /// `streamiq_quality_score`.
    pub quality: Gauge,
    /// `streamiq_quality_drop_threshold`.
    pub quality_drop_threshold: Gauge,
    /// `streamiq_{kind}_active` (`streamiq_black_active`, `streamiq_freeze_active`, ...).
    pub segment_active: PerKind<IntGauge>,
    /// `streamiq_{kind}_events_total`.
    pub segment_events: PerKind<IntCounter>,
    /// `streamiq_last_frame_timestamp_seconds`.
    pub last_frame: Gauge,
    attribute_family: GaugeVec,
    stream: String,
}

impl StreamMetrics {
    /// Counts `n` dropped frames.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].inc_by(n);
    }

    /// Frames dropped for `reason` so far.
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].get()
    }

    /// `streamiq_quality_attribute{stream, attribute}`.
    pub fn attribute(&self, attribute: &str) -> Gauge {
        self.attribute_family
            .with_label_values(&[self.stream.as_str(), attribute])
    }
}
