//! The shipped default configuration (`config/streamiq.toml`, unchanged: its model
//! bundle and its two built-in streams `clean` and `degraded`), run as a daemon. Only
//! what must differ per run is overridden through `STREAMIQ__*` variables, all inside a
//! tempdir: the HTTP address (port 0, read back from the log), the API token file, the
//! prompt directory and the label store.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use streamiq::config::{Config, Settings};

use super::{Daemon, bin, http, repo, sample};

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

/// A daemon on the default config, its address and its log.
pub struct Run {
    pub daemon: Daemon,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
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
        let mut child = command(&bin("streamiq"), work.path())
            .args(["run", "--config", CONFIG])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let daemon = Daemon(child);
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(a) = line.split_once("HTTP listening addr=") {
                    let _ = tx.send(a.1.split_whitespace().next().unwrap_or("").to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the daemon logs its address within 60 s:\n{}",
                    log.lock().unwrap().join("\n")
                )
            });
        println!("daemon pid {} on {addr}", daemon.0.id());
        Run {
            daemon,
            addr,
            log,
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
        if let Some(status) = self.daemon.0.try_wait().unwrap() {
            panic!(
                "the daemon exited ({status}):\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
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
