//! The model-upgrade path of the README ("Upgrading the model"), end to end with two
//! real bundles: A (the shipped `streamiq-tiny`) and B (a copy whose `visual.onnx` has
//! perturbed weights, so another encoder with another sha256). Labels are stored
//! through the API under A and a prompt set is adapted for A; the daemon switched to B
//! refuses that set at start, naming both shas, and scores with B's own set instead;
//! `streamiq-adapt reembed` moves the labels to B (re-embedding exactly: under A it
//! reproduces the daemon's live embeddings); the next round adapts a set for B from
//! them, which the running daemon activates.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../../tests/common/mod.rs"]
mod common;
use common::daemon::Process;
use common::{http, json_as, metric, post_label, run_ok, venv_python, wait_until};
use streamiq::score::bundle::Bundle;
use streamiq::score::prompt_store::PromptDir;

/// A copy of `from` at `to` whose `visual.onnx` initialisers are scaled by seeded noise
/// (1 + 0.05 N(0, 1)): a different encoder of the same architecture and contract.
fn perturbed_copy(from: &Path, to: &Path) {
    let script = r#"
import hashlib, re, shutil, sys
import numpy as np
import onnx
from onnx import numpy_helper
src, dst = sys.argv[1], sys.argv[2]
shutil.copytree(src, dst)
m = onnx.load(f"{dst}/visual.onnx")
rng = np.random.default_rng(7)
for init in m.graph.initializer:
    a = numpy_helper.to_array(init)
    if a.dtype == np.float32 and a.size > 1:
        b = (a * (1 + 0.05 * rng.standard_normal(a.shape))).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(b, init.name))
onnx.save(m, f"{dst}/visual.onnx")
sha = hashlib.sha256(open(f"{dst}/visual.onnx", "rb").read()).hexdigest()
text = open(f"{dst}/manifest.toml").read()
text = re.sub(r'(?m)^"visual.onnx" = "[0-9a-f]+"', f'"visual.onnx" = "{sha}"', text)
text = re.sub(r'(?m)^name = "([^"]+)"', r'name = "\1-perturbed"', text)
open(f"{dst}/manifest.toml", "w").write(text)
"#;
    run_ok(
        Command::new(venv_python())
            .arg("-c")
            .arg(script)
            .arg(from)
            .arg(to),
    );
}

/// A daemon config for `bundle` over the shared state in `work` (labels, prompts,
/// token): two live test streams whose frames score differently.
fn config(work: &Path, name: &str, bundle: &Path) -> PathBuf {
    let cfg = work.join(name);
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\napi_token_file = \"{w}/api-token\"\n\
             [model]\nbundle = \"{b}\"\nprompts_dir = \"{w}/prompts\"\nintra_threads = 1\n\
             [labels]\ndb = \"{w}/labels.sqlite\"\n\
             [adapt]\nmin_labels = 20\nholdout = 0.3\nmax_epochs = 60\n\
             [[streams]]\nid = \"plate\"\npipeline = \"videotestsrc is-live=true pattern=zone-plate kt=1 kx2=8 ky2=8 ! video/x-raw,width=320,height=240,framerate=10/1\"\nsample_fps = 5\n\
             [[streams]]\nid = \"snow\"\npipeline = \"videotestsrc is-live=true pattern=snow ! video/x-raw,width=320,height=240,framerate=10/1\"\nsample_fps = 5\n",
            w = work.display(),
            b = bundle.display()
        ),
    )
    .unwrap();
    cfg
}

fn adapt(args: &[&str], cfg: &Path) -> common::Ran {
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"))
            .args(args)
            .arg("--config")
            .arg(cfg),
    )
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

/// Every stored label's (id, model_sha256, embedding, embedding_source, frame size).
type Row = (i64, String, Vec<f32>, String, Option<usize>);
fn rows(db: &Path) -> Vec<Row> {
    let store = streamiq::labels::LabelStore::open(db).unwrap();
    store
        .list(0, None)
        .unwrap()
        .into_iter()
        .map(|l| {
            (
                l.id,
                l.model_sha256.clone(),
                store.embedding(l.id).unwrap().unwrap(),
                l.embedding_source.clone(),
                store.frame(l.id).unwrap().map(|f| f.len()),
            )
        })
        .collect()
}

#[test]
fn a_model_upgrade_keeps_the_operators_labels_and_refuses_the_old_prompt_set() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let bundle_a = common::repo().join("models/streamiq-tiny");
    let bundle_b = w.join("bundle-b");
    perturbed_copy(&bundle_a, &bundle_b);
    let sha_a = Bundle::open(&bundle_a).unwrap().manifest.files["visual.onnx"].clone();
    let sha_b = Bundle::open(&bundle_b).unwrap().manifest.files["visual.onnx"].clone();
    assert_ne!(sha_a, sha_b);
    let (cfg_a, cfg_b) = (
        config(w, "a.toml", &bundle_a),
        config(w, "b.toml", &bundle_b),
    );
    let db = w.join("labels.sqlite");
    let prompts = PromptDir::new(w.join("prompts"));

    // 1. Model A: 30 labels through the API, rated against the model's own score (the
    //    model ranks these frames backwards, so adaptation has something to learn).
    let daemon = Process::start(&cfg_a);
    let addr = daemon.addr;
    let token = common::token_in(&w.join("api-token"));
    for s in ["plate", "snow"] {
        wait_until("frames scored", || {
            metric(
                addr,
                &format!("streamiq_frames_scored_total{{stream=\"{s}\"}}"),
            ) >= 16.0
        });
    }
    let mut labelled = 0;
    for s in ["plate", "snow"] {
        let frames = json_as(
            addr,
            &format!("/api/v1/streams/{s}/frames?limit=15"),
            &token,
        );
        for f in frames.as_array().unwrap() {
            let mos = 1.0 + 4.0 * (1.0 - f["score"].as_f64().unwrap());
            let body = format!(r#"{{"frame_id": {}, "mos": {mos:.4}}}"#, f["id"]);
            let (code, v) = post_label(addr, Some(&token), &body);
            assert_eq!(code, 201, "{v}");
            labelled += 1;
        }
    }
    assert_eq!(labelled, 30);
    let stored = rows(&db);
    assert!(stored.iter().all(|(_, sha, _, src, frame)| {
        sha == &sha_a && src == "live" && frame.is_some_and(|n| n > 1000)
    }));

    // The stored frame re-embeds to the daemon's live embedding under the same model:
    // reembed's preprocessing is the daemon's.
    let store = streamiq::labels::LabelStore::open(&db).unwrap();
    let frames: Vec<_> = stored
        .iter()
        .map(|(id, ..)| {
            let png = store.frame(*id).unwrap().unwrap();
            (png, streamiq::labels::store::EmbeddingSource::Frame)
        })
        .collect();
    drop(store);
    let settings_a = streamiq::config::Config::load(&cfg_a)
        .unwrap()
        .validate()
        .unwrap();
    let again = streamiq::labels::reembed::embed_images(&settings_a, &frames).unwrap();
    for ((id, _, live, _, _), e) in stored.iter().zip(again) {
        let c = cosine(live, &e.unwrap());
        assert!(
            c > 0.9999,
            "label {id}: cosine {c} between live and re-embedded"
        );
    }
    // Nothing to do under A.
    let text = adapt(&["reembed"], &cfg_a).stdout;
    assert!(text.contains("30 were for this model already"), "{text}");

    // 2. A round under A: a set adapted for A, recording A's sha, promoted and active.
    let text = adapt(&["once"], &cfg_a).text();
    assert_eq!(prompts.active().unwrap(), Some(1), "{text}");
    let v1 = streamiq::score::prompts::PromptSet::load(&prompts.path(1), 128).unwrap();
    assert_eq!(v1.metadata["model_sha256"], sha_a);
    wait_until("v1 active under A", || {
        metric(addr, "streamiq_prompt_version") == 1.0
    });
    drop(daemon);

    // 3. Model B: v1 is refused at start, naming both shas; the bundle's own set scores.
    let mut daemon = Process::start(&cfg_b);
    let addr = daemon.addr;
    wait_until("frames scored under B", || {
        metric(addr, "streamiq_frames_scored_total{stream=\"plate\"}") >= 3.0
    });
    daemon.assert_alive();
    assert_eq!(metric(addr, "streamiq_prompt_version"), 0.0);
    assert_eq!(metric(addr, "streamiq_prompt_set_model_mismatch"), 1.0);
    assert_eq!(
        metric(
            addr,
            "streamiq_prompt_rejects_total{reason=\"model_mismatch\"}"
        ),
        1.0
    );
    let log = daemon.log_text();
    let refusal = log
        .lines()
        .find(|l| l.contains("v0001.safetensors") && l.contains("prompt set v1"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(
        refusal.contains(&sha_a) && refusal.contains(&sha_b),
        "{refusal}"
    );
    let (code, body) = http(
        addr,
        "POST",
        "/api/v1/prompts/rollback",
        Some(&token),
        r#"{"version": 1}"#,
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.contains(&sha_a) && body.contains(&sha_b), "{body}");
    assert_eq!(metric(addr, "streamiq_prompt_version"), 0.0);
    let summary = json_as(addr, "/api/v1/labels/summary", &token);
    assert_eq!(summary["labels_for_model"], 0, "{summary}");
    // Without re-embedding, a round under B has no labels.
    let text = adapt(&["once"], &cfg_b).text();
    assert!(text.contains("0 labels for this model"), "{text}");
    assert_eq!(prompts.versions(), vec![1]);

    // 4. reembed moves every label to B (with the daemon running), and is idempotent.
    let text = adapt(&["reembed"], &cfg_b).stdout;
    assert!(
        text.contains("30 from stored frames") && text.contains("30 labels are now usable"),
        "{text}"
    );
    let moved = rows(&db);
    for ((id, _, e_a, _, _), (_, sha, e_b, src, _)) in stored.iter().zip(&moved) {
        assert_eq!((sha.as_str(), src.as_str()), (sha_b.as_str(), "frame"));
        let c = cosine(e_a, e_b);
        assert!(c < 0.9999, "label {id}: B's embedding is A's ({c})");
    }
    let text = adapt(&["reembed"], &cfg_b).stdout;
    assert!(
        text.contains("0 from stored frames") && text.contains("30 were for this model already"),
        "{text}"
    );
    assert_eq!(rows(&db), moved, "a second run changes nothing");
    let summary = json_as(addr, "/api/v1/labels/summary", &token);
    assert_eq!(summary["labels_for_model"], 30, "{summary}");

    // 5. A round under B trains on them, compares with B's own set (not the refused
    //    v1), and the running daemon activates the set adapted for B.
    let text = adapt(&["once"], &cfg_b).text();
    assert!(text.contains("30 labels"), "{text}");
    assert_eq!(prompts.active().unwrap(), Some(2), "{text}");
    let v2 = streamiq::score::prompts::PromptSet::load(&prompts.path(2), 128).unwrap();
    assert_eq!(v2.metadata["model_sha256"], sha_b);
    assert_eq!(v2.metadata["parent"], "0");
    wait_until("v2 active under B", || {
        metric(addr, "streamiq_prompt_version") == 2.0
    });
    assert_eq!(metric(addr, "streamiq_prompt_set_model_mismatch"), 0.0);
    daemon.assert_alive();
    drop(daemon);

    // 6. Back to A: the labels return to their kept live embeddings, exactly.
    let text = adapt(&["reembed"], &cfg_a).stdout;
    assert!(text.contains("30 restored from kept embeddings"), "{text}");
    for ((_, _, live, _, _), (_, sha, back, src, _)) in stored.iter().zip(rows(&db)) {
        assert_eq!((sha.as_str(), src.as_str()), (sha_a.as_str(), "live"));
        assert_eq!(live, &back);
    }
}

/// Labels stored before frames were kept are re-embedded from their thumbnail and
/// counted apart; a label whose images cannot be read is reported (exit 1) and left as
/// it was while the others move; a bundle that cannot be loaded changes nothing.
#[test]
fn reembed_falls_back_to_thumbnails_and_reports_what_it_cannot_read() {
    use streamiq::labels::{LabelStore, NewLabel, Provenance, Rating};
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("labels.sqlite");
    let bundle = common::bundle();
    let sha = Bundle::open(&bundle).unwrap().manifest.files["visual.onnx"].clone();
    let picture = image::RgbImage::from_fn(298, 224, |x, y| {
        image::Rgb([
            (x % 256) as u8,
            (y * 255 / 224) as u8,
            ((x * y) % 251) as u8,
        ])
    });
    let encode = |format| {
        let mut out = std::io::Cursor::new(Vec::new());
        picture.write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let store = LabelStore::open(&db).unwrap();
    let old = "1".repeat(64);
    for (frame_id, thumbnail, frame) in [
        (
            1,
            encode(image::ImageFormat::Jpeg),
            Some(encode(image::ImageFormat::Png)),
        ),
        (2, encode(image::ImageFormat::Jpeg), None),
        (3, b"not a picture".to_vec(), None),
    ] {
        store
            .insert(&NewLabel {
                stream: "cam".into(),
                frame_id,
                captured: 0.0,
                pts: None,
                rating: Rating::Mos(3.0),
                labeller: "ana".into(),
                embedding: vec![1.0, 0.0],
                provenance: Provenance {
                    bundle: "old".into(),
                    model_sha256: old.clone(),
                },
                prompt_version: 0,
                model_score: 0.5,
                thumbnail,
                frame,
            })
            .unwrap();
    }
    drop(store);
    let reembed = |model: &Path| {
        Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"))
            .args(["reembed", "--model"])
            .arg(model)
            .arg("--db")
            .arg(&db)
            .output()
            .unwrap()
    };
    let before = rows(&db);

    // A bundle that does not load: exit 2, nothing changed.
    let broken = work.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let o = reembed(&broken);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("manifest.toml"));
    assert_eq!(rows(&db), before);

    for run in 0..2 {
        let o = reembed(&bundle);
        let text = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{text}");
        let expected = if run == 0 {
            "1 from stored frames, 1 from thumbnails, 0 restored from kept embeddings; 0 were \
             for this model already, 0 changed meanwhile (left alone), 1 failed; 2 labels"
        } else {
            "0 from stored frames, 0 from thumbnails, 0 restored from kept embeddings; 2 were \
             for this model already, 0 changed meanwhile (left alone), 1 failed; 2 labels"
        };
        assert!(text.contains(expected), "{text}");
        assert!(text.contains("label 3: not re-embedded"), "{text}");
        let now = rows(&db);
        let summary: Vec<(&str, &str)> = now
            .iter()
            .map(|(_, s, _, src, _)| (s.as_str(), src.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (sha.as_str(), "frame"),
                (sha.as_str(), "thumbnail"),
                (old.as_str(), "live")
            ]
        );
        assert_eq!(now[2], before[2], "the unreadable label is left as it was");
        // The frame and the thumbnail are the same picture, the thumbnail lossy (JPEG
        // q75 of a fine texture here): close, not the same.
        let c = cosine(&now[0].2, &now[1].2);
        assert!(
            (0.8..0.9999).contains(&c),
            "frame vs thumbnail embedding: cosine {c}"
        );
    }
}
