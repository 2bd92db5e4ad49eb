//! # streamiq-adapt
//!
//! The libtorch sidecar of streamiq, as a library; `src/main.rs` only parses the
//! command line and calls into it. It is its own crate so that the daemon (`streamiq`)
//! builds and runs without libtorch.
//!
//! - [`once`]: one few-shot adaptation round from the label store ([`adapt`]); writes a
//!   new prompt set atomically and promotes it only if held-out SRCC did not get worse.
//! - [`check`]: recomputes a bundle's prompt features with the libtorch text tower
//!   ([`clip`]) and compares them with the ones the daemon uses (parity).
//! - [`pretrain`]: meta-prompt pre-training of the context vectors over distortion-type
//!   tasks, writing a new bundle.
//! - [`mod@bench`]: the few-shot evaluation protocol.
//! - [`reembed`]: after a model upgrade, re-embeds the stored labels with the new
//!   visual tower so that adaptation can use them again.
//!
//! What the daemon and the sidecar share (bundle checksums, prompt-set files, the label
//! store) lives once, in the `streamiq` library.

pub mod adapt;
pub mod bench;
pub mod clip;
pub mod once;
pub mod pretrain;
pub mod reembed;

use streamiq::config::TorchDevice;
use streamiq::score::bundle::Bundle;
use tch::{Device, Kind};

/// Parses "cpu" or "cuda:N" (the `--device` flags; `adapt.device` is parsed by the
/// config) into a libtorch device that is there.
pub fn device(name: &str) -> anyhow::Result<Device> {
    torch_device(TorchDevice::parse("--device", name)?)
}

/// The libtorch device for a validated [`TorchDevice`]; CUDA must be available.
pub fn torch_device(device: TorchDevice) -> anyhow::Result<Device> {
    match device {
        TorchDevice::Cpu => Ok(Device::Cpu),
        TorchDevice::Cuda(n) => {
            anyhow::ensure!(
                tch::Cuda::is_available(),
                "device {device}: CUDA is not available"
            );
            Ok(Device::Cuda(n as usize))
        }
    }
}

/// Max abs difference between recomputed and stored prompt features, per pair.
pub fn check(model: &std::path::Path, dev: Device, tolerance: f64) -> anyhow::Result<bool> {
    let bundle = Bundle::open(model)?;
    let tokens = clip::load_tokens(&bundle)?;
    let text = clip::TextEncoder::load(&bundle, dev)?;
    let prompts = bundle.prompts_path();
    let ctx = clip::read_tensor(&prompts, "ctx")?.to(dev);
    let width = text.spec.width as i64;
    anyhow::ensure!(
        ctx.size() == [text.spec.n_ctx as i64, width],
        "{}: ctx has shape {:?}, expected [{}, {width}]",
        prompts.display(),
        ctx.size(),
        text.spec.n_ctx
    );
    let mut ok = true;
    let groups = std::iter::once(("quality".to_string(), &tokens.quality)).chain(
        tokens
            .attributes
            .iter()
            .map(|(k, v)| (format!("attr.{k}"), v)),
    );
    let _guard = tch::no_grad_guard();
    for (name, group) in groups {
        let got = text.forward(&group.batch(dev), Some(&ctx)).to(Device::Cpu);
        let want = clip::read_tensor(&prompts, &name)?;
        let diff = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        println!("{name:<16} max abs diff {diff:.3e} (values up to {scale:.3})");
        ok &= diff <= tolerance;
    }
    let scenes = text.forward(&tokens.scenes.batch(dev), None);
    let finite = scenes.isfinite().all().int64_value(&[]) == 1;
    println!(
        "scenes           {} prompts, features {:?}, finite {finite}",
        tokens.scenes.names.len(),
        scenes.size()
    );
    ok &= finite && scenes.kind() == Kind::Float;
    Ok(ok)
}
