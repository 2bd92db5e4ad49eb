//! `scorer.backend` and the keys of the backends that need more than `[model]`: which
//! library runs the bundle's visual tower, validated into a [`Backend`].

use super::{ConfigError, ScorerConfig, TorchDevice};

/// The library that runs the visual tower. New backends are new variants; each names
/// its settings and the bundle file it loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// ONNX Runtime on `visual.onnx`, with `model.execution`'s providers (the default).
    OnnxRuntime,
    /// libtorch (tch) on `visual.pt`, the TorchScript export of the same tower; only in
    /// a build with the `torch` cargo feature.
    Torch(TorchSettings),
    /// A KServe v2 gRPC server (Triton, KServe) serving the bundle's tower.
    Kserve(crate::score::kserve::KserveSettings),
}

impl Backend {
    /// The name used in the config (`scorer.backend`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::OnnxRuntime => "onnxruntime",
            Self::Torch(_) => "torch",
            Self::Kserve(_) => "kserve",
        }
    }
}

/// Validated `scorer.device`, `scorer.precision` and `scorer.fallback_cpu` of the
/// torch backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TorchSettings {
    /// Where the tower runs.
    pub device: TorchDevice,
    /// Arithmetic on that device.
    pub precision: Precision,
    /// A CUDA device that is missing or fails to load the tower: run on the CPU (in fp32)
    /// instead of refusing to start.
    pub fallback_cpu: bool,
}

/// Arithmetic precision of the torch backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// float32 throughout.
    Fp32,
    /// CUDA autocast to float16: convolutions and matrix products in half precision,
    /// reductions and normalisations in float32; embeddings come back as float32.
    Fp16,
}

impl Precision {
    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
        }
    }
}

/// Whether this build has the torch backend (the `torch` cargo feature).
pub const TORCH_BUILT: bool = cfg!(feature = "torch");

/// Validates `scorer.backend` with the keys that belong to it.
pub(super) fn parse_backend(s: &ScorerConfig) -> Result<Backend, ConfigError> {
    if s.backend != "kserve" && s.kserve != ScorerConfig::default().kserve {
        return Err(ConfigError::invalid(
            "scorer.kserve",
            "(set)",
            "applies to scorer.backend = \"kserve\" only",
        ));
    }
    match s.backend.as_str() {
        "onnxruntime" => {
            no_torch_keys(s, "ONNX Runtime runs on model.execution's providers")?;
            Ok(Backend::OnnxRuntime)
        }
        "kserve" => {
            no_torch_keys(s, "the server decides where the tower runs")?;
            Ok(Backend::Kserve(s.kserve.validate()?))
        }
        "torch" if !TORCH_BUILT => Err(ConfigError::invalid(
            "scorer.backend",
            "\"torch\"",
            "this streamiq was built without the torch backend (build it with \
             `cargo build --release --features torch`), or use \"onnxruntime\"",
        )),
        "torch" => Ok(Backend::Torch(parse_torch(s)?)),
        other => Err(ConfigError::invalid(
            "scorer.backend",
            format!("{other:?}"),
            "expected \"onnxruntime\", \"torch\" or \"kserve\"",
        )),
    }
}

/// Refuses the torch backend's keys with another backend (`why` says what decides
/// instead).
fn no_torch_keys(s: &ScorerConfig, why: &str) -> Result<(), ConfigError> {
    let defaults = ScorerConfig::default();
    for (key, value, default) in [
        ("scorer.device", &s.device, &defaults.device),
        ("scorer.precision", &s.precision, &defaults.precision),
    ] {
        if value != default {
            return Err(ConfigError::invalid(
                key,
                format!("{value:?}"),
                format!("applies to scorer.backend = \"torch\" only ({why})"),
            ));
        }
    }
    if s.fallback_cpu {
        return Err(ConfigError::invalid(
            "scorer.fallback_cpu",
            true,
            "applies to scorer.backend = \"torch\" only",
        ));
    }
    Ok(())
}

fn parse_torch(s: &ScorerConfig) -> Result<TorchSettings, ConfigError> {
    let device = TorchDevice::parse("scorer.device", &s.device)?;
    let precision = match s.precision.as_str() {
        "fp32" => Precision::Fp32,
        "fp16" => Precision::Fp16,
        other => {
            return Err(ConfigError::invalid(
                "scorer.precision",
                format!("{other:?}"),
                "expected \"fp32\" or \"fp16\"",
            ));
        }
    };
    if precision == Precision::Fp16 && device == TorchDevice::Cpu {
        return Err(ConfigError::invalid(
            "scorer.precision",
            "\"fp16\"",
            "needs scorer.device = \"cuda:N\" (fp16 is CUDA autocast; the CPU runs fp32)",
        ));
    }
    Ok(TorchSettings {
        device,
        precision,
        fallback_cpu: s.fallback_cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scorer(backend: &str, device: &str, precision: &str, fallback_cpu: bool) -> ScorerConfig {
        ScorerConfig {
            backend: backend.into(),
            device: device.into(),
            precision: precision.into(),
            fallback_cpu,
            ..ScorerConfig::default()
        }
    }

    fn err(s: &ScorerConfig) -> String {
        parse_backend(s).unwrap_err().to_string()
    }

    #[test]
    fn onnxruntime_is_the_default_and_refuses_the_torch_keys() {
        assert_eq!(
            parse_backend(&ScorerConfig::default()).unwrap(),
            Backend::OnnxRuntime
        );
        let e = err(&scorer("onnxruntime", "cuda:0", "fp32", false));
        assert!(e.starts_with("scorer.device = \"cuda:0\""), "{e}");
        let e = err(&scorer("onnxruntime", "cpu", "fp16", false));
        assert!(e.starts_with("scorer.precision"), "{e}");
        let e = err(&scorer("onnxruntime", "cpu", "fp32", true));
        assert!(e.starts_with("scorer.fallback_cpu"), "{e}");
        let e = err(&scorer("tensorflow", "cpu", "fp32", false));
        assert!(e.starts_with("scorer.backend = \"tensorflow\""), "{e}");
    }

    #[test]
    fn kserve_takes_its_table_and_refuses_the_torch_keys() {
        let mut s = scorer("kserve", "cpu", "fp32", false);
        s.kserve.endpoint = "http://triton:8001".into();
        match parse_backend(&s).unwrap() {
            Backend::Kserve(k) => assert_eq!(k.endpoint, "http://triton:8001"),
            other => panic!("{other:?}"),
        }
        let e = err(&scorer("kserve", "cuda:0", "fp32", false));
        assert!(e.starts_with("scorer.device"), "{e}");
        s.kserve.timeout = "soon".into();
        assert!(err(&s).starts_with("scorer.kserve.timeout"));
        // The table means nothing to another backend: a forgotten `backend` line.
        let mut s = scorer("onnxruntime", "cpu", "fp32", false);
        s.kserve.endpoint = "http://triton:8001".into();
        let e = err(&s);
        assert!(
            e.starts_with("scorer.kserve") && e.contains("\"kserve\" only"),
            "{e}"
        );
    }

    #[cfg(not(feature = "torch"))]
    #[test]
    fn a_build_without_the_feature_refuses_torch_naming_the_key() {
        let e = err(&scorer("torch", "cpu", "fp32", false));
        assert!(
            e.starts_with("scorer.backend = \"torch\"") && e.contains("--features torch"),
            "{e}"
        );
    }

    #[cfg(feature = "torch")]
    #[test]
    fn torch_devices_and_precisions() {
        let ok = |d, p, f| parse_backend(&scorer("torch", d, p, f)).unwrap();
        assert_eq!(
            ok("cuda:1", "fp16", true),
            Backend::Torch(TorchSettings {
                device: TorchDevice::Cuda(1),
                precision: Precision::Fp16,
                fallback_cpu: true
            })
        );
        assert!(
            matches!(ok("cpu", "fp32", false), Backend::Torch(t) if t.device == TorchDevice::Cpu)
        );
        for (d, p, key) in [
            ("gpu", "fp32", "scorer.device"),
            ("cuda:x", "fp32", "scorer.device"),
            ("cuda", "fp32", "scorer.device"),
            ("cuda:0", "bf16", "scorer.precision"),
            ("cpu", "fp16", "scorer.precision"),
        ] {
            let e = err(&scorer("torch", d, p, false));
            assert!(e.starts_with(key), "{d} {p}: {e}");
        }
    }
}
