//! The Debian package (`scripts/make_deb.sh`, `make deb`), built here from the test
//! binary: its metadata, contents and conffile; it depends on no libtorch; extracted into
//! a temporary root, its binary checks its own config and scans a clip with the packaged
//! model and the packaged ONNX Runtime, with no variable pointing at either.

use std::process::Command;

mod common;
use common::repo;

fn dpkg_deb(args: &[&str], deb: &std::path::Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_debian_package_installs_into_a_root_and_its_binary_runs_there() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/make_deb.sh"))
        .args([
            "--fast",
            "--binary",
            env!("CARGO_BIN_EXE_streamiq"),
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");

    let field = |name: &str| {
        dpkg_deb(&["-f"], &deb)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
            .unwrap_or_default()
    };
    assert_eq!(field("Package"), "streamiq");
    let depends = field("Depends");
    for needed in [
        "libgstreamer1.0-0",
        "gstreamer1.0-plugins-good",
        "gstreamer1.0-libav",
        "libc6",
    ] {
        assert!(depends.contains(needed), "{needed} missing from {depends}");
    }
    assert!(
        !depends.contains("torch"),
        "the daemon package pulls in libtorch: {depends}"
    );

    let contents = dpkg_deb(&["-c"], &deb);
    for path in [
        "./usr/bin/streamiq",
        "./usr/lib/streamiq/libonnxruntime.so.",
        "./usr/share/streamiq/models/streamiq-tiny/visual.onnx",
        "./usr/share/streamiq/config/alerts/streamiq.rules.yml",
        "./usr/lib/systemd/system/streamiq.service",
        "./usr/lib/sysusers.d/streamiq.conf",
        "./usr/lib/tmpfiles.d/streamiq.conf",
        "./etc/streamiq/streamiq.toml",
        "./usr/share/doc/streamiq/copyright",
    ] {
        assert!(
            contents.contains(path),
            "{path} not in the package:\n{contents}"
        );
    }
    assert!(
        !contents.contains("streamiq-adapt") && !contents.contains("libtorch"),
        "{contents}"
    );
    let control = dir.path().join("control");
    let out = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&control)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles"))
            .unwrap()
            .trim(),
        "/etc/streamiq/streamiq.toml"
    );

    // Extracted into a temporary root.
    let root = dir.path().join("root");
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success());
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/streamiq.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/streamiq run --config /etc/streamiq/streamiq.toml"),
        "{unit}"
    );
    assert!(
        unit.contains("WorkingDirectory=/usr/share/streamiq"),
        "{unit}"
    );
    assert!(!unit.contains("/opt/streamiq/bin"), "{unit}");
    let config = std::fs::read_to_string(root.join("etc/streamiq/streamiq.toml")).unwrap();
    assert!(
        config.contains("bundle = \"/usr/share/streamiq/models/streamiq-tiny\""),
        "{config}"
    );
    assert!(
        !config.contains("state/"),
        "a path into a checkout: {config}"
    );

    let bin = root.join("usr/bin/streamiq");
    let bundle = root.join("usr/share/streamiq/models/streamiq-tiny");
    let packaged = |c: &mut Command| {
        // Nothing points at the build machine's ONNX Runtime: the packaged one is found
        // beside the binary.
        c.env_remove("ORT_DYLIB_PATH").current_dir(dir.path());
    };
    // The packaged config, its model path moved into the root as an override would.
    let mut c = Command::new(&bin);
    packaged(&mut c);
    let out = c
        .args(["check-config", "--config"])
        .arg(root.join("etc/streamiq/streamiq.toml"))
        .env("STREAMIQ__MODEL__BUNDLE", &bundle)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("bundle streamiq-tiny verified"), "{err}");

    let clip = dir.path().join("clip.mp4");
    common::synth(
        "testsrc2=size=320x180:rate=10:duration=1",
        &["-pix_fmt", "yuv420p"],
        &clip,
    );
    let mut c = Command::new(&bin);
    packaged(&mut c);
    let out = c
        .args(["scan", "--json", "--model"])
        .arg(&bundle)
        .arg(&clip)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lib = root.join("usr/lib/streamiq/libonnxruntime.so.");
    assert!(
        err.contains(&lib.display().to_string()),
        "the packaged ONNX Runtime was not the one loaded: {err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["frames_scored"], 10, "{report}");
}
