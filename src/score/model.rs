//! The visual encoder in ONNX Runtime: environment set-up (ONNX Runtime is loaded
//! dynamically from the path recorded at build time, `ORT_DYLIB_PATH` or the config),
//! execution-provider selection in the configured order, and `pixels -> embeds`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::value::TensorRef;

use crate::config::ExecutionProvider;
use crate::score::prompts::normalise_in_place;

/// The visual encoder could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// ONNX Runtime itself could not be loaded.
    #[error("ONNX Runtime library {path}: {message}")]
    Runtime {
        /// The shared library tried.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The model file could not be loaded or has the wrong interface.
    #[error("{path}: {message}")]
    Load {
        /// `visual.onnx`.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A batch failed to run.
    #[error("inference failed: {0}")]
    Run(String),
    /// A remote scorer could not be reached, is shutting down or is overloaded.
    #[error("scorer unavailable: {0}")]
    Unavailable(String),
    /// A remote scorer did not answer in time.
    #[error("scorer timed out: {0}")]
    Timeout(String),
}

impl ModelError {
    /// Short static name, usable as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Runtime { .. } => "runtime",
            Self::Load { .. } => "load",
            Self::Run(_) => "run",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout(_) => "timeout",
        }
    }

    /// Why the frames of a failed batch are dropped
    /// (`streamiq_frames_dropped_total{reason}`).
    pub fn drop_reason(&self) -> crate::metrics::DropReason {
        match self {
            Self::Unavailable(_) | Self::Timeout(_) => {
                crate::metrics::DropReason::ScorerUnavailable
            }
            _ => crate::metrics::DropReason::Error,
        }
    }
}

/// Where ONNX Runtime is looked for: the explicit path, else `ORT_DYLIB_PATH`, else
/// the library installed beside the binary (`BIN/../lib/streamiq/libonnxruntime.so.*`,
/// as the Debian package lays it out), else the library found in the Python
/// environment at build time.
pub fn onnxruntime_path(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_owned)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .or_else(beside_binary)
        .or_else(|| {
            option_env!("STREAMIQ_ORT_LIB")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
}

/// The newest `libonnxruntime.so.*` in `../lib/streamiq/` from the running binary.
fn beside_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?.join("lib/streamiq");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so."))
        })
        .collect();
    found.sort();
    found.pop()
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// The ONNX Runtime library's version as its file name states it
/// (`libonnxruntime.so.1.31.1` -> `1.31.1`), or "unknown".
pub fn onnxruntime_version(lib: Option<&Path>) -> String {
    onnxruntime_path(lib)
        .and_then(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let version = name.split_once(".so.")?.1.to_string();
            version
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then_some(version)
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn environment(lib: Option<&Path>) -> Result<&'static ort::environment::Environment, ModelError> {
    let path = onnxruntime_path(lib);
    ENVIRONMENT
        .get_or_init(|| {
            let path = path.clone().ok_or_else(|| {
                "not found: set model.onnxruntime_lib or ORT_DYLIB_PATH, or build with \
                 `make build` so that the venv's library is recorded"
                    .to_string()
            })?;
            let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
            // ONNX Runtime's own switch for its usage events to Microsoft. Alone it does not
            // stop the upload: ORT_DISABLE_TELEMETRY=1 does (the binary sets it, main.rs).
            builder
                .with_name("streamiq")
                .with_telemetry(false)
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|message| ModelError::Runtime {
            path: path.unwrap_or_default(),
            message: message.clone(),
        })
}

/// A provider that could not be used, with the reason (logged and counted by callers).
#[derive(Debug, Clone)]
pub struct ProviderFailure {
    /// The provider.
    pub provider: ExecutionProvider,
    /// Why it was skipped.
    pub reason: String,
}

/// A loaded visual encoder.
pub struct VisualModel {
    session: Session,
    embed_dim: usize,
    /// The provider actually running the model.
    pub provider: ExecutionProvider,
    /// Providers tried before it and why they failed.
    pub failures: Vec<ProviderFailure>,
}

/// How to load the encoder.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Providers in order of preference.
    pub execution: Vec<ExecutionProvider>,
    /// Intra-op threads (0 = ONNX Runtime's default).
    pub intra_threads: usize,
    /// Explicit ONNX Runtime library.
    pub onnxruntime_lib: Option<PathBuf>,
}

impl VisualModel {
    /// Loads `path`, trying each provider in order; the first that loads wins.
    pub fn load(path: &Path, embed_dim: usize, opts: &ModelOptions) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::load_bytes(&bytes, path, embed_dim, opts)
    }

    /// [`load`](Self::load) from the model's bytes (`path` names it in errors).
    pub fn load_bytes(
        bytes: &[u8],
        path: &Path,
        embed_dim: usize,
        opts: &ModelOptions,
    ) -> Result<Self, ModelError> {
        let env = environment(opts.onnxruntime_lib.as_deref())?;
        // The same model, with its squares as products: much faster in ONNX Runtime.
        let (bytes, squares) = super::squares::rewrite(bytes);
        if squares > 0 {
            tracing::debug!(path = %path.display(), squares, "Powers of 2 and 4 computed as products");
        }
        let mut failures = Vec::new();
        for &provider in &opts.execution {
            match build_session(env, &bytes, provider, opts.intra_threads) {
                Ok(session) => {
                    check_interface(&session, path)?;
                    return Ok(Self {
                        session,
                        embed_dim,
                        provider,
                        failures,
                    });
                }
                Err(reason) if provider != ExecutionProvider::Cpu => {
                    failures.push(ProviderFailure { provider, reason });
                }
                Err(message) => {
                    return Err(ModelError::Load {
                        path: path.to_owned(),
                        message,
                    });
                }
            }
        }
        let tried: Vec<String> = failures
            .iter()
            .map(|f| format!("{}: {}", f.provider.name(), f.reason))
            .collect();
        Err(ModelError::Load {
            path: path.to_owned(),
            message: format!("no execution provider could load it ({})", tried.join("; ")),
        })
    }

    /// Embedding size D.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Runs `n` images (`pixels` = `[n, 3, size, size]` floats) and returns `n * D`
    /// L2-normalised embeddings.
    pub fn embed(&mut self, pixels: &[f32], n: usize, size: usize) -> Result<Vec<f32>, ModelError> {
        let run = |e: ort::Error| ModelError::Run(e.to_string());
        let input = TensorRef::from_array_view(([n, 3, size, size], pixels)).map_err(run)?;
        let outputs = self
            .session
            .run(ort::inputs!["pixels" => input])
            .map_err(run)?;
        let (shape, data) = outputs["embeds"].try_extract_tensor::<f32>().map_err(run)?;
        if shape.len() != 2 || shape[0] as usize != n || shape[1] as usize != self.embed_dim {
            return Err(ModelError::Run(format!(
                "embeds has shape {:?}, expected [{n}, {}]",
                &shape[..],
                self.embed_dim
            )));
        }
        let mut out = data.to_vec();
        for e in out.chunks_exact_mut(self.embed_dim) {
            if !normalise_in_place(e) {
                e.fill(f32::NAN);
            }
        }
        Ok(out)
    }
}

fn build_session(
    env: &ort::environment::Environment,
    bytes: &[u8],
    provider: ExecutionProvider,
    intra_threads: usize,
) -> Result<Session, String> {
    let err = |e: ort::Error<ort::session::builder::SessionBuilder>| e.to_string();
    // Decoding runs beside inference on the same cores: idle ONNX Runtime threads
    // must sleep, not spin, or they take the CPU the decoders need.
    let mut b = Session::builder(env)
        .map_err(|e| e.to_string())?
        .with_intra_op_spinning(false)
        .map_err(err)?
        .with_inter_op_spinning(false)
        .map_err(err)?;
    if intra_threads > 0 {
        b = b.with_intra_threads(intra_threads).map_err(err)?;
    }
    b = match provider {
        // ONNX Runtime's memory pattern plans one block for every intermediate tensor of
        // a batch; without it tensors are allocated as they live. On the CPU the speed
        // is the same and the peak memory is much lower (streamiq-tiny, 32 views: 318
        // against 515 MiB, README "Performance").
        ExecutionProvider::Cpu => b.with_memory_pattern(false).map_err(err)?,
        ExecutionProvider::Cuda => b
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(err)?,
        ExecutionProvider::TensorRt => b
            .with_execution_providers([ort::ep::TensorRT::default().build().error_on_failure()])
            .map_err(err)?,
    };
    b.commit_from_memory(bytes).map_err(|e| e.to_string())
}

fn check_interface(session: &Session, path: &Path) -> Result<(), ModelError> {
    let has = |outlets: &[ort::value::Outlet], name: &str| outlets.iter().any(|o| o.name() == name);
    if !has(session.inputs(), "pixels") || !has(session.outputs(), "embeds") {
        return Err(ModelError::Load {
            path: path.to_owned(),
            message: "expected input \"pixels\" and output \"embeds\"".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped encoders with their powers as products ([`super::super::squares`])
    /// embed as the files do, to a few units in the last place.
    #[test]
    fn shipped_encoders_embed_the_same_with_squares_as_products() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let opts = ModelOptions {
            execution: vec![ExecutionProvider::Cpu],
            intra_threads: 1,
            onnxruntime_lib: None,
        };
        let n = 3;
        let pixels: Vec<f32> = (0..n * 3 * 224 * 224)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        for (bundle, powers) in [("streamiq-tiny", 10), ("streamiq-effnet", 18)] {
            let path = root.join(bundle).join("visual.onnx");
            let bytes = std::fs::read(&path).unwrap();
            let (rewritten, count) = super::super::squares::rewrite(&bytes);
            assert_eq!(count, powers, "{bundle}");
            let env = environment(None).unwrap();
            let plain = build_session(env, &bytes, ExecutionProvider::Cpu, 1).unwrap();
            let mut plain = VisualModel {
                session: plain,
                embed_dim: 0,
                provider: ExecutionProvider::Cpu,
                failures: Vec::new(),
            };
            let mut loaded = VisualModel::load(&path, 0, &opts).unwrap();
            // The embedding size, from a first run.
            let dim = {
                let outputs = plain
                    .session
                    .run(ort::inputs![
                        "pixels" => TensorRef::from_array_view(([1, 3, 224, 224], &pixels[..3 * 224 * 224])).unwrap()
                    ])
                    .unwrap();
                outputs["embeds"].try_extract_tensor::<f32>().unwrap().0[1] as usize
            };
            plain.embed_dim = dim;
            loaded.embed_dim = dim;
            let a = plain.embed(&pixels, n, 224).unwrap();
            let b = loaded.embed(&pixels, n, 224).unwrap();
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-5,
                "{bundle}: {count} powers rewritten, largest change {worst}"
            );
            assert!(matches!(rewritten, std::borrow::Cow::Owned(_)) == (count > 0));
        }
    }
}
