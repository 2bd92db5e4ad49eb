//! Starting and stopping a daemon in a test, two ways:
//!
//! - [`InProcess`]: `streamiq::run` on the test's own tokio runtime, bound to
//!   127.0.0.1:0; for tests that look at the HTTP side and time the ordered shutdown.
//! - [`Process`]: the `streamiq run` binary as a child process, its log collected and its
//!   address read from it; for tests of what only a process shows (signals, the exit
//!   status, the log, the environment, a system call filter, a second binary beside it).
//!
//! Both stop the daemon when dropped, also when an assertion fails.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamiq::config::Settings;
use tokio_util::sync::CancellationToken;

/// How long a daemon may take to bind its HTTP address (it loads the model first).
const START_LIMIT: Duration = Duration::from_secs(60);

/// `streamiq::run` on the current tokio runtime (a multi-threaded one: the test's body
/// may block). Dropping it cancels the daemon; [`InProcess::stop`] also waits for the
/// ordered shutdown.
pub struct InProcess {
    pub addr: SocketAddr,
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<Result<(), streamiq::Error>>>,
}

impl InProcess {
    /// Starts the daemon and waits for its HTTP address.
    pub async fn start(settings: Settings) -> Self {
        let token = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(streamiq::run(settings, token.clone(), Some(tx)));
        let addr = tokio::time::timeout(START_LIMIT, rx)
            .await
            .expect("daemon bound in time")
            .expect("daemon started");
        Self {
            addr,
            token,
            handle: Some(handle),
        }
    }

    /// `/metrics`, fetched off the runtime's threads.
    pub async fn metrics(&self) -> String {
        let addr = self.addr;
        tokio::task::spawn_blocking(move || super::http::text(addr, "/metrics"))
            .await
            .unwrap()
    }

    /// Polls `/metrics` until `ok` holds or `timeout` passes; returns the last exposition.
    pub async fn wait_for(&self, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let m = self.metrics().await;
            if ok(&m) || t0.elapsed() > timeout {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs the ordered shutdown; panics unless it ends cleanly within 20 s. Returns how
    /// long it took.
    pub async fn stop(mut self) -> Duration {
        let t0 = Instant::now();
        self.token.cancel();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("ordered shutdown finished in time")
            .unwrap()
            .unwrap();
        t0.elapsed()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// `streamiq run` (or a command that ends up running it) as a child process. Its
/// standard error is collected line by line; its HTTP address is read from the log.
/// Killed when dropped.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    /// `streamiq run --config cfg`.
    pub fn start(cfg: &Path) -> Self {
        let mut c = Command::new(super::bin("streamiq"));
        c.args(["run", "--config"]).arg(cfg);
        Self::spawn(c)
    }

    /// Spawns `command` (with `NO_COLOR=1` and standard error piped) and waits (60 s)
    /// for the daemon to log its HTTP address.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .env("NO_COLOR", "1")
            // Incident frames never go into the checkout's state/.
            .env(
                "STREAMIQ__LABELS__INCIDENTS_DIR",
                super::scratch_dir("incidents"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let addr = line
                    .split_once("HTTP listening addr=")
                    .and_then(|(_, a)| a.split_whitespace().next()?.parse::<SocketAddr>().ok());
                if let Some(a) = addr {
                    let _ = tx.send(a);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut p = Self {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
            reader: Some(reader),
        };
        p.addr = rx
            .recv_timeout(START_LIMIT)
            .unwrap_or_else(|_| panic!("no address logged within 60 s:\n{}", p.log_text()));
        p
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Everything logged so far, one line each.
    pub fn log_text(&self) -> String {
        self.log().join("\n")
    }

    /// The stacks of the daemon's stream threads (`ingest-*`), from gdb where it is
    /// installed: what a test that waited in vain for the streams prints.
    #[allow(dead_code)]
    pub fn ingest_stacks(&self) -> String {
        let out = Command::new("timeout")
            .args(["60", "gdb", "-q", "-batch", "-p", &self.pid().to_string()])
            .args(["-ex", "thread apply all bt 40"])
            .output();
        let Ok(out) = out else {
            return "(no gdb to show the stream threads)".into();
        };
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("\nThread ")
            .filter(|t| t.contains("\"ingest-"))
            .map(|t| format!("Thread {t}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Sends `signal` (a name `kill` knows: `TERM`, `HUP`, ...).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit and for its whole log.
    pub fn wait(&mut self) -> ExitStatus {
        let status = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        status
    }

    /// Panics, with the log, unless the process still runs (the same process: no restart).
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the daemon exited ({status}):\n{}", self.log_text());
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
