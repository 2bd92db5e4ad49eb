//! A label travelling from a replica to the cluster's primary (`cluster.primary`): the
//! replica posts it to the primary's `POST /api/v1/labels` as the operator's rating
//! plus a `forwarded` object holding everything the replica knew about the frame (the
//! primary has never seen it): its run and frame id, the stream, the embedding, the
//! model that computed it, the thumbnail and the frame itself.
//!
//! ```json
//! {"mos": 4, "labeller": "ann",
//!  "forwarded": {"replica": 1, "run_id": "9c0e…", "frame_id": 812, "stream": "cam-3",
//!                "captured": 1796650000.5, "pts": 12.4, "bundle": "streamiq-tiny",
//!                "model_sha256": "…", "prompt_version": 2, "model_score": 0.61,
//!                "embedding": "<base64 of little-endian f32s>",
//!                "thumbnail": "<base64 JPEG>", "frame": "<base64 PNG or null>"}}
//! ```
//!
//! The primary stores it under the replica's run id, so a label sent twice (the reply
//! was lost) replaces itself instead of counting twice.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::{FieldError, NewLabel, Provenance, Queued, Rating, decode_embedding};

/// Largest embedding accepted, in values.
pub const MAX_EMBED_DIM: usize = 8192;

/// The `forwarded` object of a label request, as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forwarded {
    /// The replica that saw the frame (`cluster.replica`).
    pub replica: u32,
    /// That replica's label-store run id (frame ids count within it).
    pub run_id: String,
    /// The frame's id in that run.
    pub frame_id: u64,
    /// Stream id.
    pub stream: String,
    /// Capture time, unix seconds.
    pub captured: f64,
    /// Stream time in seconds, if known.
    pub pts: Option<f64>,
    /// The bundle that embedded the frame.
    pub bundle: String,
    /// sha256 of its `visual.onnx`.
    pub model_sha256: String,
    /// Prompt set that scored the frame.
    pub prompt_version: u64,
    /// The score the replica gave it.
    pub model_score: f64,
    /// The embedding, base64 of little-endian f32s.
    pub embedding: String,
    /// The JPEG thumbnail, base64.
    pub thumbnail: String,
    /// The frame as scored, PNG, base64 (absent for labels stored before frames were kept).
    pub frame: Option<String>,
}

/// A forwarded label, checked and decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidForwarded {
    /// The replica's run id, under which the primary stores it.
    pub run_id: String,
    /// The replica it came from.
    pub replica: u32,
    /// The label without its rating and labeller (they come with the request).
    pub label: NewLabel,
}

fn bad(message: impl Into<String>) -> FieldError {
    FieldError {
        field: "forwarded",
        message: message.into(),
    }
}

fn decode(what: &str, b64: &str) -> Result<Vec<u8>, FieldError> {
    B64.decode(b64)
        .map_err(|e| bad(format!("{what}: not base64 ({e})")))
}

impl Forwarded {
    /// The request's `forwarded` value, checked: every field present and of its type,
    /// a valid stream id, a finite capture time and score, an embedding of whole finite
    /// f32s, a JPEG thumbnail and a PNG frame. `rating` and `labeller` are the request's.
    pub fn validate(
        value: serde_json::Value,
        rating: Rating,
        labeller: String,
    ) -> Result<ValidForwarded, FieldError> {
        let f: Self = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        if !super::store::valid_run_id(&f.run_id) {
            return Err(bad(format!(
                "run_id {:?}: expected 1-64 letters, digits or '-'",
                f.run_id
            )));
        }
        if !crate::config::valid_stream_id(&f.stream) {
            return Err(bad(format!("stream {:?}: not a stream id", f.stream)));
        }
        if i64::try_from(f.frame_id).is_err() {
            return Err(bad(format!("frame_id {} too large", f.frame_id)));
        }
        if !f.captured.is_finite() || f.pts.is_some_and(|p| !p.is_finite()) {
            return Err(bad("captured and pts must be finite numbers"));
        }
        if !f.model_score.is_finite() {
            return Err(bad("model_score must be a finite number"));
        }
        if f.model_sha256.len() != 64 || !f.model_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "model_sha256 {:?}: expected 64 hex digits",
                f.model_sha256
            )));
        }
        if f.bundle.is_empty() || f.bundle.len() > 256 {
            return Err(bad("bundle: expected 1-256 characters"));
        }
        let embedding = decode_embedding(&decode("embedding", &f.embedding)?)
            .filter(|e| !e.is_empty() && e.len() <= MAX_EMBED_DIM)
            .filter(|e| e.iter().all(|v| v.is_finite()))
            .ok_or_else(|| {
                bad(format!(
                    "embedding: expected 1-{MAX_EMBED_DIM} finite little-endian f32s"
                ))
            })?;
        let thumbnail = decode("thumbnail", &f.thumbnail)?;
        if !thumbnail.starts_with(&[0xff, 0xd8]) {
            return Err(bad("thumbnail: not a JPEG"));
        }
        let frame = f.frame.as_deref().map(|b| decode("frame", b)).transpose()?;
        if frame
            .as_ref()
            .is_some_and(|p| !p.starts_with(b"\x89PNG\r\n\x1a\n"))
        {
            return Err(bad("frame: not a PNG"));
        }
        Ok(ValidForwarded {
            run_id: f.run_id,
            replica: f.replica,
            label: NewLabel {
                stream: f.stream,
                frame_id: f.frame_id,
                captured: f.captured,
                pts: f.pts,
                rating,
                labeller,
                embedding,
                provenance: Provenance {
                    bundle: f.bundle,
                    model_sha256: f.model_sha256.to_ascii_lowercase(),
                },
                prompt_version: f.prompt_version,
                model_score: f.model_score as f32,
                thumbnail,
                frame,
            },
        })
    }
}

/// The request body that forwards `q`, stored on replica `replica`, to the primary.
pub fn request_body(q: &Queued, replica: u32) -> serde_json::Value {
    let l = &q.label;
    let mut body = serde_json::json!({
        "labeller": l.labeller,
        "forwarded": Forwarded {
            replica,
            run_id: l.run_id.clone(),
            frame_id: l.frame_id,
            stream: l.stream.clone(),
            captured: l.captured,
            pts: l.pts,
            bundle: l.bundle.clone(),
            model_sha256: l.model_sha256.clone(),
            prompt_version: l.prompt_version,
            model_score: l.model_score,
            embedding: B64.encode(&q.embedding),
            thumbnail: B64.encode(&q.thumbnail),
            frame: q.frame.as_ref().map(|p| B64.encode(p)),
        },
    });
    match (l.mos, l.score) {
        (Some(m), _) => body["mos"] = m.into(),
        (None, Some(s)) => body["score"] = s.into(),
        (None, None) => body["score"] = l.target.into(),
    }
    body
}
