"""The training data: groups of a clean crop and three distorted versions of it, reduced to
the stored model input, with their captions; made in seeded chunks in worker processes.
`data_fingerprint` names the data cache."""
import hashlib
import inspect
import time
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

from streamiq_train import log
from streamiq_train.distortions import LOG_INTERP, distort, h264_batch, motion_kernel, param
from streamiq_train.levels import KINDS, TABLES
from streamiq_train.model_input import SIZE
from streamiq_train.photos import (
    ADDED_SHARE,
    DEBIAN_PHOTOS,
    GCOMPRIS_FOLDERS,
    GCOMPRIS_PHOTOS,
    PALAPELI_PHOTOS,
    PHOTO_SIDE,
    TRAIN_PHOTOS,
    WEBP_REDUCTION,
    dead_leaves,
    gcompris_pictures,
    gcompris_resource,
    is_colour,
    load_photo,
    photo_sources,
    rcc_entries,
    read_resource,
    training_photos,
)

STORE = 176         # stored centre crop of the 224 image; training crops TRAIN_CROP from it
SCALES = [224, 256, 320, 384, 448, 544, 672]  # crop side before reduction to 224
CHUNKS = 8          # the data is made in this many seeded chunks, whatever the worker count
VIDEO_QP = (16, 26)  # `--video`: the mild encode's quantiser range, below the h264 kind's level 1 (30)
GRAIN_SIGMA = (0.002, 0.008)  # `--grain`: 0.5-2 of 255; the noise kind's level 0.5 is 0.0106
# Caption words per kind.
KIND_WORDS = {
    "gaussian_blur": "blurry", "motion_blur": "motion-blurred", "gaussian_noise": "noisy",
    "impulse_noise": "speckled", "jpeg": "jpeg-compressed", "h264": "blocky", "rescale": "upscaled",
    "contrast": "washed-out", "brightness": None, "desaturate": "faded", "quantize": "posterized",
    "oversharpen": "oversharpened", "pixelate": "pixelated",
}
SEVERITY = [(1.5, "slightly"), (3.0, "moderately"), (4.5, "heavily"), (9.0, "extremely")]


def severity_word(u):
    return next(w for limit, w in SEVERITY if u < limit)


def caption(content, kind, u, rng, bright_up=None):
    if kind is None:
        lead = ["a sharp, clean, high quality photo of", "a high quality photo of", "a clean photo of",
                "a sharp photo of"][int(rng.integers(0, 4))]
        return f"{lead} {content}."
    word = KIND_WORDS[kind] or ("overexposed" if bright_up else "underexposed")
    q = "low quality, " if u >= 3.0 else ""
    return f"a {q}{severity_word(u)} {word} photo of {content}."


def to_input(img, rng):
    """Distorted crop (float 0..1, side c) -> the stored uint8 STORE x STORE centre of its
    224-pixel reduction (area or bilinear, as different decoders and scalers do)."""
    c = img.shape[0]
    interp = cv2.INTER_AREA if rng.random() < 0.6 else cv2.INTER_LINEAR
    small = cv2.resize(np.clip(img, 0, 1), (SIZE, SIZE), interpolation=interp) if c != SIZE else np.clip(img, 0, 1)
    o = (SIZE - STORE) // 2
    return (small[o:o + STORE, o:o + STORE] * 255).round().astype(np.uint8)


def make_chunk(args):
    """One worker's share: `n` groups from seed `seed`. Returns images [n*4,S,S,3] uint8,
    per-image (kind index or -1, level u), captions and group ids. A `video` share of the
    groups is encoded as a whole (clean picture and distorted ones alike, after their
    distortion; `--video`) with all-intra H.264 at a mild quantiser from VIDEO_QP, as every
    frame of a stream is; targets and captions stay those of the distortion. A `grain`
    share of the images (any of the four) gets faint Gaussian grain (sigma from GRAIN_SIGMA,
    below the first noise level) before the reduction, with unchanged targets and
    captions (`--grain`)."""
    seed, n, n_leaves, video, grain = args
    rng = np.random.default_rng(seed)

    def finish(img):
        # (No draw at all without --grain.)
        if grain and rng.random() < grain:
            img = img + float(rng.uniform(*GRAIN_SIGMA)) * rng.standard_normal(img.shape).astype(np.float32)
        return to_input(img, rng)

    cv2.setNumThreads(1)
    listed = training_photos()
    photos = [(load_photo(f), content, colour) for f, content, colour, _ in listed]
    leaves = [(dead_leaves(rng), "colourful shapes", True) for _ in range(n_leaves)]
    # Colour photographs twice as often as grey ones; the added packages' pictures
    # together get ADDED_SHARE of the draws.
    weights = np.array([2.0 if colour else 1.0 for _, _, colour, _ in listed])
    added = np.array([a for _, _, _, a in listed])
    weights[added] *= ADDED_SHARE / weights[added].sum()
    weights[~added] *= (1 - ADDED_SHARE) / weights[~added].sum()
    images, meta, caps, pending = [], [], [], []
    for g in range(n):
        if rng.random() < 0.7:  # a photograph, colour ones twice as often as grey ones
            src, content, colour = photos[int(rng.choice(len(photos), p=weights))]
        else:
            src, content, colour = leaves[int(rng.integers(0, len(leaves)))]
        h, w = src.shape[:2]
        c = int(rng.choice([s for s in SCALES if s <= min(h, w)]))
        region = int(rng.uniform(c, min(h, w)) if rng.random() < 0.3 else c)  # sometimes a wider view
        y, x = int(rng.integers(0, h - region + 1)), int(rng.integers(0, w - region + 1))
        crop = src[y:y + region, x:x + region]
        if region != c:
            crop = cv2.resize(crop, (c, c), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.rot90(crop, int(rng.integers(0, 4)) if rng.random() < 0.3 else 0)
        if colour and rng.random() < 0.5:
            crop = crop[..., rng.permutation(3)]
        base = np.ascontiguousarray(crop).astype(np.float32) / 255
        kinds = [k for k in KINDS if colour or k != "desaturate"]
        k1, k2 = rng.choice(len(kinds), 2, replace=False)
        u1, u2 = sorted(rng.uniform(0.5, 5.5, 2))
        jobs = [(None, 0.0), (kinds[k1], u1), (kinds[k1], u2), (kinds[k2], float(rng.uniform(0.5, 5.5)))]
        # (No draw at all without --video: the shipped recipe's data stay as they were.)
        vqp = int(rng.integers(VIDEO_QP[0], VIDEO_QP[1] + 1)) if video and rng.random() < video else None
        for kind, u in jobs:
            idx = len(images)
            up = None
            if kind == "h264":
                images.append(None)
                pending.append((idx, base, int(round(np.clip(param("h264", u), 20, 51)))))
            else:
                if kind is None:
                    out = base
                else:
                    if kind == "brightness":
                        state = rng.bit_generator.state
                        up = rng.random() < 0.5
                        rng.bit_generator.state = state  # distort() draws the same direction
                    out = distort(base, kind, u, rng)
                if vqp is None:
                    images.append(finish(out))
                else:
                    images.append(None)
                    pending.append((idx, out, vqp))
            meta.append((KINDS.index(kind) if kind else -1, u, g))
            caps.append(caption(content, kind, u, rng, up))
    # H.264 in batches of equal size and quantiser.
    by_key = {}
    for idx, base, qp in pending:
        by_key.setdefault((base.shape[0], qp), []).append((idx, base))
    for (_, qp), items in sorted(by_key.items()):
        for (idx, _), out in zip(items, h264_batch([b for _, b in items], qp)):
            images[idx] = finish(out)
    return np.stack(images), np.array(meta, np.float32), caps


def build_dataset(groups, workers, seed, video=0.0, grain=0.0):
    chunks = CHUNKS
    per = [groups // chunks + (i < groups % chunks) for i in range(chunks)]
    # 12 dead-leaves pictures per chunk (fewer for tiny test runs; same data otherwise).
    args = [(seed * 1000 + i, n, min(12, max(1, n // 50)), video, grain) for i, n in enumerate(per)]
    images, meta, caps, done = [], [], [], 0
    with Pool(workers) as pool:
        for i, (im, me, ca) in enumerate(pool.imap(make_chunk, args)):
            me[:, 2] += done
            done += per[i]
            images.append(im), meta.append(me), caps.extend(ca)
            log(f"data: chunk {i + 1}/{chunks}, {done}/{groups} groups")
    return np.concatenate(images), np.concatenate(meta), caps


def data_fingerprint():
    """Short hash of what the generated data depends on besides the seed, the group count
    and the photographs' bytes: the data constants and the source of the functions that
    make it (so a cached data file is never reused after either changes)."""
    h = hashlib.sha256()
    h.update(repr([TRAIN_PHOTOS, DEBIAN_PHOTOS, GCOMPRIS_FOLDERS, GCOMPRIS_PHOTOS, PALAPELI_PHOTOS,
                   PHOTO_SIDE, ADDED_SHARE, WEBP_REDUCTION, SIZE, STORE, SCALES, CHUNKS, VIDEO_QP, GRAIN_SIGMA,
                   TABLES, sorted(LOG_INTERP), KIND_WORDS, SEVERITY]).encode())
    for f in (rcc_entries, gcompris_resource, read_resource, load_photo, photo_sources, training_photos,
              is_colour, gcompris_pictures, dead_leaves, param, motion_kernel, distort, h264_batch,
              severity_word, caption, to_input, make_chunk, build_dataset):
        h.update(inspect.getsource(f).encode())
    return h.hexdigest()[:12]


def load_dataset(groups, workers, seed, cache_dir, video=0.0, grain=0.0):
    """The training groups, read from `cache_dir` when a file made by the same code,
    constants, seed, group count and options is there, else made (and written there when
    `cache_dir` is set). Returns (images, meta, caps, cache file name)."""
    t0 = time.time()
    variant = (f"-video{video:g}" if video else "") + (f"-grain{grain:g}" if grain else "")
    name = f"data-{data_fingerprint()}-seed{seed}-groups{groups}{variant}.npz"
    cache = Path(cache_dir) / name if cache_dir else None
    if cache and cache.is_file():
        with np.load(cache) as z:
            images, meta, caps = z["images"], z["meta"], [str(c) for c in z["caps"]]
        log(f"data: loaded {cache}")
    else:
        # (The photographs are read in the workers only: OpenCV's thread pool does not survive a fork.)
        log(f"data: {groups} groups x 4 images from {len(photo_sources())} photographs "
            "and dead-leaves pictures")
        images, meta, caps = build_dataset(groups, workers, seed, video, grain)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, images=images, meta=meta, caps=np.array(caps))
            tmp.rename(cache)
    log(f"data: {len(images)} images, {len(set(caps))} distinct captions, {time.time() - t0:.0f} s")
    return images, meta, caps, name
