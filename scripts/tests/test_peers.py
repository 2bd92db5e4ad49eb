#!/usr/bin/env python3
"""Tests of scripts/peers.py (BRISQUE and NIQE beside `streamiq eval`), on real photographs.

    scripts/setup.sh peers
    scripts/tests/test_peers.py   (re-runs itself with /opt/streamiq/peers-venv/bin/python;
                                   or that venv's pytest, where installed)

The photographs are scikit-image's chelsea, coffee and rocket, taken from the main venv
($STREAMIQ_VENV, default /opt/streamiq/venv, that scripts/setup.sh makes). Checked:
  - BRISQUE and NIQE both rank each clean picture better (lower) than its heavily blurred
    and its heavily noised version;
  - the script, run as a user runs it on a tiny label CSV it is given, prints the
    `streamiq eval` layout and writes JSON with the expected columns, and a rerun is
    served from its cache;
  - unusable input fails with exit 2 and a message naming the culprit: a malformed CSV
    row (by line), a missing image (by path and line), a missing BRISQUE model file;
  - the statistics agree with src/eval.rs's own unit tests.
Exits non-zero on failure; the last line reads `N passed, M failed`.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "peers.py"
sys.path.insert(0, str(ROOT / "scripts"))
import peers  # noqa: E402  (standard library only at import)

if __name__ == "__main__":
    peers.peers_python(__file__)  # run by another python: re-run with the peers venv's

import cv2  # noqa: E402
import numpy as np  # noqa: E402

MAIN_VENV = Path(os.environ.get("STREAMIQ_VENV", "/opt/streamiq/venv"))
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
_WORK = {}


def skimage_data():
    """scikit-image's data folder in the main venv."""
    if "sk" not in _WORK:
        py = MAIN_VENV / "bin" / "python"
        if not py.exists():
            raise AssertionError(f"{py} is missing: run scripts/setup.sh (scikit-image's photographs)")
        out = subprocess.run([str(py), "-c", "import pathlib, skimage; "
                              "print(pathlib.Path(skimage.__file__).parent / 'data')"],
                             capture_output=True, text=True, check=True)
        _WORK["sk"] = Path(out.stdout.strip())
    return _WORK["sk"]


def workdir():
    if "dir" not in _WORK:
        _WORK["tmp"] = tempfile.TemporaryDirectory(prefix="test_peers-")
        _WORK["dir"] = Path(_WORK["tmp"].name)
    return _WORK["dir"]


def variants():
    """{photo stem: {clean|blur|noise|mildblur|mildnoise: path}}, written once into the work
    folder (blur and noise are heavy, the mild ones slight)."""
    if "variants" in _WORK:
        return _WORK["variants"]
    out = {}
    rng = np.random.default_rng(0)
    img_dir = workdir() / "images"
    img_dir.mkdir(exist_ok=True)
    for name in PHOTOS:
        img = cv2.imread(str(skimage_data() / name), cv2.IMREAD_COLOR)
        assert img is not None, name
        stem = Path(name).stem
        def noised(sigma, img=img):
            return np.clip(img + rng.normal(0.0, sigma * 255, img.shape), 0, 255).astype(np.uint8)
        v = {"clean": img, "blur": cv2.GaussianBlur(img, (0, 0), 6.0), "noise": noised(0.12),
             "mildblur": cv2.GaussianBlur(img, (0, 0), 1.0), "mildnoise": noised(0.02)}
        out[stem] = {}
        for k, im in v.items():
            p = img_dir / f"{stem}_{k}.png"
            cv2.imwrite(str(p), im)
            out[stem][k] = p
    _WORK["variants"] = out
    return out


def run_script(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=600)


def write_csv(path, rows, header="path,mos,type,level,source"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------

def test_peers_rank_clean_above_blurred_and_noised():
    state = peers._load_peers(peers.METHODS)
    bad = []
    for stem, v in variants().items():
        s = {k: peers.score_image(p, peers.METHODS, state) for k, p in v.items()}
        for m in peers.METHODS:
            for k in ("blur", "noise"):
                if not s["clean"][m] < s[k][m]:
                    bad.append(f"{stem}: {m} clean {s['clean'][m]:.2f} not below {k} {s[k][m]:.2f}")
    assert not bad, "; ".join(bad)


def test_script_report_and_json_columns():
    v = variants()
    rows = []
    for stem, p in v.items():
        rows.append((f"images/{p['clean'].name}", "1.000000", "reference", 0, stem))
        rows.append((f"images/{p['mildblur'].name}", "0.833333", "gaussian_blur", 1, stem))
        rows.append((f"images/{p['blur'].name}", "0.166667", "gaussian_blur", 5, stem))
        rows.append((f"images/{p['mildnoise'].name}", "0.833333", "gaussian_noise", 1, stem))
        rows.append((f"images/{p['noise'].name}", "0.166667", "gaussian_noise", 5, stem))
    # One absolute path, as eval.rs accepts.
    rows[0] = (str(v["chelsea"]["clean"].resolve()),) + rows[0][1:]
    csv = write_csv(workdir() / "labels.csv", rows)
    out, cache = workdir() / "report.json", workdir() / "cache.sqlite"
    r = run_script("--labels", csv, "--out", out, "--cache", cache)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for want in ("== brisque", "== niqe", "images 15 (0 unreadable)", "all            SRCC ",
                 "10 x 80/20     SRCC mean ", f"type {'gaussian_blur':<24} n 6    SRCC ",
                 f"type {'gaussian_noise':<24} n 6    SRCC ", "mean SRCC over 2 types: ",
                 "== side by side", "mean over kinds", "all images"):
        assert want in text, f"{want!r} not in:\n{text}"
    assert "type reference" not in text, text
    assert "peers: brisque+niqe 15/15 images scored" in r.stderr, r.stderr
    res = json.loads(out.read_text())
    assert res["methods"] == ["brisque", "niqe"]
    for m in ("brisque", "niqe"):
        rep = res["reports"][m]
        assert set(rep) == {"all", "splits", "per_type", "unreadable"}, rep.keys()
        assert set(rep["per_type"]) == {"gaussian_blur", "gaussian_noise"}, rep["per_type"]
        assert set(rep["all"]) == {"n", "srcc", "plcc", "plcc_logistic"}
        assert rep["all"]["n"] == 15
        assert all(t["n"] == 6 for t in rep["per_type"].values()), rep["per_type"]
        # Clean beats its heavily distorted versions for every photo (first test), so the
        # negated scores agree with mos over the whole set.
        assert rep["all"]["srcc"] > 0.5, (m, rep["all"])
    for m in ("brisque", "niqe"):
        w = res["within_picture"][m]
        assert set(w) == {"gaussian_blur", "gaussian_noise"} and all(
            t["pictures"] == 3 and -1.0 <= t["srcc_mean"] <= 1.0 for t in w.values()), w
    assert "brisque/pic" in text and "niqe/pic" in text, text
    assert len(res["images"]) == 15
    row = res["images"][2]
    assert set(row) == {"path", "mos", "type", "level", "source", "brisque", "niqe"}, row
    assert row["path"] == "images/chelsea_blur.png" and row["type"] == "gaussian_blur", row
    assert row["level"] == "5" and row["source"] == "chelsea", row
    assert res["timing"]["scored"] == 15 and res["timing"]["images_per_s"] > 0
    # A rerun is served from the cache, with the same figures.
    r2 = run_script("--labels", csv, "--out", workdir() / "report2.json", "--cache", cache, "--jobs", "1")
    assert r2.returncode == 0, r2.stderr
    assert "all 15 images cached" in r2.stdout, r2.stdout
    res2 = json.loads((workdir() / "report2.json").read_text())
    assert res2["reports"] == res["reports"]
    # One peer alone.
    r3 = run_script("--labels", csv, "--cache", cache, "--methods", "niqe")
    assert r3.returncode == 0 and "== niqe" in r3.stdout and "brisque" not in r3.stdout, r3.stdout


def test_unusable_input_names_the_culprit():
    v = variants()
    good = [(f"images/{p.name}", "0.5", "blur", 1, "x") for p in v["coffee"].values()][:3]
    d = workdir()
    cases = [
        (good[:1] + [(good[1][0], "oops", "blur", 1, "x")] + good[2:], ["line 3", '"oops"']),
        (good + [("images/coffee_clean.png",)], ["line 5", "missing column mos"]),
        (good[:2] + [("images/nowhere.png", "0.5", "blur", 1, "x")], ["line 4", "nowhere.png", "missing"]),
        (good[:2], ["2 labelled rows"]),
    ]
    for i, (rows, wants) in enumerate(cases):
        csv = write_csv(d / f"bad{i}.csv", rows)
        r = run_script("--labels", csv, "--cache", "none")
        assert r.returncode == 2, (i, r.returncode, r.stdout, r.stderr)
        for w in wants + [str(csv)]:
            assert w in r.stderr, (i, w, r.stderr)
    csv = write_csv(d / "badheader.csv", good, header="file,score")
    r = run_script("--labels", csv, "--cache", "none")
    assert r.returncode == 2 and "path and mos" in r.stderr, r.stderr
    csv = write_csv(d / "ok.csv", good)
    r = run_script("--labels", csv, "--cache", "none", env={"STREAMIQ_BRISQUE_DIR": str(d / "no-model")})
    assert r.returncode == 2 and str(d / "no-model" / "brisque_model_live.yml") in r.stderr, r.stderr
    r = run_script("--labels", csv, "--cache", "none", "--methods", "brisque,piqe")
    assert r.returncode == 2 and "piqe" in r.stderr, r.stderr
    r = run_script("--labels", d / "absent.csv", "--cache", "none")
    assert r.returncode == 2 and "absent.csv" in r.stderr, r.stderr


def test_statistics_match_eval_rs():
    assert peers.ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert abs(peers.spearman(x, [2.0, 4.0, 6.0, 8.0, 10.0]) - 1.0) < 1e-12
    assert abs(peers.spearman(x, [5.0, 4.0, 3.0, 2.0, 1.0]) + 1.0) < 1e-12
    y = [v ** 4 for v in x]
    assert abs(peers.spearman(x, y) - 1.0) < 1e-12 and peers.pearson(x, y) < 0.97
    assert peers.pearson(x, [1.0] * 5) == 0.0
    xs = [i / 39.0 for i in range(40)]
    ys = [1.0 + 4.0 / (1.0 + np.exp(-(v - 0.5) / 0.08)) for v in xs]
    assert peers.pearson(xs, ys) < 0.97 and peers.plcc_logistic(xs, ys) > 0.999
    # fastrand's shuffle is a permutation, and deterministic for a seed.
    a, b = list(range(50)), list(range(50))
    peers.WyRand(0).shuffle(a)
    peers.WyRand(0).shuffle(b)
    assert a == b and sorted(a) == list(range(50)) and a != list(range(50))


if __name__ == "__main__":
    from runner import run_tests
    run_tests(globals())
