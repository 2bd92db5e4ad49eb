//! Remote scoring over the KServe v2 gRPC protocol (`scorer.backend = "kserve"`), the
//! protocol Triton Inference Server and KServe model servers answer: the model thread
//! sends each batch of preprocessed views to `ModelInfer` and reads `embeds` back.
//!
//! The connection is made lazily and remade by itself: a server that is down at start,
//! killed mid-run or slower than `scorer.kserve.timeout` costs the frames of the batches
//! it fails (dropped with reason `scorer_unavailable`), never a stream; scoring resumes
//! with the first batch it answers. The model's declared interface is read
//! (`ModelMetadata`) before the first batch after every failure: `pixels` must be
//! `FP32` (the daemon's normalised views) or `UINT8` (0-255 RGB, the server normalises),
//! `[-1, 3, S, S]` with S the bundle's input size, and `embeds` `[-1, D]`.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::codegen::http::uri::PathAndQuery;

use super::model::ModelError;
use super::prompts::normalise_in_place;
use crate::config::ConfigError;

/// The KServe v2 messages streamiq uses (package `inference`, service
/// `GRPCInferenceService`), with the protocol's field numbers. Fields it never sets or
/// reads (parameters, typed contents) are left out: protobuf skips unknown fields.
pub mod wire {
    /// `ModelMetadataRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelMetadataRequest {
        /// Model name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// Version ("" = the server's choice).
        #[prost(string, tag = "2")]
        pub version: String,
    }

    /// `ModelMetadataResponse.TensorMetadata`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorMetadata {
        /// Tensor name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// `FP32`, `UINT8`, ...
        #[prost(string, tag = "2")]
        pub datatype: String,
        /// Shape; -1 for a variable dimension.
        #[prost(int64, repeated, tag = "3")]
        pub shape: Vec<i64>,
    }

    /// `ModelMetadataResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelMetadataResponse {
        /// Model name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// Versions available.
        #[prost(string, repeated, tag = "2")]
        pub versions: Vec<String>,
        /// Backend platform.
        #[prost(string, tag = "3")]
        pub platform: String,
        /// Inputs.
        #[prost(message, repeated, tag = "4")]
        pub inputs: Vec<TensorMetadata>,
        /// Outputs.
        #[prost(message, repeated, tag = "5")]
        pub outputs: Vec<TensorMetadata>,
    }

    /// `ModelInferRequest.InferInputTensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InferInputTensor {
        /// Input name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// Datatype.
        #[prost(string, tag = "2")]
        pub datatype: String,
        /// Shape of this request's tensor.
        #[prost(int64, repeated, tag = "3")]
        pub shape: Vec<i64>,
    }

    /// `ModelInferRequest.InferRequestedOutputTensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InferRequestedOutputTensor {
        /// Output name.
        #[prost(string, tag = "1")]
        pub name: String,
    }

    /// `ModelInferRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelInferRequest {
        /// Model name.
        #[prost(string, tag = "1")]
        pub model_name: String,
        /// Version ("" = the server's choice).
        #[prost(string, tag = "2")]
        pub model_version: String,
        /// Request id, echoed back.
        #[prost(string, tag = "3")]
        pub id: String,
        /// Input tensors (their data in `raw_input_contents`, same order).
        #[prost(message, repeated, tag = "5")]
        pub inputs: Vec<InferInputTensor>,
        /// Outputs wanted.
        #[prost(message, repeated, tag = "6")]
        pub outputs: Vec<InferRequestedOutputTensor>,
        /// Each input's data: row-major, little-endian.
        #[prost(bytes = "vec", repeated, tag = "7")]
        pub raw_input_contents: Vec<Vec<u8>>,
    }

    /// `ModelInferResponse.InferOutputTensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InferOutputTensor {
        /// Output name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// Datatype.
        #[prost(string, tag = "2")]
        pub datatype: String,
        /// Shape.
        #[prost(int64, repeated, tag = "3")]
        pub shape: Vec<i64>,
    }

    /// `ModelInferResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelInferResponse {
        /// Model name.
        #[prost(string, tag = "1")]
        pub model_name: String,
        /// Version that answered.
        #[prost(string, tag = "2")]
        pub model_version: String,
        /// The request's id.
        #[prost(string, tag = "3")]
        pub id: String,
        /// Output tensors (their data in `raw_output_contents`, same order).
        #[prost(message, repeated, tag = "5")]
        pub outputs: Vec<InferOutputTensor>,
        /// Each output's data: row-major, little-endian.
        #[prost(bytes = "vec", repeated, tag = "6")]
        pub raw_output_contents: Vec<Vec<u8>>,
    }
}

const METADATA: &str = "/inference.GRPCInferenceService/ModelMetadata";
const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// `[scorer.kserve]`, as read.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KserveConfig {
    /// The server's gRPC address, `http://HOST:PORT` (Triton's gRPC port is 8001).
    pub endpoint: String,
    /// Model name on the server.
    pub model: String,
    /// Model version ("" = the server's choice).
    pub version: String,
    /// Longest wait for one request (connection included) before its frames are
    /// dropped.
    pub timeout: String,
    /// Most model inputs (views) per request: the served model's `max_batch_size`.
    pub max_batch_size: usize,
}

impl Default for KserveConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:8001".into(),
            model: "streamiq_visual".into(),
            version: String::new(),
            timeout: "5s".into(),
            max_batch_size: 32,
        }
    }
}

/// Validated `[scorer.kserve]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KserveSettings {
    /// `http://HOST:PORT`.
    pub endpoint: String,
    /// Model name.
    pub model: String,
    /// Model version ("" = any).
    pub version: String,
    /// Per-request deadline.
    pub timeout: Duration,
    /// Most inputs per request.
    pub max_batch_size: NonZeroUsize,
}

impl KserveConfig {
    /// Validates, naming the key at fault.
    pub fn validate(&self) -> Result<KserveSettings, ConfigError> {
        let endpoint = self.endpoint.trim().trim_end_matches('/').to_string();
        let uri: Result<tonic::codegen::http::Uri, _> = endpoint.parse();
        match uri {
            Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => {}
            Ok(u) if u.scheme_str() == Some("https") => {
                return Err(ConfigError::invalid(
                    "scorer.kserve.endpoint",
                    &self.endpoint,
                    "TLS is not built in: use http:// inside the cluster (or a TLS-terminating sidecar)",
                ));
            }
            _ => {
                return Err(ConfigError::invalid(
                    "scorer.kserve.endpoint",
                    &self.endpoint,
                    "expected http://HOST:PORT (the server's gRPC port)",
                ));
            }
        }
        let valid_name = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        };
        if self.model.is_empty() || self.model.len() > 128 || !valid_name(&self.model) {
            return Err(ConfigError::invalid(
                "scorer.kserve.model",
                &self.model,
                "expected a model name ([A-Za-z0-9_.-], 1-128 characters)",
            ));
        }
        if self.version.len() > 32 || !self.version.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ConfigError::invalid(
                "scorer.kserve.version",
                &self.version,
                "expected a version number or \"\" (the server's choice)",
            ));
        }
        let timeout = crate::config::duration("scorer.kserve.timeout", &self.timeout)?;
        if !(Duration::from_millis(10)..=Duration::from_secs(600)).contains(&timeout) {
            return Err(ConfigError::invalid(
                "scorer.kserve.timeout",
                &self.timeout,
                "expected a duration within 10ms..=10m, e.g. \"5s\"",
            ));
        }
        let max_batch_size = NonZeroUsize::new(self.max_batch_size)
            .filter(|n| n.get() <= 4096)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "scorer.kserve.max_batch_size",
                    self.max_batch_size,
                    "must be within 1..=4096",
                )
            })?;
        Ok(KserveSettings {
            endpoint,
            model: self.model.clone(),
            version: self.version.clone(),
            timeout,
            max_batch_size,
        })
    }
}

/// How `pixels` travel, as the served model declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelType {
    /// Normalised floats, as the bundle's `visual.onnx` takes them (4 bytes a value).
    Fp32,
    /// 0-255 RGB bytes (a quarter of the bytes); the served model normalises.
    Uint8,
}

/// The visual encoder on a KServe v2 server.
pub struct RemoteModel {
    runtime: tokio::runtime::Runtime,
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
    settings: KserveSettings,
    embed_dim: usize,
    input_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    /// Set once the metadata was read and checked; cleared by a failed request.
    pixels: Option<PixelType>,
    next_id: u64,
}

impl RemoteModel {
    /// A client for `settings` (no connection is made yet: [`check`](Self::check) tries
    /// one). `mean` / `std` undo the bundle's normalisation for a `UINT8` model.
    pub fn new(
        settings: KserveSettings,
        embed_dim: usize,
        input_size: usize,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Self, ModelError> {
        let load = |message: String| ModelError::Load {
            path: settings.endpoint.clone().into(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| load(format!("tokio runtime: {e}")))?;
        let channel = {
            let _guard = runtime.enter();
            tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                .map_err(|e| load(e.to_string()))?
                .connect_timeout(settings.timeout)
                .timeout(settings.timeout)
                .tcp_nodelay(true)
                .connect_lazy()
        };
        let grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(usize::MAX);
        Ok(Self {
            runtime,
            grpc,
            settings,
            embed_dim,
            input_size,
            mean,
            std,
            pixels: None,
            next_id: 0,
        })
    }

    /// Embedding size D.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// The endpoint, for logs.
    pub fn endpoint(&self) -> &str {
        &self.settings.endpoint
    }

    /// Reads and checks the served model's interface. `Unavailable` / `Timeout` mean
    /// the server did not answer; `Load` that it serves something else.
    pub fn check(&mut self) -> Result<PixelType, ModelError> {
        if let Some(p) = self.pixels {
            return Ok(p);
        }
        let request = wire::ModelMetadataRequest {
            name: self.settings.model.clone(),
            version: self.settings.version.clone(),
        };
        let meta: wire::ModelMetadataResponse = self.call(METADATA, request)?;
        let pixels = self.interface(&meta)?;
        self.pixels = Some(pixels);
        Ok(pixels)
    }

    fn interface(&self, meta: &wire::ModelMetadataResponse) -> Result<PixelType, ModelError> {
        let wrong = |message: String| ModelError::Load {
            path: format!("{} model {:?}", self.settings.endpoint, self.settings.model).into(),
            message,
        };
        let input = meta
            .inputs
            .iter()
            .find(|t| t.name == "pixels")
            .ok_or_else(|| {
                wrong(format!(
                    "no input \"pixels\" (inputs: {:?})",
                    names(&meta.inputs)
                ))
            })?;
        let output = meta
            .outputs
            .iter()
            .find(|t| t.name == "embeds")
            .ok_or_else(|| {
                wrong(format!(
                    "no output \"embeds\" (outputs: {:?})",
                    names(&meta.outputs)
                ))
            })?;
        let pixels = match input.datatype.as_str() {
            "FP32" => PixelType::Fp32,
            "UINT8" => PixelType::Uint8,
            other => {
                return Err(wrong(format!(
                    "input \"pixels\" is {other}, expected FP32 or UINT8"
                )));
            }
        };
        let s = self.input_size as i64;
        let fits = |shape: &[i64], want: &[i64]| {
            shape.len() == want.len() && shape.iter().zip(want).all(|(&a, &b)| a == -1 || a == b)
        };
        if !fits(&input.shape, &[-1, 3, s, s]) {
            return Err(wrong(format!(
                "input \"pixels\" has shape {:?}, expected [-1, 3, {s}, {s}] (the bundle's input size)",
                input.shape
            )));
        }
        if output.datatype != "FP32" || !fits(&output.shape, &[-1, self.embed_dim as i64]) {
            return Err(wrong(format!(
                "output \"embeds\" is {} {:?}, expected FP32 [-1, {}] (the bundle's embed_dim)",
                output.datatype, output.shape, self.embed_dim
            )));
        }
        Ok(pixels)
    }

    fn call<Req, Resp>(&mut self, path: &'static str, request: Req) -> Result<Resp, ModelError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let timeout = self.settings.timeout;
        let grpc = &mut self.grpc;
        let result = self.runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                grpc.ready()
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("not connected: {e}")))?;
                let mut req = tonic::Request::new(request);
                req.set_timeout(timeout);
                grpc.unary(
                    req,
                    PathAndQuery::from_static(path),
                    tonic_prost::ProstCodec::<Req, Resp>::default(),
                )
                .await
            })
            .await
        });
        match result {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => {
                self.pixels = None;
                Err(from_status(&self.settings.endpoint, status))
            }
            Err(_) => {
                self.pixels = None;
                Err(ModelError::Timeout(format!(
                    "{}: no answer within {}",
                    self.settings.endpoint,
                    humantime::format_duration(timeout)
                )))
            }
        }
    }

    /// Runs `n` views (`pixels` = `[n, 3, size, size]` normalised floats) in requests
    /// of at most `max_batch_size` and returns `n * D` L2-normalised embeddings.
    pub fn embed(&mut self, pixels: &[f32], n: usize, size: usize) -> Result<Vec<f32>, ModelError> {
        let kind = self.check()?;
        let per = 3 * size * size;
        let mut out = Vec::with_capacity(n * self.embed_dim);
        let chunk = self.settings.max_batch_size.get();
        for start in (0..n).step_by(chunk) {
            let m = chunk.min(n - start);
            let views = &pixels[start * per..(start + m) * per];
            let (datatype, raw) = match kind {
                PixelType::Fp32 => (
                    "FP32",
                    views
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>(),
                ),
                PixelType::Uint8 => ("UINT8", self.to_bytes(views, size)),
            };
            self.next_id += 1;
            let request = wire::ModelInferRequest {
                model_name: self.settings.model.clone(),
                model_version: self.settings.version.clone(),
                id: self.next_id.to_string(),
                inputs: vec![wire::InferInputTensor {
                    name: "pixels".into(),
                    datatype: datatype.into(),
                    shape: vec![m as i64, 3, size as i64, size as i64],
                }],
                outputs: vec![wire::InferRequestedOutputTensor {
                    name: "embeds".into(),
                }],
                raw_input_contents: vec![raw],
            };
            let response: wire::ModelInferResponse = self.call(INFER, request)?;
            out.extend(self.read_embeds(&response, m)?);
        }
        for e in out.chunks_exact_mut(self.embed_dim) {
            if !normalise_in_place(e) {
                e.fill(f32::NAN);
            }
        }
        Ok(out)
    }

    /// Normalised planes back to 0-255 bytes (`x * std + mean`, rounded).
    fn to_bytes(&self, views: &[f32], size: usize) -> Vec<u8> {
        let plane = size * size;
        views
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = (i / plane) % 3;
                ((v * self.std[c] + self.mean[c]) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
            .collect()
    }

    fn read_embeds(&self, r: &wire::ModelInferResponse, m: usize) -> Result<Vec<f32>, ModelError> {
        let bad = |what: String| ModelError::Run(format!("{}: {what}", self.settings.endpoint));
        let i = r
            .outputs
            .iter()
            .position(|t| t.name == "embeds")
            .ok_or_else(|| bad("the answer has no \"embeds\"".into()))?;
        let t = &r.outputs[i];
        if t.datatype != "FP32" || t.shape != [m as i64, self.embed_dim as i64] {
            return Err(bad(format!(
                "\"embeds\" is {} {:?}, expected FP32 [{m}, {}]",
                t.datatype, t.shape, self.embed_dim
            )));
        }
        let raw = r
            .raw_output_contents
            .get(i)
            .ok_or_else(|| bad("the answer has no raw \"embeds\" data".into()))?;
        if raw.len() != m * self.embed_dim * 4 {
            return Err(bad(format!(
                "\"embeds\" has {} bytes, expected {}",
                raw.len(),
                m * self.embed_dim * 4
            )));
        }
        Ok(raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// What `streamiq export-triton` writes.
#[derive(Debug, Clone)]
pub struct TritonExport {
    /// Model name in the repository (the client's `scorer.kserve.model`).
    pub name: String,
    /// Triton's `max_batch_size` (the client's `scorer.kserve.max_batch_size`).
    pub max_batch_size: NonZeroUsize,
    /// Execution instances per GPU.
    pub instances: NonZeroUsize,
}

/// Writes a Triton model repository for `bundle` under `out` (created; it must not hold
/// a model of that name already): `out/NAME/config.pbtxt` for the ONNX Runtime backend
/// with dynamic batching on GPUs, and `out/NAME/1/model.onnx`, the bundle's verified
/// `visual.onnx`. Returns the model directory.
pub fn export_triton(
    bundle: &super::bundle::Bundle,
    out: &std::path::Path,
    export: &TritonExport,
) -> Result<std::path::PathBuf, String> {
    let name = &export.name;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(format!("--name {name:?}: expected [A-Za-z0-9_.-]"));
    }
    let dir = out.join(name);
    if dir.exists() {
        return Err(format!(
            "{}: exists; choose another --name or remove it",
            dir.display()
        ));
    }
    let bytes = bundle.visual_bytes().map_err(|e| e.to_string())?;
    let m = &bundle.manifest;
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let mut preferred: Vec<usize> = [8, 16, 32, 64, 128]
        .into_iter()
        .filter(|&b| b <= export.max_batch_size.get())
        .collect();
    if preferred.last() != Some(&export.max_batch_size.get()) {
        preferred.push(export.max_batch_size.get());
    }
    let config = format!(
        r#"# Written by `streamiq export-triton` for bundle {bundle_name} (visual.onnx sha256 {sha}).
# streamiq's side: scorer.backend = "kserve", [scorer.kserve] model = "{name}",
# max_batch_size = {max_batch}.
name: "{name}"
backend: "onnxruntime"
# Requests carry 1..{max_batch} views; every tensor gets a leading batch dimension.
max_batch_size: {max_batch}
input [
  {{
    name: "pixels"
    data_type: TYPE_FP32
    dims: [ 3, {size}, {size} ]
  }}
]
output [
  {{
    name: "embeds"
    data_type: TYPE_FP32
    dims: [ {dim} ]
  }}
]
# Requests from every streamiq replica are merged into batches; a request waits at most
# 2 ms for others; past 256 waiting requests new ones fail at once (UNAVAILABLE), which
# streamiq counts as frames dropped with reason scorer_unavailable.
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: 2000
  default_queue_policy {{ max_queue_size: 256 }}
}}
instance_group [
  {{
    count: {instances}
    kind: KIND_GPU
  }}
]
version_policy: {{ latest: {{ num_versions: 1 }} }}
"#,
        bundle_name = m.name,
        max_batch = export.max_batch_size,
        size = m.input.size,
        dim = m.embed_dim,
        preferred = preferred
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        instances = export.instances,
    );
    let version = dir.join("1");
    let io = |p: &std::path::Path, e: std::io::Error| format!("{}: {e}", p.display());
    std::fs::create_dir_all(&version).map_err(|e| io(&version, e))?;
    std::fs::write(version.join("model.onnx"), &bytes).map_err(|e| io(&version, e))?;
    std::fs::write(dir.join("config.pbtxt"), config).map_err(|e| io(&dir, e))?;
    Ok(dir)
}

fn names(t: &[wire::TensorMetadata]) -> Vec<&str> {
    t.iter().map(|t| t.name.as_str()).collect()
}

/// A gRPC status as a model error: a server that cannot be reached, is shutting down or
/// overloaded is `Unavailable`; a deadline is `Timeout`; anything else (an unknown
/// model, a shape it refuses) is `Run`.
fn from_status(endpoint: &str, status: tonic::Status) -> ModelError {
    use tonic::Code;
    let message = format!("{endpoint}: {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted | Code::Cancelled => {
            ModelError::Unavailable(message)
        }
        Code::DeadlineExceeded => ModelError::Timeout(message),
        _ => ModelError::Run(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated_naming_the_key() {
        let ok = KserveConfig::default().validate().unwrap();
        assert_eq!(ok.endpoint, "http://127.0.0.1:8001");
        assert_eq!(ok.timeout, Duration::from_secs(5));
        let err = |c: KserveConfig| c.validate().unwrap_err().to_string();
        let with = |f: fn(&mut KserveConfig)| {
            let mut c = KserveConfig::default();
            f(&mut c);
            c
        };
        assert!(
            err(with(|c| c.endpoint = "triton:8001".into())).contains("scorer.kserve.endpoint")
        );
        assert!(err(with(|c| c.endpoint = "https://triton:8001".into())).contains("TLS"));
        assert!(err(with(|c| c.model = "a/b".into())).contains("scorer.kserve.model"));
        assert!(err(with(|c| c.version = "v1".into())).contains("scorer.kserve.version"));
        assert!(err(with(|c| c.timeout = "0s".into())).contains("scorer.kserve.timeout"));
        assert!(err(with(|c| c.max_batch_size = 0)).contains("scorer.kserve.max_batch_size"));
    }

    #[test]
    fn statuses_map_to_unavailable_timeout_or_run() {
        let k = |code| from_status("e", tonic::Status::new(code, "x")).kind();
        assert_eq!(k(tonic::Code::Unavailable), "unavailable");
        assert_eq!(k(tonic::Code::DeadlineExceeded), "timeout");
        assert_eq!(k(tonic::Code::NotFound), "run");
        assert_eq!(k(tonic::Code::InvalidArgument), "run");
    }

    #[test]
    fn messages_use_the_protocol_field_numbers() {
        use prost::Message;
        // ModelInferRequest { model_name = 1: "m", raw_input_contents = 7: [0x01] }
        let r = wire::ModelInferRequest {
            model_name: "m".into(),
            raw_input_contents: vec![vec![1]],
            ..Default::default()
        };
        assert_eq!(r.encode_to_vec(), [0x0a, 1, b'm', 0x3a, 1, 1]);
        // ModelInferResponse { raw_output_contents = 6: [0x02] }
        let back = wire::ModelInferResponse::decode(&[0x32, 1, 2][..]).unwrap();
        assert_eq!(back.raw_output_contents, [vec![2]]);
    }
}
