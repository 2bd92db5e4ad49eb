//! End to end on the shipped default configuration: the degraded stream scores clearly
//! below the clean one (the sidecar's few-shot round on it is in
//! `adapt/tests/default_config_few_shot.rs`).

use std::time::{Duration, Instant};

mod common;
use common::default_run::{Run, quality, scored};
use common::wait_until_for;

#[test]
fn default_config_ranks_the_degraded_stream_below_the_clean_one() {
    let t0 = Instant::now();
    let mut run = Run::start();
    let need = run
        .window_frames("clean")
        .max(run.window_frames("degraded"));
    // A full window of both streams.
    wait_until_for(
        Duration::from_secs(60),
        "a quality window's worth of scored frames in both streams",
        || {
            let m = run.metrics();
            ["clean", "degraded"].iter().all(|s| {
                quality(&m, s).is_some_and(f64::is_finite) && scored(&m, s).unwrap_or(0.0) >= need
            })
        },
    );
    let mut samples = Vec::new();
    for i in 0..5 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let m = run.metrics();
        let (c, d) = (
            quality(&m, "clean").unwrap(),
            quality(&m, "degraded").unwrap(),
        );
        println!(
            "sample {i}: clean {c:.4}  degraded {d:.4}  difference {:.4}",
            c - d
        );
        samples.push((c, d));
    }
    run.assert_alive();
    let n = samples.len() as f64;
    let mean_clean = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_degraded = samples.iter().map(|s| s.1).sum::<f64>() / n;
    println!(
        "mean over {n} samples: clean {mean_clean:.4}, degraded {mean_degraded:.4}, difference {:.4} ({:.1} s)",
        mean_clean - mean_degraded,
        t0.elapsed().as_secs_f64()
    );
    for (stream, mean) in [("clean", mean_clean), ("degraded", mean_degraded)] {
        assert!((0.0..=1.0).contains(&mean), "{stream}: {mean}");
    }
    assert!(
        samples.iter().all(|(c, d)| d < c),
        "the degraded stream must score below the clean one in every sample: {samples:?}"
    );
    assert!(
        mean_clean - mean_degraded >= 0.15,
        "the degraded stream must score clearly below the clean one: mean clean {mean_clean:.4}, degraded {mean_degraded:.4}"
    );
    drop(run);
}
