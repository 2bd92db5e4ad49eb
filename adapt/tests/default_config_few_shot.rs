//! A few-shot round of `streamiq-adapt once` beside a daemon on the shipped default
//! configuration: labels posted through the API, a promoted prompt set hot-swapped
//! without a pause in scoring, and rolled back.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../../tests/common/mod.rs"]
mod common;
use common::default_run::{CONFIG, Run, command, scored};
use common::{http, metric, post_label, sample, wait_until_for};

/// Longest time `streamiq_frames_scored_total` (summed over streams) may stand still.
const MAX_GAP: Duration = Duration::from_secs(3);

/// One scrape of the sampler: when, frames scored (all streams), prompt version.
#[derive(Clone, Copy, Debug)]
struct Tick {
    at: Instant,
    scored: f64,
    version: f64,
}

/// Sets the sampler's stop flag when dropped (also when an assertion fails).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `c` to completion with its output captured; kills it after `limit`.
fn output_within(c: &mut Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{c:?} did not finish within {limit:?}:\n{}{}",
                String::from_utf8_lossy(&out.join().unwrap()),
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Scrapes `/metrics` every 250 ms until `stop` is set.
fn sampler(addr: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Tick>> {
    std::thread::spawn(move || {
        let mut ticks = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let (_, m) = http(&addr, "GET", "/metrics", None, "");
            let scored = ["clean", "degraded"]
                .iter()
                .map(|s| scored(&m, s).unwrap_or(f64::NAN))
                .sum();
            let version = sample(&m, "streamiq_prompt_version").unwrap_or(f64::NAN);
            ticks.push(Tick {
                at: Instant::now(),
                scored,
                version,
            });
            std::thread::sleep(Duration::from_millis(250));
        }
        ticks
    })
}

/// The longest time the scored-frames sum stood still, and when it started (seconds
/// from the first tick).
fn longest_gap(ticks: &[Tick]) -> (Duration, f64) {
    let first = ticks[0].at;
    let (mut last_change, mut last_value) = (first, ticks[0].scored);
    let mut worst = (Duration::ZERO, 0.0);
    for t in ticks {
        if t.scored != last_value {
            last_change = t.at;
            last_value = t.scored;
        }
        let gap = t.at - last_change;
        if gap > worst.0 {
            worst = (gap, (last_change - first).as_secs_f64());
        }
    }
    worst
}

/// A label of `frame_id` with `mos`, as the labelling page posts it.
fn label(frame_id: u64, mos: u32) -> String {
    format!(r#"{{"frame_id": {frame_id}, "mos": {mos}, "labeller": "default-config-test"}}"#)
}

#[test]
fn few_shot_round_on_the_default_config_hot_swaps_and_rolls_back() {
    let t0 = Instant::now();
    let mut run = Run::start();
    let addr = run.addr.clone();
    let min_labels = run.settings.adapt.min_labels;
    // Half of the labels from each stream, at least adapt.min_labels in all.
    let per_stream = min_labels.max(30).div_ceil(2);

    // Enough recent frames of each stream, as the labelling page gets them.
    let mut frames: Vec<Vec<Value>> = Vec::new();
    wait_until_for(
        Duration::from_secs(60),
        &format!("{per_stream} recent frames in each stream"),
        || {
            frames = ["clean", "degraded"]
                .iter()
                .map(|s| {
                    run.json(&format!("/api/v1/streams/{s}/frames?limit={per_stream}"))
                        .as_array()
                        .unwrap()
                        .clone()
                })
                .collect();
            frames.iter().all(|f| f.len() >= per_stream)
        },
    );
    let summary0 = run.json("/api/v1/labels/summary");
    let run_id = summary0["run_id"].as_str().unwrap().to_string();
    assert_eq!(metric(&addr, "streamiq_prompt_version"), 0.0);
    let pid = run.daemon.pid();
    let token_file = run.work.path().join("api-token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap_or_else(|e| panic!("{}: {e}", token_file.display()));
    let token = token.trim();
    assert!(!token.is_empty());

    // Without the token (and with a wrong one): 401, nothing stored.
    let first = frames[0][0]["id"].as_u64().unwrap();
    let (code, body) = post_label(&addr, None, &label(first, 5));
    assert_eq!(code, 401, "{body}");
    let (code, body) = post_label(&addr, Some("not-the-token"), &label(first, 5));
    assert_eq!(code, 401, "{body}");
    assert_eq!(run.json("/api/v1/labels").as_array().unwrap().len(), 0);
    assert_eq!(metric(&addr, "streamiq_labels_total"), 0.0);

    // With the token: clean frames rated 5, degraded frames 1, interleaved.
    let mut posted = 0;
    for pair in frames[0].iter().zip(&frames[1]).take(per_stream) {
        for (stream, f, mos) in [("clean", pair.0, 5), ("degraded", pair.1, 1)] {
            let id = f["id"].as_u64().unwrap();
            let (code, v) = post_label(&addr, Some(token), &label(id, mos));
            assert_eq!(code, 201, "label frame {id}: {v}");
            assert_eq!(v["stream"], stream, "{v}");
            assert_eq!(v["frame_id"], id, "{v}");
            posted += 1;
        }
    }
    assert!(posted >= min_labels);
    assert_eq!(metric(&addr, "streamiq_labels_total"), posted as f64);
    let summary = run.json("/api/v1/labels/summary");
    assert_eq!(summary["labels_for_model"], posted, "{summary}");
    assert_eq!(summary["needed"], 0, "{summary}");
    let mean_score = |s: usize| {
        let f = &frames[s][..per_stream];
        f.iter().map(|f| f["score"].as_f64().unwrap()).sum::<f64>() / f.len() as f64
    };
    println!(
        "{posted} labels stored ({:.1} s); model scores of the labelled frames (v0): clean {:.4}, degraded {:.4}",
        t0.elapsed().as_secs_f64(),
        mean_score(0),
        mean_score(1)
    );

    // One adaptation round beside the running daemon, watched from before it starts.
    let stop = Arc::new(AtomicBool::new(false));
    let watch = sampler(addr.clone(), stop.clone());
    let stop_guard = StopOnDrop(stop);
    std::thread::sleep(Duration::from_secs(1));
    let t_round = Instant::now();
    let o = output_within(
        command(
            std::path::Path::new(env!("CARGO_BIN_EXE_streamiq-adapt")),
            run.work.path(),
        )
        .args(["once", "--config", CONFIG])
        .env("OMP_NUM_THREADS", "1"),
        Duration::from_secs(180),
    );
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    println!(
        "streamiq-adapt once: {} in {:.1} s\n--- stdout\n{out}--- stderr\n{err}---",
        o.status,
        t_round.elapsed().as_secs_f64()
    );
    if !o.status.success() {
        panic!("streamiq-adapt once failed ({}):\n{out}{err}", o.status);
    }
    if !out.contains("promoted it") {
        panic!("the round did not promote a prompt set:\n{out}{err}");
    }
    let promoted = wait_for_version(&run, |v| v > 0.0);
    println!(
        "prompt version 0 -> {promoted} on /metrics {:.1} s after the round started",
        t_round.elapsed().as_secs_f64()
    );
    // Scoring goes on with the new set: a frame scored by it, and a few seconds more.
    wait_until_for(
        Duration::from_secs(30),
        "a frame scored with the new prompt set",
        || {
            ["clean", "degraded"].iter().all(|s| {
                run.json(&format!("/api/v1/streams/{s}/frames?limit=1"))[0]["prompt_version"]
                    .as_f64()
                    == Some(promoted)
            })
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    drop(stop_guard);
    let ticks = watch
        .join()
        .expect("the sampler scraped /metrics throughout");
    run.assert_alive();
    assert_eq!(run.daemon.pid(), pid);
    let summary = run.json("/api/v1/labels/summary");
    assert_eq!(summary["run_id"], run_id.as_str(), "the daemon restarted");

    let (gap, gap_at) = longest_gap(&ticks);
    let swap = ticks
        .iter()
        .position(|t| t.version == promoted)
        .expect("the sampler saw the new version");
    let (s_first, s_last) = (ticks[0].scored, ticks.last().unwrap().scored);
    println!(
        "sampler: {} scrapes over {:.1} s; frames scored {s_first} -> {s_last}; version {} -> {} at scrape {swap}; longest gap {:.2} s (at +{gap_at:.1} s)",
        ticks.len(),
        (ticks.last().unwrap().at - ticks[0].at).as_secs_f64(),
        ticks[0].version,
        promoted,
        gap.as_secs_f64()
    );
    assert_eq!(ticks[0].version, 0.0);
    assert!(
        ticks.iter().all(|t| t.scored.is_finite()),
        "every scrape has both streams' counters"
    );
    assert!(
        ticks.last().unwrap().scored > ticks[swap].scored,
        "frames scored after the swap: {ticks:?}"
    );
    assert!(
        gap <= MAX_GAP,
        "streamiq_frames_scored_total stood still for {:.2} s (from +{gap_at:.1} s)",
        gap.as_secs_f64()
    );
    for s in ["clean", "degraded"] {
        assert_eq!(
            metric(
                &addr,
                &format!("streamiq_frames_dropped_total{{reason=\"error\",stream=\"{s}\"}}")
            ),
            0.0
        );
    }
    let newest =
        |s: &str| run.json(&format!("/api/v1/streams/{s}/frames?limit=1"))[0]["score"].clone();
    println!(
        "newest scores with v{promoted}: clean {}, degraded {}",
        newest("clean"),
        newest("degraded")
    );

    // Rollback: 401 without the token; with it, back to v0 on /metrics.
    let (code, body) = http(
        &addr,
        "POST",
        "/api/v1/prompts/rollback",
        None,
        r#"{"version": 0}"#,
    );
    assert_eq!(code, 401, "{body}");
    assert_eq!(metric(&addr, "streamiq_prompt_version"), promoted);
    let (code, body) = http(
        &addr,
        "POST",
        "/api/v1/prompts/rollback",
        Some(token),
        r#"{"version": 0}"#,
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["previous"].as_f64(), Some(promoted), "{v}");
    assert_eq!(v["active"], 0, "{v}");
    wait_for_version(&run, |v| v == 0.0);
    assert_eq!(run.json("/api/v1/prompts")["active"], 0);
    let s0: f64 = ["clean", "degraded"]
        .iter()
        .map(|s| scored(&run.metrics(), s).unwrap())
        .sum();
    wait_until_for(
        Duration::from_secs(30),
        "scoring after the rollback",
        || {
            let m = run.metrics();
            ["clean", "degraded"]
                .iter()
                .map(|s| scored(&m, s).unwrap())
                .sum::<f64>()
                >= s0 + 4.0
        },
    );
    run.assert_alive();
    assert_eq!(
        run.json("/api/v1/labels/summary")["run_id"],
        run_id.as_str()
    );
    println!(
        "rolled back v{promoted} -> v0; total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    drop(run);
}

/// Waits (30 s) until `streamiq_prompt_version` satisfies `ok`; returns it.
fn wait_for_version(run: &Run, ok: impl Fn(f64) -> bool) -> f64 {
    let mut v = f64::NAN;
    wait_until_for(
        Duration::from_secs(30),
        "streamiq_prompt_version to change",
        || {
            v = metric(&run.addr, "streamiq_prompt_version");
            ok(v)
        },
    );
    v
}
