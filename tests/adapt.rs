//! The real-CLIP conversion path end to end: `scripts/tests/test_convert_clip.py`
//! builds randomly initialised small CLIPs (OpenAI/open_clip and Hugging Face layouts),
//! converts them and checks them against PyTorch; then the sidecar's libtorch text
//! tower must reproduce every bundle's prompt features (parity, max abs diff <= 1e-4)
//! and the daemon's scorer must load the same bundles.

use std::path::{Path, PathBuf};
use std::process::Command;

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("STREAMIQ_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/streamiq/venv"));
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/setup.sh",
        py.display()
    );
    py
}

fn adapt(args: &[&str], model: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"))
        .args(args)
        .arg("--model")
        .arg(model)
        .output()
        .unwrap()
}

#[test]
fn converted_clip_bundles_load_in_the_sidecar_and_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(venv_python())
        .arg(repo.join("scripts/tests/test_convert_clip.py"))
        .arg("--keep")
        .arg(dir.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{log}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.lines().any(|l| l.ends_with("passed, 0 failed")),
        "{log}"
    );

    for name in [
        "bundle-openai",
        "bundle-openai-jit",
        "bundle-hf",
        "bundle-hf16",
    ] {
        let bundle = dir.path().join(name);
        let o = adapt(&["check"], &bundle);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{name}: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let diffs: Vec<f64> = text
            .lines()
            .filter_map(|l| l.split("max abs diff ").nth(1))
            .map(|v| v.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(diffs.len(), 5, "quality + 4 attribute pairs: {text}");
        assert!(diffs.iter().all(|d| *d <= 1e-4), "{name}: {diffs:?}");

        let o = Command::new(env!("CARGO_BIN_EXE_streamiq"))
            .args(["score", "--json", "--model"])
            .arg(&bundle)
            .arg(dir.path().join("frame.png"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!((0.0..=1.0).contains(&v["score"].as_f64().unwrap()));
        assert_eq!(v["attributes"].as_object().unwrap().len(), 4);
    }

    // A bundle whose text weights were swapped for others is refused, naming the file.
    let bad = dir.path().join("bundle-hf16");
    std::fs::copy(
        dir.path().join("bundle-openai/text/weights.safetensors"),
        bad.join("text/weights.safetensors"),
    )
    .unwrap();
    let o = adapt(&["check"], &bad);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("text/weights.safetensors") && err.contains("sha256"),
        "{err}"
    );
}
