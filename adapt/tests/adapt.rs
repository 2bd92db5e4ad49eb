//! The real-CLIP conversion path end to end: `scripts/tests/test_convert_clip.py`
//! builds randomly initialised small CLIPs (OpenAI/open_clip and Hugging Face layouts),
//! converts them and checks them against PyTorch; then the sidecar's libtorch text
//! tower must reproduce every bundle's prompt features (parity, max abs diff <= 1e-4)
//! and the daemon's scorer must load the same bundles.

use std::path::Path;
use std::process::Command;

#[path = "../../tests/common/mod.rs"]
mod common;
use common::daemon::Process;
use common::{HiddenDirectionLabels, http, metric, run_ok, venv_python, wait_until};

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
    let repo = common::repo();
    let repo = repo.as_path();
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
    // A still image for the daemon's scorer (the Python test makes one only when a
    // release build exists).
    let frame = dir.path().join("still.png");
    common::synth("testsrc2=size=320x240:rate=1", &["-frames:v", "1"], &frame);

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

        let o = Command::new(common::bin("streamiq"))
            .args(["score", "--json", "--model"])
            .arg(&bundle)
            .arg(&frame)
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

    few_shot_round_hot_swaps_into_a_running_daemon(&dir.path().join("bundle-openai"));
    few_shot_protocol_bench(&dir.path().join("bundle-openai"), &frame);

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

/// Labels whose targets follow a hidden direction in embedding space. With fewer than
/// `adapt.min_labels`, a round writes nothing; with enough, it must raise the held-out
/// SRCC, write v0001 atomically and promote it, and the running daemon must hot-swap
/// to it without a restart and without a pause in scoring; rollback returns to v0, and
/// a bad prompt file is refused while scoring goes on with the previous set.
fn few_shot_round_hot_swaps_into_a_running_daemon(bundle: &Path) {
    use streamiq::score::bundle::Bundle;
    use streamiq::score::prompt_store::PromptDir;

    let work = tempfile::tempdir().unwrap();
    let b = Bundle::open(bundle).unwrap();
    let dim = b.manifest.embed_dim;
    let db = work.path().join("labels.sqlite");
    let cfg = work.path().join("adapt.toml");
    let prompts = work.path().join("prompts");
    let token_file = work.path().join("api-token");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\napi_token_file = \"{}\"\n\
             [model]\nbundle = \"{}\"\nprompts_dir = \"{}\"\nintra_threads = 1\n[labels]\ndb = \"{}\"\n\
             [adapt]\nmin_labels = 20\nholdout = 0.3\nmax_epochs = 80\n\
             [[streams]]\nid = \"cam\"\npipeline = \"videotestsrc is-live=true pattern=zone-plate kt=1 ! video/x-raw,width=160,height=120,framerate=10/1\"\nsample_fps = 5\n",
            token_file.display(),
            bundle.display(),
            prompts.display(),
            db.display()
        ),
    )
    .unwrap();
    let daemon = Process::start(&cfg);
    let addr = daemon.addr;
    let scored = || metric(addr, "streamiq_frames_scored_total{stream=\"cam\"}");
    wait_until("frames scored", || scored() >= 3.0);
    assert_eq!(metric(addr, "streamiq_prompt_version"), 0.0);
    let once = || {
        run_ok(
            Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"))
                .args(["once", "--config"])
                .arg(&cfg),
        )
        .text()
    };

    let mut labels = HiddenDirectionLabels::new(&db, &b);
    labels.add(0..10);
    let text = once();
    assert!(text.contains("not adapting"), "{text}");
    assert!(PromptDir::new(&prompts).versions().is_empty());

    labels.add(10..60);
    let text = once();
    let dir = PromptDir::new(&prompts);
    assert_eq!(dir.versions(), vec![1], "{text}");
    assert_eq!(dir.active().unwrap(), Some(1), "{text}");
    let set = streamiq::score::prompts::PromptSet::load(&dir.path(1), dim).unwrap();
    let before: f64 = set.metadata["val_srcc_before"].parse().unwrap();
    let after: f64 = set.metadata["val_srcc"].parse().unwrap();
    assert!(
        after > before + 0.2 && after > 0.6,
        "held-out SRCC {before} -> {after}: {text}"
    );
    assert_eq!(set.metadata["parent"], "0");
    assert_eq!(set.metadata["labels"], "60");
    assert_eq!(set.attributes.len(), 4, "attribute pairs carried over");

    // The running daemon picks v1 up by itself, and keeps scoring throughout.
    let s0 = scored();
    wait_until("prompt version 1", || {
        metric(addr, "streamiq_prompt_version") == 1.0
    });
    wait_until("scoring after the swap", || scored() >= s0 + 3.0);
    assert_eq!(
        metric(
            addr,
            "streamiq_frames_dropped_total{reason=\"error\",stream=\"cam\"}"
        ),
        0.0
    );

    // Rollback needs the token, then returns to the bundle's own set.
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    assert_eq!(
        http(
            addr,
            "POST",
            "/api/v1/prompts/rollback",
            None,
            r#"{"version":0}"#
        )
        .0,
        401
    );
    let (code, body) = http(
        addr,
        "POST",
        "/api/v1/prompts/rollback",
        Some(token),
        r#"{"version":7}"#,
    );
    assert_eq!(code, 404, "{body}");
    // Malformed bodies: not JSON, not the expected object.
    for (bad, status) in [
        (r#"{"version" 1}"#, 400),
        (r#"{"version":"one"}"#, 422),
        ("[]", 422),
    ] {
        let (code, body) = http(addr, "POST", "/api/v1/prompts/rollback", Some(token), bad);
        assert_eq!(code, status, "{bad}: {body}");
        assert!(body.contains("version"), "{body}");
    }
    assert_eq!(dir.active().unwrap(), Some(1), "nothing changed");
    let (code, body) = http(
        addr,
        "POST",
        "/api/v1/prompts/rollback",
        Some(token),
        r#"{"version":0}"#,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(metric(addr, "streamiq_prompt_version"), 0.0);
    assert_eq!(dir.active().unwrap(), Some(0));

    // A truncated prompt file promoted behind the daemon's back is refused and counted.
    let good = std::fs::read(dir.path(1)).unwrap();
    streamiq::score::prompt_store::write_atomic(&dir.path(2), &good[..good.len() / 2]).unwrap();
    dir.set_active(2).unwrap();
    wait_until("the bad set refused", || {
        metric(addr, "streamiq_prompt_rejects_total{reason=\"invalid\"}") >= 1.0
    });
    assert_eq!(metric(addr, "streamiq_prompt_version"), 0.0);
    let (code, body) = http(addr, "POST", "/api/v1/prompts/reload", Some(token), "");
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("v0002.safetensors"), "{body}");
    let s1 = scored();
    wait_until("scoring goes on", || scored() >= s1 + 3.0);
    let (code, listing) = http(addr, "GET", "/api/v1/prompts", Some(token), "");
    assert_eq!(code, 200, "{listing}");
    let v: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(v["active"], 0);
    assert_eq!(v["history"].as_array().unwrap().len(), 3, "{v}");
    drop(daemon);
}

/// `streamiq distort` -> `streamiq eval --save-embeddings` -> `streamiq-adapt bench`:
/// the protocol runs and reports the three methods.
fn few_shot_protocol_bench(bundle: &Path, source: &Path) {
    let work = tempfile::tempdir().unwrap();
    let run = |cmd: &mut Command| run_ok(cmd).text();
    let set = work.path().join("set");
    run(Command::new(common::bin("streamiq"))
        .args([
            "distort",
            "--size",
            "64",
            "--kinds",
            "gaussian_blur,jpeg,gaussian_noise,contrast,rescale,pixelate",
            "--out",
        ])
        .arg(&set)
        .arg(source));
    let emb = work.path().join("emb.safetensors");
    run(Command::new(common::bin("streamiq"))
        .args(["eval", "--model"])
        .arg(bundle)
        .arg("--labels")
        .arg(set.join("labels.csv"))
        .arg("--save-embeddings")
        .arg(&emb));
    let text = run(Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"))
        .args([
            "bench",
            "--train",
            "10",
            "--splits",
            "2",
            "--max-epochs",
            "5",
            "--model",
        ])
        .arg(bundle)
        .arg("--embeddings")
        .arg(&emb));
    for method in ["no adaptation", "lambda = 0", "lambda = 5"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(method))
            .unwrap_or_else(|| panic!("{method}: {text}"));
        let srcc: f64 = line[method.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((-1.0..=1.0).contains(&srcc), "{line}");
    }
    pretrain_writes_a_loadable_bundle(bundle, &emb, work.path());
}

/// `streamiq-adapt pretrain` on the same kind of set writes a new bundle whose prompt
/// set the text tower reproduces and the daemon's scorer loads.
fn pretrain_writes_a_loadable_bundle(bundle: &Path, emb: &Path, work: &Path) {
    let out = work.join("pretrained");
    let pretrain = |iterations: &str, val_types: &str| {
        Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"))
            .args([
                "pretrain",
                "--iterations",
                iterations,
                "--val-types",
                val_types,
            ])
            .arg("--model")
            .arg(bundle)
            .arg("--embeddings")
            .arg(emb)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = pretrain("10", "jpeg,contrast");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("held-out SRCC"), "{text}");
    let o = adapt(&["check"], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let set = streamiq::score::prompts::PromptSet::load(
        &out.join("prompts.safetensors"),
        streamiq::score::bundle::Bundle::open(&out)
            .unwrap()
            .manifest
            .embed_dim,
    )
    .unwrap();
    assert!(set.metadata["source"].starts_with("streamiq-adapt pretrain"));
    // Refuses to overwrite.
    let o = pretrain("1", "jpeg");
    assert_eq!(o.status.code(), Some(2));
}

/// The sidecar unit's system call filter (and the rest of its sandbox but what needs
/// systemd) does not break a real round: under the filter loaded from
/// `systemd/streamiq-adapt.service` by `scripts/seccomp_exec.py`, `streamiq-adapt once`
/// adapts the shipped model's prompts from 60 labels and promotes v0001, while a
/// privileged call (chroot) fails with EPERM.
#[test]
fn an_adaptation_round_runs_under_the_sidecar_units_syscall_filter() {
    use streamiq::score::prompt_store::PromptDir;
    let unit = common::repo().join("systemd/streamiq-adapt.service");
    let wrapper = common::repo().join("scripts/seccomp_exec.py");
    let denied = Command::new("/usr/bin/python3")
        .arg(&wrapper)
        .arg(&unit)
        .args(["--", "/usr/sbin/chroot", "/", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && err.contains("Operation not permitted"),
        "the filter is live: {err}"
    );

    let work = tempfile::tempdir().unwrap();
    let bundle_dir = common::repo().join("models/streamiq-tiny");
    let bundle = streamiq::score::bundle::Bundle::open(&bundle_dir).unwrap();
    let db = work.path().join("labels.sqlite");
    common::HiddenDirectionLabels::new(&db, &bundle).add(0..60);
    let prompts = work.path().join("prompts");
    let cfg = work.path().join("adapt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nbundle = \"{}\"\nprompts_dir = \"{}\"\n[labels]\ndb = \"{}\"\n\
             [adapt]\nmin_labels = 20\nholdout = 0.3\nmax_epochs = 40\n\
             [[streams]]\nid = \"cam\"\npipeline = \"videotestsrc is-live=true\"\n",
            bundle_dir.display(),
            prompts.display(),
            db.display()
        ),
    )
    .unwrap();
    let out = Command::new("/usr/bin/python3")
        .arg(&wrapper)
        .arg(&unit)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_streamiq-adapt"))
        .args(["once", "--config"])
        .arg(&cfg)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("system calls allowed"), "{stderr}");
    let dir = PromptDir::new(&prompts);
    assert_eq!(dir.versions(), vec![1], "{stdout}");
    assert_eq!(dir.active().unwrap(), Some(1), "{stdout}");
}
