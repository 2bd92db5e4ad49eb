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
    }
}

impl Drop for Triton {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill_group();
        }
    }
}
