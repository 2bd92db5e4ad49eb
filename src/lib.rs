//! # streamiq
//!
//! Watches live video streams, scores sampled frames with a CLIP-style blind
//! image-quality model, and exports per-stream quality to Prometheus.
//!
//! # Layout
//!
//! Frames flow left to right; each stage is a module:
//!
//! ```text
//! ingest ──Frame──▶ ingest::handoff ──▶ batch ──Vec<Frame>──▶ score (model thread)
//!   (GStreamer,       (bounded queue,      (flush rules)        (ort: pixels -> embeds,
//!    supervisor)       drop policy)                              prompt pair -> score)
//!      │                                                              │
//!      └── qc (black / freeze, on arrival) ──▶ state ◀── ScoredFrame ──┘
//!                                                │
//!                                  metrics ◀─────┴────▶ http (/metrics, /api/v1)
//!                                                             │ POST /api/v1/labels
//!                                                             ▼
//!                                              labels (SQLite: label, embedding, thumbnail)
//! ```
//!
//! - [`config`]: `Config` as read (TOML + environment) -> validated `Settings`.
//! - [`ingest`]: one GStreamer pipeline per stream, the appsink handoff, the supervisor.
//! - [`frame`]: the `Frame` that flows through, holding the GStreamer buffer (no copy).
//! - [`batch`]: pure batching rules and the batcher loop.
//! - [`score`]: model bundle, preprocessing, the visual encoder (ONNX Runtime, or
//!   libtorch with the `torch` feature and `scorer.backend = "torch"`), prompt sets,
//!   and the engine (batcher + model threads).
//! - [`qc`]: windowed quality, black / freeze segment detection.
//! - [`state`]: per-stream runtime state shared by ingest, scoring and HTTP.
//! - [`registry`]: the daemon's streams at run time (add / replace / remove one stream
//!   without touching the others) and the engine's sink into them;
//!   [`runtime_streams`]: streams added through the API; [`cluster`]: which of the
//!   streams this daemon watches when several share them (rendezvous hashing).
//! - [`metrics`]: every Prometheus metric, declared once.
//! - [`http`]: axum routes; the bearer token that guards write routes.
//! - [`labels`]: operator labels (rating + the frame's embedding and thumbnail) in the
//!   SQLite label store, read back by `streamiq-adapt`.
//! - [`distort`]: synthetic distortions (13 kinds x 5 levels, plus `color_cast` on request)
//!   for training and evaluation sets.
//! - [`scan`]: file scan mode (CDN / VOD); [`eval`]: SRCC / PLCC against labels;
//!   [`csv`]: the CSV fields of label exports and `scan --format csv`.
//! - [`app`]: the daemon's wiring and ordered shutdown; [`shutdown`]: signals;
//!   [`reload`]: SIGHUP re-reads the config into the registry.
//! - [`error`]: the errors that end a command, each with its exit status;
//!   [`redact`]: credentials removed from everything shown or logged.

pub mod app;
pub mod batch;
pub mod cluster;
pub mod config;
pub mod csv;
pub mod distort;
pub mod error;
pub mod eval;
pub mod follower;
pub mod frame;
pub mod http;
pub mod incidents;
pub mod ingest;
pub mod labels;
pub mod metrics;
pub mod qc;
pub mod redact;
pub mod registry;
pub mod reload;
pub mod runtime_streams;
pub mod scan;
pub mod score;
pub mod shutdown;
pub mod state;

pub use app::{RunOptions, run, run_with};
pub use error::Error;
