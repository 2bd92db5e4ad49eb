//! `streamiq-adapt`: the libtorch sidecar's command line (the logic is the
//! `streamiq_adapt` library).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use streamiq_adapt::{bench, check, device, once, pretrain, reembed};

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
    /// After a model upgrade: re-embed every stored label with the new bundle's visual
    /// tower, from its stored frame, so that `once` trains on it again. One transaction
    /// at the end (an interrupted run changes nothing); safe to run again.
    Reembed {
        /// Configuration file of the daemon that runs (or will run) the new model:
        /// model.*, scorer.views and labels.db are used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The new model bundle directory (overrides model.bundle).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The label store (overrides labels.db).
        #[arg(long)]
        db: Option<PathBuf>,
        /// "global", "crops:N", ... as the daemon scores (overrides scorer.views).
        #[arg(long)]
        views: Option<String>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
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
        Command::Reembed {
            config,
            model,
            db,
            views,
            json,
        } => {
            let o = reembed::ReembedOptions {
                config,
                model,
                db,
                views,
            };
            match reembed::run(&o) {
                Ok(r) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string(&r).expect("the report serialises")
                        );
                    } else {
                        println!("{r}");
                        for (id, why) in &r.failed {
                            println!("label {id}: not re-embedded: {why}");
                        }
                    }
                    if r.failed.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("streamiq-adapt: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
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
