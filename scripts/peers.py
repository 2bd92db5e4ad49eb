#!/usr/bin/env python3
"""Scores a `streamiq eval` label CSV with the classic blind IQA peers, BRISQUE and NIQE,
and reports their agreement with the labels exactly as `streamiq eval` reports the
model's (src/eval.rs), so that the model can be compared with them on the same images.

    scripts/setup.sh peers          # once: /opt/streamiq/peers-venv and Debian's opencv-data
    scripts/peers.py --labels SET/labels.csv \\
        [--out REPORT.json] [--methods brisque,niqe] [--jobs 2] [--cache DB] [--splits 10]

(run by any python, it re-runs itself with /opt/streamiq/peers-venv/bin/python).

The CSV is read as `streamiq eval` reads it: a header naming at least `path` and `mos`
(and `type`, for the figures per distortion kind), comma-separated, relative image paths
resolved against the CSV's folder. `streamiq distort` writes such a file (path, mos, type,
level, source; mos falls with the level).

The peers:
  brisque  OpenCV's BRISQUE (opencv-contrib cv2.quality) with the LIVE model that Debian's
           opencv-data installs (/usr/share/opencv4/quality); on the 8-bit picture.
  niqe     scikit-video's NIQE (its pristine-patch parameters, 96 px patches) on the
           luma Y = 0.299 R + 0.587 G + 0.114 B in 0..255; scipy.misc.imresize, which it
           calls and SciPy no longer has, is supplied here (Pillow bicubic, mode F).
Both give lower values to better pictures, so they are negated before the correlations:
SRCC and PLCC are those of the negated score with the label, so positive is agreement,
as for the model. The raw scores are in the JSON.

The report, per peer, is `streamiq eval`'s: SRCC / PLCC / PLCC after its 4-parameter
logistic fit over all images together, the same seeded 80/20 splits (fastrand's wyrand,
seed 0), SRCC per kind (within each `type`; `reference`, whose labels are all equal, is
left out) and the mean over kinds; then a table of the peers side by side. Where the CSV
has a `source` column (as `streamiq distort` writes), the table adds, per peer, the SRCC
inside each picture's own ladder of a kind, averaged over the pictures ("/pic"): pooled
figures also charge a peer for scoring whole pictures high or low, this one does not.

Per-image scores are cached (sqlite, keyed by method, its version and the file's SHA-256;
default $XDG_CACHE_HOME/streamiq/peers.sqlite), so a rerun is instant. Images are scored
in --jobs processes (default 2); progress goes to stderr.

Exit status: 0 success; 2 unusable input (a malformed CSV names its line, a missing image
names itself and its CSV line, a missing BRISQUE model file names itself).
"""
import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import sqlite3
import sys
import time
import warnings
from pathlib import Path

from bundle_io import sha256

METHODS = ("brisque", "niqe")
BRISQUE_DIR = Path(os.environ.get("STREAMIQ_BRISQUE_DIR", "/usr/share/opencv4/quality"))
BRISQUE_MODEL = BRISQUE_DIR / "brisque_model_live.yml"
BRISQUE_RANGE = BRISQUE_DIR / "brisque_range_live.yml"
NIQE_PATCH = 96


class Unusable(Exception):
    """Input that cannot be used; the message names the culprit."""


# ---------------------------------------------------------------------------------------
# The label file, read as src/eval.rs `read_labels` reads it.
# ---------------------------------------------------------------------------------------

def read_labels(csv):
    """[(path, mos, kind or None, line number, extra columns)] from a label CSV."""
    csv = Path(csv)
    try:
        text = csv.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise Unusable(f"{csv}: {e}") from None
    lines = [(n, t) for n, t in enumerate(text.splitlines()) if t.strip()]
    if not lines:
        raise Unusable(f"{csv}: empty file")
    _, header = lines[0]
    cols = [c.strip() for c in header.split(",")]
    if "path" not in cols or "mos" not in cols:
        raise Unusable(f"{csv}: header {header!r} must name the columns path and mos")
    pi, mi = cols.index("path"), cols.index("mos")
    ti = cols.index("type") if "type" in cols else None
    base = csv.parent
    out = []
    for n, line in lines[1:]:
        f = [c.strip() for c in line.split(",")]

        def get(i, f=f, n=n, line=line):
            if i >= len(f):
                raise Unusable(f"{csv}: line {n + 1}: missing column {cols[i]} "
                               f"({len(f)} fields, header has {len(cols)}): {line!r}")
            return f[i]

        raw = get(mi)
        try:
            mos = float(raw)
        except ValueError:
            mos = math.nan
        if not math.isfinite(mos):
            raise Unusable(f'{csv}: line {n + 1}: mos "{raw}" is not a number')
        p = Path(get(pi))
        if not str(p):
            raise Unusable(f"{csv}: line {n + 1}: empty path")
        extra = {c: f[i] for i, c in enumerate(cols) if i < len(f) and c not in ("path", "mos")}
        out.append((p if p.is_absolute() else base / p, mos,
                    get(ti) if ti is not None else None, n + 1, extra))
    if len(out) < 3:
        raise Unusable(f"{csv}: {len(out)} labelled rows; at least 3 are needed")
    return out


# ---------------------------------------------------------------------------------------
# Statistics: a line-for-line port of src/eval.rs, so that the figures compare.
# ---------------------------------------------------------------------------------------

def ranks(v):
    """1-based ranks, ties given their mean rank."""
    idx = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and v[idx[j + 1]] == v[idx[i]]:
            j += 1
        mean = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            r[idx[k]] = mean
        i = j + 1
    return r


def pearson(x, y):
    """Pearson correlation; 0 when either side is constant."""
    n = float(len(x))
    mx, my = sum(x) / n, sum(y) / n
    sxy = sxx = syy = 0.0
    for a, b in zip(x, y):
        sxy += (a - mx) * (b - my)
        sxx += (a - mx) ** 2
        syy += (b - my) ** 2
    if sxx <= 0.0 or syy <= 0.0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def _fmax(a, b):
    """Rust's f64::max: NaN loses."""
    if a != a:
        return b
    if b != b:
        return a
    return a if a >= b else b


def _exp(v):
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def _logistic4(p, x):
    return (p[0] - p[1]) / (1.0 + _exp(-(x - p[2]) / _fmax(abs(p[3]), 1e-9))) + p[1]


def _solve4(a, b):
    a = [row[:] for row in a]
    b = b[:]
    for c in range(4):
        piv = c
        for i in range(c + 1, 4):  # max_by keeps the last of equal maxima
            if abs(a[i][c]) >= abs(a[piv][c]):
                piv = i
        if abs(a[piv][c]) < 1e-300:
            return None
        a[c], a[piv] = a[piv], a[c]
        b[c], b[piv] = b[piv], b[c]
        pivot_row = a[c][:]
        for r in range(c + 1, 4):
            f = a[r][c] / pivot_row[c]
            for k in range(c, 4):
                a[r][k] -= f * pivot_row[k]
            b[r] -= f * b[c]
    x = [0.0] * 4
    for c in range(3, -1, -1):
        x[c] = (b[c] - sum(a[c][k] * x[k] for k in range(c + 1, 4))) / a[c][c]
    return x


def plcc_logistic(x, y):
    """PLCC after eval.rs's Levenberg-Marquardt fit of the 4-parameter logistic."""
    plain = pearson(x, y)
    ymax, ymin = max(y), min(y)
    mx = sum(x) / len(x)
    sx = _fmax(math.sqrt(sum((v - mx) ** 2 for v in x) / len(x)), 1e-6)
    p = [ymax, ymin, mx, sx]

    def sse(p):
        return sum((_logistic4(p, a) - b) ** 2 for a, b in zip(x, y))

    err = sse(p)
    lam = 1e-2
    for _ in range(200):
        jtj = [[0.0] * 4 for _ in range(4)]
        jtr = [0.0] * 4
        for a, b in zip(x, y):
            f0 = _logistic4(p, a)
            g = [0.0] * 4
            for k in range(4):
                q = p[:]
                h = 1e-6 * _fmax(abs(q[k]), 1e-3)
                q[k] += h
                g[k] = (_logistic4(q, a) - f0) / h
            for i in range(4):
                jtr[i] += g[i] * (b - f0)
                for j in range(4):
                    jtj[i][j] += g[i] * g[j]
        for i in range(4):
            jtj[i][i] *= 1.0 + lam
        step = _solve4(jtj, jtr)
        if step is None:
            break
        q = [p[k] + step[k] for k in range(4)]
        e = sse(q)
        if e < err:
            done = (err - e) < 1e-12 * _fmax(err, 1e-12)
            p, err = q, e
            lam = _fmax(lam / 3.0, 1e-9)
            if done:
                break
        else:
            lam *= 4.0
            if lam > 1e9:
                break
    r = pearson([_logistic4(p, a) for a in x], y)
    return r if math.isfinite(r) and abs(r) >= abs(plain) else plain


def agreement(scores, labels):
    return {"n": len(scores), "srcc": spearman(scores, labels), "plcc": pearson(scores, labels),
            "plcc_logistic": plcc_logistic(scores, labels)}


class WyRand:
    """fastrand 2's generator (`Rng::with_seed`, `shuffle`), for eval's very splits."""
    M = (1 << 64) - 1

    def __init__(self, seed):
        self.s = seed & self.M

    def u64(self):
        self.s = (self.s + 0x2D358DCCAA6C78A5) & self.M
        t = self.s * (self.s ^ 0x8BB84B93962EACC9)
        return (t & self.M) ^ (t >> 64)

    def below(self, n):
        """gen_mod_u64: uniform in 0..n (Lemire)."""
        m = self.u64() * n
        lo = m & self.M
        if lo < n:
            t = ((1 << 64) - n) % n
            while lo < t:
                m = self.u64() * n
                lo = m & self.M
        return m >> 64

    def shuffle(self, v):
        for i in range(1, len(v)):
            j = self.below(i + 1)
            v[i], v[j] = v[j], v[i]


def median(v):
    if not v:
        return 0.0
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 == 1 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def split_summary(scores, labels, splits, seed=0):
    rng = WyRand(seed)
    s, p = [], []
    for _ in range(splits):
        idx = list(range(len(scores)))
        rng.shuffle(idx)
        test = idx[:min(max(len(scores) // 5, 3), len(scores))]
        a = agreement([scores[i] for i in test], [labels[i] for i in test])
        s.append(a["srcc"])
        p.append(a["plcc_logistic"])
    k = max(splits, 1)
    return {"splits": splits, "srcc_mean": sum(s) / k, "srcc_median": median(s),
            "plcc_mean": sum(p) / k, "plcc_median": median(p)}


def report(labelled, scores, errors, splits):
    """eval.rs `report`: scores aligned with labelled (None = not scored)."""
    ok = [(i, s) for i, s in enumerate(scores) if s is not None]
    xs = [s for _, s in ok]
    ys = [labelled[i][1] for i, _ in ok]
    groups = {}
    for i, s in ok:
        kind = labelled[i][2]
        if kind is not None:
            g = groups.setdefault(kind, ([], []))
            g[0].append(s)
            g[1].append(labelled[i][1])
    if len(xs) < 3:
        raise Unusable(f"only {len(xs)} images could be scored; at least 3 are needed")
    per_type = {k: agreement(x, y) for k, (x, y) in sorted(groups.items(), key=lambda kv: kv[0].encode())
                if len(x) >= 3 and any(v != y[0] for v in y)}
    return {"all": agreement(xs, ys), "splits": split_summary(xs, ys, splits, 0),
            "per_type": per_type, "unreadable": errors}


def within_picture(labelled, scores):
    """Per kind: SRCC between score and label inside each picture's own ladder (its rows of
    that kind, by the `source` column), averaged over pictures; None without `source`.
    A diagnostic beside eval's pooled figure: it leaves out how pictures compare."""
    groups = {}
    for (_, mos, kind, _, extra), s in zip(labelled, scores):
        if s is None or kind is None or "source" not in extra:
            continue
        g = groups.setdefault(kind, {}).setdefault(extra["source"], ([], []))
        g[0].append(s)
        g[1].append(mos)
    if not groups:
        return None
    out = {}
    for kind in sorted(groups, key=str.encode):
        r = [spearman(x, y) for x, y in groups[kind].values() if len(x) >= 2 and any(v != y[0] for v in y)]
        if r:
            out[kind] = {"pictures": len(r), "srcc_mean": sum(r) / len(r)}
    return out


def _f4(v):
    return "NaN" if v != v else f"{v:.4f}"


def format_text(r):
    """eval.rs `format_text`, line for line."""
    a = r["all"]
    s = [f"images {a['n']} ({len(r['unreadable'])} unreadable)"]
    s += [f"  unreadable {p}: {e}" for p, e in r["unreadable"]]
    s.append(f"all            SRCC {_f4(a['srcc'])}  PLCC {_f4(a['plcc'])}  "
             f"PLCC(logistic) {_f4(a['plcc_logistic'])}")
    sp = r["splits"]
    s.append(f"{sp['splits']} x 80/20     SRCC mean {_f4(sp['srcc_mean'])} median "
             f"{_f4(sp['srcc_median'])}  PLCC mean {_f4(sp['plcc_mean'])} median {_f4(sp['plcc_median'])}")
    for k, t in r["per_type"].items():
        s.append(f"type {k:<24} n {t['n']:<4} SRCC {_f4(t['srcc'])}  PLCC {_f4(t['plcc_logistic'])}")
    if r["per_type"]:
        mean = sum(t["srcc"] for t in r["per_type"].values()) / len(r["per_type"])
        s.append(f"mean SRCC over {len(r['per_type'])} types: {_f4(mean)}")
    return "\n".join(s) + "\n"


def mean_srcc(r):
    t = r["per_type"]
    return sum(v["srcc"] for v in t.values()) / len(t) if t else None


def side_by_side(reports, within=None):
    """SRCC per kind, mean over kinds and over all images, one column per peer (pooled over
    the pictures, as eval); with `within`, a column per peer of the mean SRCC inside each
    picture too."""
    names = list(reports)
    within = {n: w for n, w in (within or {}).items() if w}
    kinds = sorted({k for r in reports.values() for k in r["per_type"]}, key=str.encode)
    w = max([len("mean over kinds")] + [len(k) for k in kinds])
    cols = [(n, "pooled") for n in names] + [(n, "picture") for n in names if n in within]
    head = f"{'SRCC':<{w}}  " + "  ".join(f"{n if c == 'pooled' else n + '/pic':>11}" for n, c in cols)
    rows = [head, "-" * len(head)]

    def cell(n, c, k):
        v = reports[n]["per_type"].get(k, {}).get("srcc") if c == "pooled" else \
            within[n].get(k, {}).get("srcc_mean")
        return f"{_f4(v) if v is not None else '-':>11}"

    def mean(n, c):
        vals = [t["srcc"] for t in reports[n]["per_type"].values()] if c == "pooled" else \
            [t["srcc_mean"] for t in within[n].values()]
        return f"{_f4(sum(vals) / len(vals)) if vals else '-':>11}"

    for k in kinds:
        rows.append(f"{k:<{w}}  " + "  ".join(cell(n, c, k) for n, c in cols))
    rows.append("-" * len(head))
    rows.append(f"{'mean over kinds':<{w}}  " + "  ".join(mean(n, c) for n, c in cols))
    rows.append(f"{'all images':<{w}}  " + "  ".join(
        f"{_f4(reports[n]['all']['srcc']) if c == 'pooled' else '-':>11}" for n, c in cols))
    if within:
        rows.append("(/pic: SRCC inside each picture's own levels of the kind, mean over pictures)")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------
# The peers.
# ---------------------------------------------------------------------------------------

def _imresize(arr, size, interp="bilinear", mode=None):
    """scipy.misc.imresize as SciPy < 1.3 had it, for float ('F') images."""
    import numpy as np
    from PIL import Image
    arr = np.asarray(arr)
    im = Image.fromarray(arr.astype(np.float32), mode="F") if mode == "F" or arr.dtype.kind == "f" \
        else Image.fromarray(arr)
    if isinstance(size, (int, np.integer)):
        size = tuple((np.array(im.size) * (size / 100.0)).astype(int))
    elif isinstance(size, (float, np.floating)):
        size = tuple((np.array(im.size) * size).astype(int))
    else:
        size = (size[1], size[0])
    resample = {"nearest": Image.NEAREST, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR,
                "bicubic": Image.BICUBIC, "cubic": Image.BICUBIC}[interp]
    return np.array(im.resize(size, resample=resample))


def _versions(brisque_model=BRISQUE_MODEL, brisque_range=BRISQUE_RANGE):
    """Cache keys of the peers: what their scores depend on besides the image."""
    import cv2
    import skvideo
    h = hashlib.sha256()
    for f in (brisque_model, brisque_range):
        h.update(Path(f).read_bytes() if Path(f).is_file() else b"")
    return {"brisque": f"brisque-live/opencv-{cv2.__version__}/model-{h.hexdigest()[:12]}",
            "niqe": f"niqe-96/scikit-video-{skvideo.__version__}/pil-bicubic"}


_STATE = {}


def _load_peers(methods, brisque_model=BRISQUE_MODEL, brisque_range=BRISQUE_RANGE):
    """Imports and models of the peers; raises Unusable naming what is missing."""
    try:
        import cv2
        import numpy  # noqa: F401
    except ImportError as e:
        raise Unusable(f"{e}: run scripts/setup.sh peers and use /opt/streamiq/peers-venv/bin/python") from None
    cv2.setNumThreads(1)
    st = {"methods": methods}
    if "brisque" in methods:
        if not hasattr(cv2, "quality"):
            raise Unusable(f"cv2 {cv2.__version__} at {cv2.__file__} has no cv2.quality (BRISQUE): "
                           "it needs opencv-contrib; run scripts/setup.sh peers and use "
                           "/opt/streamiq/peers-venv/bin/python")
        for f in (brisque_model, brisque_range):
            if not Path(f).is_file():
                raise Unusable(f"BRISQUE model file {f} is missing (Debian's opencv-data installs it: "
                               "scripts/setup.sh apt; or set STREAMIQ_BRISQUE_DIR)")
        try:
            st["brisque"] = cv2.quality.QualityBRISQUE_create(str(brisque_model), str(brisque_range))
        except cv2.error as e:
            raise Unusable(f"BRISQUE model {brisque_model} / {brisque_range} cannot be loaded: {e}") from None
    if "niqe" in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import scipy.misc
                scipy.misc.imresize = _imresize  # what scikit-video 1.1.11 calls
                import skvideo.measure
            except ImportError as e:
                raise Unusable(f"{e}: NIQE needs scikit-video; run scripts/setup.sh peers and use "
                               "/opt/streamiq/peers-venv/bin/python") from None
        st["niqe"] = skvideo.measure.niqe
    return st


def score_image(path, methods, state):
    """{method: raw score} of one image; raises ValueError when it cannot be scored."""
    import cv2
    import numpy as np
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("cannot decode the image")
    out = {}
    if "brisque" in methods:
        out["brisque"] = float(state["brisque"].compute(bgr)[0])
    if "niqe" in methods:
        h, w = bgr.shape[:2]
        if min(h, w) <= 2 * NIQE_PATCH + 1:
            raise ValueError(f"{w}x{h}: NIQE needs both sides over {2 * NIQE_PATCH + 1} px")
        f = bgr.astype(np.float64)
        y = 0.299 * f[:, :, 2] + 0.587 * f[:, :, 1] + 0.114 * f[:, :, 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["niqe"] = float(state["niqe"](y.astype(np.float32))[0])
    for m, v in out.items():
        if not math.isfinite(v):
            raise ValueError(f"{m} gave {v}")
    return out


def _worker_init(methods, model, rng):
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = "1"
    _STATE.update(_load_peers(methods, model, rng))


def _worker(task):
    i, path, methods = task
    t = time.perf_counter()
    try:
        return i, score_image(path, methods, _STATE), None, time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 -- reported as unreadable, like eval does
        return i, None, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e), \
            time.perf_counter() - t


# ---------------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------------

class Cache:
    def __init__(self, path):
        self.path = Path(path) if path else None
        self.db = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=60)
            self.db.execute("CREATE TABLE IF NOT EXISTS scores (method TEXT, sha TEXT, score REAL, "
                            "PRIMARY KEY (method, sha))")

    def get(self, method, sha):
        if not self.db:
            return None
        r = self.db.execute("SELECT score FROM scores WHERE method=? AND sha=?", (method, sha)).fetchone()
        return r[0] if r else None

    def put(self, method, sha, score):
        if self.db:
            self.db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", (method, sha, score))

    def commit(self):
        if self.db:
            self.db.commit()


def default_cache():
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "streamiq" / "peers.sqlite")


# ---------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------

def run(labels_csv, methods, jobs=2, cache_path=None, splits=10, brisque_model=BRISQUE_MODEL,
        brisque_range=BRISQUE_RANGE, progress=True):
    """Scores the set and returns the JSON-ready result."""
    labelled = read_labels(labels_csv)
    missing = [(p, n) for p, _, _, n, _ in labelled if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise Unusable(f"{labels_csv}: {len(missing)} image(s) missing: " + "; ".join(
            f"line {n}: {p}" for p, n in missing[:5]) + more)
    _load_peers(methods, brisque_model, brisque_range)  # fail early, in this process
    versions = _versions(brisque_model, brisque_range)
    cache = Cache(cache_path)
    t0 = time.perf_counter()
    shas = [sha256(p) for p, *_ in labelled]
    raw = [dict() for _ in labelled]
    todo = []
    for i, sha in enumerate(shas):
        for m in methods:
            v = cache.get(versions[m], sha)
            if v is not None:
                raw[i][m] = v
        need = tuple(m for m in methods if m not in raw[i])
        if need:
            todo.append((i, str(labelled[i][0]), need))
    cached = len(labelled) - len(todo)
    errors = {}
    busy = 0.0
    last = 0.0

    def tell(done, final=False):
        nonlocal last
        now = time.perf_counter()
        if progress and (final or now - last > 2.0):
            last = now
            el = now - t0
            rate = done / el if el > 0 else 0.0
            eta = (len(todo) - done) / rate if rate > 0 else 0.0
            print(f"peers: {'+'.join(methods)} {done}/{len(todo)} images scored "
                  f"({cached} cached), {rate:.2f}/s, {el:.0f}s elapsed, eta {eta:.0f}s",
                  file=sys.stderr, flush=True)

    def take(res):
        nonlocal busy
        i, out, err, dt = res
        busy += dt
        if err is not None:
            errors[i] = err
            print(f"peers: {labelled[i][0]}: {err}", file=sys.stderr, flush=True)
            return
        raw[i].update(out)
        for m, v in out.items():
            cache.put(versions[m], shas[i], v)

    if todo:
        if jobs > 1 and len(todo) > 1:
            ctx = mp.get_context("fork")
            with ctx.Pool(min(jobs, len(todo)), _worker_init, (methods, brisque_model, brisque_range)) as pool:
                for done, res in enumerate(pool.imap_unordered(_worker, todo, chunksize=1), 1):
                    take(res)
                    if done % 20 == 0:
                        cache.commit()
                    tell(done)
        else:
            _worker_init(methods, brisque_model, brisque_range)
            for done, t in enumerate(todo, 1):
                take(_worker(t))
                if done % 20 == 0:
                    cache.commit()
                tell(done)
        cache.commit()
        tell(len(todo), final=True)
    wall = time.perf_counter() - t0
    unreadable = [(str(labelled[i][0]), e) for i, e in sorted(errors.items())]
    reports, within = {}, {}
    for m in methods:
        q = [-raw[i][m] if m in raw[i] else None for i in range(len(labelled))]
        reports[m] = report(labelled, q, unreadable, splits)
        within[m] = within_picture(labelled, q)
    base = Path(labels_csv).parent
    rows = []
    for (p, mos, kind, _, extra), r in zip(labelled, raw):
        try:
            shown = str(p.relative_to(base))
        except ValueError:
            shown = str(p)
        row = {"path": shown, "mos": mos, "type": kind, **{k: v for k, v in extra.items() if k != "type"}}
        row.update({m: r.get(m) for m in methods})
        rows.append(row)
    return {
        "labels": str(labels_csv),
        "methods": list(methods),
        "versions": {m: versions[m] for m in methods},
        "sign": "SRCC/PLCC are of the negated raw score (lower raw = better) with mos",
        "reports": reports,
        "mean_srcc": {m: mean_srcc(reports[m]) for m in methods},
        "within_picture": within,
        "timing": {"images": len(labelled), "scored": len(todo), "cached": cached, "jobs": jobs,
                   "wall_s": wall, "images_per_s": len(todo) / wall if todo and wall > 0 else None,
                   "cpu_s_per_image": busy / len(todo) if todo else None},
        "images": rows,
    }


def format_result(res):
    out = []
    for m in res["methods"]:
        out.append(f"== {m} ({res['versions'][m]}; lower is better, so SRCC/PLCC of -{m})")
        out.append(format_text(res["reports"][m]))
    if len(res["methods"]) > 1 or any(res["within_picture"].values()):
        out.append("== side by side")
        out.append(side_by_side(res["reports"], res["within_picture"]))
    return "\n".join(out)


def peers_python(script=None):
    """Re-runs this script (or `script`) with the peers venv's python when the current one lacks the peers
    (so `scripts/peers.py ...` works from any shell); STREAMIQ_PEERS_VENV names the venv."""
    venv = Path(os.environ.get("STREAMIQ_PEERS_VENV", "/opt/streamiq/peers-venv"))
    py = venv / "bin" / "python"
    if Path(sys.prefix).resolve() == venv.resolve() or not py.exists():
        return
    try:
        import cv2
        import skvideo  # noqa: F401
        if hasattr(cv2, "quality"):
            return
    except ImportError:
        pass
    os.execv(str(py), [str(py), str(Path(script or __file__).resolve()), *sys.argv[1:]])


def main(argv=None):
    if argv is None:
        peers_python()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", required=True, type=Path, help="label CSV (path, mos[, type] ...)")
    ap.add_argument("--out", type=Path, help="also write the full report (and raw scores) as JSON")
    ap.add_argument("--methods", default="brisque,niqe", help="comma-separated: brisque, niqe")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--cache", default=None,
                    help=f"score cache (sqlite; default {default_cache()}); 'none' for no cache")
    ap.add_argument("--splits", type=int, default=10, help="random 80/20 splits (as streamiq eval)")
    ap.add_argument("--brisque-model", type=Path, default=BRISQUE_MODEL)
    ap.add_argument("--brisque-range", type=Path, default=BRISQUE_RANGE)
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    a = ap.parse_args(argv)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        print(f"peers: --methods {a.methods!r}: expected some of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    cache = None if a.cache == "none" else (a.cache or default_cache())
    try:
        res = run(a.labels, methods, max(1, a.jobs), cache, max(1, a.splits), a.brisque_model,
                  a.brisque_range, progress=not a.quiet)
    except Unusable as e:
        print(f"peers: {e}", file=sys.stderr)
        return 2
    print(format_result(res), end="")
    t = res["timing"]
    if t["images_per_s"]:
        print(f"timing: {t['scored']} images scored in {t['wall_s']:.1f} s ({t['images_per_s']:.2f} images/s, "
              f"{t['jobs']} jobs, {t['cpu_s_per_image']:.3f} s per image in a worker); {t['cached']} cached")
    else:
        print(f"timing: all {t['images']} images cached ({t['wall_s']:.2f} s)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"peers: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
