//! A real Triton server (PyTriton's `tritonserver` with its Python backend running the
//! bundle's `visual.onnx` in onnxruntime, `scripts/triton_serve.py`), in a process group
//! of its own so that killing it leaves no backend stub behind.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running server; killed (the whole group) on drop.
pub struct Triton {
    child: Child,
    _workspace: tempfile::TempDir,
    /// Its gRPC port.
    pub grpc_port: u16,
}

impl Triton {
    /// Serves `bundle` on `grpc_port` (HTTP and metrics on free ports) with extra
    /// `scripts/triton_serve.py` options; waits (90 s) for it to answer.
    pub fn start(bundle: &std::path::Path, grpc_port: u16, extra: &[&str]) -> Self {
        let workspace = tempfile::tempdir().unwrap();
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
            .stderr(Stdio::null());
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
        let server = Self {
            child,
            _workspace: workspace,
            grpc_port,
        };
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(line) if line.starts_with("STREAMIQ-TRITON READY") => server,
            other => panic!("Triton did not start: {other:?}"),
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
    }
}

impl Drop for Triton {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill_group();
        }
    }
}
