#!/usr/bin/env python3
"""Make a test clip of slow pans over real photographs, with inserted black and
frozen segments, and print the truth as JSON.

    make_pan_clip.py OUT.mp4 [--seconds 30] [--size 1280x720] [--fps 25] [--crf 23]
                     [--black 8:10.5] [--freeze 17:20] [--seed 0]

The photographs are the freely licensed images that ship inside the scikit-image
wheel (astronaut, coffee, chelsea, rocket, ...). Each shot is a slow pan with a slow
zoom (Ken Burns) over one photograph; shots cut every few seconds. `--black A:B` fills
[A, B) seconds with black; `--freeze A:B` repeats the frame at A until B. Encoded with
ffmpeg (libx264, yuv420p) at the given CRF, so the frozen segment carries real
compression noise. Needs numpy, scikit-image and ffmpeg.
"""
import argparse
import json
import subprocess
import sys

import numpy as np
from skimage import data, transform

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry", "hubble_deep_field"]


def photo(name):
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.float32) / 255.0


def span(text):
    a, b = (float(x) for x in text.split(":"))
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"{text}: expected A:B with 0 <= A < B")
    return a, b


def shot_frame(img, w, h, u, rng_params):
    """The view at progress u in [0, 1] of a pan/zoom over img, resized to w x h."""
    (x0, y0, x1, y1, z0, z1) = rng_params
    ih, iw = img.shape[:2]
    zoom = z0 + (z1 - z0) * u
    cw = min(iw, ih * w / h) / zoom
    ch = cw * h / w
    cx = (x0 + (x1 - x0) * u) * (iw - cw) + cw / 2
    cy = (y0 + (y1 - y0) * u) * (ih - ch) + ch / 2
    tf = transform.AffineTransform(scale=(cw / w, ch / h), translation=(cx - cw / 2, cy - ch / 2))
    return transform.warp(img, tf, output_shape=(h, w), order=1, mode="edge")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--crf", type=int, default=23)
    ap.add_argument("--shot", type=float, default=5.0, help="seconds per shot")
    ap.add_argument("--black", type=span, action="append", default=[])
    ap.add_argument("--freeze", type=span, action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    rng = np.random.default_rng(a.seed)
    photos = [photo(n) for n in PHOTOS]
    n = int(round(a.seconds * a.fps))
    per_shot = int(round(a.shot * a.fps))
    shots = []
    for s in range((n + per_shot - 1) // per_shot):
        z0, z1 = rng.uniform(1.0, 1.3, 2)
        shots.append((photos[s % len(photos)], (*rng.uniform(0, 1, 4), z0, z1)))

    enc = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
         "-r", str(a.fps), "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-crf", str(a.crf),
         "-pix_fmt", "yuv420p", a.out],
        stdin=subprocess.PIPE)
    held = None
    for i in range(n):
        t = i / a.fps
        if any(b0 <= t < b1 for b0, b1 in a.black):
            frame = np.zeros((h, w, 3), np.uint8)
        elif any(f0 <= t < f1 for f0, f1 in a.freeze):
            if held is None:
                img, params = shots[i // per_shot]
                held = (shot_frame(img, w, h, (i % per_shot) / per_shot, params) * 255).astype(np.uint8)
            frame = held
        else:
            held = None
            img, params = shots[i // per_shot]
            frame = (shot_frame(img, w, h, (i % per_shot) / per_shot, params) * 255).astype(np.uint8)
        enc.stdin.write(frame.tobytes())
        if i % (5 * a.fps) == 0:
            print(f"frame {i}/{n}", file=sys.stderr)
    enc.stdin.close()
    if enc.wait() != 0:
        sys.exit("ffmpeg failed")
    print(json.dumps({"path": a.out, "frames": n, "fps": a.fps,
                      "black_segments": [{"start": s, "end": e} for s, e in a.black],
                      "freeze_segments": [{"start": s, "end": e} for s, e in a.freeze]}))


if __name__ == "__main__":
    main()
