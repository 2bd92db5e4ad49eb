//! Records where ONNX Runtime was found at build time (the project's Python venv), and
//! gives `streamiq-adapt` an rpath to libtorch, so that the release binaries run from
//! the repo root with no environment variable set.

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

/// libtorch for the sidecar only: an rpath to the torch lib dir tch was built against,
/// and libtorch_cuda linked even though no symbol of it is referenced (otherwise
/// `--as-needed` drops it and CUDA is never found; tch issue 980).
fn link_libtorch() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let bin = "streamiq-adapt";
        println!("cargo:rustc-link-arg-bin={bin}=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-bin={bin}=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg-bin={bin}=-ltorch_cuda");
            println!("cargo:rustc-link-arg-bin={bin}=-Wl,--as-needed");
        }
    }
}

fn main() {
    link_libtorch();
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
