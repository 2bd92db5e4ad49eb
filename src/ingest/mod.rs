//! Ingest: one GStreamer pipeline per stream ([`pipeline`]), the non-blocking frame
//! handoff to the batcher ([`handoff`]) and the per-stream supervisor that restarts
//! failed pipelines ([`supervisor`]).

pub mod handoff;
pub mod pipeline;
pub mod supervisor;

pub use handoff::Handoff;
pub use pipeline::{IngestError, PipelineSpec};
