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
    /// Rewrite the graph to cheaper equivalents as it loads ([`super::rewrite`]).
    pub graph_rewrites: bool,
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
        // The same model with cheaper equivalents of its pooling: much faster in ONNX
        // Runtime.
        let (bytes, rewrites) = if opts.graph_rewrites {
            super::rewrite::rewrite(bytes)
        } else {
            (std::borrow::Cow::Borrowed(bytes), Default::default())
        };
        if rewrites.any() {
            tracing::debug!(
                path = %path.display(),
                powers = rewrites.powers,
                variances = rewrites.variances,
                global_pools = rewrites.global_pools,
                "Graph rewritten to cheaper equivalents"
            );
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
        let image = 3 * size * size;
        if pixels.len() != n * image {
            return Err(ModelError::Run(format!(
                "{} pixel values for {n} images of {size}x{size}",
                pixels.len()
            )));
        }
        let chunk = match self.provider {
            ExecutionProvider::Cpu => CPU_CHUNK,
            _ => n.max(1),
        };
        let mut out = Vec::with_capacity(n * self.embed_dim);
        for (i, part) in pixels.chunks(chunk * image).enumerate() {
            let m = part.len() / image;
            self.run(part, m, size, &mut out).map_err(|e| match e {
                ModelError::Run(msg) if n > m => {
                    ModelError::Run(format!("images {}..{}: {msg}", i * chunk, i * chunk + m))
                }
                e => e,
            })?;
        }
        for e in out.chunks_exact_mut(self.embed_dim) {
            if !normalise_in_place(e) {
                e.fill(f32::NAN);
            }
        }
        Ok(out)
    }

    /// One ONNX Runtime call over `n` images; their raw embeddings are appended to `out`.
    fn run(
        &mut self,
        pixels: &[f32],
        n: usize,
        size: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
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
        out.extend_from_slice(data);
        Ok(())
    }
}

/// On the CPU a batch runs through ONNX Runtime this many images at a time. One call
/// over all of them does the same work, but a stage's activations then outgrow the
/// caches between the convolution that writes them and the pooling that reads them:
/// `streamiq-tiny` at 4 images per call took 6-7 % less CPU per image than at 32, and
/// `streamiq scan` peaked at about 270 instead of 435 MiB (README, Performance).
const CPU_CHUNK: usize = 4;

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

    /// The shipped encoders with their graphs rewritten ([`super::super::rewrite`]) embed
    /// as the files do: to about 1e-6 of the embeddings' size on textured views, and to
    /// about 1e-4 on flat grey and black ones, whose channels' variances are about 0 and
    /// so lose the most when computed from two means (measured 1.2e-4).
    #[test]
    fn shipped_encoders_embed_the_same_with_their_graphs_rewritten() {
        use super::super::rewrite::Rewrites;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let opts = ModelOptions {
            execution: vec![ExecutionProvider::Cpu],
            intra_threads: 1,
            onnxruntime_lib: None,
            graph_rewrites: true,
        };
        let n = 4;
        let plane = 224 * 224;
        let mut pixels: Vec<f32> = (0..2 * 3 * plane)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        // Mid grey, and black as CLIP's normalisation makes it.
        pixels.extend(std::iter::repeat_n(0.1, 3 * plane));
        for c in [-1.792, -1.752, -1.480] {
            pixels.extend(std::iter::repeat_n(c, plane));
        }
        let expected = [
            (
                "streamiq-tiny",
                Rewrites {
                    powers: 5,
                    variances: 5,
                    global_pools: 15,
                },
            ),
            (
                "streamiq-effnet",
                Rewrites {
                    powers: 5,
                    variances: 13,
                    global_pools: 31,
                },
            ),
        ];
        for (bundle, rewrites) in expected {
            let path = root.join(bundle).join("visual.onnx");
            let bytes = std::fs::read(&path).unwrap();
            let (rewritten, done) = super::super::rewrite::rewrite(&bytes);
            assert_eq!(done, rewrites, "{bundle}");
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
            for (view, (a, b)) in a.chunks(dim).zip(b.chunks(dim)).enumerate() {
                let size = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    worst <= if view < 2 { 1e-5 } else { 3e-4 } * size,
                    "{bundle}, view {view}: {done:?}, largest change {worst} of {size}"
                );
            }
            assert!(matches!(rewritten, std::borrow::Cow::Owned(_)));
            // Five images run as calls of CPU_CHUNK and the rest, in order.
            let mut five = pixels.clone();
            five.extend_from_slice(&pixels[..3 * plane]);
            let c = loaded.embed(&five, n + 1, 224).unwrap();
            assert_eq!(c.len(), (n + 1) * dim);
            let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-6);
            assert!(
                close(&c[..n * dim], &b),
                "{bundle}: the first call's images"
            );
            assert!(
                close(&c[n * dim..], &b[..dim]),
                "{bundle}: the last call's image"
            );
            let short = loaded
                .embed(&five[1..], n + 1, 224)
                .unwrap_err()
                .to_string();
            assert!(short.contains("pixel values"), "{short}");
        }
    }
}
