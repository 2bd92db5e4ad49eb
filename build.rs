//! Records where ONNX Runtime was found at build time (the project's Python venv), so
//! that the release binary runs from the repo root with no environment variable set.
//! With the `torch` feature (the libtorch scorer backend), also gives the binaries an
//! rpath to the libtorch that tch was built against and links libtorch_cuda, as
//! `adapt/build.rs` does for the sidecar.

use std::path::{Path, PathBuf};

fn find_onnxruntime(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    for entry in std::fs::read_dir(&lib).ok()?.flatten() {
        let capi = entry.path().join("site-packages/onnxruntime/capi");
        let Ok(files) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut found: Vec<PathBuf> = files
            .flatten()
            .map(|f| f.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so."))
            })
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
    }
    None
}

/// The source's git commit (12 hex digits), or "unknown" outside a checkout.
fn revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// The `torch` feature's link arguments: an rpath to libtorch, and libtorch_cuda kept
/// even though no symbol of it is referenced (otherwise `--as-needed` drops it and CUDA
/// is never found; tch issue 980).
fn link_libtorch() {
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

fn main() {
    link_libtorch();
    println!("cargo:rustc-env=STREAMIQ_REVISION={}", revision());
    // A new commit moves the branch HEAD points at.
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            let path = Path::new(".git").join(r);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    println!("cargo:rerun-if-env-changed=STREAMIQ_VENV");
    println!("cargo:rerun-if-env-changed=ORT_DYLIB_PATH");
    let venv = std::env::var_os("STREAMIQ_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/streamiq/venv"));
    let ort = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .or_else(|| find_onnxruntime(&venv));
    if let Some(p) = ort {
        println!("cargo:rustc-env=STREAMIQ_ORT_LIB={}", p.display());
        println!("cargo:rerun-if-changed={}", p.display());
    } else {
        println!(
            "cargo:warning=ONNX Runtime not found under {}; run scripts/setup.sh or set ORT_DYLIB_PATH",
            venv.display()
        );
    }
}
