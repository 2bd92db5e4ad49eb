//! `streamiq`: the daemon and its light tools. Parses flags, sets up tracing, calls
//! the library. Exit codes: 0 ok, 1 runtime failure (or scan below threshold),
//! 2 bad configuration, model files or input files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use streamiq::config::ScanGates;
use streamiq::config::{Backend, Config, ConfigError, Settings};
use streamiq::scan::{self, ScanOptions};
use streamiq::score::bundle::Bundle;
use streamiq::score::prompts::PromptSet;

#[derive(Parser)]
#[command(
    name = "streamiq",
    version,
    about = "Per-stream picture quality for Prometheus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration (and its model bundle) and print the effective config.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Score video files as fast as possible and report per file; exit 1 when a file
    /// fails a gate (the `--fail-*` flags, or the config's `[scan]` keys).
    #[command(group(clap::ArgGroup::new("source").required(true).args(["config", "model"])))]
    Scan {
        /// Configuration file (model, scorer, qc and scan sections are used).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Model bundle directory, instead of a configuration (defaults elsewhere).
        #[arg(long)]
        model: Option<PathBuf>,
        /// With --model: how the model looks at each frame (as `scorer.views`).
        #[arg(long, requires = "model")]
        views: Option<String>,
        /// One JSON object per file instead of text (as `--format jsonl`).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// Output: `text` (default), `jsonl` (one JSON object per file) or `csv` (a header
        /// and one row per file: scores, segment counts and durations, attributes, gates).
        #[arg(long, value_enum)]
        format: Option<ScanFormat>,
        /// Frames per second to sample (default: every frame).
        #[arg(long)]
        sample_fps: Option<f64>,
        /// Files decoded at once; one model scores all of them in shared batches. Each
        /// file's report is printed as soon as it ends, so with more than one job the
        /// order can differ from the command line's.
        #[arg(long, short = 'j', default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Also write every scored frame to this CSV file (path, pts, score, attributes,
        /// black/freeze/bars flags), for plotting.
        #[arg(long, value_name = "FILE")]
        per_frame: Option<PathBuf>,
        #[command(flatten)]
        gates: GateArgs,
        /// Video files.
        #[arg(required = true)]
        videos: Vec<PathBuf>,
    },
    /// Score still images: `SCORE PATH` per line, or JSON with --json.
    Score {
        /// Model bundle directory.
        #[arg(long)]
        model: PathBuf,
        /// How the model looks at each image: `global`, `crops:N` or `mixed:N` (as
        /// `scorer.views`; default: the default configuration's).
        #[arg(long)]
        views: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Image files (anything GStreamer decodes: JPEG, PNG, ...).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Decoded-frame-to-score throughput and batch latency through the scoring path
    /// (preprocessing, batching, the backend's device copies), one JSON line; run by
    /// scripts/bench_gpu.sh.
    #[command(hide = true)]
    BenchEngine {
        /// Model bundle directory.
        #[arg(long)]
        model: PathBuf,
        /// `scorer.backend`.
        #[arg(long, default_value = "onnxruntime")]
        backend: String,
        /// `scorer.device` (torch backend).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// `scorer.precision` (torch backend).
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// `scorer.max_batch`.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// `scorer.views`.
        #[arg(long, default_value = "global")]
        views: String,
        /// `model.intra_threads`.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Frames scored before timing.
        #[arg(long, default_value_t = 64)]
        warmup: usize,
        /// Frames timed.
        #[arg(long, default_value_t = 512)]
        frames: usize,
        /// Batches of latency measurement after the throughput run (0 = none).
        #[arg(long, default_value_t = 0)]
        latency_rounds: usize,
        /// Frame size WxH as ingest delivers it.
        #[arg(long, default_value = "398x224")]
        frame: String,
    },
    /// Write a labelled set of synthetically distorted images (13 kinds x 5 levels by
    /// default).
    Distort {
        /// Output directory (images/ and labels.csv).
        #[arg(long)]
        out: PathBuf,
        /// Seed (the same seed gives the same images).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Shorter side of the working size in pixels.
        #[arg(long, default_value_t = 384)]
        size: u32,
        /// Comma-separated kinds (default: the 13 standard kinds; `color_cast`, held out
        /// of the default set for few-shot recalibration evidence, is only made when named).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Source images.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
    },
    /// Write a Triton model repository for a bundle (ONNX Runtime backend, dynamic
    /// batching, GPU instances): OUT/NAME/config.pbtxt and OUT/NAME/1/model.onnx, for
    /// daemons that score with `scorer.backend = "kserve"`.
    ExportTriton {
        /// Model bundle directory (its visual.onnx is verified first).
        #[arg(long)]
        model: PathBuf,
        /// Model name in the repository (`scorer.kserve.model`).
        #[arg(long, default_value = "streamiq_visual")]
        name: String,
        /// Largest batch the server forms (`scorer.kserve.max_batch_size`).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=4096))]
        max_batch_size: u16,
        /// Execution instances per GPU.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        instances: u16,
        /// Repository directory (created if missing).
        out: PathBuf,
    },
    /// Write the stored labels as a set `streamiq eval` reads: DIR/labels.csv (path, mos,
    /// type = stream, id, labeller, target, model_score, model_sha256, image) and
    /// DIR/images/label-ID.png, each the frame as it was scored.
    #[command(group(clap::ArgGroup::new("store").required(true).args(["config", "db"])))]
    ExportLabels {
        /// Configuration file (its `labels.db`, with `STREAMIQ__LABELS__DB` over it).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The label store itself.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Output directory: new, or empty.
        #[arg(long)]
        out: PathBuf,
        /// Only labels with an id above this.
        #[arg(long, default_value_t = 0)]
        since: i64,
    },
    /// SRCC / PLCC of the model against labels (CSV with columns path, mos[, type]).
    Eval {
        /// Model bundle directory.
        #[arg(long)]
        model: PathBuf,
        /// Label CSV; relative image paths are resolved against its directory.
        #[arg(long)]
        labels: PathBuf,
        /// How the model looks at each image: `global`, `crops:N` or `mixed:N` (as
        /// `scorer.views`; default: the default configuration's).
        #[arg(long)]
        views: Option<String>,
        /// Random 80/20 splits to summarise.
        #[arg(long, default_value_t = 10)]
        splits: usize,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also write the images' embeddings and labels (safetensors `embeds` [N,D],
        /// `targets` [N] in [0,1], metadata `types`), for `streamiq-adapt bench`.
        #[arg(long)]
        save_embeddings: Option<PathBuf>,
    },
}

/// ONNX Runtime 1.31 sends usage events to Microsoft (a device id kept under
/// `~/.cache/Microsoft`, a DNS lookup and an HTTPS upload from the scoring process)
/// unless `ORT_DISABLE_TELEMETRY=1` is in the environment when it loads; its
/// `DisableTelemetryEvents` call alone does not stop the upload. Changing the environment
/// of a running process takes `unsafe` (this crate has none), so without the variable
/// the program runs itself again with it, once, before anything else (the same process:
/// `exec` keeps the PID that systemd and the tests watch). The unit, the container and the
/// Kubernetes manifests set it, so a service never takes this detour.
fn without_onnxruntime_telemetry() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "ORT_DISABLE_TELEMETRY";
    if std::env::var_os(VAR).is_some_and(|v| v == "1") {
        return;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!(
                "streamiq: cannot find its own executable to set {VAR}=1 ({e}); set it in the environment"
            );
            return;
        }
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(&exe);
    if let Some(argv0) = args.next() {
        cmd.arg0(argv0);
    }
    let e = cmd.args(args).env(VAR, "1").exec();
    eprintln!(
        "streamiq: cannot run {} again with {VAR}=1 ({e}); set it in the environment",
        exe.display()
    );
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("STREAMIQ_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `scan`'s gates; each overrides the config's `[scan]` key of the same name.
#[derive(clap::Args, Default)]
struct GateArgs {
    /// Fail a file whose mean score is below this (0..1).
    #[arg(long)]
    fail_below: Option<f64>,
    /// Fail a file whose 5th-percentile score is below this (0..1).
    #[arg(long)]
    fail_below_p5: Option<f64>,
    /// Fail a file with a black segment at least this long ("2s", "500ms").
    #[arg(long, value_name = "DURATION")]
    fail_on_black: Option<String>,
    /// Fail a file with a frozen segment at least this long.
    #[arg(long, value_name = "DURATION")]
    fail_on_freeze: Option<String>,
    /// Fail a file showing colour bars at least this long.
    #[arg(long, value_name = "DURATION")]
    fail_on_bars: Option<String>,
}

impl GateArgs {
    /// The gates: these flags over the config's `[scan]` keys.
    fn over(self, config: &streamiq::config::ScanConfig) -> Result<ScanGates, ConfigError> {
        let merged = streamiq::config::ScanConfig {
            fail_below: self.fail_below.or(config.fail_below),
            fail_below_p5: self.fail_below_p5.or(config.fail_below_p5),
            fail_on_black: self.fail_on_black.or(config.fail_on_black.clone()),
            fail_on_freeze: self.fail_on_freeze.or(config.fail_on_freeze.clone()),
            fail_on_bars: self.fail_on_bars.or(config.fail_on_bars.clone()),
        };
        ScanGates::from_config(&merged, "--").map_err(|e| {
            // A flag's name is `--fail-on-black`, the key's `fail_on_black`.
            match e {
                ConfigError::Invalid { key, value, reason } => ConfigError::Invalid {
                    key: key.replace('_', "-"),
                    value,
                    reason,
                },
                other => other,
            }
        })
    }
}

/// `raw` for a command that watches no streams (`scan`, `export-labels`): its
/// `[cluster]`, whose replica index may come from a pod's host name, does not apply.
fn without_cluster(mut raw: Config) -> Config {
    raw.cluster = Default::default();
    raw
}

fn settings(path: &std::path::Path) -> Result<Settings, ConfigError> {
    Config::load(path)?.validate()
}

/// The default configuration with `model.bundle = model` (and `scorer.views = views`,
/// if given), for the commands that only need a model.
fn model_config(model: PathBuf, views: Option<String>) -> Config {
    let mut c = Config::default();
    c.model.bundle = model;
    if let Some(v) = views {
        c.scorer.views = v;
    }
    c
}

/// Validated [`model_config`].
fn model_settings(model: PathBuf, views: Option<String>) -> Result<Settings, ConfigError> {
    model_config(model, views).validate()
}

/// Prints `msg` (credentials removed: a config error may quote a stream's URI) and
/// returns `code`.
fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("streamiq: {}", streamiq::redact::redact(&msg.to_string()));
    ExitCode::from(code)
}

fn main() -> ExitCode {
    without_onnxruntime_telemetry();
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => check_config(config),
        Command::ExportTriton {
            model,
            name,
            max_batch_size,
            instances,
            out,
        } => {
            let bundle = match Bundle::open(&model) {
                Ok(b) => b,
                Err(e) => return fail(2, format!("--model: {e}")),
            };
            let export = streamiq::score::kserve::TritonExport {
                name,
                max_batch_size: std::num::NonZeroUsize::new(max_batch_size.into())
                    .expect("clap keeps it >= 1"),
                instances: std::num::NonZeroUsize::new(instances.into())
                    .expect("clap keeps it >= 1"),
            };
            match streamiq::score::kserve::export_triton(&bundle, &out, &export) {
                Ok(dir) => {
                    eprintln!(
                        "streamiq: {}: model {:?} of bundle {} (inputs [-1, 3, {s}, {s}] FP32, max_batch_size {})",
                        dir.display(),
                        export.name,
                        bundle.manifest.name,
                        export.max_batch_size,
                        s = bundle.manifest.input.size
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(2, e),
            }
        }
        Command::ExportLabels {
            config,
            db,
            out,
            since,
        } => {
            let db = match (db, config) {
                (Some(db), _) => db,
                (None, Some(c)) => match Config::load(&c)
                    .map(without_cluster)
                    .and_then(Config::validate)
                {
                    Ok(s) => s.labels_db,
                    Err(e) => return fail(2, e),
                },
                (None, None) => unreachable!("clap requires --config or --db"),
            };
            if !db.is_file() {
                return fail(2, format!("{}: no label store there", db.display()));
            }
            let store = match streamiq::labels::LabelStore::open(&db) {
                Ok(s) => s,
                Err(e) => return fail(2, e),
            };
            match store.export_dir(&out, since) {
                Ok(n) => {
                    eprintln!(
                        "streamiq: wrote {n} labels to {}",
                        out.join("labels.csv").display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, e),
            }
        }
        Command::Scan {
            config,
            model,
            views,
            json,
            format,
            sample_fps,
            jobs,
            per_frame,
            gates,
            videos,
        } => {
            let raw = match (config, model) {
                (Some(c), _) => Config::load(&c),
                (None, Some(m)) => Ok(model_config(m, views)),
                (None, None) => unreachable!("clap requires --config or --model"),
            };
            let loaded = raw
                .map(without_cluster)
                .and_then(|raw| raw.settings().map(|s| (raw, s)));
            let (raw, mut s) = match loaded {
                Ok(both) => both,
                Err(e) => return fail(2, e),
            };
            s.scan = match gates.over(&raw.scan) {
                Ok(g) => g,
                Err(e) => return fail(2, e),
            };
            let format = format.unwrap_or(if json {
                ScanFormat::Jsonl
            } else {
                ScanFormat::Text
            });
            let opts = ScanOptions {
                files: videos,
                sample_fps: None,
                gates: s.scan.clone(),
                jobs: jobs.into(),
                per_frame: per_frame.is_some(),
            };
            scan_cmd(&s, opts, sample_fps, format, per_frame)
        }
        Command::Score {
            model,
            views,
            json,
            images,
        } => {
            let s = match model_settings(model, views) {
                Ok(s) => s,
                Err(e) => return fail(2, e),
            };
            score_cmd(&s, images, json)
        }
        Command::BenchEngine {
            model,
            backend,
            device,
            precision,
            batch,
            views,
            threads,
            warmup,
            frames,
            latency_rounds,
            frame,
        } => {
            let mut c = model_config(model, Some(views));
            c.scorer.backend = backend;
            c.scorer.device = device;
            c.scorer.precision = precision;
            c.scorer.max_batch = batch;
            c.scorer.queue_capacity = c.scorer.queue_capacity.max(2 * batch);
            c.model.intra_threads = threads;
            let Some((width, height)) = frame
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
            else {
                return fail(2, format!("--frame {frame:?}: expected WxH"));
            };
            let opts = streamiq::score::bench::BenchOptions {
                warmup,
                frames,
                latency_rounds,
                width,
                height,
            };
            match c.validate() {
                Ok(s) => bench_cmd(&s, &opts),
                Err(e) => fail(2, e),
            }
        }
        Command::Distort {
            out,
            seed,
            size,
            kinds,
            sources,
        } => distort_cmd(out, seed, size, kinds, sources),
        Command::Eval {
            model,
            labels,
            views,
            splits,
            json,
            save_embeddings,
        } => {
            let s = match model_settings(model, views) {
                Ok(s) => s,
                Err(e) => return fail(2, e),
            };
            eval_cmd(&s, &labels, splits.max(1), json, save_embeddings.as_deref())
        }
    }
}

fn bench_cmd(s: &Settings, opts: &streamiq::score::bench::BenchOptions) -> ExitCode {
    match streamiq::score::bench::bench(s, opts) {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.exit_code(), e),
    }
}

fn distort_cmd(
    out: PathBuf,
    seed: u64,
    size: u32,
    kinds: Vec<String>,
    sources: Vec<PathBuf>,
) -> ExitCode {
    use streamiq::distort::{DistortOptions, Kind, write_set};
    let kinds = if kinds.is_empty() {
        Kind::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for k in &kinds {
            match Kind::from_name(k) {
                Some(k) => v.push(k),
                None => {
                    let all: Vec<&str> = Kind::ALL
                        .iter()
                        .chain(&Kind::EXTRA)
                        .map(|k| k.name())
                        .collect();
                    return fail(
                        2,
                        format!("--kinds {k:?}: unknown; expected one of {}", all.join(", ")),
                    );
                }
            }
        }
        v
    };
    if !(16..=4096).contains(&size) {
        return fail(2, format!("--size {size}: must be within 16..=4096"));
    }
    let opts = DistortOptions {
        sources,
        out,
        seed,
        size,
        kinds,
    };
    match write_set(&opts, |done, total| {
        eprintln!("distort: {done}/{total} sources")
    }) {
        Ok(rows) => {
            eprintln!(
                "distort: wrote {} images and {}",
                rows.len(),
                opts.out.join("labels.csv").display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(2, e),
    }
}

fn eval_cmd(
    s: &Settings,
    labels: &std::path::Path,
    splits: usize,
    json: bool,
    save: Option<&std::path::Path>,
) -> ExitCode {
    let labelled = match streamiq::eval::read_labels(labels) {
        Ok(l) => l,
        Err(e) => return fail(2, e),
    };
    let opts = ScanOptions::files(labelled.iter().map(|l| l.path.clone()).collect());
    let reports = match scan::scan(s, &opts) {
        Ok(r) => r,
        Err(e) => return fail(e.exit_code(), e),
    };
    let scores: Vec<Option<f64>> = reports.iter().map(|r| r.mean_score).collect();
    let errors = reports
        .iter()
        .filter_map(|r| r.error.clone().map(|e| (r.path.clone(), e)))
        .collect();
    let rep = streamiq::eval::report(&labelled, &scores, errors, splits);
    if let Some(path) = save {
        let embeds: Vec<Option<Vec<f32>>> = reports.iter().map(|r| r.embedding.clone()).collect();
        match streamiq::eval::save_embeddings(path, &labelled, &embeds) {
            Ok(n) => eprintln!("streamiq: wrote {n} embeddings to {}", path.display()),
            Err(e) => return fail(1, e),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&rep).expect("report serialises")
        );
    } else {
        print!("{}", streamiq::eval::format_text(&rep));
    }
    ExitCode::SUCCESS
}

fn run(config: PathBuf) -> ExitCode {
    let s = match settings(&config) {
        Ok(s) if s.streams.is_empty() => {
            return fail(
                2,
                format!(
                    "{}: streams: configure at least one [[streams]]",
                    config.display()
                ),
            );
        }
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, e),
    };
    let token = CancellationToken::new();
    let deadline = s.server.shutdown_timeout;
    rt.spawn(streamiq::shutdown::on_signals(token.clone(), deadline));
    let opts = streamiq::RunOptions {
        config_path: Some(config),
        bound: None,
    };
    match rt.block_on(streamiq::run_with(s, opts, token)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), e),
    }
}

fn check_config(config: PathBuf) -> ExitCode {
    let (raw, s) = match Config::load(&config).and_then(|c| c.settings().map(|s| (c, s))) {
        Ok(both) => both,
        Err(e) => return fail(2, e),
    };
    let bundle = match Bundle::open(&s.model.bundle) {
        Ok(b) => b,
        Err(e) => return fail(2, format!("model.bundle: {e}")),
    };
    if let Err(e) = PromptSet::load(&bundle.prompts_path(), bundle.manifest.embed_dim) {
        return fail(2, format!("model.bundle: {e}"));
    }
    if matches!(s.scorer.backend, Backend::Torch(_))
        && let Err(e) = bundle.torchscript_bytes()
    {
        return fail(2, format!("model.bundle: {e}"));
    }
    match toml::to_string_pretty(&raw) {
        Ok(text) => {
            // The effective config, with stream credentials removed (the unit runs this
            // before every start, so it goes to the journal).
            print!("{}", streamiq::redact::redact(&text));
            eprintln!(
                "streamiq: {}: ok ({} streams, bundle {} verified)",
                config.display(),
                s.streams.len(),
                bundle.manifest.name
            );
            if s.cluster.is_sharded() {
                let mine: Vec<String> = s
                    .cluster
                    .mine(&s.streams)
                    .into_iter()
                    .map(|st| st.id)
                    .collect();
                eprintln!(
                    "streamiq: replica {} of {} watches {} of them: {}",
                    s.cluster.replica,
                    s.cluster.replicas,
                    mine.len(),
                    mine.join(" ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

/// `scan`'s output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ScanFormat {
    /// Readable lines per file.
    Text,
    /// One JSON object per file.
    Jsonl,
    /// A header row and one row per file.
    Csv,
}

/// Prints `scan`'s reports as files end, keeps the progress bar and writes the
/// per-frame file.
struct ScanPrinter {
    format: ScanFormat,
    attributes: Vec<String>,
    per_frame: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
    write_error: Option<String>,
    bar: indicatif::ProgressBar,
}

impl ScanPrinter {
    fn write_per_frame(&mut self, text: &str) {
        use std::io::Write;
        if let Some((path, w)) = &mut self.per_frame
            && self.write_error.is_none()
            && let Err(e) = w.write_all(text.as_bytes())
        {
            self.write_error = Some(format!("--per-frame {}: {e}", path.display()));
        }
    }
}

impl scan::ScanObserver for ScanPrinter {
    fn started(&mut self, attributes: &[String]) {
        self.attributes = attributes.to_vec();
        if self.format == ScanFormat::Csv {
            print!("{}", scan::csv_header(attributes));
        }
        self.write_per_frame(&scan::per_frame_header(attributes));
    }

    fn progress(&mut self, frames_scored: u64) {
        self.bar
            .set_message(format!("{frames_scored} frames scored"));
    }

    fn finished(&mut self, r: &scan::FileReport) {
        let line = match self.format {
            ScanFormat::Csv => scan::csv_row(r, &self.attributes),
            ScanFormat::Jsonl => serde_json::to_string(r).expect("report serialises") + "\n",
            ScanFormat::Text => scan::format_text(r),
        };
        self.bar.suspend(|| print!("{line}"));
        self.bar.inc(1);
        self.write_per_frame(&scan::per_frame_rows(r));
    }
}

fn scan_cmd(
    s: &Settings,
    mut opts: ScanOptions,
    sample_fps: Option<f64>,
    format: ScanFormat,
    per_frame: Option<PathBuf>,
) -> ExitCode {
    use std::io::IsTerminal;
    opts.sample_fps = match sample_fps.map(|f| streamiq::config::sample_fps("--sample-fps", f)) {
        Some(Err(e)) => return fail(2, e),
        Some(Ok(f)) => f,
        None => None,
    };
    let per_frame = match per_frame {
        Some(path) => match std::fs::File::create(&path) {
            Ok(f) => Some((path, std::io::BufWriter::new(f))),
            Err(e) => return fail(2, format!("--per-frame {}: {e}", path.display())),
        },
        None => None,
    };
    // Progress on standard error only when a person watches it.
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(opts.files.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} files, {msg} (eta {eta})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut printer = ScanPrinter {
        format,
        attributes: Vec::new(),
        per_frame,
        write_error: None,
        bar,
    };
    let reports = match scan::scan_with(s, &opts, &mut printer) {
        Ok(r) => r,
        Err(e) => return fail(e.exit_code(), e),
    };
    printer.bar.finish_and_clear();
    if let Some((path, mut w)) = printer.per_frame.take() {
        use std::io::Write;
        if let Err(e) = w.flush() {
            printer
                .write_error
                .get_or_insert(format!("--per-frame {}: {e}", path.display()));
        }
    }
    if let Some(e) = printer.write_error {
        return fail(2, e);
    }
    ExitCode::from(scan::exit_code(&reports) as u8)
}

fn score_cmd(s: &Settings, images: Vec<PathBuf>, json: bool) -> ExitCode {
    let opts = ScanOptions::files(images);
    let reports = match scan::scan(s, &opts) {
        Ok(r) => r,
        Err(e) => return fail(e.exit_code(), e),
    };
    for r in &reports {
        match (r.mean_score, json) {
            (Some(score), false) => println!("{score:.6} {}", r.path),
            (Some(score), true) => println!(
                "{}",
                serde_json::json!({"path": r.path, "score": score, "attributes": r.attributes})
            ),
            (None, _) => eprintln!(
                "streamiq: {}: {}",
                r.path,
                r.error.as_deref().unwrap_or("not scored")
            ),
        }
    }
    ExitCode::from(if reports.iter().any(|r| r.error.is_some()) {
        2
    } else {
        0
    })
}
