//! The visual encoder in libtorch (tch), the `torch` backend: the bundle's `visual.pt`
//! (a TorchScript export of the same tower as `visual.onnx`) on the CPU or a CUDA
//! device, in fp32 or under CUDA fp16 autocast. Only in a build with the `torch` feature.
//!
//! A CUDA device that libtorch does not see, or on which the tower fails to load or to
//! run one warm-up image, stops the start with an error naming `scorer.device`, or, with
//! `scorer.fallback_cpu`, runs the tower on the CPU in fp32 (logged, counted and shown
//! in `streamiq_build_info{execution}`).

use std::io::Cursor;
use std::path::PathBuf;

use tch::{CModule, Device, Kind, Tensor};

use super::LoadError;
use super::encoder::Fallback;
use super::model::ModelError;
use super::prompts::normalise_in_place;
use crate::config::{Precision, TorchDevice, TorchSettings};

/// A loaded TorchScript visual encoder on its device.
pub struct TorchVisual {
    module: CModule,
    device: TorchDevice,
    precision: Precision,
    embed_dim: usize,
    /// The configured device that could not be used, if the tower fell back to the CPU.
    pub fallback: Option<Fallback>,
}

/// What [`load`] needs besides the bytes.
#[derive(Debug, Clone)]
pub struct TorchOptions {
    /// `visual.pt`, for error messages.
    pub path: PathBuf,
    /// Embedding size D.
    pub embed_dim: usize,
    /// Input side in pixels (for the warm-up image).
    pub size: usize,
    /// Device, precision and fall-back.
    pub settings: TorchSettings,
    /// libtorch intra-op threads (0 = its default).
    pub intra_threads: usize,
}

fn tch_device(d: TorchDevice) -> Device {
    match d {
        TorchDevice::Cpu => Device::Cpu,
        TorchDevice::Cuda(n) => Device::Cuda(n as usize),
    }
}

/// Loads `visual.pt` from its (already checked) bytes on the configured device, or on
/// the CPU when that device cannot be used and `fallback_cpu` says so.
pub fn load(bytes: &[u8], opts: &TorchOptions) -> Result<TorchVisual, LoadError> {
    if opts.intra_threads > 0 {
        tch::set_num_threads(i32::try_from(opts.intra_threads).unwrap_or(i32::MAX));
    }
    let s = opts.settings;
    let TorchDevice::Cuda(n) = s.device else {
        return Ok(TorchVisual::on(
            bytes,
            opts,
            TorchDevice::Cpu,
            Precision::Fp32,
        )?);
    };
    let attempt = cuda_device(n).and_then(|()| {
        TorchVisual::on(bytes, opts, s.device, s.precision).map_err(|e| e.to_string())
    });
    match attempt {
        Ok(m) => Ok(m),
        Err(reason) if s.fallback_cpu => {
            let mut m = TorchVisual::on(bytes, opts, TorchDevice::Cpu, Precision::Fp32)?;
            m.fallback = Some(Fallback {
                from: execution_name(s.device),
                reason,
            });
            Ok(m)
        }
        Err(reason) => Err(LoadError::Device {
            device: s.device.to_string(),
            message: format!(
                "{reason} (set scorer.fallback_cpu = true to score on the CPU instead)"
            ),
        }),
    }
}

/// Whether libtorch sees CUDA device `n`.
fn cuda_device(n: u32) -> Result<(), String> {
    let count = tch::Cuda::device_count();
    if i64::from(n) < count {
        Ok(())
    } else if count == 0 {
        Err("libtorch finds no CUDA device (no GPU, driver or CUDA runtime)".into())
    } else {
        Err(format!(
            "libtorch finds {count} CUDA device(s), numbered from 0"
        ))
    }
}

/// The `streamiq_build_info{execution}` value of the torch backend on `device`.
pub fn execution_name(device: TorchDevice) -> String {
    format!("torch-{device}")
}

impl TorchVisual {
    /// Loads the module on `device` and runs one warm-up image through it, so that a
    /// tower that cannot run there is refused at start, not at the first batch.
    fn on(
        bytes: &[u8],
        opts: &TorchOptions,
        device: TorchDevice,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let load = |message: String| ModelError::Load {
            path: opts.path.clone(),
            message,
        };
        let mut module = CModule::load_data_on_device(&mut Cursor::new(bytes), tch_device(device))
            .map_err(|e| load(format!("not a TorchScript module for {device}: {e}")))?;
        module.set_eval();
        let mut m = Self {
            module,
            device,
            precision,
            embed_dim: opts.embed_dim,
            fallback: None,
        };
        let warm = vec![0.0f32; 3 * opts.size * opts.size];
        m.embed(&warm, 1, opts.size)
            .map_err(|e| load(format!("warm-up on {device} failed: {e}")))?;
        Ok(m)
    }

    /// Embedding size D.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// The `streamiq_build_info{execution}` value: `torch-cpu`, `torch-cuda:0`, ...
    pub fn execution(&self) -> String {
        execution_name(self.device)
    }

    /// The precision the tower runs in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Runs `n` images (`pixels` = `[n, 3, size, size]` floats): copied to the device,
    /// run, and returned as `n * D` L2-normalised float32 embeddings.
    pub fn embed(&mut self, pixels: &[f32], n: usize, size: usize) -> Result<Vec<f32>, ModelError> {
        let run = |e: tch::TchError| ModelError::Run(e.to_string());
        let _no_grad = tch::no_grad_guard();
        let dims = [n, 3, size, size].map(|d| d as i64);
        let x = Tensor::f_from_slice(pixels)
            .and_then(|t| t.f_view(dims))
            .and_then(|t| t.f_to_device(tch_device(self.device)))
            .map_err(run)?;
        let y = match self.precision {
            Precision::Fp32 => self.module.forward_ts(&[x]),
            Precision::Fp16 => tch::autocast(true, || self.module.forward_ts(&[x])),
        }
        .map_err(run)?;
        let shape = y.size();
        if shape != [n as i64, self.embed_dim as i64] {
            return Err(ModelError::Run(format!(
                "embeds has shape {shape:?}, expected [{n}, {}]",
                self.embed_dim
            )));
        }
        let y = y
            .f_to_kind(Kind::Float)
            .and_then(|t| t.f_to_device(Device::Cpu))
            .and_then(|t| t.f_flatten(0, -1))
            .map_err(run)?;
        let mut out = Vec::<f32>::try_from(&y).map_err(run)?;
        for e in out.chunks_exact_mut(self.embed_dim) {
            if !normalise_in_place(e) {
                e.fill(f32::NAN);
            }
        }
        Ok(out)
    }
}
