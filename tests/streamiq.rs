//! Integration tests: the daemon end to end on 127.0.0.1:0, stream restarts, file
//! scan with black / freeze segments, and the command line's error handling.
//!
//! They need the test bundle (`make bundle`) and GStreamer; `make test` provides both.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::daemon::{InProcess, Process};
use common::{
    bundle, config_text, get, get_as, json_as, post_label, repo, request, sample, settings, text,
    text_as, venv_python,
};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_streamiq")
}

fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/setup.sh installs Debian's prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_end_to_end_scrape() {
    let streams = r#"
[[streams]]
id = "bars"
pipeline = "videotestsrc is-live=true pattern=zone-plate kx2=20 ky2=20 kt=1 ! video/x-raw,width=320,height=180,framerate=10/1"
sample_fps = 5.0
[[streams]]
id = "soft"
pipeline = "videotestsrc is-live=true pattern=zone-plate kx2=20 ky2=20 kt=1 ! video/x-raw,width=320,height=180,framerate=10/1 ! videoscale ! video/x-raw,width=40,height=24 ! videoscale ! video/x-raw,width=320,height=180"
sample_fps = 5.0
"#;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&config_text(streams, ""));
    s.server.api_token_file = dir.path().join("api-token");
    let token_file = s.server.api_token_file.clone();
    let d = InProcess::start(s).await;
    let token = common::token_in(&token_file);
    let m = d
        .wait_for(Duration::from_secs(30), |m| {
            ["bars", "soft"].iter().all(|s| {
                sample(
                    m,
                    &format!("streamiq_frames_scored_total{{stream=\"{s}\"}}"),
                )
                .is_some_and(|v| v >= 5.0)
            })
        })
        .await;
    for s in ["bars", "soft"] {
        let scored = sample(
            &m,
            &format!("streamiq_frames_scored_total{{stream=\"{s}\"}}"),
        );
        assert!(scored.is_some_and(|v| v >= 5.0), "{s} scored: {m}");
        assert_eq!(
            sample(&m, &format!("streamiq_stream_up{{stream=\"{s}\"}}")),
            Some(1.0)
        );
        let q = sample(&m, &format!("streamiq_quality_score{{stream=\"{s}\"}}")).unwrap();
        assert!((0.0..=1.0).contains(&q), "{s} quality {q}");
    }
    assert!(m.contains("streamiq_build_info{execution=\"cpu\""), "{m}");
    assert!(sample(&m, "streamiq_batch_size_count").unwrap() >= 1.0);
    let clean = sample(&m, "streamiq_quality_score{stream=\"bars\"}").unwrap();
    let soft = sample(&m, "streamiq_quality_score{stream=\"soft\"}").unwrap();
    assert!(
        soft < clean,
        "blurred stream {soft} should score below clean {clean}"
    );
    promtool_check(&m);
    // What runs where: the build, the libraries and the provider; the process itself.
    let info = m
        .lines()
        .find(|l| l.starts_with("streamiq_build_info{"))
        .expect("streamiq_build_info");
    for label in ["version=", "revision=", "execution=\"cpu\""] {
        assert!(info.contains(label), "{info}");
    }
    assert!(info.contains("gstreamer=\"1."), "{info}");
    assert!(!info.contains("onnxruntime=\"unknown\""), "{info}");
    for family in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_threads",
    ] {
        assert!(sample(&m, family).is_some_and(|v| v > 0.0), "{family}");
    }

    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        assert_eq!(get(addr, "/healthz").0, 200);
        assert_eq!(get(addr, "/readyz").0, 200);
        let streams: serde_json::Value =
            serde_json::from_str(&text(addr, "/api/v1/streams")).unwrap();
        assert_eq!(streams.as_array().unwrap().len(), 2);
        assert_eq!(streams[0]["phase"], "playing");
        // Frames and thumbnails need the token (header, or the page's session cookie).
        let frames_path = "/api/v1/streams/bars/frames?limit=3";
        let (code, body) = get(addr, frames_path);
        assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
        let (code, body) = get_as(addr, frames_path, &token);
        assert_eq!(code, 200);
        let frames: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let frames = frames.as_array().unwrap();
        assert_eq!(frames.len(), 3);
        let score = frames[0]["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
        let thumb = frames[0]["thumbnail"].as_str().unwrap();
        assert_eq!(get(addr, thumb).0, 401, "no thumbnail without the token");
        let (code, jpeg) = get_as(addr, thumb, &token);
        assert_eq!(code, 200);
        assert_eq!(&jpeg[..3], &[0xff, 0xd8, 0xff], "a JPEG");
        let cookie = |value: &str| {
            let (code, _) = request(
                addr,
                "GET",
                thumb,
                &[("Cookie", &format!("streamiq_session={value}"))],
                b"",
            );
            code
        };
        assert_eq!(cookie(&token), 200, "the session cookie reads");
        assert_eq!(cookie("wrong"), 401);
        // A session is opened with the header only; the cookie never authorises a write.
        let (code, _) = request(addr, "POST", "/api/v1/session", &[], b"");
        assert_eq!(code, 401);
        let auth = format!("Bearer {token}");
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /api/v1/session HTTP/1.0\r\nHost: localhost\r\nAuthorization: {auth}\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut head = String::new();
        s.read_to_string(&mut head).unwrap();
        assert!(head.starts_with("HTTP/1.0 204"), "{head}");
        assert!(
            head.contains("streamiq_session=") && head.contains("HttpOnly") && head.contains("SameSite=Strict"),
            "{head}"
        );
        let (code, _) = request(
            addr,
            "POST",
            "/api/v1/labels",
            &[
                ("Cookie", &format!("streamiq_session={token}")),
                ("Content-Type", "application/json"),
            ],
            b"{\"frame_id\": 1, \"mos\": 3}",
        );
        assert_eq!(code, 401, "a cookie never authorises a write");
        let (code, body) = get_as(addr, "/api/v1/streams/bars/frames?limit=many", &token);
        assert_eq!(code, 400);
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(err["field"], "query", "a JSON error naming the query: {err}");
        let (code, body) = get_as(addr, "/api/v1/streams/nope/frames", &token);
        assert_eq!(code, 404);
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(err["field"], "id");
        assert_eq!(get_as(addr, "/api/v1/frames/999999999/thumbnail.jpg", &token).0, 404);
        assert_eq!(get_as(addr, "/api/v1/frames/abc/thumbnail.jpg", &token).0, 400);
        // Labels and prompt sets too; the stream list and health stay open.
        for path in ["/api/v1/labels", "/api/v1/labels/summary", "/api/v1/prompts"] {
            assert_eq!(get(addr, path).0, 401, "{path}");
            assert_eq!(get_as(addr, path, &token).0, 200, "{path}");
        }
    })
    .await
    .unwrap();
    let took = d.stop().await;
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_streams_restart_and_never_affect_the_others() {
    let streams = r#"
[[streams]]
id = "good"
pipeline = "videotestsrc is-live=true pattern=zone-plate kx2=20 ky2=20 kt=1 ! video/x-raw,width=160,height=120,framerate=10/1"
sample_fps = 5.0
[[streams]]
id = "errors"
pipeline = "videotestsrc is-live=true pattern=zone-plate kt=1 ! video/x-raw,width=160,height=120,framerate=10/1 ! identity error-after=5"
sample_fps = 0
[[streams]]
id = "stalls"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=10/1 ! identity drop-probability=1.0"
[[streams]]
id = "unreachable"
uri = "rtsp://127.0.0.1:9/nothing-here"
"#;
    let d = InProcess::start(settings(&config_text(streams, ""))).await;
    let restarts = |m: &str, s: &str| {
        sample(
            m,
            &format!("streamiq_stream_restarts_total{{stream=\"{s}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let m = d
        .wait_for(Duration::from_secs(40), |m| {
            restarts(m, "errors") >= 2.0
                && restarts(m, "stalls") >= 1.0
                && restarts(m, "unreachable") >= 1.0
        })
        .await;
    assert!(restarts(&m, "errors") >= 2.0, "{m}");
    assert!(restarts(&m, "stalls") >= 1.0, "{m}");
    assert!(restarts(&m, "unreachable") >= 1.0, "{m}");
    assert_eq!(
        sample(&m, "streamiq_stream_up{stream=\"stalls\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "streamiq_stream_up{stream=\"unreachable\"}"),
        Some(0.0)
    );
    // The erroring stream delivered frames between its failures.
    assert!(sample(&m, "streamiq_frames_decoded_total{stream=\"errors\"}").unwrap() >= 5.0);
    // The good stream kept going the whole time.
    assert_eq!(sample(&m, "streamiq_stream_up{stream=\"good\"}"), Some(1.0));
    assert_eq!(restarts(&m, "good"), 0.0);
    let before = sample(&m, "streamiq_frames_scored_total{stream=\"good\"}").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sample(
        &d.metrics().await,
        "streamiq_frames_scored_total{stream=\"good\"}",
    )
    .unwrap();
    assert!(
        after > before,
        "good stream still scoring: {before} -> {after}"
    );
    let addr = d.addr;
    let streams: serde_json::Value = tokio::task::spawn_blocking(move || {
        serde_json::from_str(&text(addr, "/api/v1/streams")).unwrap()
    })
    .await
    .unwrap();
    let errors = streams
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "errors")
        .unwrap();
    assert!(errors["last_error"].as_str().is_some(), "{errors}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_are_counted_per_stream() {
    // A one-frame queue and every frame of a 1000 fps source: the model cannot keep up.
    let streams = r#"
[[streams]]
id = "flood"
pipeline = "videotestsrc is-live=true pattern=smpte ! video/x-raw,width=64,height=48,framerate=1000/1"
sample_fps = 0
"#;
    let extra = "[scorer]\nqueue_capacity = 1\nmax_batch = 1\nmax_wait = \"1ms\"\n";
    let d = InProcess::start(settings(&config_text(streams, extra))).await;
    let m = d
        .wait_for(Duration::from_secs(30), |m| {
            sample(
                m,
                "streamiq_frames_dropped_total{reason=\"queue_full\",stream=\"flood\"}",
            )
            .is_some_and(|v| v >= 10.0)
        })
        .await;
    let dropped = sample(
        &m,
        "streamiq_frames_dropped_total{reason=\"queue_full\",stream=\"flood\"}",
    )
    .unwrap();
    let decoded = sample(&m, "streamiq_frames_decoded_total{stream=\"flood\"}").unwrap();
    let scored = sample(&m, "streamiq_frames_scored_total{stream=\"flood\"}").unwrap();
    assert!(dropped >= 10.0, "{m}");
    // Every decoded frame is scored, dropped or still in flight (queue 1 + batch 1 + model 1).
    assert!(
        decoded - scored - dropped <= 4.0,
        "decoded {decoded} scored {scored} dropped {dropped}"
    );
    d.stop().await;
}

/// Makes a clip with ffmpeg's synthetic source: 12 s at 25 fps, black from 2 s to
/// 4 s, frozen from 7 s to 10 s, moving everywhere else.
fn make_clip(dir: &Path) -> PathBuf {
    let out = dir.join("segments.mp4");
    common::synth(
        "testsrc2=size=640x360:rate=25:duration=12",
        &[
            "-filter_complex",
            "[0]split[a][b];[a][b]freezeframes=first=175:last=249:replace=175,drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(t,2,3.99)'",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "23",
            "-pix_fmt",
            "yuv420p",
        ],
        &out,
    );
    out
}

/// `streamiq scan ARGS` run in `dir`, which must succeed; its standard output.
fn scan_ok(dir: &Path, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = Command::new(bin())
        .current_dir(dir)
        .arg("scan")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `streamiq scan --json` of one file, which must succeed; its report.
fn scan_json(cfg: &Path, clip: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json".as_ref(), "--config".as_ref(), cfg.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.push(clip.as_os_str());
    serde_json::from_slice(&scan_ok(Path::new("."), &args)).unwrap()
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("streamiq.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn scan_finds_black_and_freeze_segments() {
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(dir.path());
    let cfg = write_config(dir.path(), &config_text("", ""));
    let r = scan_json(&cfg, &clip, &[]);
    assert_eq!(r["frames_scored"], 300, "{r}");
    let segs = |k: &str| -> Vec<(f64, f64)> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|s| (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap()))
            .collect()
    };
    let black = segs("black_segments");
    let freeze = segs("freeze_segments");
    assert_eq!(black.len(), 1, "{r}");
    assert!(
        (black[0].0 - 2.0).abs() <= 0.1 && (black[0].1 - 4.0).abs() <= 0.1,
        "{black:?}"
    );
    assert_eq!(freeze.len(), 1, "{r}");
    assert!(
        (freeze[0].0 - 7.0).abs() <= 0.1 && (freeze[0].1 - 10.0).abs() <= 0.1,
        "{freeze:?}"
    );
    let mean = r["mean_score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean));

    let d = &r["freeze_segments"][0];
    let duration = d["duration"].as_f64().unwrap();
    assert!((duration - (freeze[0].1 - freeze[0].0)).abs() < 1e-9, "{d}");

    // Sampling at 5 fps finds the same segments, within a sample period.
    let r = scan_json(&cfg, &clip, &["--sample-fps", "5"]);
    let n = r["frames_scored"].as_u64().unwrap();
    assert!((59..=61).contains(&n), "{r}");
    assert_eq!(r["black_segments"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["freeze_segments"].as_array().unwrap().len(), 1, "{r}");

    // --format csv: a header and a row per file, segment counts and durations; a file
    // name a spreadsheet would run as a formula is quoted and neutralised.
    let odd = "=odd, name.mp4";
    std::fs::copy(&clip, dir.path().join(odd)).unwrap();
    let csv = ["--format", "csv", "--sample-fps", "5", "--config"].map(std::ffi::OsStr::new);
    let mut args = csv.to_vec();
    args.extend([cfg.as_os_str(), clip.as_os_str(), odd.as_ref()]);
    let text = String::from_utf8(scan_ok(dir.path(), &args)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let row: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(row.len(), header.len(), "{text}");
    assert_eq!(row[col("path")], clip.to_str().unwrap());
    assert_eq!(row[col("black_segments")], "1", "{text}");
    assert_eq!(row[col("freeze_segments")], "1", "{text}");
    assert_eq!(row[col("bars_segments")], "0", "{text}");
    let secs = |c: &str| row[col(c)].parse::<f64>().unwrap();
    assert!((secs("black_seconds") - 2.0).abs() <= 0.25, "{text}");
    assert!(
        (secs("freeze_longest_seconds") - 3.0).abs() <= 0.25,
        "{text}"
    );
    assert_eq!(row[col("failed")], "false");
    assert!(header.contains(&"attr_sharp"), "{text}");
    assert!(
        lines[2].starts_with("\"'=odd, name.mp4\","),
        "the odd name is quoted and neutralised: {text}"
    );
    let both = Command::new(bin())
        .args(["scan", "--json", "--format", "csv", "--config"])
        .arg(&cfg)
        .arg(&clip)
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2), "--json and --format conflict");
}

/// A still picture that an encoder re-encodes at every key frame (noisy content at
/// CRF 35, a GOP of 1 s: the picture changes by about 0.4 grey levels at the first GOP
/// boundary, then not at all) stays one freeze from 2 s to 10 s. FFmpeg's
/// `freezedetect`, which compares every frame with the first of the run at a fixed
/// noise floor, starts it at the first boundary (3 s) on the same file.
#[test]
fn a_freeze_holds_across_an_encoders_key_frame_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("refresh.mp4");
    common::synth(
        "testsrc2=size=960x540:rate=25:duration=12",
        &[
            "-filter_complex",
            "[0]noise=alls=20:allf=t,split[a][b];[a][b]freezeframes=first=50:last=249:replace=50",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "35",
            "-g",
            "25",
            "-keyint_min",
            "25",
            "-sc_threshold",
            "0",
            "-threads",
            "1",
            "-pix_fmt",
            "yuv420p",
        ],
        &clip,
    );
    let cfg = write_config(dir.path(), &config_text("", ""));
    let r = scan_json(&cfg, &clip, &["--sample-fps", "5"]);
    let freeze = r["freeze_segments"].as_array().unwrap();
    assert_eq!(freeze.len(), 1, "{r}");
    let (start, end) = (
        freeze[0]["start"].as_f64().unwrap(),
        freeze[0]["end"].as_f64().unwrap(),
    );
    assert!(
        (start - 2.0).abs() <= 0.25 && (end - 10.0).abs() <= 0.25,
        "{r}"
    );
    let ffmpeg = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostats", "-i"])
        .arg(&clip)
        .args(["-vf", "freezedetect", "-f", "null", "-"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&ffmpeg.stderr);
    let theirs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lavfi.freezedetect.freeze_"))
        .collect();
    println!("streamiq: {start:.2} s - {end:.2} s; ffmpeg freezedetect: {theirs:?}");
}

/// Colour bars (ffmpeg's SMPTE pattern, H.264-encoded) over a moving picture from 5 s
/// to 8 s are one bars segment, and never also a freeze though the pattern is still.
#[test]
fn scan_finds_colour_bars_as_a_segment_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("bars.mp4");
    common::synth(
        "testsrc2=size=640x360:rate=25:duration=10",
        &[
            "-filter_complex",
            "smptebars=size=640x360:rate=25[b];[0][b]overlay=enable='between(t,5,7.99)':shortest=1",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
        ],
        &clip,
    );
    let cfg = write_config(dir.path(), &config_text("", ""));
    let r = scan_json(&cfg, &clip, &["--sample-fps", "5"]);
    let bars = r["bars_segments"].as_array().unwrap();
    assert_eq!(bars.len(), 1, "{r}");
    let (start, end) = (
        bars[0]["start"].as_f64().unwrap(),
        bars[0]["end"].as_f64().unwrap(),
    );
    assert!(
        (start - 5.0).abs() <= 0.25 && (end - 8.0).abs() <= 0.25,
        "{r}"
    );
    assert_eq!(r["freeze_segments"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["black_segments"].as_array().unwrap().len(), 0, "{r}");
}

#[test]
fn scan_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &config_text("", ""));
    let clip = dir.path().join("short.mp4");
    common::synth(
        "testsrc2=size=320x180:rate=10:duration=1",
        &["-pix_fmt", "yuv420p"],
        &clip,
    );
    let junk = dir.path().join("junk.mp4");
    std::fs::write(&junk, b"this is not a video").unwrap();
    let missing = dir.path().join("missing.mp4");

    let out = Command::new(bin())
        .args(["scan", "--config"])
        .arg(&cfg)
        .arg(&clip)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("frames 10"));

    let out = Command::new(bin())
        .args(["scan", "--fail-below", "1.01", "--config"])
        .arg(&cfg)
        .arg(&clip)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    for bad in [&junk, &missing] {
        let out = Command::new(bin())
            .args(["scan", "--json", "--config"])
            .arg(&cfg)
            .arg(&clip)
            .arg(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", bad.display());
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0]["error"].is_null(),
            "the good file is still reported"
        );
        let reason = lines[1]["error"].as_str().unwrap();
        assert!(!reason.is_empty());
    }
}

/// Scan's gates for pipelines: a 3 s black segment and a 3 s freeze fail
/// `--fail-on-black 2s` / `--fail-on-freeze 2s` (exit 1, the gate named in the file's
/// JSON line), a clean file passes them, a longer limit passes all, the 5th-percentile
/// gate and the `[scan]` config keys work the same, and a bad value names its flag.
#[test]
fn scan_gates_fail_black_frozen_and_low_files_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let clip = |name: &str, filter: &str| {
        let out = dir.path().join(name);
        common::synth(
            "testsrc2=size=320x180:rate=10:duration=6",
            &[
                "-vf", filter, "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
            ],
            &out,
        );
        out
    };
    let clean = clip("clean.mp4", "null");
    let black = clip(
        "black.mp4",
        "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(t,1,3.99)'",
    );
    let frozen = clip(
        "frozen.mp4",
        "[0]split[a][b];[a][b]freezeframes=first=10:last=39:replace=10",
    );
    let scan = |args: &[&str], config: Option<&Path>| {
        let mut c = Command::new(bin());
        c.args(["scan", "--json"]);
        match config {
            Some(cfg) => c.arg("--config").arg(cfg),
            None => c.arg("--model").arg(bundle()),
        };
        let out = c
            .args(args)
            .args([&clean, &black, &frozen])
            .output()
            .unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (
            out.status.code(),
            lines,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let gates = |lines: &[serde_json::Value]| -> Vec<Vec<String>> {
        lines
            .iter()
            .map(|l| {
                l["failed_gates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_str().unwrap().to_string())
                    .collect()
            })
            .collect()
    };
    let (code, lines, err) = scan(&["--fail-on-black", "2s", "--fail-on-freeze", "2s"], None);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        gates(&lines),
        [vec![], vec!["black"], vec!["freeze"]],
        "{lines:?}"
    );
    assert_eq!(lines[0]["failed"], false);
    assert_eq!(lines[1]["failed"], true);

    let (code, lines, err) = scan(&["--fail-on-black", "5s", "--fail-on-freeze", "5s"], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(gates(&lines).iter().all(Vec::is_empty), "{lines:?}");

    let (code, lines, _) = scan(&["--fail-below-p5", "1.01"], None);
    assert_eq!(code, Some(1));
    assert!(
        gates(&lines).iter().all(|g| g == &["p5_below"]),
        "{lines:?}"
    );

    // The same gates as config keys; a flag overrides its key.
    let cfg = write_config(
        dir.path(),
        &config_text(
            "",
            "[scan]\nfail_on_black = \"2s\"\nfail_on_freeze = \"2s\"",
        ),
    );
    let (code, lines, err) = scan(&[], Some(&cfg));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(gates(&lines), [vec![], vec!["black"], vec!["freeze"]]);
    let (code, _, err) = scan(
        &["--fail-on-black", "9s", "--fail-on-freeze", "9s"],
        Some(&cfg),
    );
    assert_eq!(code, Some(0), "{err}");

    let (code, _, err) = scan(&["--fail-on-black", "2 fortnights"], None);
    assert_eq!(code, Some(2));
    assert!(err.contains("--fail-on-black"), "{err}");
    let (code, _, err) = scan(&["--fail-below", "NaN"], None);
    assert_eq!(code, Some(2));
    assert!(err.contains("--fail-below"), "{err}");
}

/// `scan -j 2` prints each file's line as it ends (a short file after a long one on the
/// command line comes out first), reports the same as `-j 1`, and `--per-frame` writes
/// one row per scored frame with its picture flags.
#[test]
fn scan_in_parallel_reports_files_as_they_end_with_per_frame_rows() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long.mp4");
    common::synth(
        "testsrc2=size=320x180:rate=10:duration=8",
        &[
            "-vf",
            "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(t,1,3.99)'",
            "-pix_fmt",
            "yuv420p",
        ],
        &long,
    );
    let short = dir.path().join("short.mp4");
    common::synth(
        "testsrc2=size=320x180:rate=10:duration=1",
        &["-pix_fmt", "yuv420p"],
        &short,
    );
    let per_frame = dir.path().join("frames.csv");
    let scan = |jobs: &str, extra: &[&std::ffi::OsStr]| -> Vec<serde_json::Value> {
        let out = Command::new(bin())
            .args(["scan", "--json", "-j", jobs, "--model"])
            .arg(bundle())
            .args(extra)
            .args([&long, &short])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let serial = scan("1", &[]);
    let parallel = scan("2", &["--per-frame".as_ref(), per_frame.as_os_str()]);
    let path = |v: &serde_json::Value| v["path"].as_str().unwrap().to_string();
    assert_eq!(
        serial.iter().map(path).collect::<Vec<_>>(),
        [long.display().to_string(), short.display().to_string()]
    );
    assert_eq!(
        parallel.iter().map(path).collect::<Vec<_>>(),
        [short.display().to_string(), long.display().to_string()],
        "the short file ends first"
    );
    for p in &parallel {
        let s = serial.iter().find(|s| path(s) == path(p)).unwrap();
        for key in [
            "frames_scored",
            "black_segments",
            "freeze_segments",
            "failed_gates",
            "error",
        ] {
            assert_eq!(s[key], p[key], "{key}");
        }
        let (a, b) = (
            s["mean_score"].as_f64().unwrap(),
            p["mean_score"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-4, "{a} {b}");
    }

    let text = std::fs::read_to_string(&per_frame).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&header[..3], ["path", "pts", "score"]);
    assert_eq!(&header[header.len() - 3..], ["black", "freeze", "bars"]);
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 90, "{text}");
    let mut black = 0;
    for r in rows.iter().filter(|r| r[0] == long.to_str().unwrap()) {
        assert_eq!(r.len(), header.len());
        let t: f64 = r[col("pts")].parse().unwrap();
        let score: f64 = r[col("score")].parse().unwrap();
        assert!((0.0..=1.0).contains(&score));
        let expect = if (1.0..3.95).contains(&t) { "1" } else { "0" };
        assert_eq!(r[col("black")], expect, "t = {t}");
        black += (r[col("black")] == "1") as usize;
    }
    assert_eq!(black, 30);

    // An unwritable --per-frame file is refused before anything is scanned.
    let out = Command::new(bin())
        .args(["scan", "--model"])
        .arg(bundle())
        .args(["--per-frame", "/nonexistent/dir/frames.csv"])
        .arg(&short)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--per-frame /nonexistent/dir/frames.csv")
    );
}

fn check_config(dir: &Path, text: &str) -> (i32, String) {
    let cfg = write_config(dir, text);
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_configs_exit_2_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "[[streams]]\nid = \"a\"\npipeline = \"videotestsrc\"\n";
    let (code, err) = check_config(dir.path(), &config_text(stream, ""));
    assert_eq!(code, 0, "{err}");

    for (extra, streams, needle) in [
        ("[scorer]\nmax_bach = 4", stream.to_string(), "max_bach"),
        (
            "[scorer]\nmax_batch = \"lots\"",
            stream.to_string(),
            "max_batch",
        ),
        ("", format!("{stream}{stream}"), "duplicate"),
        // Inside the [qc] table the helper opens.
        (
            "freeze_min_duration = \"2 fortnights\"",
            stream.to_string(),
            "qc.freeze_min_duration",
        ),
    ] {
        let text = config_text(&streams, extra);
        let (code, err) = check_config(dir.path(), &text);
        assert_eq!(code, 2, "{needle}: {err}");
        assert!(err.contains(needle), "{needle} not named in: {err}");
    }

    // A missing bundle and a bundle whose file does not match its checksum.
    let text =
        config_text(stream, "").replace(&bundle().display().to_string(), "/nonexistent/bundle");
    let (code, err) = check_config(dir.path(), &text);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/bundle/manifest.toml"), "{err}");

    let copy = dir.path().join("bundle");
    std::fs::create_dir(&copy).unwrap();
    for f in ["manifest.toml", "visual.onnx", "prompts.safetensors"] {
        std::fs::copy(bundle().join(f), copy.join(f)).unwrap();
    }
    let mut onnx = std::fs::read(copy.join("visual.onnx")).unwrap();
    onnx.truncate(onnx.len() / 2);
    std::fs::write(copy.join("visual.onnx"), onnx).unwrap();
    let text = config_text(stream, "")
        .replace(&bundle().display().to_string(), &copy.display().to_string());
    let (code, err) = check_config(dir.path(), &text);
    assert_eq!(code, 2);
    assert!(
        err.contains("visual.onnx") && err.contains("sha256"),
        "{err}"
    );

    // The daemon refuses the same at start, with exit code 2.
    let cfg = write_config(dir.path(), &text);
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("visual.onnx"));
}

/// A daemon built without the torch feature refuses `scorer.backend = "torch"` at start,
/// naming the key: `check-config` and `run` alike, exit 2.
#[cfg(not(feature = "torch"))]
#[test]
fn a_build_without_torch_refuses_the_torch_backend() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("", "[scorer]\nbackend = \"torch\"\n");
    let (code, err) = check_config(dir.path(), &text);
    assert_eq!(code, 2);
    assert!(
        err.contains("scorer.backend = \"torch\"") && err.contains("--features torch"),
        "{err}"
    );
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(write_config(dir.path(), &text))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("scorer.backend = \"torch\""));
}

#[test]
fn every_shipped_config_is_valid() {
    for entry in std::fs::read_dir(repo().join("config")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let c = streamiq::config::Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
            c.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
    let dash =
        std::fs::read_to_string(repo().join("config/grafana/streamiq-dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
}

/// The `streamiq_*` names in `text`, histogram suffixes folded onto their family.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = std::collections::BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("streamiq_").map(|p| p + i) {
        let start_ok = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let end = text[at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |p| at + p);
        if start_ok {
            let name = &text[at..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(family.to_string());
        }
        i = end.max(at + 1);
    }
    names
}

/// Every metric the alert rules and the dashboard use is one the daemon exports, and
/// every alert's runbook_url has its entry in the README.
#[test]
fn alerts_and_dashboard_use_only_exported_metrics_and_documented_runbooks() {
    let metrics = streamiq::metrics::Metrics::new();
    let stream = metrics.stream("s");
    stream.attribute("sharp").set(0.5);
    metrics.batch_size.observe(1.0);
    metrics.inference_duration.observe(0.1);
    metrics.frame_latency.observe(0.1);
    metrics.set_build_info("1.31.1", "1.22.0", "cpu");
    // What a replica that follows the cluster's primary exports besides.
    metrics.register_follower();
    for c in [
        &metrics.provider_failures,
        &metrics.prompt_rejects,
        &metrics.inference_errors,
    ] {
        c.with_label_values(&["x"]).inc();
    }
    let exported = metric_names(&metrics.encode());
    let files = [
        "config/alerts/streamiq.rules.yml",
        "config/grafana/streamiq-dashboard.json",
    ];
    for file in files {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the daemon does not export: {unknown:?}"
        );
    }
    // Every dashboard query is valid PromQL (checked by promtool as recording rules,
    // with the dashboard's variables filled in) and filters by the instance variable.
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(files[1])).unwrap()).unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 20, "{exprs:?}");
    let dir = tempfile::tempdir().unwrap();
    let mut rules_yml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        assert!(e.contains("$instance"), "not filtered by instance: {e}");
        let promql = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
            .replace("$stream", ".*");
        rules_yml.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(&promql).unwrap()
        ));
    }
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, rules_yml).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "instance", "stream"]);
    assert!(
        !dash.to_string().contains("DS_PROMETHEUS"),
        "works with file provisioning"
    );

    let rules = std::fs::read_to_string(repo().join(files[0])).unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 18, "{alerts:?}");
    for alert in alerts {
        let anchor = format!("runbook-{}", alert.to_lowercase());
        assert!(
            rules.contains(&format!("runbook_url: 'README.md#{anchor}'")),
            "{alert} has no runbook_url"
        );
        assert!(
            readme.contains(&format!("id=\"{anchor}\"")),
            "README.md has no runbook entry for {alert}"
        );
    }
}

#[test]
fn scan_on_photo_pans_matches_truth_without_false_segments() {
    // Slow pans and zooms over real photographs, H.264 at CRF 30 (visible compression
    // noise), with a black and two frozen segments inserted.
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("pans.mp4");
    let out = Command::new(venv_python())
        .arg(repo().join("scripts/make_pan_clip.py"))
        .arg(&clip)
        .args([
            "--seconds",
            "16",
            "--size",
            "640x360",
            "--shot",
            "4",
            "--crf",
            "30",
        ])
        .args([
            "--black",
            "2.5:4.6",
            "--freeze",
            "7:9.5",
            "--freeze",
            "12.2:14.4",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truth: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cfg = write_config(dir.path(), &config_text("", ""));
    for sample_fps in [None, Some("2")] {
        let mut cmd = Command::new(bin());
        cmd.args(["scan", "--json", "--config"])
            .arg(&cfg)
            .arg(&clip);
        if let Some(f) = sample_fps {
            cmd.args(["--sample-fps", f]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for kind in ["black_segments", "freeze_segments"] {
            let want = truth[kind].as_array().unwrap();
            let have = got[kind].as_array().unwrap();
            assert_eq!(want.len(), have.len(), "{kind} at {sample_fps:?}: {got}");
            for (w, h) in want.iter().zip(have) {
                for edge in ["start", "end"] {
                    let (w, h) = (w[edge].as_f64().unwrap(), h[edge].as_f64().unwrap());
                    assert!((w - h).abs() <= 0.5, "{kind} {edge}: truth {w}, got {h}");
                }
            }
        }
    }
}

#[test]
fn sigterm_stops_the_daemon_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let streams = r#"
[[streams]]
id = "live"
pipeline = "videotestsrc is-live=true pattern=zone-plate kt=1 ! video/x-raw,width=160,height=120,framerate=10/1"
"#;
    let cfg = write_config(dir.path(), &config_text(streams, ""));
    let mut c = Command::new(bin());
    c.args(["run", "--config"])
        .arg(&cfg)
        .env("STREAMIQ_LOG", "info");
    let mut daemon = Process::spawn(c);
    let t0 = Instant::now();
    while get(daemon.addr, "/readyz").0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = daemon.log().len();
    daemon.signal("TERM");
    let t0 = Instant::now();
    let code = daemon.wait();
    assert!(t0.elapsed() < Duration::from_secs(10));
    let rest = daemon.log().split_off(before);
    assert_eq!(code.code(), Some(0), "{rest:?}");
    let pos = |needle: &str| {
        rest.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not logged: {rest:?}"))
    };
    assert!(pos("Shutting down") < pos("queue drained"));
    assert!(pos("queue drained") < pos("Stopped"));
}

#[test]
fn distort_writes_a_deterministic_labelled_set_that_eval_reads() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.png");
    common::synth("testsrc2=size=200x150:rate=1", &["-frames:v", "1"], &src);
    let run = |out: &Path| {
        let o = Command::new(bin())
            .args(["distort", "--size", "96", "--seed", "3", "--out"])
            .arg(out)
            .arg(&src)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out.join("labels.csv")).unwrap()
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let csv = run(&a);
    assert_eq!(csv, run(&b));
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 1 + 13 * 5, "reference + 13 kinds x 5 levels");
    for row in &rows {
        let path = row.split(',').next().unwrap();
        let (x, y) = (
            std::fs::read(a.join(path)).unwrap(),
            std::fs::read(b.join(path)).unwrap(),
        );
        assert!(x == y, "{path} differs between runs with the same seed");
    }
    let levels: Vec<f64> = rows
        .iter()
        .filter(|r| r.contains(",h264,"))
        .map(|r| r.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(
        levels.windows(2).all(|w| w[1] < w[0]),
        "targets decrease with level: {levels:?}"
    );

    let o = Command::new(bin())
        .args(["eval", "--json", "--splits", "3", "--model"])
        .arg(bundle())
        .arg("--labels")
        .arg(a.join("labels.csv"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["all"]["n"], 66);
    assert_eq!(r["per_type"].as_object().unwrap().len(), 13, "{r}");
    assert!(r["all"]["srcc"].as_f64().unwrap().abs() <= 1.0);

    // The same pictures as operator labels (the kind as the stream, the target as a
    // 0-1 score, the PNG as the stored frame): `export-labels` writes a set that `eval`
    // reads directly and scores exactly as the original.
    let db = dir.path().join("labels.sqlite");
    let store = streamiq::labels::LabelStore::open(&db).unwrap();
    for (i, row) in rows.iter().enumerate() {
        let f: Vec<&str> = row.split(',').collect();
        store
            .insert(&streamiq::labels::NewLabel {
                stream: f[2].to_string(),
                frame_id: i as u64,
                captured: 0.0,
                pts: None,
                rating: streamiq::labels::Rating::Score(f[1].parse().unwrap()),
                labeller: "=cmd|' /c calc'!A1".into(),
                embedding: vec![1.0, 0.0],
                provenance: streamiq::labels::Provenance {
                    bundle: "b".into(),
                    model_sha256: "aa".into(),
                },
                prompt_version: 0,
                model_score: 0.5,
                thumbnail: vec![0xff, 0xd8],
                frame: Some(std::fs::read(a.join(f[0])).unwrap()),
            })
            .unwrap();
    }
    drop(store);
    let export = |out: &Path| {
        Command::new(bin())
            .args(["export-labels", "--db"])
            .arg(&db)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let exported = dir.path().join("exported");
    let o = export(&exported);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(exported.join("labels.csv")).unwrap();
    assert!(text.starts_with("path,mos,type,"), "{text}");
    assert!(
        text.contains(",'=cmd|' /c calc'!A1,"),
        "a formula labeller is neutralised: {text}"
    );
    let o = Command::new(bin())
        .args(["eval", "--json", "--splits", "3", "--model"])
        .arg(bundle())
        .arg("--labels")
        .arg(exported.join("labels.csv"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["all"]["n"], 66);
    for key in ["srcc", "plcc"] {
        let (x, y) = (
            r["all"][key].as_f64().unwrap(),
            e["all"][key].as_f64().unwrap(),
        );
        assert!(
            (x - y).abs() < 1e-9,
            "{key}: {x} on the set, {y} on its export"
        );
    }
    // The same frames scored twice can differ in the last bits (batches form by timing).
    for (kind, m) in r["per_type"].as_object().unwrap() {
        assert_eq!(m["n"], e["per_type"][kind]["n"], "{kind} n");
        for key in ["srcc", "plcc"] {
            let (x, y) = (
                m[key].as_f64().unwrap(),
                e["per_type"][kind][key].as_f64().unwrap(),
            );
            assert!((x - y).abs() < 1e-9, "{kind} {key}: {x} and {y}");
        }
    }
    // A directory that holds something is never written into.
    let o = export(&exported);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not empty"));
}

/// Hundreds of still images scanned one after another in one process: each must give
/// its frame at once. (decodebin3 in GStreamer 1.22 now and then never finished stream
/// selection on one of them: a 10 s stall, twice in a row failing the file.)
#[test]
fn hundreds_of_still_images_scan_without_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let mut sources = Vec::new();
    for hue in [0, 90, 180, 270] {
        let src = dir.path().join(format!("src{hue}.png"));
        common::synth(
            &format!("testsrc2=size=160x120:rate=1,hue=h={hue}"),
            &["-frames:v", "1"],
            &src,
        );
        sources.push(src);
    }
    let set = dir.path().join("set");
    common::run_ok(
        Command::new(bin())
            .args(["distort", "--seed", "0", "--size", "120", "--out"])
            .arg(&set)
            .args(&sources),
    );
    let mut images: Vec<_> = std::fs::read_dir(set.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    images.sort();
    assert_eq!(images.len(), 4 * 66);
    let ran = common::run_ok(
        Command::new(bin())
            .args(["score", "--model"])
            .arg(bundle())
            .args(&images)
            .args(&images),
    );
    assert!(
        !ran.stderr.contains("stalled"),
        "a still image stalled:\n{}",
        ran.stderr
    );
    assert_eq!(
        ran.stdout.lines().count(),
        2 * images.len(),
        "{}",
        ran.text()
    );
}

#[test]
fn crops_view_scores_every_frame_at_native_scale() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("c.mp4");
    common::synth(
        "testsrc2=size=1280x720:rate=10:duration=2",
        &["-pix_fmt", "yuv420p"],
        &clip,
    );
    let scan = |views: &str| {
        let extra = format!("[scorer]\nviews = \"{views}\"");
        let cfg = write_config(dir.path(), &config_text("", &extra));
        scan_json(&cfg, &clip, &[])
    };
    let (global, crops) = (scan("global"), scan("crops:4"));
    assert_eq!(global["frames_scored"], 20);
    assert_eq!(crops["frames_scored"], 20);
    let (g, c) = (
        global["mean_score"].as_f64().unwrap(),
        crops["mean_score"].as_f64().unwrap(),
    );
    assert!((0.0..=1.0).contains(&c));
    assert!(
        (g - c).abs() > 1e-6,
        "crops see other pixels than the global view"
    );
}

/// Incidents: a 1280x720 stream with a black and a frozen stretch keeps, for each onset,
/// the frames around it on disk at the source's resolution (capped at
/// `labels.incident_max_px`), listed and served behind the token, and labellable with
/// the embedding they were scored with; a restart with a lower `labels.incidents_max`
/// deletes the oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_frames_are_kept_at_native_resolution_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("incidents.mp4");
    common::synth(
        "testsrc2=size=1280x720:rate=25:duration=10",
        &[
            "-filter_complex",
            "[0]split[a][b];[a][b]freezeframes=first=150:last=224:replace=150,drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(t,1.5,3.49)'",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
        ],
        &clip,
    );
    let incidents = dir.path().join("incidents");
    let config = |max: usize| {
        let streams = format!(
            "[[streams]]\nid = \"cam\"\nuri = \"file://{}\"\nsample_fps = 5.0\n",
            clip.display()
        );
        let extra = format!(
            "black_min_duration = \"1s\"\nfreeze_min_duration = \"1s\"\n[labels]\nincidents_dir = \"{}\"\nincidents_max = {max}\nincident_max_px = 960\nincident_quality_below = 0.0\n",
            incidents.display()
        );
        let mut s = settings(&config_text(&streams, &extra));
        s.server.api_token_file = dir.path().join("api-token");
        s.labels_db = dir.path().join("labels.sqlite");
        s
    };
    let d = InProcess::start(config(10)).await;
    let token = std::fs::read_to_string(dir.path().join("api-token"))
        .unwrap()
        .trim()
        .to_string();
    let addr = d.addr;
    let token2 = token.clone();
    let (black, freeze, (relabel, first)) = tokio::task::spawn_blocking(move || {
        let kinds = || -> Vec<serde_json::Value> {
            json_as(addr, "/api/v1/incidents", &token)["incidents"]
                .as_array()
                .unwrap()
                .clone()
        };
        let all = common::poll(
            Duration::from_secs(60),
            "a black and a freeze incident",
            || {
                let all = kinds();
                let has = |k: &str| all.iter().any(|i| i["kind"] == k);
                (has("black") && has("freeze")).then_some(all)
            },
        );
        // Behind the token.
        assert_eq!(get(addr, "/api/v1/incidents").0, 401);
        let find = |k: &str| all.iter().find(|i| i["kind"] == k).unwrap().clone();
        let (black, freeze) = (find("black"), find("freeze"));
        for inc in [&black, &freeze] {
            assert_eq!(inc["stream"], "cam");
            let frames = inc["frames"].as_array().unwrap();
            assert!((2..=4).contains(&frames.len()), "{inc}");
            assert_eq!(
                frames.iter().filter(|f| f["onset"] == true).count(),
                1,
                "{inc}"
            );
            for f in frames {
                assert_eq!(
                    (f["width"].as_u64(), f["height"].as_u64()),
                    (Some(960), Some(540)),
                    "{f}"
                );
                let (code, png) = get_as(addr, f["url"].as_str().unwrap(), &token);
                assert_eq!(code, 200);
                let img = image::load_from_memory(&png).unwrap();
                assert_eq!((img.width(), img.height()), (960, 540));
            }
        }
        // The frame at which the black segment became active (the alarm) is black at
        // native resolution.
        let frames = black["frames"].as_array().unwrap();
        let onset = frames.iter().position(|f| f["onset"] == true).unwrap();
        let png = get_as(addr, frames[onset]["url"].as_str().unwrap(), &token).1;
        let img = image::load_from_memory(&png).unwrap().to_luma8();
        let mean = img.pixels().map(|p| p.0[0] as f64).sum::<f64>() / (960.0 * 540.0);
        assert!(mean < 30.0, "{mean}: {black}");
        // Bad ids and frames: 404 naming the field.
        for path in [
            "/api/v1/incidents/..%2Fapi-token/frames/0.png".to_string(),
            format!(
                "/api/v1/incidents/{}/frames/99.png",
                black["id"].as_str().unwrap()
            ),
            format!(
                "/api/v1/incidents/{}/frames/x.png",
                black["id"].as_str().unwrap()
            ),
        ] {
            assert_eq!(get_as(addr, &path, &token).0, 404, "{path}");
        }

        // Labelled like a recent frame, with the embedding it was scored with.
        let f = frames
            .iter()
            .find(|f| f["labellable"] == true)
            .expect("a scored frame");
        let body = format!(
            r#"{{"incident": {}, "frame": {}, "mos": 1}}"#,
            black["id"], f["n"]
        );
        let (code, stored) = post_label(addr, Some(&token), &body);
        assert_eq!(code, 201, "{stored}");
        assert_eq!(stored["stream"], "cam");
        assert_eq!(stored["target"], 0.0);
        let score = stored["model_score"].as_f64().unwrap();
        assert!(
            (score - f["score"].as_f64().unwrap()).abs() < 1e-6,
            "{stored} {f}"
        );
        let body = format!(r#"{{"incident": {}, "frame": 63, "mos": 1}}"#, black["id"]);
        assert_eq!(post_label(addr, Some(&token), &body).0, 404);
        let body = r#"{"incident": "0000000000000-cam-nothing", "frame": 0, "mos": 1}"#;
        assert_eq!(post_label(addr, Some(&token), body).0, 404);
        // A frame of the newer incident too, to label again after a restart.
        let newer = [&black, &freeze]
            .into_iter()
            .max_by_key(|i| i["id"].as_str().unwrap().to_string())
            .unwrap();
        let n = newer["frames"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["labellable"] == true)
            .expect("a scored frame")["n"]
            .clone();
        let body = format!(r#"{{"incident": {}, "frame": {n}, "mos": 2}}"#, newer["id"]);
        let (code, stored) = post_label(addr, Some(&token), &body);
        assert_eq!(code, 201, "{stored}");
        (black, freeze, (body, stored))
    })
    .await
    .unwrap();
    let m = d.metrics().await;
    assert_eq!(
        sample(
            &m,
            "streamiq_incidents_total{kind=\"black\",stream=\"cam\"}"
        ),
        Some(1.0),
        "{m}"
    );
    d.stop().await;

    // A lower bound on the next start deletes the oldest: the newer of the two stays.
    let newest = [&black, &freeze]
        .into_iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .max()
        .unwrap();
    let d = InProcess::start(config(1)).await;
    // Frame ids count within a run: the incident's frame labelled again after the
    // restart replaces the label of the run that scored it, never one of this run's.
    let addr = d.addr;
    let again = tokio::task::spawn_blocking(move || post_label(addr, Some(&token2), &relabel))
        .await
        .unwrap();
    assert_eq!(again.0, 201, "{}", again.1);
    assert_eq!(again.1["replaced"], true, "{} after {first}", again.1);
    assert_eq!(
        again.1["run_id"], first["run_id"],
        "{} after {first}",
        again.1
    );
    let kept: Vec<String> = std::fs::read_dir(&incidents)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(kept.len() <= 2, "{kept:?}");
    assert!(kept.contains(&newest) || kept.len() == 1, "{kept:?}");
    d.stop().await;
    let kept: Vec<String> = std::fs::read_dir(&incidents)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
}

/// Hostile input on every route: traversal, SQL-looking, huge and odd ids; bodies that
/// are malformed, of the wrong type, oversized or empty; requests without the token.
/// Nothing answers 5xx, every error is a JSON object naming the field, nothing protected
/// answers without the token, and no response ever holds the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_on_every_route_gets_a_clear_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let streams = "[[streams]]\nid = \"cam\"\npipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=5/1\"\nsample_fps = 5.0\n";
    let mut s = settings(&config_text(
        streams,
        &format!(
            "[labels]\nincidents_dir = \"{}\"\n",
            dir.path().join("incidents").display()
        ),
    ));
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    s.model.prompts_dir = dir.path().join("prompts");
    let d = InProcess::start(s).await;
    let token = std::fs::read_to_string(dir.path().join("api-token"))
        .unwrap()
        .trim()
        .to_string();
    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        let ids = [
            "..%2F..%2Fapi-token".to_string(),
            "..".to_string(),
            "1%27%20OR%201%3D1--".to_string(),
            "1%3B%20DROP%20TABLE%20labels".to_string(),
            "99999999999999999999999999".to_string(),
            "-1".to_string(),
            "%00".to_string(),
            "%E2%80%AE".to_string(),
            "x".repeat(4000),
        ];
        // (template, whether some of the ids are valid there: a query value such as -1)
        let templates = [
            ("/api/v1/streams/{}/frames", false),
            ("/api/v1/streams/cam/frames?limit={}", true),
            ("/api/v1/frames/{}/thumbnail.jpg", false),
            ("/api/v1/labels/{}/thumbnail.jpg", false),
            ("/api/v1/labels?since={}", true),
            ("/api/v1/labels?limit={}", true),
            ("/api/v1/labels?format={}", false),
            ("/api/v1/incidents/{}/frames/0.png", false),
            ("/api/v1/incidents/1700000000000-cam-black/frames/{}", false),
            ("/static/{}", false),
            ("/{}", false),
        ];
        let check = |method: &str,
                     path: &str,
                     headers: &[(&str, &str)],
                     body: &[u8],
                     authed: bool,
                     may_succeed: bool| {
            let (code, head, bytes) =
                common::http::request_with_head(addr, method, path, headers, body);
            let text = String::from_utf8_lossy(&bytes);
            let short: String = path.chars().take(90).collect();
            assert!(code < 500, "{method} {short}: {code} {text}");
            assert!(
                (400..500).contains(&code) || (may_succeed && authed),
                "{method} {short}: {code} {text}"
            );
            assert!(
                !text.contains(&token) && !head.contains(&token),
                "{method} {short} leaks the token"
            );
            if (400..500).contains(&code) && code != 405 {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("{method} {short}: {code}: not JSON: {text}"));
                assert!(
                    v["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{method} {short}: {v}"
                );
                assert!(v["field"].is_string(), "{method} {short}: {v}");
            }
            if !authed && path.starts_with("/api/v1/") {
                assert!(
                    code == 401 || code == 404 || code == 405,
                    "{method} {short} without the token: {code}"
                );
            }
        };
        let auth = format!("Bearer {token}");
        for (t, may_succeed) in templates {
            for id in &ids {
                let path = t.replace("{}", id);
                check(
                    "GET",
                    &path,
                    &[("Authorization", &auth)],
                    b"",
                    true,
                    may_succeed,
                );
                if path.starts_with("/api/v1/") {
                    check("GET", &path, &[], b"", false, false);
                }
            }
        }
        let big = vec![b'{'; 2 << 20];
        for path in [
            "/api/v1/labels",
            "/api/v1/prompts/rollback",
            "/api/v1/prompts/reload",
            "/api/v1/session",
        ] {
            for (ctype, body) in [
                ("application/json", &b"{\"frame_id\": "[..]),
                ("application/json", &b"[1, 2, 3]"[..]),
                ("application/json", &b"\"\\u0000\""[..]),
                (
                    "application/json",
                    &b"{\"version\": -1, \"frame_id\": \"1 OR 1=1\"}"[..],
                ),
                ("text/plain", &b"{\"frame_id\": 1, \"mos\": 3}"[..]),
                ("application/json", &big[..]),
                // A label forwarded by a replica: the wrong type, hostile fields.
                (
                    "application/json",
                    &b"{\"mos\": 3, \"forwarded\": \"x\"}"[..],
                ),
                (
                    "application/json",
                    &br#"{"mos": 3, "forwarded": {"replica": 1, "run_id": "1 OR 1=1",
                        "frame_id": 1, "stream": "../x", "captured": 1, "pts": null,
                        "bundle": "b", "model_sha256": "00", "prompt_version": 0,
                        "model_score": 0.5, "embedding": "%%%", "thumbnail": "", "frame": null}}"#
                        [..],
                ),
            ] {
                let headers = [("Authorization", auth.as_str()), ("Content-Type", ctype)];
                let (code, _, bytes) =
                    common::http::request_with_head(addr, "POST", path, &headers, body);
                let text = String::from_utf8_lossy(&bytes);
                // reload and session take no body: they may succeed (204/200); nothing may fail.
                assert!(
                    code < 500,
                    "POST {path} {ctype} {}: {code} {text}",
                    body.len()
                );
                assert!(!text.contains(&token), "POST {path} leaks the token");
                if path == "/api/v1/labels" || path == "/api/v1/prompts/rollback" {
                    check("POST", path, &headers, body, true, false);
                }
                check("POST", path, &[("Content-Type", ctype)], body, false, false);
            }
        }
        check("GET", "/api/v1/prompts/active", &[], b"", false, false);
        // Nothing was stored, and the daemon still answers.
        assert_eq!(
            json_as(addr, "/api/v1/labels", &token),
            serde_json::json!([])
        );
        assert_eq!(get(addr, "/healthz").0, 200);
        assert!(!text(addr, "/metrics").is_empty());
    })
    .await
    .unwrap();
    d.stop().await;
}

/// Streams at run time: `POST /api/v1/streams` validates like the config, starts the
/// stream (scored and on `/metrics` within seconds) and keeps it across a restart;
/// `DELETE` removes it for good; the config's streams are refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_added_and_removed_at_run_time_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state/runtime-streams.toml");
    let config = || {
        let streams = "[[streams]]\nid = \"cam\"\npipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=5/1\"\nsample_fps = 5.0\n";
        let mut s = settings(&config_text(streams, ""));
        s.server.api_token_file = dir.path().join("api-token");
        s.server.runtime_streams = file.clone();
        s.labels_db = dir.path().join("labels.sqlite");
        s
    };
    let d = InProcess::start(config()).await;
    let token = std::fs::read_to_string(dir.path().join("api-token"))
        .unwrap()
        .trim()
        .to_string();
    let addr = d.addr;
    let t = token.clone();
    tokio::task::spawn_blocking(move || {
        let post = |body: &str, token: Option<&str>| {
            let (code, text) = common::http(addr, "POST", "/api/v1/streams", token, body);
            (code, serde_json::from_str::<serde_json::Value>(&text).unwrap_or(serde_json::Value::Null))
        };
        let new = r#"{"id": "added", "pipeline": "videotestsrc is-live=true pattern=ball ! video/x-raw,width=64,height=48,framerate=5/1", "sample_fps": 5.0}"#;
        assert_eq!(post(new, None).0, 401);
        let (code, v) = post(new, Some(&t));
        assert_eq!(code, 201, "{v}");
        assert_eq!((v["id"].as_str(), v["added_at_run_time"].as_bool()), (Some("added"), Some(true)));
        common::wait_until("the added stream scored on /metrics", || {
            sample(&text(addr, "/metrics"), "streamiq_frames_scored_total{stream=\"added\"}")
                .is_some_and(|v| v >= 2.0)
        });
        for (body, status, field) in [
            (new, 409, "id"),
            (r#"{"id": "cam", "pipeline": "videotestsrc"}"#, 409, "id"),
            (r#"{"id": "Bad Id", "pipeline": "videotestsrc"}"#, 422, "id"),
            (r#"{"id": "x"}"#, 422, "uri"),
            (r#"{"id": "x", "uri": "/no/scheme.mp4"}"#, 422, "uri"),
            (r#"{"id": "x", "pipeline": "videotestsrc", "sample_fps": -3}"#, 422, "sample_fps"),
            (r#"{"id": "x", "pipeline": "videotestsrc", "colour": 1}"#, 422, "body"),
            (r#"{"id": "x", "#, 400, "body"),
        ] {
            let (code, v) = post(body, Some(&t));
            assert_eq!((code, v["field"].as_str()), (status, Some(field)), "{body}: {v}");
        }
        let (code, body) = common::http(addr, "DELETE", "/api/v1/streams/cam", Some(&t), "");
        assert_eq!(code, 409, "{body}");
        assert!(body.contains("configuration file"), "{body}");
        assert_eq!(common::http(addr, "DELETE", "/api/v1/streams/nothing", Some(&t), "").0, 404);
        assert_eq!(common::http(addr, "DELETE", "/api/v1/streams/added", None, "").0, 401);
    })
    .await
    .unwrap();
    d.stop().await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "a source may hold credentials");
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("id = \"added\"")
        );
    }

    // Back after a restart; removed for good.
    let d = InProcess::start(config()).await;
    let addr = d.addr;
    let t = token.clone();
    tokio::task::spawn_blocking(move || {
        let ids = || -> Vec<String> {
            serde_json::from_str::<serde_json::Value>(&text(addr, "/api/v1/streams"))
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(ids(), ["cam", "added"]);
        assert_eq!(
            common::http(addr, "DELETE", "/api/v1/streams/added", Some(&t), "").0,
            204
        );
        assert_eq!(ids(), ["cam"]);
        common::wait_until("the removed stream off /metrics", || {
            sample(
                &text(addr, "/metrics"),
                "streamiq_stream_up{stream=\"added\"}",
            )
            .is_none()
        });
    })
    .await
    .unwrap();
    d.stop().await;
    let d = InProcess::start(config()).await;
    let listed: serde_json::Value = serde_json::from_str(&text(d.addr, "/api/v1/streams")).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    d.stop().await;

    // A runtime file that holds a config stream's id is refused at start, naming it.
    std::fs::write(
        &file,
        "[[streams]]\nid = \"cam\"\npipeline = \"videotestsrc\"\n",
    )
    .unwrap();
    let err = streamiq::run(config(), tokio_util::sync::CancellationToken::new(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("runtime-streams.toml") && err.contains("\"cam\""),
        "{err}"
    );
}

/// `sample = "keyframes"`: only key frames reach the decoder (a 1-s GOP clip read as
/// fast as possible gives one frame per second, each at a key frame's time, where fps
/// sampling at 5 gives five); and a source without timestamps or framerate
/// (`multipartdemux ! jpegdec` over TCP) is sampled by the wall clock and scores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyframe_sampling_and_sources_without_timestamps() {
    // Dropping delta units must not make GStreamer log criticals (one per frame would
    // flood the journal): they are counted here.
    let criticals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = {
        use gstreamer::glib;
        let criticals = criticals.clone();
        glib::log_set_handler(
            Some("GStreamer"),
            glib::LogLevels::LEVEL_CRITICAL,
            false,
            false,
            move |_, _, message| {
                eprintln!("GStreamer-CRITICAL: {message}");
                criticals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("gop.mp4");
    common::synth(
        "testsrc2=size=320x180:rate=25:duration=10",
        &[
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-g",
            "25",
            "-keyint_min",
            "25",
            "-sc_threshold",
            "0",
            "-pix_fmt",
            "yuv420p",
        ],
        &clip,
    );
    let port = common::free_port();
    /// Kills the sender however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _sender = Killed(
        Command::new("gst-launch-1.0")
            .args([
                "-q",
                "videotestsrc",
                "is-live=true",
                "!",
                "video/x-raw,width=160,height=120,framerate=10/1",
                "!",
                "jpegenc",
                "!",
                "multipartmux",
                "!",
                "tcpserversink",
                "host=127.0.0.1",
            ])
            .arg(format!("port={port}"))
            .spawn()
            .unwrap(),
    );
    let streams = format!(
        "[[streams]]\nid = \"keys\"\nuri = \"file://{c}\"\nsample = \"keyframes\"\nsample_fps = 5.0\nrealtime = false\n\
         [[streams]]\nid = \"fps\"\nuri = \"file://{c}\"\nsample_fps = 5.0\nrealtime = false\n\
         [[streams]]\nid = \"mjpeg\"\npipeline = \"tcpclientsrc host=127.0.0.1 port={port} ! multipartdemux ! jpegdec\"\nsample_fps = 2.0\n",
        c = clip.display()
    );
    let mut s = settings(&config_text(&streams, "[labels]\nrecent_frames = 100\n"));
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    let d = InProcess::start(s).await;
    let token = std::fs::read_to_string(dir.path().join("api-token"))
        .unwrap()
        .trim()
        .to_string();
    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        let metrics = || text(addr, "/metrics");
        common::wait_until_for(
            Duration::from_secs(60),
            "both file streams finished and the MJPEG one scoring",
            || {
                let m = metrics();
                let phase = |id: &str| {
                    serde_json::from_str::<serde_json::Value>(&text(addr, "/api/v1/streams"))
                        .unwrap()
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|s| s["id"] == id)
                        .map(|s| s["phase"].clone())
                };
                // Finished, and every frame sampled has been scored.
                let settled = |id: &str| {
                    phase(id) == Some(serde_json::json!("finished"))
                        && sample(
                            &m,
                            &format!("streamiq_frames_scored_total{{stream=\"{id}\"}}"),
                        ) == sample(
                            &m,
                            &format!("streamiq_frames_decoded_total{{stream=\"{id}\"}}"),
                        )
                };
                settled("keys")
                    && settled("fps")
                    && sample(&m, "streamiq_frames_scored_total{stream=\"mjpeg\"}")
                        .is_some_and(|v| v >= 3.0)
            },
        );
        let m = metrics();
        let scored = |id: &str| {
            sample(
                &m,
                &format!("streamiq_frames_scored_total{{stream=\"{id}\"}}"),
            )
            .unwrap()
        };
        assert_eq!(scored("keys"), 10.0, "one key frame a second: {m}");
        assert_eq!(scored("fps"), 50.0, "{m}");
        let frames = json_as(addr, "/api/v1/streams/keys/frames?limit=100", &token);
        for f in frames.as_array().unwrap() {
            let pts = f["pts"].as_f64().unwrap();
            assert!(
                (pts - pts.round()).abs() < 1e-6,
                "a key frame at a whole second: {pts}"
            );
        }
    })
    .await
    .unwrap();
    d.stop().await;
    gstreamer::glib::log_remove_handler(Some("GStreamer"), handler);
    assert_eq!(
        criticals.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "GStreamer logged criticals"
    );
}

/// The README's TLS recipe, as written: nginx (with a self-signed certificate for the
/// name in the recipe) in front of a daemon on loopback whose `server.allowed_hosts`
/// lists that name. Reads through HTTPS work with the token and not without; plain
/// HTTP to the TLS port gets nothing; the daemon itself refuses other names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tls_proxy_recipe_works_with_nginx() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = readme
        .split("```nginx\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README has an nginx block")
        .to_string();
    let name = block
        .lines()
        .find_map(|l| l.trim().strip_prefix("server_name "))
        .unwrap()
        .trim_end_matches(';')
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg(format!("/CN={name}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let streams = "[[streams]]\nid = \"cam\"\npipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=5/1\"\n";
    let mut s = settings(&config_text(streams, ""));
    s.server.allowed_hosts = vec![name.clone()];
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    let d = InProcess::start(s).await;
    let token = std::fs::read_to_string(dir.path().join("api-token"))
        .unwrap()
        .trim()
        .to_string();
    let port = common::free_port();
    let server = block
        .replace("listen 443 ssl;", &format!("listen 127.0.0.1:{port} ssl;"))
        .replace(
            &format!("/etc/ssl/certs/{name}.pem"),
            cert.to_str().unwrap(),
        )
        .replace(
            &format!("/etc/ssl/private/{name}.key"),
            key.to_str().unwrap(),
        )
        .replace("http://127.0.0.1:9790", &format!("http://{}", d.addr));
    assert!(
        server.contains(&format!("127.0.0.1:{port}")) && server.contains(cert.to_str().unwrap()),
        "{server}"
    );
    let t = dir.path().display();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\npid {t}/nginx.pid;\nerror_log {t}/error.log;\n\
             events {{}}\nhttp {{\naccess_log off;\nclient_body_temp_path {t}/body;\n\
             proxy_temp_path {t}/proxy;\nfastcgi_temp_path {t}/fcgi;\nuwsgi_temp_path {t}/uwsgi;\n\
             scgi_temp_path {t}/scgi;\n{server}\n}}\n"
        ),
    )
    .unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _nginx = Killed(
        Command::new("nginx")
            .args(["-e", &format!("{t}/error.log"), "-c"])
            .arg(dir.path().join("nginx.conf"))
            .spawn()
            .expect("nginx is installed (scripts/setup.sh)"),
    );
    let addr = d.addr;
    let (name2, cert2, tok) = (name.clone(), cert.clone(), token.clone());
    tokio::task::spawn_blocking(move || {
        let curl = |path: &str, token: Option<&str>, scheme: &str| -> (String, String) {
            let mut c = Command::new("curl");
            c.args([
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "--max-time",
                "10",
                "--cacert",
            ])
            .arg(&cert2)
            .arg("--resolve")
            .arg(format!("{name2}:{port}:127.0.0.1"));
            if let Some(t) = token {
                c.arg("-H").arg(format!("Authorization: Bearer {t}"));
            }
            let out = c
                .arg(format!("{scheme}://{name2}:{port}{path}"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
            (code.to_string(), body.to_string())
        };
        let (code, body) = common::poll(Duration::from_secs(20), "nginx answering", || {
            let r = curl("/api/v1/streams/cam/frames?limit=1", Some(&tok), "https");
            (r.0 != "000").then_some(r)
        });
        assert_eq!(code, "200", "{body}");
        assert_eq!(curl("/api/v1/labels", None, "https").0, "401");
        assert_eq!(curl("/metrics", None, "https").0, "200");
        let (code, _) = curl("/healthz", None, "http");
        assert_ne!(code, "200", "plain HTTP on the TLS port is not served");
        // The daemon itself answers the proxy's name only.
        let status = |host: &str| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(s, "GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
            let mut b = String::new();
            let _ = s.read_to_string(&mut b);
            b.split_whitespace().nth(1).unwrap_or("").to_string()
        };
        assert_eq!(status(&name2), "200");
        assert_eq!(status("localhost"), "421");
    })
    .await
    .unwrap();
    d.stop().await;
}

/// DNS rebinding: a daemon on a loopback address answers only loopback `Host` names
/// (421 for another site's name, on every route), and one with `server.allowed_hosts`
/// only those names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_other_host_names_are_refused() {
    fn status(addr: SocketAddr, path: &str, host: &str) -> u16 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    let streams = "[[streams]]\nid = \"cam\"\npipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=5/1\"\n";
    let dir = tempfile::tempdir().unwrap();
    for allowed in [None, Some("qc.example")] {
        let extra = allowed.map_or(String::new(), |h| format!("allowed_hosts = [\"{h}\"]\n"));
        let mut s = settings(&config_text(streams, "").replacen(
            "[server]\n",
            &format!("[server]\n{extra}"),
            1,
        ));
        s.server.api_token_file = dir.path().join("api-token");
        s.labels_db = dir.path().join("labels.sqlite");
        let d = InProcess::start(s).await;
        let addr = d.addr;
        tokio::task::spawn_blocking(move || {
            let port = addr.port();
            for path in ["/healthz", "/metrics", "/api/v1/streams", "/"] {
                let evil = status(addr, path, &format!("rebind.evil.example:{port}"));
                assert_eq!(evil, 421, "{path}");
                let local = status(addr, path, &format!("localhost:{port}"));
                let named = status(addr, path, &format!("qc.example:{port}"));
                match allowed {
                    None => {
                        assert_eq!(local, 200, "{path}");
                        assert_eq!(status(addr, path, &format!("127.0.0.1:{port}")), 200);
                        assert_eq!(named, 421, "{path}");
                    }
                    Some(_) => {
                        assert_eq!(local, 421, "{path}");
                        assert_eq!(named, 200, "{path}");
                    }
                }
            }
        })
        .await
        .unwrap();
        d.stop().await;
    }
}

/// The label API's bounds: past `labels.max_per_minute` a label gets 429 with
/// Retry-After; past `labels.max_labels` it gets 507 naming the key; what is stored
/// stays, and the summary still counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_rate_and_store_limits_refuse_without_losing_labels() {
    let dir = tempfile::tempdir().unwrap();
    let streams = r#"
[[streams]]
id = "cam"
pipeline = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1"
sample_fps = 5.0
"#;
    let limits = |per_minute: u32, max: u64| {
        let mut s = settings(&config_text(
            streams,
            &format!("[labels]\nmax_per_minute = {per_minute}\nmax_labels = {max}\n"),
        ));
        s.server.api_token_file = dir.path().join("api-token");
        s.labels_db = dir.path().join("labels.sqlite");
        s
    };
    for (per_minute, max, refused, field) in [(2, 100, 429, "labels"), (100, 2, 507, "labels")] {
        let d = InProcess::start(limits(per_minute, max)).await;
        d.wait_for(Duration::from_secs(30), |m| {
            sample(m, "streamiq_frames_scored_total{stream=\"cam\"}").is_some_and(|v| v >= 4.0)
        })
        .await;
        let token = std::fs::read_to_string(dir.path().join("api-token"))
            .unwrap()
            .trim()
            .to_string();
        let addr = d.addr;
        tokio::task::spawn_blocking(move || {
            let frames = json_as(addr, "/api/v1/streams/cam/frames?limit=3", &token);
            let ids: Vec<u64> = frames
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["id"].as_u64().unwrap())
                .collect();
            assert_eq!(ids.len(), 3);
            let before = json_as(addr, "/api/v1/labels", &token)
                .as_array()
                .unwrap()
                .len();
            for (i, id) in ids.iter().enumerate() {
                let body = format!(r#"{{"frame_id": {id}, "mos": 3, "labeller": "l{i}"}}"#);
                let (code, r) = post_label(addr, Some(&token), &body);
                if i < 2 && before == 0 {
                    assert_eq!(code, 201, "{r}");
                } else {
                    assert_eq!(code, refused, "{r}");
                    assert_eq!(r["field"], field, "{r}");
                    let e = r["error"].as_str().unwrap();
                    assert!(
                        e.contains(if refused == 429 {
                            "labels.max_per_minute = 2"
                        } else {
                            "labels.max_labels = 2"
                        }),
                        "{e}"
                    );
                }
            }
            if refused == 429 {
                let auth = format!("Bearer {token}");
                let body = format!(r#"{{"frame_id": {}, "mos": 2}}"#, ids[0]);
                let (code, head, _) = common::http::request_with_head(
                    addr,
                    "POST",
                    "/api/v1/labels",
                    &[
                        ("Content-Type", "application/json"),
                        ("Authorization", &auth),
                    ],
                    body.as_bytes(),
                );
                assert_eq!(code, 429);
                let retry: u64 = head
                    .lines()
                    .find_map(|l| l.strip_prefix("retry-after: "))
                    .unwrap_or_else(|| panic!("no Retry-After: {head}"))
                    .trim()
                    .parse()
                    .unwrap();
                assert!((1..=60).contains(&retry), "{retry}");
            }
            let stored = json_as(addr, "/api/v1/labels", &token);
            assert_eq!(stored.as_array().unwrap().len(), 2, "{stored}");
            let summary = json_as(addr, "/api/v1/labels/summary", &token);
            assert_eq!(summary["streams"]["cam"]["labels"], 2, "{summary}");
        })
        .await
        .unwrap();
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_stored_durably_behind_the_api_token() {
    let dir = tempfile::tempdir().unwrap();
    let streams = r#"
[[streams]]
id = "cam"
pipeline = "videotestsrc is-live=true pattern=zone-plate kx2=20 ky2=20 kt=1 ! video/x-raw,width=160,height=120,framerate=10/1"
sample_fps = 5.0
"#;
    let mut s = settings(&config_text(streams, "[labels]\nrecent_frames = 20\n"));
    let token_file = dir.path().join("state/api-token");
    let db = dir.path().join("state/labels.sqlite");
    s.server.api_token_file = token_file.clone();
    s.labels_db = db.clone();
    let d = InProcess::start(s).await;

    // The token file was created: 64 hex characters, readable by the owner only.
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    d.wait_for(Duration::from_secs(30), |m| {
        sample(m, "streamiq_frames_scored_total{stream=\"cam\"}").is_some_and(|v| v >= 3.0)
    })
    .await;

    let addr = d.addr;
    let reader = token.clone();
    let (frame_id, first_label) = tokio::task::spawn_blocking(move || {
        // The reads below are behind the token too.
        let json = |a: SocketAddr, p: &str| json_as(a, p, &reader);
        let text = |a: SocketAddr, p: &str| text_as(a, p, &reader);
        let get = |a: SocketAddr, p: &str| get_as(a, p, &reader);
        let frames = json(addr, "/api/v1/streams/cam/frames?limit=1");
        let frame = &frames[0];
        let id = frame["id"].as_u64().unwrap();
        let label = format!(r#"{{"frame_id": {id}, "mos": 4}}"#);

        // No token, a wrong token: 401 naming the header, nothing stored.
        let (code, err) = post_label(addr, None, &label);
        assert_eq!((code, err["field"].as_str()), (401, Some("authorization")));
        let (code, err) = post_label(addr, Some(&"0".repeat(64)), &label);
        assert_eq!((code, err["field"].as_str()), (401, Some("authorization")));
        assert_eq!(json(addr, "/api/v1/labels"), serde_json::json!([]));

        let (code, stored) = post_label(addr, Some(&token), &label);
        assert_eq!(code, 201, "{stored}");
        assert_eq!(stored["frame_id"], id);
        assert_eq!(stored["stream"], "cam");
        assert_eq!(stored["mos"], 4.0);
        assert_eq!(stored["target"], 0.75);
        assert_eq!(stored["labeller"], "operator");
        assert_eq!(stored["replaced"], false);
        assert_eq!(stored["embed_dim"], 64);
        assert_eq!(stored["bundle"], "streamiq-test");
        assert_eq!(stored["prompt_version"], frame["prompt_version"]);
        let model_score = stored["model_score"].as_f64().unwrap();
        assert!((model_score - frame["score"].as_f64().unwrap()).abs() < 1e-6);

        // Bad input: the right status and field, and nothing stored.
        let big = format!(
            r#"{{"frame_id": {id}, "mos": 3, "labeller": "{}"}}"#,
            "x".repeat(17 * 1024)
        );
        for (body, status, field) in [
            (r#"{"frame_id": 999999999, "mos": 3}"#.to_string(), 404, "frame_id"),
            (format!(r#"{{"frame_id": {id}, "mos": 7}}"#), 422, "mos"),
            (format!(r#"{{"frame_id": {id}, "score": -0.1}}"#), 422, "score"),
            (format!(r#"{{"frame_id": {id}, "mos": 3, "score": 0.5}}"#), 422, "mos"),
            (format!(r#"{{"frame_id": {id}}}"#), 422, "mos"),
            (r#"{"mos": 3}"#.to_string(), 422, "frame_id"),
            (format!(r#"{{"frame_id": "x{id}", "mos": 3}}"#), 422, "frame_id"),
            (
                format!(r#"{{"frame_id": {id}, "mos": 3, "labeller": "{}"}}"#, "y".repeat(65)),
                422,
                "labeller",
            ),
            (format!(r#"{{"frame_id": {id}, "mos": 3, "extra": 1}}"#), 422, "body"),
            (format!(r#"{{"frame_id": {id}, "mos": "#), 400, "body"),
            (big, 413, "body"),
        ] {
            let (code, err) = post_label(addr, Some(&token), &body);
            let short = &body[..body.len().min(80)];
            assert_eq!(code, status, "{short}: {err}");
            assert_eq!(err["field"], field, "{short}: {err}");
            assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()), "{err}");
        }
        let auth = format!("Bearer {token}");
        let (code, body) = request(
            addr,
            "POST",
            "/api/v1/labels",
            &[("Content-Type", "text/plain"), ("Authorization", &auth)],
            label.as_bytes(),
        );
        assert_eq!(code, 415);
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(err["field"], "body");
        let all = json(addr, "/api/v1/labels");
        assert_eq!(all.as_array().unwrap().len(), 1, "{all}");

        // Relabelling the frame replaces the label; another labeller adds one.
        let (code, again) = post_label(
            addr,
            Some(&token),
            &format!(r#"{{"frame_id": {id}, "mos": 2}}"#),
        );
        assert_eq!(code, 201, "{again}");
        assert_eq!(again["replaced"], true);
        assert_eq!(again["target"], 0.25);
        let (code, other) = post_label(
            addr,
            Some(&token),
            &format!(r#"{{"frame_id": "{id}", "score": 0.9, "labeller": "ana"}}"#),
        );
        assert_eq!(code, 201, "{other}");
        assert_eq!(other["score"], 0.9);
        let all = json(addr, "/api/v1/labels");
        let all = all.as_array().unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0]["id"], again["id"]);
        assert_eq!(all[1]["labeller"], "ana");
        let page = json(addr, &format!("/api/v1/labels?since={}&limit=1", again["id"]));
        assert_eq!(page.as_array().unwrap().len(), 1);
        assert_eq!(page[0]["id"], other["id"]);
        let csv = text(addr, "/api/v1/labels?format=csv");
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(
            rows[0],
            "id,stream,frame_id,captured,mos,target,labeller,model_score,prompt_version,bundle,created"
        );
        assert_eq!(rows.len(), 3, "{csv}");
        assert!(rows[2].starts_with(&format!("{},cam,{id},", other["id"])), "{csv}");
        assert!(rows[2].contains(",,0.9,ana,"), "{csv}");
        let (code, err) = get(addr, "/api/v1/labels?format=xml");
        assert_eq!(code, 400);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&err).unwrap()["field"], "format");

        // The stored thumbnail outlives the frame's stay in the recent ring.
        let t0 = Instant::now();
        while get(addr, &format!("/api/v1/frames/{id}/thumbnail.jpg")).0 != 404 {
            assert!(t0.elapsed() < Duration::from_secs(30), "frame never left the ring");
            std::thread::sleep(Duration::from_millis(200));
        }
        let (code, jpeg) = get(addr, &format!("/api/v1/labels/{}/thumbnail.jpg", other["id"]));
        assert_eq!(code, 200);
        assert_eq!(&jpeg[..3], &[0xff, 0xd8, 0xff], "a JPEG");
        assert_eq!(get(addr, "/api/v1/labels/999999/thumbnail.jpg").0, 404);
        assert_eq!(get(addr, "/api/v1/labels/abc/thumbnail.jpg").0, 400);
        let (code, err) = post_label(addr, Some(&token), &label);
        assert_eq!((code, err["field"].as_str()), (404, Some("frame_id")));
        (id, other)
    })
    .await
    .unwrap();

    let m = d.metrics().await;
    assert_eq!(sample(&m, "streamiq_labels_total"), Some(3.0), "{m}");
    promtool_check(&m);
    d.stop().await;

    // After shutdown the rows are on disk, with their blobs.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM labels", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    let (frame, dim, emb_len, thumb, sha, labeller): (i64, i64, i64, Vec<u8>, String, String) =
        conn.query_row(
            "SELECT frame_id, embed_dim, length(embedding), thumbnail, model_sha256, labeller
             FROM labels WHERE id = ?1",
            [first_label["id"].as_i64().unwrap()],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(frame as u64, frame_id);
    assert_eq!(labeller, "ana");
    assert_eq!(dim, 64);
    assert_eq!(emb_len, 4 * dim);
    assert_eq!(&thumb[..3], &[0xff, 0xd8, 0xff]);
    let manifest = std::fs::read_to_string(bundle().join("manifest.toml")).unwrap();
    assert!(manifest.contains(&sha), "visual.onnx sha256 {sha}");
    drop(conn);
    let set = streamiq::labels::load_training_set(&db, &sha).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set[0].1, 0.25);
    assert!((set[1].1 - 0.9).abs() < 1e-6);
    let norm: f32 = set[0].0.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-3,
        "L2-normalised embedding, norm {norm}"
    );
}

#[test]
fn daemon_refuses_an_empty_or_short_api_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("api-token");
    let streams = r#"
[[streams]]
id = "live"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=10/1"
"#;
    let cfg = write_config(dir.path(), &config_text(streams, ""));
    for (content, says) in [("\n", "empty"), ("secret\n", "fewer than 16")] {
        std::fs::write(&token_file, content).unwrap();
        let out = Command::new(bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env("STREAMIQ__SERVER__API_TOKEN_FILE", &token_file)
            .env("STREAMIQ__LABELS__DB", dir.path().join("labels.sqlite"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("server.api_token_file")
                && stderr.contains(&*token_file.to_string_lossy())
                && stderr.contains(says),
            "{stderr}"
        );
        assert!(
            !stderr.contains("secret"),
            "the token is never shown: {stderr}"
        );
    }
}

/// The stream registry on real GStreamer pipelines: replacing one stream restarts only
/// that stream (the other's counters never reset and keep counting), removing one
/// takes its series off `/metrics`, and `apply` reports what it changed.
#[test]
fn registry_restarts_only_the_stream_that_changed() {
    use std::sync::Arc;
    use streamiq::config::{Source, StreamSettings, WhenFull};
    use streamiq::ingest::Handoff;
    use streamiq::metrics::Metrics;
    use streamiq::registry::{StreamContext, StreamRegistry, StreamSlots};
    use streamiq::score::bundle::ResizeRule;

    streamiq::ingest::pipeline::init().unwrap();
    let s = settings(&config_text("", ""));
    let metrics = Arc::new(Metrics::new());
    let (handoff, rx) = Handoff::new(64, WhenFull::DropOldest, Arc::new(|_: &_| {}));
    // The scoring side is not under test: frames are taken off the queue and dropped.
    let drain = std::thread::spawn(move || rx.iter().count());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let registry = StreamRegistry::new(
        StreamContext {
            metrics: metrics.clone(),
            qc: s.qc.clone(),
            recent_frames: 4,
            input_size: 64,
            resize: ResizeRule::ShorterSideCrop,
            views: s.scorer.views,
            shutdown: shutdown.clone(),
            incidents: None,
        },
        Arc::new(StreamSlots::default()),
        handoff,
    );
    let stream = |id: &str, pattern: &str| StreamSettings {
        id: id.into(),
        source: Source::Pipeline(format!(
            "videotestsrc is-live=true pattern={pattern} ! video/x-raw,width=160,height=120,framerate=20/1"
        )),
        sample_fps: Some(10.0),
        keyframes: false,
        realtime: true,
        restart_on_eos: true,
        quality_drop_threshold: 0.15,
    };
    let decoded = |id: &str| registry.get(id).map(|st| st.metrics.decoded.get());
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !ok() {
            assert!(t0.elapsed() < Duration::from_secs(30), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let report = registry
        .apply(&[stream("a", "ball"), stream("b", "smpte")])
        .unwrap();
    assert_eq!(report.added, ["a", "b"]);
    wait_for("frames from both streams", &|| {
        decoded("a").unwrap() >= 5 && decoded("b").unwrap() >= 5
    });
    let slot_b = registry.get("b").unwrap().index;
    let a_before = decoded("a").unwrap();

    // Change b only: a keeps its state object, its counter and its pipeline.
    let a_state = registry.get("a").unwrap();
    let report = registry
        .apply(&[stream("a", "ball"), stream("b", "snow")])
        .unwrap();
    assert_eq!(report.restarted, ["b"]);
    assert_eq!(report.unchanged, ["a"]);
    assert!(Arc::ptr_eq(&a_state, &registry.get("a").unwrap()));
    assert_eq!(registry.get("b").unwrap().index, slot_b, "b keeps its slot");
    let b_after_restart = decoded("b").unwrap();
    wait_for("frames from b after its restart", &|| {
        decoded("b").unwrap() >= b_after_restart + 5
    });
    assert!(decoded("a").unwrap() > a_before, "a never stopped counting");

    // Same settings again: nothing restarts.
    let report = registry
        .apply(&[stream("a", "ball"), stream("b", "snow")])
        .unwrap();
    assert_eq!(report.unchanged, ["a", "b"]);
    assert!(report.added.is_empty() && report.restarted.is_empty() && report.removed.is_empty());

    // Add a twice: refused, nothing changed.
    assert!(registry.add(stream("a", "ball")).is_err());
    // Remove b: its series leave the exposition, a's stay.
    let report = registry.apply(&[stream("a", "ball")]).unwrap();
    assert_eq!(report.removed, ["b"]);
    let exposition = metrics.encode();
    assert!(!exposition.contains("stream=\"b\""), "{exposition}");
    assert!(exposition.contains("streamiq_frames_decoded_total{stream=\"a\"}"));
    assert!(registry.get("b").is_none() && registry.len() == 1);
    assert!(registry.remove("b").is_err());

    shutdown.cancel();
    registry.shutdown();
    assert!(
        registry.add(stream("c", "ball")).is_err(),
        "no change after shutdown"
    );
    assert!(drain.join().unwrap() > 0);
}

/// `scripts/peers.py` (BRISQUE and NIQE on a label CSV, reported as `eval` reports the
/// model) passes its own tests: both peers rank clean photographs above their heavily
/// blurred and noised versions, the report's layout, and its errors naming the culprit.
/// Needs the peers' venv (`scripts/setup.sh peers`, run by `make test`).
#[test]
fn peers_script_scores_label_sets_like_eval() {
    python_tests_pass(&common::peers_python(), "scripts/tests/test_peers.py");
}

/// Runs a Python test script of `scripts/tests/` (its runner ends with `N passed, M
/// failed`) and asserts that all passed.
fn python_tests_pass(python: &Path, script: &str) {
    let out = Command::new(python)
        .arg(repo().join(script))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{script}: {text}");
    assert!(text.contains(" passed, 0 failed"), "{script}: {text}");
}

/// `streamiq distort` and the training data's Python distortions agree, both reading
/// src/distort/levels.toml (`scripts/tests/test_distort_parity.py`, on this build's
/// binary): PSNR of at least 35 dB between the two outputs per kind and level, the
/// random choices pinned to the binary's; the two noise kinds by their PSNR to the
/// reference; the pairs that differ by design held to the floors the script lists.
#[test]
fn distort_matches_the_python_distortions() {
    let script = "scripts/tests/test_distort_parity.py";
    let out = Command::new(venv_python())
        .arg(repo().join(script))
        .env("STREAMIQ_BIN", env!("CARGO_BIN_EXE_streamiq"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "{script}: {text}");
    assert!(text.contains("3 passed, 0 failed"), "{script}: {text}");
}

/// SIGHUP re-reads the config: the edited stream restarts, the other never stops
/// counting; a broken edit is refused, changes nothing and flips
/// `streamiq_config_last_reload_successful` to 0; a removed stream leaves `/metrics`.
#[test]
fn sighup_reload_restarts_only_the_edited_stream() {
    let dir = tempfile::tempdir().unwrap();
    let stream = |id: &str, pattern: &str| {
        format!(
            "[[streams]]\nid = \"{id}\"\nsample_fps = 5.0\npipeline = \"videotestsrc is-live=true pattern={pattern} ! video/x-raw,width=160,height=120,framerate=10/1\"\n"
        )
    };
    let both = |b: &str| format!("{}{}", stream("a", "ball"), stream("b", b));
    let cfg = write_config(dir.path(), &config_text(&both("smpte"), ""));
    let mut child = Process::start(&cfg);
    let addr = child.addr;
    let scored = |id: &str| {
        sample(
            &text(addr, "/metrics"),
            &format!("streamiq_frames_scored_total{{stream=\"{id}\"}}"),
        )
    };
    let gauge = |name: &str| sample(&text(addr, "/metrics"), name).unwrap();
    let source_of = |id: &str| -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&text(addr, "/api/v1/streams")).unwrap();
        v.as_array()?
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["source"].as_str().unwrap().to_string())
    };
    // `a`'s counter, sampled throughout: it must never go back.
    let mut a_seen = Vec::new();
    let wait = |what: &str, a_seen: &mut Vec<f64>, ok: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        loop {
            a_seen.push(scored("a").unwrap_or(0.0));
            if ok() {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("both streams scored", &mut a_seen, &|| {
        scored("a").unwrap_or(0.0) >= 3.0 && scored("b").unwrap_or(0.0) >= 3.0
    });
    assert_eq!(gauge("streamiq_config_last_reload_successful"), 1.0);
    let started_at = gauge("streamiq_config_last_reload_success_timestamp_seconds");
    assert!(started_at > 1.7e9, "{started_at}");

    // Edit b only.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&cfg, config_text(&both("snow"), "")).unwrap();
    child.signal("HUP");
    wait("b restarted with its new source", &mut a_seen, &|| {
        source_of("b").is_some_and(|s| s.contains("pattern=snow"))
    });
    let b_after = scored("b").unwrap();
    // The streams switch before the reload's outcome is exported and logged: wait for
    // all of it.
    let reloaded = |log: &[String]| {
        log.iter().any(|l| {
            l.contains("Configuration reloaded")
                && l.contains("restarted=[\"b\"]")
                && l.contains("unchanged=1")
        })
    };
    wait(
        "frames from the restarted b and from a, the reload logged and exported",
        &mut a_seen,
        &|| {
            scored("b").unwrap() >= b_after + 3.0
                && reloaded(&child.log())
                && gauge("streamiq_config_last_reload_success_timestamp_seconds") > started_at
        },
    );

    // A broken edit: refused, nothing changes, the gauge says so.
    std::fs::write(&cfg, config_text(&both("ball"), "no_such_key = 1")).unwrap();
    child.signal("HUP");
    wait("the reload refused", &mut a_seen, &|| {
        gauge("streamiq_config_last_reload_successful") == 0.0
    });
    assert!(source_of("b").unwrap().contains("pattern=snow"));
    let log = child.log();
    assert!(
        log.iter()
            .any(|l| l.contains("Configuration reload refused") && l.contains("no_such_key")),
        "{log:#?}"
    );

    // Remove b: it leaves the API and /metrics; a runs on.
    std::fs::write(&cfg, config_text(&stream("a", "ball"), "")).unwrap();
    child.signal("HUP");
    wait("b removed and the reload exported", &mut a_seen, &|| {
        source_of("b").is_none() && gauge("streamiq_config_last_reload_successful") == 1.0
    });
    assert!(scored("b").is_none(), "b's series left /metrics");
    let a_last = *a_seen.last().unwrap();
    wait("a still counting", &mut a_seen, &|| {
        scored("a").unwrap() >= a_last + 2.0
    });
    assert!(
        a_seen.windows(2).all(|w| w[1] >= w[0]),
        "a's frames_scored_total went back: {a_seen:?}"
    );
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "the daemon still runs"
    );
}

/// No form of credential leaves the daemon: not `check-config`'s output (the unit runs
/// it before every start, into the journal), not `/api/v1/streams` (sources and the
/// errors of streams that cannot connect), not the log, not a config error.
#[test]
fn credentials_never_leave_the_daemon() {
    const SECRET: &str = "hunter2xyz";
    let dir = tempfile::tempdir().unwrap();
    let streams = format!(
        r#"
[[streams]]
id = "userinfo"
uri = "rtsp://admin:{SECRET}@127.0.0.1:1/live"
[[streams]]
id = "srt"
uri = "srt://127.0.0.1:1?mode=caller&passphrase={SECRET}"
[[streams]]
id = "signed"
uri = "http://127.0.0.1:1/live.m3u8?token={SECRET}&sig={SECRET}&exp=1"
[[streams]]
id = "launch"
pipeline = "rtspsrc location=rtsp://127.0.0.1:1/x user-id=admin user-pw={SECRET} ! decodebin ! videoconvert"
[[streams]]
id = "ok"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=10/1"
"#
    );
    let cfg = write_config(dir.path(), &config_text(&streams, ""));
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("passphrase=***") && printed.contains("user-pw=***"));
    assert!(!printed.contains(SECRET), "check-config: {printed}");

    // A bad config quoting a secret in its error.
    let bad = config_text(
        &format!("[[streams]]\nid = \"x\"\nuri = \"no-scheme?token={SECRET}\"\n"),
        "",
    );
    let bad_cfg = dir.path().join("bad.toml");
    std::fs::write(&bad_cfg, bad).unwrap();
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&bad_cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("streams[0].uri") && !err.contains(SECRET),
        "{err}"
    );

    let daemon = Process::start(&cfg);
    // Let the unreachable streams fail and restart at least once (generous: on a loaded
    // machine every stream once sat in "starting" for 40 s; the log then says why).
    let t0 = Instant::now();
    let streams = loop {
        let body = text(daemon.addr, "/api/v1/streams");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let failed = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["restarts"].as_u64().unwrap_or(0) >= 1)
            .count();
        if failed >= 4 {
            break body;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{body}\nlog:\n{}\nstream threads:\n{}",
            daemon.log().join("\n"),
            daemon.ingest_stacks()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!streams.contains(SECRET), "/api/v1/streams: {streams}");
    assert!(streams.contains("rtsp://***@127.0.0.1:1/live"), "{streams}");
    let log = daemon.log().join("\n");
    assert!(log.contains("Restarting pipeline"), "{log}");
    assert!(!log.contains(SECRET), "log: {log}");
}

/// ONNX Runtime sends usage events to Microsoft unless `ORT_DISABLE_TELEMETRY=1` is set
/// when it loads, and keeps a device id and an event store under `~/.cache/Microsoft`.
/// Started without the variable, the daemon runs itself again with it (same PID), scores,
/// and leaves nothing of ONNX Runtime's in its home directory.
#[test]
fn onnxruntime_sends_and_keeps_nothing_of_its_own() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let streams = r#"
[[streams]]
id = "cam"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=10/1"
"#;
    let cfg = write_config(dir.path(), &config_text(streams, ""));
    let mut c = Command::new(bin());
    c.args(["run", "--config"])
        .arg(&cfg)
        .env_remove("ORT_DISABLE_TELEMETRY")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", home.path());
    let daemon = Process::spawn(c);
    common::wait_until("frames scored", || {
        sample(
            &text(daemon.addr, "/metrics"),
            "streamiq_frames_scored_total{stream=\"cam\"}",
        )
        .is_some_and(|v| v >= 2.0)
    });
    let environ = std::fs::read(format!("/proc/{}/environ", daemon.pid())).unwrap();
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|v| v == b"ORT_DISABLE_TELEMETRY=1"),
        "the daemon (PID {}) runs without ORT_DISABLE_TELEMETRY=1",
        daemon.pid()
    );
    // GStreamer's registry cache is expected there; nothing of ONNX Runtime's.
    assert!(home.path().join(".cache/gstreamer-1.0").is_dir());
    let microsoft = home.path().join(".cache/Microsoft");
    assert!(!microsoft.exists(), "{} was written", microsoft.display());
}

/// Seconds until the server closes `s` (a read returns end of file or an error), at most
/// `limit`; `None` if it is still open then.
fn seconds_until_closed(s: &mut TcpStream, limit: Duration) -> Option<f64> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed().as_secs_f64()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(t0.elapsed().as_secs_f64()),
        }
    }
    None
}

/// Hostile and careless clients are cut within their bounds and never starve
/// `/metrics`: a client dribbling its header is closed after `server.header_timeout`, an
/// idle keep-alive connection too; a body that never finishes gets a 408 after
/// `server.request_timeout`; a flood of idle connections from one address is held to
/// `server.max_connections_per_ip` while another address scrapes `/metrics` throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_flooding_clients_are_cut_and_metrics_keep_answering() {
    let dir = tempfile::tempdir().unwrap();
    let streams = r#"
[[streams]]
id = "cam"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=10/1"
"#;
    let mut s = settings(&config_text(streams, ""));
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    s.server.limits.header_timeout = Duration::from_secs(1);
    s.server.limits.request_timeout = Duration::from_secs(1);
    s.server.limits.max_connections_per_ip = std::num::NonZeroUsize::new(8).unwrap();
    let token_file = s.server.api_token_file.clone();
    let d = InProcess::start(s).await;
    let addr = d.addr;
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim().to_string();

    tokio::task::spawn_blocking(move || {
        // A header sent one byte every 300 ms never completes: closed after about 1 s.
        let mut slow = TcpStream::connect(addr).unwrap();
        let t0 = Instant::now();
        let dribble = std::thread::spawn({
            let mut w = slow.try_clone().unwrap();
            move || {
                for b in b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: yes" {
                    if w.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        });
        let closed = seconds_until_closed(&mut slow, Duration::from_secs(6))
            .expect("a dribbling header is cut");
        assert!(
            (0.8..3.0).contains(&closed),
            "closed after {closed:.2} s (header_timeout 1 s)"
        );
        assert!(t0.elapsed() < Duration::from_secs(6));
        let _ = dribble.join();

        // An idle keep-alive connection after one answered request: closed too.
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let closed = seconds_until_closed(&mut idle, Duration::from_secs(6))
            .expect("an idle keep-alive connection is cut");
        assert!(closed < 3.0, "idle connection closed after {closed:.2} s");

        // A label body that never arrives: 408 after about 1 s.
        let mut body = TcpStream::connect(addr).unwrap();
        write!(
            body,
            "POST /api/v1/labels HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"frame_id\": "
        )
        .unwrap();
        let t0 = Instant::now();
        body.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let mut answer = Vec::new();
        let _ = body.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());

        // 40 idle connections from 127.0.0.1: at most 8 stay open, the rest are closed
        // at once; /metrics from 127.0.0.2 answers all the while.
        let flood: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let t0 = Instant::now();
        let mut scrapes = 0;
        let mut last = String::new();
        while t0.elapsed() < Duration::from_millis(900) {
            let scraper = tokio::net::TcpSocket::new_v4().unwrap();
            scraper.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut conn = rt
                .block_on(scraper.connect(addr))
                .unwrap()
                .into_std()
                .unwrap();
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            conn.read_to_string(&mut text).unwrap();
            assert!(text.starts_with("HTTP/1.0 200"), "{text}");
            let open = sample(&text, "streamiq_http_connections").unwrap();
            // 8 from the flood, this scrape's, and recent scrapes' not yet reaped.
            assert!(open <= 8.0 + 4.0, "open connections {open}");
            scrapes += 1;
            last = text;
        }
        assert!(scrapes >= 3, "{scrapes} scrapes");
        let rejected = sample(&last, "streamiq_http_connections_rejected_total").unwrap();
        assert!(rejected >= 32.0, "rejected {rejected}");
        drop(flood);
    })
    .await
    .unwrap();
    d.stop().await;
}

/// A promoted prompt set that cannot be used (a `prompts_dir/active` that is not a
/// version, or names one that is missing) stops the start with exit code 2 naming the
/// file, instead of silently scoring with the bundle's set.
#[test]
fn daemon_refuses_an_unusable_active_prompt_set() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts");
    std::fs::create_dir_all(&prompts).unwrap();
    let streams = r#"
[[streams]]
id = "live"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=10/1"
"#;
    let cfg = write_config(dir.path(), &config_text(streams, ""));
    for (active, says) in [
        ("junk\n", "is not a version number"),
        ("7\n", "v0007.safetensors"),
    ] {
        std::fs::write(prompts.join("active"), active).unwrap();
        let out = Command::new(bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env("STREAMIQ__MODEL__PROMPTS_DIR", &prompts)
            .env(
                "STREAMIQ__SERVER__API_TOKEN_FILE",
                dir.path().join("api-token"),
            )
            .env("STREAMIQ__LABELS__DB", dir.path().join("labels.sqlite"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{active:?}: {stderr}");
        assert!(
            stderr.contains("model.prompts_dir") && stderr.contains(says),
            "{active:?}: {stderr}"
        );
    }
}

/// A source that is not live and reaches its end (a TCP or HTTP server that closed,
/// files that vanished) is rebuilt by default, like a live one; `on_eos = "stop"` makes
/// it finish for good, as a `file:` URI does by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_that_end_restart_unless_told_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let ending = "videotestsrc num-buffers=5 ! video/x-raw,width=160,height=120,framerate=25/1";
    let streams = format!(
        "[[streams]]\nid = \"again\"\npipeline = \"{ending}\"\n\
         [[streams]]\nid = \"once\"\npipeline = \"{ending}\"\non_eos = \"stop\"\n"
    );
    let mut s = settings(&config_text(&streams, ""));
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    let d = InProcess::start(s).await;
    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        loop {
            let v: serde_json::Value =
                serde_json::from_str(&text(addr, "/api/v1/streams")).unwrap();
            let of = |id: &str| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["id"] == id)
                    .unwrap()
                    .clone()
            };
            let (again, once) = (of("again"), of("once"));
            if again["restarts"].as_u64().unwrap() >= 2 && once["phase"] == "finished" {
                assert_eq!(once["restarts"], 0, "{once}");
                assert_eq!(again["last_error"], "end of stream", "{again}");
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{again} {once}");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    d.stop().await;
}

/// The shipped unit's system call filter (SystemCallFilter=@system-service, minus
/// @privileged) does not break the daemon: under the same filter, loaded by
/// `scripts/seccomp_exec.py` from the unit file itself, it scores a real H.264 stream
/// and answers /metrics, while a privileged call (chroot) fails with EPERM.
#[test]
fn daemon_scores_a_real_stream_under_the_units_syscall_filter() {
    let dir = tempfile::tempdir().unwrap();
    let unit = repo().join("systemd/streamiq.service");
    let wrapper = repo().join("scripts/seccomp_exec.py");
    let denied = Command::new("/usr/bin/python3")
        .arg(&wrapper)
        .arg(&unit)
        .args(["--", "/usr/sbin/chroot", "/", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success(), "{err}");
    assert!(
        err.contains("Operation not permitted"),
        "the filter is live: {err}"
    );

    let streams = r#"
[[streams]]
id = "live"
pipeline = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1 ! x264enc tune=zerolatency ! h264parse ! avdec_h264"
sample_fps = 5.0
"#;
    let cfg = write_config(dir.path(), &config_text(streams, ""));
    let mut c = Command::new("/usr/bin/python3");
    c.arg(&wrapper)
        .arg(&unit)
        .arg("--")
        .arg(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env(
            "STREAMIQ__SERVER__API_TOKEN_FILE",
            dir.path().join("api-token"),
        )
        .env("STREAMIQ__LABELS__DB", dir.path().join("labels.sqlite"))
        .env("STREAMIQ__MODEL__PROMPTS_DIR", dir.path().join("prompts"));
    let daemon = Process::spawn(c);
    let t0 = Instant::now();
    loop {
        let m = text(daemon.addr, "/metrics");
        if sample(&m, "streamiq_frames_scored_total{stream=\"live\"}").is_some_and(|v| v >= 10.0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "no frames scored under the filter:\n{}",
            daemon.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(daemon.addr, "/readyz").0, 200);
    let log = daemon.log().join("\n");
    assert!(log.contains("system calls allowed"), "{log}");
    assert!(!log.contains("Operation not permitted"), "{log}");
}

/// Readiness follows the scoring engine, not the cameras: with its only camera
/// unreachable the daemon is ready (a stream that is down is the StreamDown alert, not a
/// reason to take the daemon out of service), and `/readyz` says what it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_while_the_engine_works_even_with_every_camera_offline() {
    let dir = tempfile::tempdir().unwrap();
    let streams = "[[streams]]\nid = \"offline\"\nuri = \"rtsp://127.0.0.1:1/live\"\n";
    let mut s = settings(&config_text(streams, ""));
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    let d = InProcess::start(s).await;
    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        let (code, body) = get(addr, "/readyz");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["engine_healthy"], true, "{v}");
        assert_eq!(v["model_loaded"], true, "{v}");
        assert_eq!(v["frames_seen"], false, "{v}");
        assert_eq!(v["queue_depth"], 0, "{v}");
    })
    .await
    .unwrap();
    d.stop().await;
}

/// The two-stream tower's content stream really is Google's pretrained EfficientNet-Lite0
/// (`scripts/tests/test_efficientnet_weights.py`: the weights' checksum, the unmodified
/// network calls scikit-image's chelsea a cat, and the tower's own preprocessing feeds it
/// what it was trained on, in torch and under ONNX Runtime).
#[test]
fn the_content_stream_is_the_pretrained_efficientnet() {
    python_tests_pass(&venv_python(), "scripts/tests/test_efficientnet_weights.py");
}

/// The rendezvous weight as the README states it, written out again here so that the
/// daemons are checked against the documented rule, not against their own code.
fn documented_owner(id: &str, replicas: u32) -> u32 {
    use sha2::{Digest, Sha256};
    let weight = |r: u32| {
        let mut h = Sha256::new();
        h.update(format!("streamiq-rendezvous\0{id}\0").as_bytes());
        h.update(r.to_le_bytes());
        u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
    };
    (0..replicas)
        .max_by_key(|&r| (weight(r), std::cmp::Reverse(r)))
        .unwrap()
}

/// Sharded daemons (`[cluster]`): three replicas over twelve streams score every
/// stream exactly once, each the streams the documented rendezvous rule gives it (one
/// replica takes its index from a StatefulSet-style host name); replica 0 killed and
/// restarted with four replicas configured keeps a subset of its streams, and the new
/// replica 3 takes exactly the streams that move to it. A stream added through the API
/// on the wrong replica is refused, naming the right one.
#[test]
fn replicas_share_the_streams_by_rendezvous_hashing_and_a_new_replica_moves_only_its_own() {
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..12).map(|i| format!("cam-{i:02}")).collect();
    let streams: String = ids
        .iter()
        .map(|id| {
            format!(
                "[[streams]]\nid = \"{id}\"\npipeline = \"videotestsrc is-live=true pattern=ball ! video/x-raw,width=96,height=64,framerate=5/1\"\nsample_fps = 2.0\n"
            )
        })
        .collect();
    let cfg = dir.path().join("streamiq.toml");
    std::fs::write(&cfg, config_text(&streams, "[cluster]\nreplicas = 3\n")).unwrap();
    // Each replica runs in its own directory (its state/ holds its token and stores).
    let start = |replica: u32, env: &[(&str, String)]| {
        let cwd = dir.path().join(format!("replica-{replica}"));
        std::fs::create_dir_all(&cwd).unwrap();
        let mut c = std::process::Command::new(common::bin("streamiq"));
        c.args(["run", "--config"]).arg(&cfg).current_dir(&cwd);
        c.env_remove("HOSTNAME");
        for (k, v) in env {
            c.env(k, v);
        }
        (common::daemon::Process::spawn(c), cwd)
    };
    let watched = |p: &common::daemon::Process| -> BTreeSet<String> {
        // Every stream the replica lists has been scored, and only those are exported.
        let addr = p.addr;
        let listed: BTreeSet<String> =
            serde_json::from_str::<serde_json::Value>(&text(addr, "/api/v1/streams"))
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_string())
                .collect();
        common::wait_until("every listed stream scored", || {
            let m = text(addr, "/metrics");
            listed.iter().all(|id| {
                sample(
                    &m,
                    &format!("streamiq_frames_scored_total{{stream=\"{id}\"}}"),
                )
                .is_some_and(|v| v >= 1.0)
            })
        });
        let m = text(addr, "/metrics");
        let exported: BTreeSet<String> = m
            .lines()
            .filter_map(|l| l.strip_prefix("streamiq_stream_up{stream=\""))
            .filter_map(|l| l.split_once('"').map(|(id, _)| id.to_string()))
            .collect();
        assert_eq!(listed, exported);
        listed
    };
    let expected = |replica: u32, replicas: u32| -> BTreeSet<String> {
        ids.iter()
            .filter(|id| documented_owner(id, replicas) == replica)
            .cloned()
            .collect()
    };

    let r = |n: u32| ("STREAMIQ__CLUSTER__REPLICA", n.to_string());
    let (mut r0, _) = start(0, &[r(0)]);
    let (r1, cwd1) = start(1, &[r(1)]);
    let (r2, _) = start(2, &[("HOSTNAME", "streamiq-2".to_string())]);
    let sets: Vec<BTreeSet<String>> = [&r0, &r1, &r2].iter().map(|p| watched(p)).collect();
    let mut all = BTreeSet::new();
    for (i, set) in sets.iter().enumerate() {
        assert_eq!(*set, expected(i as u32, 3), "replica {i} of 3");
        assert!(set.is_disjoint(&all), "a stream watched twice: {sets:?}");
        all.extend(set.iter().cloned());
    }
    assert_eq!(all.len(), 12, "{sets:?}");
    assert!(sets.iter().all(|s| !s.is_empty()), "{sets:?}");
    let m = text(r1.addr, "/metrics");
    assert_eq!(
        sample(&m, "streamiq_cluster_info{replica=\"1\",replicas=\"3\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "streamiq_cluster_streams_elsewhere"),
        Some((12 - sets[1].len()) as f64)
    );

    // A stream is added on the replica it falls to, and only there.
    let token = common::token_in(&cwd1.join("state/api-token"));
    let (id, owner) = (0..)
        .map(|i| format!("extra-{i}"))
        .map(|id| {
            let o = documented_owner(&id, 3);
            (id, o)
        })
        .find(|(_, o)| *o != 1)
        .unwrap();
    let body = format!(
        r#"{{"id": "{id}", "pipeline": "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=5/1"}}"#
    );
    let (code, reply) = common::http(r1.addr, "POST", "/api/v1/streams", Some(&token), &body);
    assert_eq!(code, 409, "{reply}");
    assert!(reply.contains(&format!("replica {owner} of 3")), "{reply}");

    // Scale to four: replica 0 restarts with the new count, replica 3 joins.
    r0.signal("KILL");
    r0.wait();
    let four = ("STREAMIQ__CLUSTER__REPLICAS", "4".to_string());
    let (r0, _) = start(0, &[r(0), four.clone()]);
    let (r3, _) = start(3, &[r(3), four]);
    let (now0, now3) = (watched(&r0), watched(&r3));
    assert_eq!(now0, expected(0, 4));
    assert_eq!(now3, expected(3, 4));
    assert!(
        now0.is_subset(&sets[0]),
        "replica 0 took streams it did not have: {now0:?} vs {:?}",
        sets[0]
    );
    for id in sets[0].difference(&now0) {
        assert!(
            now3.contains(id),
            "{id} left replica 0 but not for the new replica"
        );
    }
    // Only the new replica's share moved (every other stream keeps its replica).
    for id in &ids {
        let (before, after) = (documented_owner(id, 3), documented_owner(id, 4));
        assert!(before == after || after == 3, "{id}: {before} -> {after}");
    }
    assert_eq!(
        sample(
            &text(r3.addr, "/metrics"),
            "streamiq_cluster_info{replica=\"3\",replicas=\"4\"}"
        ),
        Some(1.0)
    );
    drop((r1, r2));
}

/// The Kubernetes manifests (deploy/kubernetes): every file passes kubernetes-validate
/// (strict: an unknown field fails, shown on a broken copy); the ConfigMap's
/// streamiq.toml passes `streamiq check-config` as pod `streamiq-1` with the
/// StatefulSet's environment; ports, probe paths, scrape annotations, the PodMonitor and
/// the replica count agree with each other and with the daemon's routes.
#[test]
fn kubernetes_manifests_validate_and_their_config_runs_as_a_replica() {
    let deploy = common::repo().join("deploy/kubernetes");
    let validator = common::venv_python().with_file_name("kubernetes-validate");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&deploy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let out = common::run_ok(Command::new(&validator).arg("--strict").args(&files));
    let passed = out.text().matches(" passed for resource ").count();
    assert_eq!(passed, 8, "{}", out.text());
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("statefulset.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(deploy.join("statefulset.yaml"))
            .unwrap()
            .replacen("failureThreshold: 60", "failureTreshold: 60", 1),
    )
    .unwrap();
    let bad = Command::new(&validator)
        .arg("--strict")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!bad.status.success(), "a misspelled field passed");

    // Every document of every file, as JSON.
    let docs = |path: &Path| -> Vec<serde_json::Value> {
        let out = common::run_ok(Command::new(common::venv_python()).args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ]).arg(path));
        serde_json::from_str(&out.text()).unwrap()
    };
    let kustomization = &docs(&deploy.join("kustomization.yaml"))[0];
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            name == "kustomization.yaml" || listed.contains(&name),
            "{name} not in kustomization.yaml"
        );
    }
    let sts = &docs(&deploy.join("statefulset.yaml"))[0];
    let config_map = &docs(&deploy.join("configmap.yaml"))[0];
    let pod = &sts["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let env = |name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    assert_eq!(
        env("STREAMIQ__CLUSTER__REPLICAS").unwrap(),
        sts["spec"]["replicas"].to_string(),
        "the replica count the daemons shard with is the StatefulSet's"
    );
    // Liveness never depends on cameras: /healthz; readiness and start-up: /readyz.
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["startupProbe"]["httpGet"]["path"], "/readyz");
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        port.to_string()
    );
    let monitor = &docs(&deploy.join("prometheus-operator/podmonitor.yaml"))[0];
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"][0]["port"],
        container["ports"][0]["name"]
    );
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        pod["metadata"]["labels"]
    );
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "--config", format!("{mount}/streamiq.toml")])
    );

    // The ConfigMap's config, as pod streamiq-1 reads it (paths of the image replaced
    // by this checkout's bundle and a scratch directory).
    let toml = config_map["data"]["streamiq.toml"].as_str().unwrap();
    assert!(
        toml.contains(&format!("listen = \"0.0.0.0:{port}\"")),
        "{toml}"
    );
    let cfg = dir.path().join("streamiq.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut check = Command::new(common::bin("streamiq"));
    check
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("HOSTNAME", "streamiq-1")
        .env(
            "STREAMIQ__CLUSTER__REPLICAS",
            env("STREAMIQ__CLUSTER__REPLICAS").unwrap(),
        )
        .env("STREAMIQ__MODEL__BUNDLE", common::bundle());
    let out = common::run_ok(&mut check);
    let log = out.text();
    assert!(log.contains("ok (6 streams"), "{log}");
    assert!(log.contains("replica 1 of 3 watches"), "{log}");
    // Without an ordinal in the host name, the index must be given.
    let refused = Command::new(common::bin("streamiq"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("HOSTNAME", "qc-box")
        .env("STREAMIQ__MODEL__BUNDLE", common::bundle())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cluster.replica") && err.contains("qc-box"),
        "{err}"
    );
}

/// Per-frame scores of `scan --per-frame` with `config` (path, pts -> score).
fn per_frame_scores(config: &Path, video: &Path, out: &Path) -> Vec<(String, f64)> {
    let ran = common::run_ok(
        Command::new(bin())
            .args(["scan", "--json", "--config"])
            .arg(config)
            .arg("--per-frame")
            .arg(out)
            .arg(video),
    );
    assert!(ran.stdout.contains("\"frames_scored\":"), "{}", ran.text());
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_string(), f[2].parse().unwrap())
        })
        .collect()
}

/// `scorer.backend = "kserve"` against a real Triton server (PyTriton's tritonserver
/// running the bundle's visual.onnx): `scan` gives the in-process scores within 1e-4,
/// with FP32 views and with a model that takes UINT8 pixels; the daemon starts while the
/// server is down (frames dropped as `scorer_unavailable`, the stream up), scores once it
/// comes, loses no stream when it is killed mid-run and recovers when it returns; a
/// server slower than `scorer.kserve.timeout` costs the frames (timeouts counted), not
/// the stream. `export-triton` writes a repository that Triton's own parser accepts
/// up to the ONNX Runtime backend it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_backend_scores_like_onnxruntime_through_triton_and_survives_it() {
    use common::{free_port, triton::Triton};
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mp4");
    common::synth(
        "testsrc2=size=640x360:rate=10:duration=2",
        &["-pix_fmt", "yuv420p"],
        &clip,
    );
    let port = free_port();
    let write = |name: &str, scorer: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[model]\nbundle = \"{}\"\nintra_threads = 1\n[scorer]\n{scorer}\n",
                bundle().display()
            ),
        )
        .unwrap();
        p
    };
    let local = write("local.toml", "");
    let remote_keys = format!(
        "backend = \"kserve\"\n[scorer.kserve]\nendpoint = \"http://127.0.0.1:{port}\"\nmax_batch_size = 16\ntimeout = \"20s\""
    );
    let remote = write("remote.toml", &remote_keys);

    // Parity, FP32 then UINT8 pixels.
    let want = per_frame_scores(&local, &clip, &dir.path().join("local.csv"));
    assert_eq!(want.len(), 20);
    for extra in [&[][..], &["--uint8"][..]] {
        let server = Triton::start(&bundle(), port, extra);
        let got = per_frame_scores(&remote, &clip, &dir.path().join("remote.csv"));
        assert_eq!(got.len(), want.len(), "{extra:?}");
        let worst = want
            .iter()
            .zip(&got)
            .map(|((pa, a), (pb, b))| {
                assert_eq!(pa, pb);
                (a - b).abs()
            })
            .fold(0.0, f64::max);
        eprintln!("kserve {extra:?}: largest score difference {worst:e}");
        assert!(worst < 1e-4, "{extra:?}: {worst}");
        server.kill();
    }

    // The daemon, with the server down at start.
    let stream = "[[streams]]\nid = \"cam\"\npipeline = \"videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=5/1\"\nsample_fps = 2.0\n";
    let mut s = settings(&config_text(stream, ""));
    s.server.api_token_file = dir.path().join("api-token");
    s.labels_db = dir.path().join("labels.sqlite");
    s.scorer.backend = streamiq::config::Backend::Kserve(
        streamiq::score::kserve::KserveConfig {
            endpoint: format!("http://127.0.0.1:{port}"),
            max_batch_size: 16,
            timeout: "1s".into(),
            ..Default::default()
        }
        .validate()
        .unwrap(),
    );
    let d = InProcess::start(s).await;
    let addr = d.addr;
    let b = bundle();
    tokio::task::spawn_blocking(move || {
        let m = || text(addr, "/metrics");
        let value = |series: &str| sample(&m(), series).unwrap_or(0.0);
        let scored = || value("streamiq_frames_scored_total{stream=\"cam\"}");
        let unavailable =
            || value("streamiq_frames_dropped_total{reason=\"scorer_unavailable\",stream=\"cam\"}");
        common::wait_until("frames dropped while the server is down", || {
            unavailable() >= 2.0
        });
        assert_eq!(scored(), 0.0);
        assert_eq!(value("streamiq_stream_up{stream=\"cam\"}"), 1.0);
        assert!(m().contains("execution=\"kserve\""), "{}", m());

        let server = Triton::start(&b, port, &[]);
        common::wait_until("scoring once the server answers", || scored() >= 3.0);
        server.kill();
        let before = unavailable();
        common::wait_until("frames dropped after the server was killed", || {
            unavailable() >= before + 2.0
        });
        assert_eq!(
            value("streamiq_stream_up{stream=\"cam\"}"),
            1.0,
            "the stream is not the scorer"
        );
        let _server = Triton::start(&b, port, &[]);
        let now = scored();
        common::wait_until("scoring again after the server came back", || {
            scored() >= now + 3.0
        });
        drop(_server);

        // Slower than the 1-s timeout: frames dropped, timeouts counted.
        let _slow = Triton::start(&b, port, &["--delay-ms", "2500"]);
        let before = value("streamiq_inference_errors_total{kind=\"timeout\"}");
        common::wait_until_for(Duration::from_secs(60), "timeouts counted", || {
            value("streamiq_inference_errors_total{kind=\"timeout\"}") >= before + 2.0
        });
        assert_eq!(value("streamiq_stream_up{stream=\"cam\"}"), 1.0);
        assert_eq!(
            get(addr, "/readyz").0,
            200,
            "a slow scorer is not a dead engine"
        );
    })
    .await
    .unwrap();
    d.stop().await;

    // export-triton: Triton parses the repository and stops only for want of the ONNX
    // Runtime backend (PyTriton's server has only the Python one); a second export of
    // the same name is refused.
    let repo = dir.path().join("repo");
    let export = || {
        Command::new(bin())
            .args(["export-triton", "--model"])
            .arg(bundle())
            .arg(&repo)
            .output()
            .unwrap()
    };
    let out = export();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = std::fs::read_to_string(repo.join("streamiq_visual/config.pbtxt")).unwrap();
    assert_eq!(
        std::fs::read(repo.join("streamiq_visual/1/model.onnx")).unwrap(),
        std::fs::read(bundle().join("visual.onnx")).unwrap()
    );
    assert!(
        config.contains("max_batch_size: 32") && config.contains("kind: KIND_GPU"),
        "{config}"
    );
    let again = export();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let site = common::triton_python()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("lib/python3.11/site-packages");
    let server_dir = site.join("pytriton/tritonserver");
    let parse = |repo: &Path| {
        let o = Command::new(server_dir.join("bin/tritonserver"))
            .env("LD_LIBRARY_PATH", site.join("nvidia_pytriton.libs"))
            .arg(format!("--model-repository={}", repo.display()))
            .arg(format!(
                "--backend-directory={}",
                server_dir.join("backends").display()
            ))
            .args([
                "--disable-auto-complete-config",
                "--allow-gpu-metrics=false",
                "--allow-http=false",
                "--allow-grpc=false",
                "--allow-metrics=false",
            ])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let log = parse(&repo);
    assert!(
        log.contains("unable to find backend library for backend 'onnxruntime'"),
        "{log}"
    );
    // The same with a misspelt field fails earlier, at parsing.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(broken.join("streamiq_visual/1")).unwrap();
    std::fs::copy(
        repo.join("streamiq_visual/1/model.onnx"),
        broken.join("streamiq_visual/1/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        broken.join("streamiq_visual/config.pbtxt"),
        config.replacen("\nmax_batch_size:", "\nmax_batch_sise:", 1),
    )
    .unwrap();
    let log = parse(&broken);
    assert!(
        log.contains("max_batch_sise") && !log.contains("unable to find backend library"),
        "{log}"
    );
}
