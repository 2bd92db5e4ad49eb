//! `streamiq-adapt`: the libtorch sidecar.
//!
//! - `once`: one few-shot adaptation round from the label store ([`adapt`]); writes a
//!   new prompt set atomically and promotes it only if held-out SRCC did not get worse.
//! - `check`: recomputes a bundle's prompt features with the libtorch text tower
//!   ([`clip`]) and compares them with the ones the daemon uses (parity).
//! - `pretrain`: meta-prompt pre-training of the context vectors over distortion-type
//!   tasks ([`pretrain`]), writing a new bundle.
//! - `bench`: the few-shot evaluation protocol ([`mod@bench`]).

mod adapt;
mod bench;
mod clip;
mod once;
mod pretrain;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamiq::score::bundle::Bundle;
use tch::{Device, Kind};

#[derive(Parser)]
#[command(
    name = "streamiq-adapt",
    version,
    about = "streamiq's libtorch sidecar"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Meta-prompt pre-training (Reptile over distortion types) of a bundle's context
    /// vectors; writes a new bundle to --out.
    Pretrain {
        /// Model bundle directory (with text/).
        #[arg(long)]
        model: PathBuf,
        /// Embeddings with a `types` list, from `streamiq eval --save-embeddings` on a
        /// `streamiq distort` set.
        #[arg(long)]
        embeddings: PathBuf,
        /// Output bundle directory (must not hold a bundle yet).
        #[arg(long)]
        out: PathBuf,
        /// Distortion types held out for checkpoint selection (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        val_types: Vec<String>,
        /// Outer iterations.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Tasks per meta-batch.
        #[arg(long, default_value_t = 4)]
        tasks_per_batch: usize,
        /// Reptile step size.
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        /// Inner Adam learning rate.
        #[arg(long, default_value_t = 1e-3)]
        inner_lr: f64,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// "cpu" or "cuda:N".
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The few-shot protocol on a labelled set: no adaptation vs adaptation per lambda,
    /// over random splits (embeddings from `streamiq eval --save-embeddings`).
    Bench {
        /// Model bundle directory (with text/).
        #[arg(long)]
        model: PathBuf,
        /// Embeddings + targets written by `streamiq eval --save-embeddings`.
        #[arg(long)]
        embeddings: PathBuf,
        /// Training labels per split.
        #[arg(long, default_value_t = 50)]
        train: usize,
        /// Random splits.
        #[arg(long, default_value_t = 10)]
        splits: usize,
        /// Regularisation strengths to compare.
        #[arg(long, value_delimiter = ',', default_value = "0,5")]
        lambdas: Vec<f64>,
        /// Epoch bound per adaptation round.
        #[arg(long, default_value_t = 200)]
        max_epochs: usize,
        /// "cpu" or "cuda:N".
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// One adaptation round from the label store (see the [adapt] config section).
    Once {
        /// Configuration file (model, labels and adapt sections are used).
        #[arg(long, short)]
        config: PathBuf,
        /// Override adapt.lambda.
        #[arg(long)]
        lambda: Option<f64>,
    },
    /// Load a bundle's text tower and check that it reproduces the bundle's prompt
    /// features from its context vectors (max abs difference at most --tolerance).
    Check {
        /// Model bundle directory (with text/).
        #[arg(long)]
        model: PathBuf,
        /// "cpu" or "cuda:N".
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Largest accepted absolute difference.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
    },
}

/// Parses "cpu" or "cuda:N".
pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("device {other:?}: expected \"cpu\" or \"cuda:N\""))?;
            anyhow::ensure!(
                tch::Cuda::is_available(),
                "device {other}: CUDA is not available"
            );
            Ok(Device::Cuda(n))
        }
    }
}

/// Max abs difference between recomputed and stored prompt features, per pair.
fn check(model: &std::path::Path, dev: Device, tolerance: f64) -> anyhow::Result<bool> {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Pretrain {
            model,
            embeddings,
            out,
            val_types,
            iterations,
            tasks_per_batch,
            beta,
            inner_lr,
            seed,
            device: dev,
        } => {
            let o = pretrain::PretrainOptions {
                iterations: iterations.max(1),
                tasks_per_batch: tasks_per_batch.max(1),
                beta,
                inner_lr,
                val_types,
                eval_every: 10,
                seed,
            };
            match device(&dev).and_then(|d| pretrain::run(&model, &embeddings, &out, &o, d)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("streamiq-adapt: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Bench {
            model,
            embeddings,
            train,
            splits,
            lambdas,
            max_epochs,
            device: dev,
        } => {
            let o = bench::BenchOptions {
                train,
                splits: splits.max(1),
                lambdas,
                max_epochs,
            };
            match device(&dev).and_then(|d| bench::run(&model, &embeddings, &o, d)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("streamiq-adapt: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Once { config, lambda } => match once::run(&config, lambda) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("streamiq-adapt: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Check {
            model,
            device: dev,
            tolerance,
        } => match device(&dev).and_then(|d| check(&model, d, tolerance)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!(
                    "streamiq-adapt: {}: text tower does not reproduce the prompt features",
                    model.display()
                );
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("streamiq-adapt: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}
