//! The shipped default configuration (`config/streamiq.toml`, unchanged: its model
//! bundle and its two built-in streams `clean` and `degraded`), run as a daemon. Only
//! what must differ per run is overridden through `STREAMIQ__*` variables, all inside a
//! tempdir: the HTTP address (port 0, read back from the log), the API token file, the
//! prompt directory and the label store.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use streamiq::config::{Config, Settings};

use super::daemon::Process;
use super::{bin, http, repo, sample};

pub const CONFIG: &str = "config/streamiq.toml";

pub fn config_path() -> PathBuf {
    let frames = repo().join("state/demo/clean/00300.jpg");
    assert!(
        frames.is_file(),
        "{} is missing: the default streams loop over it; run `make demo` (or `make test`)",
        frames.display()
    );
    repo().join(CONFIG)
}

/// The per-run overrides, every path inside `work`.
pub fn overrides(work: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("STREAMIQ__SERVER__LISTEN", "127.0.0.1:0".into()),
        ("STREAMIQ__SERVER__API_TOKEN_FILE", work.join("api-token")),
        ("STREAMIQ__MODEL__PROMPTS_DIR", work.join("prompts")),
        ("STREAMIQ__LABELS__DB", work.join("labels.sqlite")),
    ]
}

/// A command run from the repository root with the shipped config's relative paths,
/// no inherited `STREAMIQ__*` override, and this run's overrides.
pub fn command(program: &Path, work: &Path) -> Command {
    let mut c = Command::new(program);
    c.current_dir(repo()).env("NO_COLOR", "1");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STREAMIQ__") {
            c.env_remove(k);
        }
    }
    for (k, v) in overrides(work) {
        c.env(k, v);
    }
    c
}

/// The shipped config, validated (stream ids, sampling rates, window, adapt.min_labels).
pub fn settings() -> Settings {
    Config::load(&config_path())
        .and_then(Config::validate)
        .unwrap_or_else(|e| panic!("{CONFIG}: {e}"))
}

/// A daemon on the default config.
pub struct Run {
    pub daemon: Process,
    /// The daemon's HTTP address, `127.0.0.1:PORT`.
    pub addr: String,
    pub work: tempfile::TempDir,
    pub settings: Settings,
}

impl Run {
    pub fn start() -> Run {
        let work = tempfile::tempdir().unwrap();
        let settings = settings();
        let ids: Vec<&str> = settings.streams.iter().map(|s| s.id.as_str()).collect();
        assert!(
            ids.contains(&"clean") && ids.contains(&"degraded"),
            "{CONFIG} streams: {ids:?}"
        );
        let mut c = command(&bin("streamiq"), work.path());
        c.args(["run", "--config", CONFIG]);
        let daemon = Process::spawn(c);
        let addr = daemon.addr.to_string();
        println!("daemon pid {} on {addr}", daemon.pid());
        Run {
            daemon,
            addr,
            work,
            settings,
        }
    }

    pub fn metrics(&self) -> String {
        http(&self.addr, "GET", "/metrics", None, "").1
    }

    /// GET `path` as JSON, with the API token (every `/api/v1` read but the stream
    /// list needs it).
    pub fn json(&self, path: &str) -> Value {
        let token = super::token_in(&self.work.path().join("api-token"));
        let (code, body) = http(&self.addr, "GET", path, Some(&token), "");
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// Frames a full quality window holds for `stream`.
    pub fn window_frames(&self, stream: &str) -> f64 {
        let fps = self
            .settings
            .streams
            .iter()
            .find(|s| s.id == stream)
            .unwrap()
            .sample_fps
            .expect("the default streams are sampled");
        (self.settings.qc.window.as_secs_f64() * fps).ceil()
    }

    /// Panics unless the daemon still runs (the same process: no restart).
    pub fn assert_alive(&mut self) {
        self.daemon.assert_alive();
    }
}

pub fn quality(m: &str, stream: &str) -> Option<f64> {
    sample(m, &format!("streamiq_quality_score{{stream=\"{stream}\"}}"))
}

pub fn scored(m: &str, stream: &str) -> Option<f64> {
    sample(
        m,
        &format!("streamiq_frames_scored_total{{stream=\"{stream}\"}}"),
    )
}
