//! A real Triton server (PyTriton's `tritonserver` with its Python backend running the
//! bundle's `visual.onnx` in onnxruntime, `scripts/triton_serve.py`), in a process group
//! of its own so that killing it leaves no backend stub behind, nor its shared memory.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running server; killed (the whole group) on drop.
pub struct Triton {
    child: Child,
    _workspace: tempfile::TempDir,
    /// Triton's shared-memory segments that existed before this server started.
    shm_before: HashSet<OsString>,
    /// Its gRPC port.
    pub grpc_port: u16,
}

impl Triton {
    /// Serves `bundle` on `grpc_port` (HTTP and metrics on free ports) with extra
    /// `scripts/triton_serve.py` options; waits (90 s) for it to answer. A server that
    /// neither answers nor exits by then is killed and started once more on fresh HTTP
    /// and metrics ports (the gRPC port is the one the daemon under test was given): its
    /// start is not what the tests test. Both logs are shown if that fails too.
    pub fn start(bundle: &std::path::Path, grpc_port: u16, extra: &[&str]) -> Self {
        let mut failures = Vec::new();
        for _ in 0..2 {
            match Self::try_start(bundle, grpc_port, extra) {
                Ok(server) => return server,
                Err(why) => {
                    eprintln!("Triton did not start: {why}");
                    failures.push(why);
                }
            }
        }
        panic!("Triton did not start, twice:\n{}", failures.join("\n---\n"));
    }

    fn try_start(bundle: &std::path::Path, grpc_port: u16, extra: &[&str]) -> Result<Self, String> {
        let workspace = tempfile::tempdir().unwrap();
        let shm_before = shm_segments();
        let log_path = workspace.path().join("triton.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut c = Command::new("setsid");
        c.arg(super::triton_python())
            .arg(super::repo().join("scripts/triton_serve.py"))
            .arg("--bundle")
            .arg(bundle)
            .args(["--grpc-port", &grpc_port.to_string()])
            .args(["--http-port", &super::free_port().to_string()])
            .args(["--metrics-port", &super::free_port().to_string()])
            .arg("--workspace")
            .arg(workspace.path().join("pytriton"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.starts_with("STREAMIQ-TRITON ") {
                    let _ = tx.send(line);
                }
            }
        });
        let mut server = Self {
            child,
            _workspace: workspace,
            shm_before,
            grpc_port,
        };
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(line) if line.starts_with("STREAMIQ-TRITON READY") => Ok(server),
            other => {
                server.kill_group();
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                Err(format!("{other:?}; its log ends:\n{}", tail.join("\n")))
            }
        }
    }

    /// Kills the server's whole process group at once (no clean shutdown).
    pub fn kill(mut self) {
        self.kill_group();
    }

    fn kill_group(&mut self) {
        // setsid made the server its own process group leader: -PID is the group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
        remove_orphaned_segments(&self.shm_before);
    }
}

/// The shared-memory segments Triton's Python backend (`psm_*`) and PyTriton
/// (`pytrtion*`) make in /dev/shm. A server killed with SIGKILL leaves them behind
/// (several MB each), which would fill a small /dev/shm over many test runs.
fn shm_segments() -> HashSet<OsString> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name())
                .filter(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("psm_") || n.starts_with("pytrtion")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the segments made since `before` that no live process has open or mapped
/// (another test's server may be running beside this one).
fn remove_orphaned_segments(before: &HashSet<OsString>) {
    let new: Vec<OsString> = shm_segments().difference(before).cloned().collect();
    if new.is_empty() {
        return;
    }
    let mut in_use: HashSet<PathBuf> = HashSet::new();
    for proc in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let dir = proc.path();
        if let Ok(fds) = std::fs::read_dir(dir.join("fd")) {
            in_use.extend(
                fds.flatten()
                    .filter_map(|fd| std::fs::read_link(fd.path()).ok()),
            );
        }
        if let Ok(maps) = std::fs::read_to_string(dir.join("maps")) {
            in_use.extend(maps.lines().filter_map(|l| {
                let at = l.find("/dev/shm/")?;
                Some(PathBuf::from(l[at..].trim_end_matches(" (deleted)")))
            }));
        }
    }
    for name in new {
        let path = PathBuf::from("/dev/shm").join(&name);
        if !in_use.contains(&path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

impl Drop for Triton {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill_group();
        }
    }
}
