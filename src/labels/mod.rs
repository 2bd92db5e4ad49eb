//! Operator labels for scored frames: what a label request may hold ([`LabelRequest`],
//! validated into [`ValidRequest`] with errors that name the field), and the SQLite
//! label store ([`store`]) that keeps each label with the frame's embedding, its
//! thumbnail and the model that produced them, for `streamiq-adapt` to train on.
//!
//! ```text
//! POST /api/v1/labels ─▶ LabelRequest::validate ─▶ recent-frame ring (state) ─▶ NewLabel
//!   ─▶ LabelStore::insert (one transaction, synchronous=FULL) ─▶ labels.sqlite
//!   ─▶ load_training_set (read-only; the sidecar) ─▶ (embedding, target) pairs
//! ```

pub mod forward;
pub mod reembed;
pub mod store;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use store::{ExportFormat, Inserted, LabelError, LabelStore, Queued, load_training_set};

/// Longest `labeller` name, in characters.
pub const MAX_LABELLER_CHARS: usize = 64;

/// The labeller recorded when a request names none.
pub const DEFAULT_LABELLER: &str = "operator";

/// An operator's rating, as given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rating {
    /// Mean opinion score in [1, 5].
    Mos(f64),
    /// Quality in [0, 1].
    Score(f64),
}

impl Rating {
    /// The rating on the model's scale, [0, 1]: MOS maps linearly, `(mos - 1) / 4`.
    pub fn target(self) -> f64 {
        match self {
            Self::Mos(m) => (m - 1.0) / 4.0,
            Self::Score(s) => s,
        }
    }

    /// The MOS, if the rating was given as one.
    pub fn mos(self) -> Option<f64> {
        match self {
            Self::Mos(m) => Some(m),
            Self::Score(_) => None,
        }
    }

    /// The [0, 1] score, if the rating was given as one.
    pub fn score(self) -> Option<f64> {
        match self {
            Self::Mos(_) => None,
            Self::Score(s) => Some(s),
        }
    }
}

/// A label request field that is missing, of the wrong type or out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The JSON field, e.g. `mos`.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// The body of `POST /api/v1/labels`, as read. Fields are kept as JSON values so that
/// [`LabelRequest::validate`] can name the field whose type is wrong.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    /// The frame: a number, or a string holding one.
    pub frame_id: Option<Value>,
    /// Instead of `frame_id`: an incident's id (`/api/v1/incidents`) ...
    pub incident: Option<Value>,
    /// ... and the index of its frame.
    pub frame: Option<Value>,
    /// Mean opinion score in [1, 5] (exactly one of `mos` and `score`).
    pub mos: Option<Value>,
    /// Quality in [0, 1] (exactly one of `mos` and `score`).
    pub score: Option<Value>,
    /// Who labelled it (default [`DEFAULT_LABELLER`]).
    pub labeller: Option<Value>,
    /// Instead of `frame_id` or `incident`: a label that a replica stored first and
    /// forwards to the cluster's primary, with its frame ([`forward::Forwarded`]).
    pub forwarded: Option<Value>,
}

/// A label request whose fields are all valid.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// The frame.
    pub target: LabelTarget,
    /// The rating.
    pub rating: Rating,
    /// Who labelled it.
    pub labeller: String,
}

/// What a label is for.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelTarget {
    /// A recent frame of a stream, by the daemon's frame id.
    Frame(u64),
    /// A frame kept with an incident.
    Incident {
        /// The incident's id.
        id: String,
        /// The frame's index in it.
        frame: usize,
    },
    /// A frame another replica saw, sent with the label.
    Forwarded(Box<forward::ValidForwarded>),
}

impl LabelRequest {
    /// Checks every field; the error names the first bad one.
    pub fn validate(mut self) -> Result<ValidRequest, FieldError> {
        if let Some(forwarded) = self.forwarded.take() {
            if self.frame_id.is_some() || self.incident.is_some() || self.frame.is_some() {
                return Err(FieldError::new(
                    "forwarded",
                    "give forwarded alone, without frame_id, incident or frame",
                ));
            }
            let (rating, labeller) = self.rating_and_labeller()?;
            let f = forward::Forwarded::validate(forwarded, rating, labeller.clone())?;
            return Ok(ValidRequest {
                target: LabelTarget::Forwarded(Box::new(f)),
                rating,
                labeller,
            });
        }
        let target = match (self.frame_id.take(), self.incident.take()) {
            (Some(v), None) => LabelTarget::Frame(parse_frame_id(&v)?),
            (None, Some(v)) => {
                let id = v
                    .as_str()
                    .filter(|id| crate::incidents::valid_id(id))
                    .ok_or_else(|| {
                        FieldError::new("incident", format!("{v}: expected an incident id"))
                    })?;
                let frame = self
                    .frame
                    .as_ref()
                    .and_then(Value::as_u64)
                    .filter(|n| *n < 64)
                    .ok_or_else(|| {
                        FieldError::new(
                            "frame",
                            "with incident: the index of one of its frames (0, 1, ...)",
                        )
                    })?;
                LabelTarget::Incident {
                    id: id.to_string(),
                    frame: frame as usize,
                }
            }
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "frame_id",
                    "give either frame_id or incident, not both",
                ));
            }
            (None, None) => return Err(FieldError::new("frame_id", "missing")),
        };
        if self.frame.is_some() && !matches!(target, LabelTarget::Incident { .. }) {
            return Err(FieldError::new("frame", "only with incident"));
        }
        let (rating, labeller) = self.rating_and_labeller()?;
        Ok(ValidRequest {
            target,
            rating,
            labeller,
        })
    }

    fn rating_and_labeller(self) -> Result<(Rating, String), FieldError> {
        let rating = match (self.mos, self.score) {
            (Some(m), None) => Rating::Mos(number_in("mos", &m, 1.0, 5.0)?),
            (None, Some(s)) => Rating::Score(number_in("score", &s, 0.0, 1.0)?),
            (Some(_), Some(_)) => {
                return Err(FieldError::new("mos", "give either mos or score, not both"));
            }
            (None, None) => {
                return Err(FieldError::new(
                    "mos",
                    "missing: give mos (1..5) or score (0..1)",
                ));
            }
        };
        let labeller = match self.labeller {
            None => DEFAULT_LABELLER.to_string(),
            Some(v) => parse_labeller(&v)?,
        };
        Ok((rating, labeller))
    }
}

fn parse_frame_id(v: &Value) -> Result<u64, FieldError> {
    let id = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    id.filter(|id| i64::try_from(*id).is_ok()).ok_or_else(|| {
        FieldError::new(
            "frame_id",
            format!("{v}: expected a non-negative integer (or a string holding one)"),
        )
    })
}

fn number_in(field: &'static str, v: &Value, lo: f64, hi: f64) -> Result<f64, FieldError> {
    match v.as_f64() {
        Some(x) if (lo..=hi).contains(&x) => Ok(x),
        Some(x) => Err(FieldError::new(
            field,
            format!("{x}: must be within {lo}..={hi}"),
        )),
        None => Err(FieldError::new(
            field,
            format!("{v}: expected a number within {lo}..={hi}"),
        )),
    }
}

/// Characters that change how a name is shown without being seen: bidirectional
/// embeddings, overrides and isolates, zero-width ones, the byte-order mark.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{061C}')
}

fn parse_labeller(v: &Value) -> Result<String, FieldError> {
    let Value::String(s) = v else {
        return Err(FieldError::new(
            "labeller",
            format!("{v}: expected a string"),
        ));
    };
    let n = s.chars().count();
    if n == 0 || n > MAX_LABELLER_CHARS || s.trim().is_empty() {
        return Err(FieldError::new(
            "labeller",
            format!("must be 1..={MAX_LABELLER_CHARS} characters, not blank"),
        ));
    }
    if s.chars().any(|c| c.is_control() || invisible(c)) {
        return Err(FieldError::new(
            "labeller",
            "must be printable (no control, bidirectional-override or zero-width characters)",
        ));
    }
    Ok(s.clone())
}

/// Which model an embedding came from: labels are only comparable within one encoder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Bundle name from its manifest, e.g. `streamiq-test`.
    pub bundle: String,
    /// sha256 (hex) of the bundle's `visual.onnx`, the encoder that computed the embedding.
    pub model_sha256: String,
}

/// A label to store: the rating plus everything the model knew about the frame.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLabel {
    /// Stream id.
    pub stream: String,
    /// The frame's id in this daemon run.
    pub frame_id: u64,
    /// Wall-clock capture time, unix seconds.
    pub captured: f64,
    /// Stream time in seconds, if known.
    pub pts: Option<f64>,
    /// The operator's rating.
    pub rating: Rating,
    /// Who labelled it.
    pub labeller: String,
    /// The frame's L2-normalised image embedding.
    pub embedding: Vec<f32>,
    /// The model that computed the embedding.
    pub provenance: Provenance,
    /// Version of the prompt set that scored the frame.
    pub prompt_version: u64,
    /// The model's score for the frame, in [0, 1].
    pub model_score: f32,
    /// The frame as scored, JPEG.
    pub thumbnail: Vec<u8>,
    /// The whole working frame the scorer was given, PNG ([`encode_frame_png`]): what
    /// `streamiq-adapt reembed` re-embeds with another model. `None` stores no frame.
    pub frame: Option<Vec<u8>>,
}

/// A stored label, without its blobs (embedding, thumbnail).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Label {
    /// Row id, increasing; a relabelled frame gets a new id.
    pub id: i64,
    /// The daemon run that saw the frame (frame ids restart with every process).
    pub run_id: String,
    /// Stream id.
    pub stream: String,
    /// The frame's id within its run.
    pub frame_id: u64,
    /// Capture time, unix seconds.
    pub captured: f64,
    /// Stream time in seconds, if known.
    pub pts: Option<f64>,
    /// MOS as given, if given as one.
    pub mos: Option<f64>,
    /// [0, 1] score as given, if given as one.
    pub score: Option<f64>,
    /// The rating normalised to [0, 1].
    pub target: f64,
    /// Who labelled it.
    pub labeller: String,
    /// Embedding size.
    pub embed_dim: usize,
    /// Bundle name.
    pub bundle: String,
    /// sha256 of the bundle's `visual.onnx`.
    pub model_sha256: String,
    /// Version of the prompt set that scored the frame.
    pub prompt_version: u64,
    /// The model's score for the frame.
    pub model_score: f64,
    /// When the label was stored, unix seconds.
    pub created: f64,
    /// How the embedding was computed: `live` (by the daemon, when labelled), `frame`
    /// or `thumbnail` (re-embedded from the stored frame or thumbnail by
    /// `streamiq-adapt reembed`).
    pub embedding_source: String,
}

/// The frame as the scorer was given it (the whole working frame: GStreamer already
/// brought it to the model's working size), losslessly as PNG, so that another model's
/// preprocessing can start from exactly these pixels.
pub fn encode_frame_png(img: &crate::frame::RgbImage) -> Vec<u8> {
    use image::ImageEncoder as _;
    let mut rgb = Vec::with_capacity(img.width * img.height * 3);
    for y in 0..img.height {
        rgb.extend_from_slice(img.row(y));
    }
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(
        &rgb,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .expect("encoding into memory does not fail");
    out
}

/// Little-endian f32 bytes of an embedding, as stored.
pub fn encode_embedding(e: &[f32]) -> Vec<u8> {
    e.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The embedding stored as little-endian f32 bytes; `None` if the length is not a
/// multiple of 4.
pub fn decode_embedding(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> Result<ValidRequest, FieldError> {
        serde_json::from_value::<LabelRequest>(v)
            .unwrap()
            .validate()
    }

    #[test]
    fn mos_and_score_normalise_to_unit_range() {
        let r = req(json!({"frame_id": 7, "mos": 5})).unwrap();
        assert_eq!(r.target, LabelTarget::Frame(7));
        assert_eq!(r.rating.target(), 1.0);
        assert_eq!(r.labeller, DEFAULT_LABELLER);
        assert_eq!(Rating::Mos(1.0).target(), 0.0);
        assert_eq!(Rating::Mos(3.0).target(), 0.5);
        let r = req(json!({"frame_id": "12", "score": 0.25, "labeller": "ana"})).unwrap();
        assert_eq!(r.target, LabelTarget::Frame(12));
        let inc =
            req(json!({"incident": "1700000000000-cam-black", "frame": 2, "mos": 2})).unwrap();
        assert_eq!(
            inc.target,
            LabelTarget::Incident {
                id: "1700000000000-cam-black".into(),
                frame: 2
            }
        );
        assert_eq!(r.rating, Rating::Score(0.25));
        assert_eq!(r.rating.target(), 0.25);
        assert_eq!(r.labeller, "ana");
    }

    #[test]
    fn bad_fields_are_named() {
        for (body, field) in [
            (json!({"mos": 3}), "frame_id"),
            (json!({"frame_id": -1, "mos": 3}), "frame_id"),
            (json!({"frame_id": 1.5, "mos": 3}), "frame_id"),
            (json!({"frame_id": "x", "mos": 3}), "frame_id"),
            (json!({"frame_id": u64::MAX, "mos": 3}), "frame_id"),
            (json!({"frame_id": 1, "mos": 7}), "mos"),
            (json!({"frame_id": 1, "mos": 0.99}), "mos"),
            (json!({"frame_id": 1, "mos": "high"}), "mos"),
            (json!({"frame_id": 1, "score": -0.1}), "score"),
            (json!({"frame_id": 1, "score": 1.01}), "score"),
            (json!({"frame_id": 1, "mos": 3, "score": 0.5}), "mos"),
            (json!({"frame_id": 1}), "mos"),
            (json!({"frame_id": 1, "mos": 3, "labeller": ""}), "labeller"),
            (
                json!({"frame_id": 1, "mos": 3, "labeller": "   "}),
                "labeller",
            ),
            (
                json!({"frame_id": 1, "mos": 3, "labeller": "a\nb"}),
                "labeller",
            ),
            (json!({"frame_id": 1, "mos": 3, "labeller": 5}), "labeller"),
            (
                json!({"frame_id": 1, "mos": 3, "labeller": "ana\u{202E}gnp.exe"}),
                "labeller",
            ),
            (
                json!({"frame_id": 1, "mos": 3, "labeller": "a\u{200B}na"}),
                "labeller",
            ),
            (
                json!({"frame_id": 1, "mos": 3, "labeller": "\u{2066}ana"}),
                "labeller",
            ),
            (
                json!({"frame_id": 1, "mos": 3, "labeller": "x".repeat(65)}),
                "labeller",
            ),
        ] {
            let e = req(body.clone()).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
        let ok = req(json!({"frame_id": 1, "mos": 3, "labeller": "é".repeat(64)}));
        assert!(ok.is_ok(), "64 characters, more bytes: {ok:?}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_value::<LabelRequest>(json!({"frames": 1})).is_err());
    }

    #[test]
    fn embeddings_round_trip_as_little_endian() {
        let e = vec![1.0f32, -0.5, 0.25];
        let b = encode_embedding(&e);
        assert_eq!(b.len(), 12);
        assert_eq!(&b[..4], &1.0f32.to_le_bytes());
        assert_eq!(decode_embedding(&b).unwrap(), e);
        assert!(decode_embedding(&b[..5]).is_none());
    }
}

/// Property tests: no label request body makes parsing or validation panic, and what
/// validates is within range.
#[cfg(test)]
mod props {
    use super::{LabelRequest, MAX_LABELLER_CHARS, Rating};
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            "\\PC{0,80}".prop_map(Value::String),
            "[0-9. eE+-]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{0,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn body() -> impl Strategy<Value = Value> {
        (
            prop::option::of(json_value()),
            prop::option::of(json_value()),
            prop::option::of(json_value()),
            prop::option::of(json_value()),
            prop::option::of(("[a-z_]{1,10}", json_value())),
        )
            .prop_map(|(frame_id, mos, score, labeller, extra)| {
                let mut m = serde_json::Map::new();
                for (k, v) in [
                    ("frame_id", frame_id),
                    ("mos", mos),
                    ("score", score),
                    ("labeller", labeller),
                ] {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                }
                if let Some((k, v)) = extra {
                    m.insert(k, v);
                }
                Value::Object(m)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn any_label_body_parses_or_names_a_field(v in body()) {
            let Ok(req) = serde_json::from_value::<LabelRequest>(v) else {
                return Ok(());
            };
            match req.validate() {
                Ok(ok) => {
                    match ok.rating {
                        Rating::Mos(m) => prop_assert!((1.0..=5.0).contains(&m)),
                        Rating::Score(s) => prop_assert!((0.0..=1.0).contains(&s)),
                    }
                    let n = ok.labeller.chars().count();
                    prop_assert!((1..=MAX_LABELLER_CHARS).contains(&n));
                    prop_assert!(!ok.labeller.chars().any(char::is_control));
                }
                Err(e) => prop_assert!(
                    ["frame_id", "mos", "score", "labeller"].contains(&e.field)
                ),
            }
        }

        #[test]
        fn any_text_as_a_label_body_never_panics(text in "\\PC{0,120}") {
            if let Ok(req) = serde_json::from_str::<LabelRequest>(&text) {
                let _ = req.validate();
            }
        }
    }
}
