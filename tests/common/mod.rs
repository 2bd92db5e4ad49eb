//! The integration tests' harness, shared by every test binary of both crates (each
//! uses a subset; the `adapt/` crate's tests include it by path):
//!
//! - [`daemon`]: a daemon in the test process or as a child process, stopped on drop;
//! - [`http`]: the one HTTP client, and reading `/metrics`;
//! - [`default_run`]: the shipped config as a daemon;
//! - [`triton`]: a real Triton server serving a bundle (`scripts/triton_serve.py`);
//! - here: paths (repository, binaries, bundle, venvs), configs, commands, polling and
//!   test data.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use streamiq::config::{Config, Settings};

pub mod daemon;
pub mod default_run;
pub mod http;
pub mod triton;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use http::{get, get_as, http, json_as, metric, post_label, request, sample, text, text_as};

/// The repository root (the workspace's, also for tests of the `adapt/` crate).
pub fn repo() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .unwrap_or(&manifest)
        .to_path_buf()
}

/// A binary of the workspace (`streamiq` or `streamiq-adapt`) in the target directory
/// this test runs from. A test of one crate that runs the other crate's binary uses
/// this; `cargo test --workspace` (what `make test` runs) builds both.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's binaries first (`cargo test --workspace` and `make test` do)",
        path.display()
    );
    path
}

/// The generated test bundle (`make bundle`).
pub fn bundle() -> PathBuf {
    let b = repo().join("models/streamiq-test");
    assert!(
        b.join("manifest.toml").is_file(),
        "{} is missing: run `make bundle` (or `make test`) first",
        b.display()
    );
    b
}

/// What a finished command printed.
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Standard output followed by standard error.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to the end and asserts that it succeeded, showing all it printed if not.
pub fn run_ok(cmd: &mut std::process::Command) -> Ran {
    let o = cmd.output().unwrap();
    let ran = Ran {
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(o.status.success(), "{cmd:?} failed:\n{}", ran.text());
    ran
}

/// The project venv's Python (`scripts/setup.sh`).
pub fn venv_python() -> PathBuf {
    python_of("STREAMIQ_VENV", "/opt/streamiq/venv")
}

/// The Python of the Triton venv (`scripts/setup.sh triton`).
pub fn triton_python() -> PathBuf {
    python_of("STREAMIQ_TRITON_VENV", "/opt/streamiq/triton-venv")
}

/// The Python of the classic IQA peers' venv (`scripts/setup.sh peers`).
pub fn peers_python() -> PathBuf {
    python_of("STREAMIQ_PEERS_VENV", "/opt/streamiq/peers-venv")
}

/// `bin/python` of the venv that `var` names, else of `default`; it must exist.
fn python_of(var: &str, default: &str) -> PathBuf {
    let venv = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/setup.sh (make test does)",
        py.display()
    );
    py
}

/// `text` parsed and validated, as the daemon does with a config file. Incident frames
/// go to a fresh temporary directory unless `text` names one (never into the checkout).
pub fn settings(text: &str) -> Settings {
    let mut s = Config::from_toml(text).unwrap().validate().unwrap();
    if s.incidents.dir == std::path::Path::new("state/incidents") {
        s.incidents.dir = scratch_dir("incidents");
    }
    s
}

/// A new directory under the system's temporary directory, for what a test's daemon
/// writes beside the files the test looks at.
pub fn scratch_dir(what: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("streamiq-test-{what}-{}-{n}", std::process::id()))
}

/// A config with the test bundle, fast QC timings, `extra` keys (inside `[qc]` unless
/// they open a table) and the given streams.
pub fn config_text(streams: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[model]
bundle = "{}"
intra_threads = 1
[qc]
stall_timeout = "2s"
window = "5s"
{extra}
{streams}
"#,
        bundle().display()
    )
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The API token in `path` (a daemon's `server.api_token_file`).
pub fn token_in(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// Writes `out` from ffmpeg's synthetic source `lavfi` (e.g.
/// `testsrc2=size=320x240:rate=10:duration=1`) with extra output options `opts`.
pub fn synth(lavfi: &str, opts: &[&str], out: &std::path::Path) {
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i", lavfi])
        .args(opts)
        .arg(out)
        .status()
        .expect("ffmpeg is installed (scripts/setup.sh)");
    assert!(
        status.success(),
        "ffmpeg {lavfi} {opts:?} -> {}",
        out.display()
    );
}

/// Polls `ok` every 200 ms; panics naming `what` after 30 s.
pub fn wait_until(what: &str, ok: impl FnMut() -> bool) {
    wait_until_for(Duration::from_secs(30), what, ok)
}

/// Polls `ok` every 200 ms; panics naming `what` after `timeout`.
pub fn wait_until_for(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    poll(timeout, what, || ok().then_some(()))
}

/// Polls `f` every 200 ms until it returns `Some`; panics naming `what` after `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Labels whose targets follow a hidden direction in embedding space (a logistic of the
/// projection, slope 12), with random unit embeddings, stored in a real label store with
/// `bundle`'s encoder as their provenance. Seeded: the same calls give the same labels.
pub struct HiddenDirectionLabels {
    store: streamiq::labels::LabelStore,
    rng: fastrand::Rng,
    hidden: Vec<f32>,
    bundle: String,
    model_sha256: String,
}

impl HiddenDirectionLabels {
    /// Opens (or creates) the store at `db`.
    pub fn new(db: &std::path::Path, bundle: &streamiq::score::bundle::Bundle) -> Self {
        let mut rng = fastrand::Rng::with_seed(11);
        let hidden = (0..bundle.manifest.embed_dim)
            .map(|_| rng.f32() - 0.5)
            .collect();
        Self {
            store: streamiq::labels::LabelStore::open(db).unwrap(),
            rng,
            hidden,
            bundle: bundle.manifest.name.clone(),
            model_sha256: bundle.manifest.files["visual.onnx"].clone(),
        }
    }

    /// Stores one label per frame id in `frames` (stream `cam`).
    pub fn add(&mut self, frames: std::ops::Range<u64>) {
        use streamiq::labels::{NewLabel, Provenance, Rating};
        for i in frames {
            let mut e: Vec<f32> = (0..self.hidden.len())
                .map(|_| self.rng.f32() - 0.5)
                .collect();
            let n = e.iter().map(|v| v * v).sum::<f32>().sqrt();
            e.iter_mut().for_each(|v| *v /= n);
            let x: f32 = e.iter().zip(&self.hidden).map(|(a, b)| a * b).sum();
            self.store
                .insert(&NewLabel {
                    stream: "cam".into(),
                    frame_id: i,
                    captured: i as f64,
                    pts: None,
                    rating: Rating::Score(1.0 / (1.0 + (-12.0 * x as f64).exp())),
                    labeller: "test".into(),
                    embedding: e,
                    provenance: Provenance {
                        bundle: self.bundle.clone(),
                        model_sha256: self.model_sha256.clone(),
                    },
                    prompt_version: 0,
                    model_score: 0.5,
                    thumbnail: vec![0xff, 0xd8, 0xff, 0xd9],
                    frame: None,
                })
                .unwrap();
        }
    }
}
