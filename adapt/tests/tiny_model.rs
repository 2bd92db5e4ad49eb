//! The shipped models and the recipe that makes the default one: the default config's
//! model (`models/streamiq-tiny`) and the two-stream option (`models/streamiq-effnet`)
//! load in the daemon's scorer and in the sidecar with the same text features (parity);
//! the default model, with the default views, ranks distortion ladders on unseen
//! photographs, is not fooled by grain and puts degraded video below clean video;
//! `scripts/train_tiny.py` runs end to end in a tiny configuration into a bundle both
//! binaries load.

use std::path::{Path, PathBuf};
use std::process::Command;
use streamiq::eval::spearman;

#[path = "../../tests/common/mod.rs"]
mod common;
use common::{repo, run_ok, venv_python};

fn effnet() -> PathBuf {
    repo().join("models/streamiq-effnet")
}

/// The default configuration's model.
fn shipped() -> PathBuf {
    repo().join(streamiq::config::Config::default().model.bundle)
}

/// Standard output of `cmd`, which must succeed.
fn run(cmd: &mut Command) -> String {
    run_ok(cmd).stdout
}

fn parity(model: &Path) -> String {
    let out = run(Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"))
        .arg("check")
        .arg("--model")
        .arg(model));
    println!("{out}");
    out
}

/// The folder of photographs inside the scikit-image wheel of the project's venv.
fn skimage_data() -> PathBuf {
    let out = run(Command::new(venv_python()).args([
        "-c",
        "import pathlib, skimage; print(pathlib.Path(skimage.__file__).parent / 'data')",
    ]));
    PathBuf::from(out.trim())
}

/// Scores of `images` under `model` with the default configuration's views, in order.
fn scores(model: &Path, images: &[PathBuf]) -> Vec<f64> {
    let out = run(Command::new(common::bin("streamiq"))
        .arg("score")
        .arg("--model")
        .arg(model)
        .args(images));
    out.lines()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn shipped_model_loads_everywhere_and_orders_a_blur_and_noise_ladder() {
    parity(&effnet());
    let model = shipped();
    parity(&model);
    // A photograph the model never saw in training (models/README.md), distorted by
    // `streamiq distort`: the score must fall as blur and noise grow.
    let dir = tempfile::tempdir().unwrap();
    run(Command::new(common::bin("streamiq"))
        .args([
            "distort",
            "--kinds",
            "gaussian_blur,gaussian_noise",
            "--out",
        ])
        .arg(dir.path())
        .arg(skimage_data().join("chelsea.png")));
    for kind in ["gaussian_blur", "gaussian_noise"] {
        let images: Vec<PathBuf> =
            std::iter::once(dir.path().join("images/chelsea_reference_0.png"))
                .chain((1..=5).map(|l| dir.path().join(format!("images/chelsea_{kind}_{l}.png"))))
                .collect();
        let s = scores(&model, &images);
        println!("{kind}: {s:?}");
        assert!(
            s.windows(2).filter(|w| w[1] < w[0]).count() >= 4 && s[5] < s[0] - 0.2,
            "{kind}: scores do not fall with the level: {s:?}"
        );
    }
}

#[test]
fn faint_grain_does_not_make_blurred_photographs_look_sharp() {
    // Video frames carry faint grain (sensor noise, dither, an encoder's noise shaping),
    // also after blur. On the three unseen scikit-image photographs blurred at levels 2
    // and 3, grain of sigma 1.5/255 (0.4 of the first noise level's) must not raise the
    // score by more than 0.08 (the default model: at most 0.012 with `global`, 0.032 with
    // the default `crops:4`; under `streamiq-effnet` grain adds 0.2-0.4): a model that reads
    // grain as sharpness (the MSCN variants did, by up to 0.55; models/EXPERIMENTS.md) rates
    // blurred streams as sharp.
    let dir = tempfile::tempdir().unwrap();
    let data = skimage_data();
    run(Command::new(common::bin("streamiq"))
        .args(["distort", "--kinds", "gaussian_blur", "--out"])
        .arg(dir.path())
        .args(["chelsea.png", "coffee.png", "rocket.jpg"].map(|f| data.join(f))));
    let mut plain = Vec::new();
    for photo in ["chelsea", "coffee", "rocket"] {
        for level in [2, 3] {
            plain.push(
                dir.path()
                    .join(format!("images/{photo}_gaussian_blur_{level}.png")),
            );
        }
    }
    let grainy: Vec<PathBuf> = plain
        .iter()
        .map(|p| {
            p.with_file_name(format!(
                "grain_{}",
                p.file_name().unwrap().to_str().unwrap()
            ))
        })
        .collect();
    let mut script = String::from("import cv2, numpy as np\nrng = np.random.default_rng(0)\n");
    for (a, b) in plain.iter().zip(&grainy) {
        script += &format!(
            "x = cv2.imread({a:?}).astype(np.float32)\n\
             cv2.imwrite({b:?}, np.clip(x + rng.normal(0, 1.5, x.shape), 0, 255).round().astype(np.uint8))\n"
        );
    }
    run(Command::new(venv_python()).args(["-c", &script]));
    let (s, g) = (scores(&shipped(), &plain), scores(&shipped(), &grainy));
    println!("blurred {s:.3?}\nwith grain {g:.3?}");
    for ((a, b), p) in s.iter().zip(&g).zip(&plain) {
        assert!(
            b - a < 0.08,
            "grain raised {} from {a:.3} to {b:.3}",
            p.display()
        );
    }
}

#[test]
fn train_tiny_recipe_runs_end_to_end_in_a_tiny_configuration() {
    tiny_recipe(&[]);
}

#[test]
fn train_tiny_variants_run_end_to_end_in_a_tiny_configuration() {
    // The MSCN image tower (cored), and data with mildly encoded groups and faint grain.
    tiny_recipe(&[
        "--mscn",
        "0.02",
        "--mscn-core",
        "0.01",
        "--video",
        "0.5",
        "--grain",
        "0.25",
    ]);
}

/// Runs train_tiny.py on 8 groups for 2 steps (with `extra` options), then checks the
/// bundle: its files, text parity with libtorch, and a score from the daemon's code.
fn tiny_recipe(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    let log = run(Command::new(venv_python())
        .arg(repo().join("scripts/train_tiny.py"))
        .arg("--out")
        .arg(&out)
        .args([
            "--groups",
            "8",
            "--steps",
            "2",
            "--batch-groups",
            "2",
            "--workers",
            "1",
        ])
        .args(extra));
    assert!(log.contains("step 2/2"), "{log}");
    let manifest = std::fs::read_to_string(out.join("manifest.toml")).unwrap();
    for option in extra {
        assert!(
            manifest.contains(option),
            "{option} not recorded: {manifest}"
        );
    }
    for f in [
        "manifest.toml",
        "visual.onnx",
        "prompts.safetensors",
        "text/weights.safetensors",
        "text/tokens.json",
        "text/vocab.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // Same text features from the libtorch tower as from the script's torch export,
    // through the compact vocabulary.
    parity(&out);
    let photo = dir.path().join("grey.png");
    image::RgbImage::from_pixel(64, 48, image::Rgb([120, 130, 140]))
        .save(&photo)
        .unwrap();
    let s = scores(&out, &[photo]);
    assert!(s.len() == 1 && (0.0..=1.0).contains(&s[0]), "{s:?}");
}

#[test]
fn default_config_scan_puts_degraded_photo_pans_below_their_clean_twins() {
    // Pans over photographs (H.264, CRF 20) and the same clip blurred, noised and
    // re-encoded at a low bitrate, scanned with the shipped config.
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.mp4");
    let degraded = dir.path().join("degraded.mp4");
    run(Command::new(venv_python())
        .arg(repo().join("scripts/make_pan_clip.py"))
        .arg(&clean)
        .args([
            "--seconds",
            "12",
            "--size",
            "640x360",
            "--shot",
            "3",
            "--crf",
            "20",
        ]));
    run(Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(&clean)
        .args([
            "-vf",
            "gblur=sigma=1.5,noise=alls=18:allf=t",
            "-c:v",
            "libx264",
            "-b:v",
            "150k",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&degraded));
    // From the repository root: the shipped config's paths are relative to it.
    let out = run(Command::new(common::bin("streamiq"))
        .current_dir(repo())
        .args(["scan", "--json", "--sample-fps", "4", "--config"])
        .arg(repo().join("config/streamiq.toml"))
        .arg(&clean)
        .arg(&degraded));
    let means: Vec<f64> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["mean_score"].as_f64().unwrap()
        })
        .collect();
    println!("clean {:.3}, degraded {:.3}", means[0], means[1]);
    assert_eq!(means.len(), 2, "{out}");
    assert!(
        means[1] < means[0] - 0.15,
        "degraded {:.3} is not clearly below clean {:.3}",
        means[1],
        means[0]
    );
}

/// The six kinds of our real-photograph check.
const SIX_KINDS: [&str; 6] = [
    "gaussian_blur",
    "gaussian_noise",
    "jpeg",
    "h264",
    "rescale",
    "contrast",
];

/// Scores `streamiq distort` ladders (the six kinds, five levels) of `sources` (name,
/// picture) with the shipped model; asserts that level 5 scores below the clean picture
/// in every ladder and that the mean SRCC between score and level inside each picture
/// and kind is at least 0.88; returns the mean per-kind SRCC pooled across the pictures.
fn six_kind_check(sources: &[(String, PathBuf)], dir: &Path) -> f64 {
    let set = dir.join("set");
    run(Command::new(common::bin("streamiq"))
        .args([
            "distort",
            "--seed",
            "0",
            "--kinds",
            &SIX_KINDS.join(","),
            "--out",
        ])
        .arg(&set)
        .args(sources.iter().map(|(_, p)| p)));
    let mut images = Vec::new();
    for (stem, _) in sources {
        images.push(set.join(format!("images/{stem}_reference_0.png")));
        for kind in SIX_KINDS {
            images.extend((1..=5).map(|l| set.join(format!("images/{stem}_{kind}_{l}.png"))));
        }
    }
    let s = scores(&shipped(), &images);
    let per_photo = 1 + 5 * SIX_KINDS.len();
    let mut within = Vec::new();
    let mut failures = Vec::new();
    let mut pooled = vec![(Vec::new(), Vec::new()); SIX_KINDS.len()];
    for ((stem, _), s) in sources.iter().zip(s.chunks(per_photo)) {
        for (k, kind) in SIX_KINDS.iter().enumerate() {
            let ladder: Vec<f64> = std::iter::once(s[0])
                .chain(s[1 + 5 * k..][..5].iter().copied())
                .collect();
            println!("{stem} {kind}: {ladder:.3?}");
            if ladder[5] >= ladder[0] {
                failures.push(format!("{stem} {kind}: {ladder:.3?}"));
            }
            let levels: Vec<f64> = (0..6).map(|l| -(l as f64)).collect();
            within.push(spearman(&levels, &ladder));
            pooled[k].0.extend(levels);
            pooled[k].1.extend(ladder);
        }
    }
    let mean = within.iter().sum::<f64>() / within.len() as f64;
    println!("mean within-picture SRCC {mean:.3}");
    let per_kind: Vec<f64> = pooled.iter().map(|(l, s)| spearman(l, s)).collect();
    let across = per_kind.iter().sum::<f64>() / per_kind.len() as f64;
    println!("SRCC across the pictures, per kind {per_kind:.3?}, mean {across:.3}");
    assert!(
        failures.is_empty(),
        "level 5 not below the clean picture:\n{}",
        failures.join("\n")
    );
    assert!(mean >= 0.88, "mean within-picture SRCC {mean:.3}");
    across
}

/// The second evaluation set of models/README.md, made as `scripts/make_tiny.sh` makes
/// it: eight camera photographs the model never saw (Debian wallpaper packages that
/// scripts/setup.sh installs), reduced to 768 px wide, with the six kinds of our
/// real-photograph check at five levels. Inside each picture, level 5 must score below
/// the clean picture for every kind and the levels must be ranked well on average
/// (measured with the default `crops:4` views: every case, mean within-picture SRCC
/// 0.939; `global` 0.950); across the eight pictures, the mean per-kind SRCC between
/// score and level must stay at least 0.75 (measured 0.825, `global` 0.800; the dark,
/// flat Storm picture costs most of what is missing to our 0.85).
#[test]
fn shipped_model_ranks_levels_inside_unseen_camera_photographs() {
    let bg = Path::new("/usr/share/backgrounds");
    let photos = [
        "mate/nature/Storm.jpg",
        "mate/nature/LadyBird.jpg",
        "Wine_by_Jakkub_Mede.jpg",
        "Bridge_by_Sander_Klootwijk.jpg",
        "aitzgorri_by_Aitzol_Berasategi.jpg",
        "life_by_Aitzol_Berasategi.jpg",
        "friends_by_Aitzol_Berasategi.jpg",
        "Picture_0B_by_freespace.jpg",
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut sources = Vec::new();
    for p in photos {
        let src = bg.join(p);
        assert!(
            src.is_file(),
            "{} is missing: scripts/setup.sh installs mate-backgrounds and lomiri-wallpapers-16.04",
            src.display()
        );
        let stem = Path::new(p)
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let small = dir.path().join(format!("{stem}.png"));
        run(Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-i"])
            .arg(&src)
            .args(["-vf", "scale=768:-2:flags=area"])
            .arg(&small));
        sources.push((stem, small));
    }
    let across = six_kind_check(&sources, dir.path());
    assert!(
        across >= 0.75,
        "mean per-kind SRCC across the pictures {across:.3}"
    );
}

/// The third evaluation set of models/README.md: the twelve GCompris photographs
/// (animals, monuments, an orchestra) that `scripts/train_tiny.py` keeps out of training,
/// written by its `--write-held-out` as make_tiny does. Across the twelve pictures the
/// mean per-kind SRCC must reach the 0.85 we aim for (measured 0.882 with the default
/// `crops:4` views, inside each picture 0.954; `global` 0.867; make_tiny's
/// evaluation gave the model before the GCompris pictures were added to training 0.81
/// on these six kinds), and level 5 must score below the clean picture everywhere.
#[test]
fn shipped_model_ranks_unseen_gcompris_photographs_across_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    run(Command::new(venv_python())
        .arg(repo().join("scripts/train_tiny.py"))
        .arg("--write-held-out")
        .arg(&src));
    let mut sources: Vec<(String, PathBuf)> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_stem().unwrap().to_str().unwrap().to_string(), p)
        })
        .collect();
    sources.sort();
    assert_eq!(sources.len(), 12, "{sources:?}");
    let across = six_kind_check(&sources, dir.path());
    assert!(
        across >= 0.85,
        "mean per-kind SRCC across the pictures {across:.3}"
    );
}
