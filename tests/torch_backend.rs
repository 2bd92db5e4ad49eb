//! The torch scorer backend (`scorer.backend = "torch"`, a build with the `torch`
//! feature) against ONNX Runtime on the same bundles, and what happens to a CUDA device
//! that cannot be used. `make test` runs it:
//! `cargo test -p streamiq --features torch --test torch_backend`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::InProcess;
use common::{config_text, repo, sample, settings, synth};
use streamiq::config::Settings;
use streamiq::scan::{self, ScanOptions};

/// The committed bundles and the generated test bundle, each with its `visual.pt`.
fn bundles() -> Vec<PathBuf> {
    vec![
        repo().join("models/streamiq-tiny"),
        repo().join("models/streamiq-effnet"),
        common::bundle(),
    ]
}

/// A config over `bundle` with `views` and the `[scorer]` backend keys `scorer`.
fn config_for(bundle: &Path, views: &str, scorer: &str) -> Settings {
    let text = config_text("", &format!("[scorer]\nviews = \"{views}\"\n{scorer}")).replace(
        &common::bundle().display().to_string(),
        &bundle.display().to_string(),
    );
    settings(&text)
}

const TORCH_CPU: &str = "backend = \"torch\"\ndevice = \"cpu\"\n";

/// Whether libtorch sees a CUDA device here (the refusal tests need a machine without).
fn has_cuda() -> bool {
    tch::Cuda::device_count() > 0
}

#[test]
fn scan_scores_equal_onnxruntime_within_1e_4_on_every_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mp4");
    // Moving detail, then the same softened and noisy: scores far apart.
    synth(
        "testsrc2=size=480x270:rate=10:duration=1.2,split[a][b];\
         [b]gblur=sigma=3,noise=alls=30:allf=t[c];[a][c]concat=n=2:v=1:a=0",
        &["-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p"],
        &clip,
    );
    for bundle in bundles() {
        for views in ["global", "mixed:2"] {
            // Per-frame scores and the file's embedding (the normalised mean of its frames').
            let scores = |scorer: &str| -> (Vec<f32>, Vec<f32>) {
                let s = config_for(&bundle, views, scorer);
                let mut opts = ScanOptions::files(vec![clip.clone()]);
                opts.per_frame = true;
                let mut reports = scan::scan(&s, &opts).unwrap();
                let r = reports.remove(0);
                assert_eq!(r.error, None);
                let scores = r.frames.iter().map(|f| f.score).collect();
                (scores, r.embedding.expect("the file's embedding"))
            };
            let ((ort, ort_embedding), (torch, torch_embedding)) = (scores(""), scores(TORCH_CPU));
            let distance = ort_embedding
                .iter()
                .zip(&torch_embedding)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            assert_eq!(ort.len(), 24, "{}", bundle.display());
            assert_eq!(ort.len(), torch.len());
            let worst = ort
                .iter()
                .zip(&torch)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let spread = ort.iter().cloned().fold(f32::MIN, f32::max)
                - ort.iter().cloned().fold(f32::MAX, f32::min);
            eprintln!(
                "{} {views}: {} frames, scores spread {spread:.3}, largest torch - onnxruntime \
                 difference {worst:.1e}, file embeddings {distance:.1e} apart",
                bundle.display(),
                ort.len()
            );
            assert!(worst <= 1e-4, "{}: {worst}", bundle.display());
            assert!(distance <= 1e-5, "{}: {distance}", bundle.display());
        }
    }
}

#[test]
fn a_missing_cuda_device_is_refused_naming_the_key() {
    if has_cuda() {
        eprintln!("skipped: this machine has a CUDA device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = config_for(
        &repo().join("models/streamiq-tiny"),
        "global",
        "backend = \"torch\"\ndevice = \"cuda:0\"\nprecision = \"fp16\"\n",
    );
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    s.model.prompts_dir = dir.path().join("prompts");
    let e = match streamiq::score::load(&s.model, &s.scorer.backend) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("cuda:0 loaded on a machine without CUDA"),
    };
    assert!(
        e.starts_with("scorer.device = \"cuda:0\": libtorch finds no CUDA device")
            && e.contains("scorer.fallback_cpu = true"),
        "{e}"
    );
    // The daemon stops at start with the same error, as an operator's mistake (exit 2).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(streamiq::run(
            s,
            tokio_util::sync::CancellationToken::new(),
            None,
        ))
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().starts_with("scorer.device"), "{err}");
}

#[test]
fn a_bundle_without_visual_pt_is_refused_with_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::bundle();
    let manifest = std::fs::read_to_string(src.join("manifest.toml")).unwrap();
    let manifest: String = manifest
        .lines()
        .filter(|l| !l.starts_with("\"visual.pt\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.path().join("manifest.toml"), manifest).unwrap();
    for f in ["visual.onnx", "prompts.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let s = config_for(dir.path(), "global", TORCH_CPU);
    let e = match streamiq::score::load(&s.model, &s.scorer.backend) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loaded without visual.pt"),
    };
    assert!(
        e.contains("no entry for visual.pt") && e.contains("make torchscript"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_falls_back_to_the_cpu_when_configured_and_says_so() {
    let streams = r#"
[[streams]]
id = "zone"
pipeline = "videotestsrc is-live=true pattern=zone-plate kx2=20 ky2=20 kt=1 ! video/x-raw,width=320,height=180,framerate=10/1"
sample_fps = 5.0
"#;
    // Where libtorch sees a GPU, the same config runs on it.
    let execution = if has_cuda() {
        "torch-cuda:0"
    } else {
        "torch-cpu"
    };
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        streams,
        "[scorer]\nbackend = \"torch\"\ndevice = \"cuda:0\"\nprecision = \"fp16\"\nfallback_cpu = true\n",
    );
    let mut s = settings(&text);
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    s.model.prompts_dir = dir.path().join("prompts");
    let d = InProcess::start(s).await;
    let m = d
        .wait_for(Duration::from_secs(30), |m| {
            sample(m, "streamiq_frames_scored_total{stream=\"zone\"}").is_some_and(|v| v >= 5.0)
        })
        .await;
    assert!(
        sample(&m, "streamiq_frames_scored_total{stream=\"zone\"}").is_some_and(|v| v >= 5.0),
        "{m}"
    );
    let q = sample(&m, "streamiq_quality_score{stream=\"zone\"}").unwrap();
    assert!((0.0..=1.0).contains(&q), "quality {q}");
    let info = m
        .lines()
        .find(|l| l.starts_with("streamiq_build_info{"))
        .expect("streamiq_build_info");
    assert!(
        info.contains(&format!("execution=\"{execution}\"")),
        "{info}"
    );
    if !has_cuda() {
        assert_eq!(
            sample(
                &m,
                "streamiq_execution_provider_failures_total{provider=\"torch-cuda:0\"}"
            ),
            Some(1.0),
            "{m}"
        );
    }
    d.stop().await;
}
