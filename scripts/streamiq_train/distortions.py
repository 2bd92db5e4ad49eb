"""Python re-implementations of the 13 standard `streamiq distort` kinds (float RGB in
0..1), with the parameters of src/distort/levels.toml interpolated at a continuous level
(0.5-5.5 in training). H.264 goes through ffmpeg/libx264; scripts/tests/test_distort_parity.py
compares every kind with the daemon's own at levels 1 to 5."""
import math
import subprocess

import cv2
import numpy as np

from streamiq_train.levels import TABLES

# Kinds whose parameter is interpolated between levels on a log scale.
LOG_INTERP = {"jpeg", "quantize", "gaussian_noise", "impulse_noise", "rescale", "pixelate"}


def param(kind, u):
    t = TABLES[kind]
    xs = np.arange(1, 6)
    if kind in LOG_INTERP and min(t) > 0:
        lt = np.log(t)
        slope = (lt[1] - lt[0]) if u < 1 else (lt[4] - lt[3])
        v = np.interp(u, xs, lt) + (slope * (u - 1) if u < 1 else slope * (u - 5) if u > 5 else 0)
        return float(np.exp(v))
    slope = (t[1] - t[0]) if u < 1 else (t[4] - t[3])
    return float(np.interp(u, xs, t) + (slope * (u - 1) if u < 1 else slope * (u - 5) if u > 5 else 0))


def motion_kernel(length, angle):
    k = max(int(round(length)), 1)
    ker = np.zeros((k + 2, k + 2), np.float32)
    c = (k + 1) / 2
    dx, dy = math.cos(angle) * (k - 1) / 2, math.sin(angle) * (k - 1) / 2
    cv2.line(ker, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1, cv2.LINE_AA)
    return ker / ker.sum()


def distort(img, kind, u, rng):
    """`img` float32 RGB 0..1 -> distorted copy; H.264 is done by the caller in batches."""
    p = param(kind, u)
    if kind == "gaussian_blur":
        return cv2.GaussianBlur(img, (0, 0), max(p, 0.3))
    if kind == "motion_blur":
        return cv2.filter2D(img, -1, motion_kernel(max(p, 2), rng.uniform(0, math.pi)), borderType=cv2.BORDER_REFLECT)
    if kind == "gaussian_noise":
        if rng.random() < 0.3:  # luminance-only noise
            n = rng.standard_normal(img.shape[:2] + (1,)).astype(np.float32)
        else:
            n = rng.standard_normal(img.shape).astype(np.float32)
        return img + p * n
    if kind == "impulse_noise":
        out = img.copy()
        hit = rng.random(img.shape[:2]) < p
        if rng.random() < 0.3:  # per channel
            hit3 = rng.random(img.shape) < p / 2
            out[hit3] = rng.integers(0, 2, int(hit3.sum())).astype(np.float32)
        else:
            out[hit] = rng.integers(0, 2, (int(hit.sum()), 1)).astype(np.float32)
        return out
    if kind == "jpeg":
        q = int(np.clip(round(p), 1, 95))
        bgr = cv2.cvtColor((np.clip(img, 0, 1) * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, q])
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    if kind == "rescale":
        h, w = img.shape[:2]
        f = max(p, 1.2)
        small = cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
        up = [cv2.INTER_LINEAR, cv2.INTER_CUBIC][int(rng.integers(0, 2))]
        return cv2.resize(small, (w, h), interpolation=up)
    if kind == "contrast":
        k = float(np.clip(p, 0.05, 0.95))
        return img.mean() + k * (img - img.mean())
    if kind == "brightness":
        d = float(np.clip(p, 0.03, 0.65))
        x = np.clip(img, 0, 1)
        if rng.random() < 0.5:
            return x ** (1 - d) + d * 0.5
        return x ** (1 + 2 * d)
    if kind == "desaturate":
        k = float(np.clip(p, 0.0, 0.9))
        y = (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        return y + k * (img - y)
    if kind == "quantize":
        n = max(p, 2.0)
        return np.round(np.clip(img, 0, 1) * (n - 1)) / (n - 1)
    if kind == "oversharpen":
        soft = cv2.GaussianBlur(img, (0, 0), 1.5)
        return img + max(p, 0.3) * (img - soft)
    if kind == "pixelate":
        h, w = img.shape[:2]
        b = max(p, 2.0)
        small = cv2.resize(img, (max(1, round(w / b)), max(1, round(h / b))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    raise ValueError(kind)


def h264_batch(frames, qp):
    """All-intra H.264 at a fixed quantiser through ffmpeg/libx264, 4:2:0, and back."""
    h, w = frames[0].shape[:2]
    raw = b"".join((np.clip(f, 0, 1) * 255).round().astype(np.uint8).tobytes() for f in frames)
    enc = subprocess.run(["ffmpeg", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                          "-i", "-", "-c:v", "libx264", "-qp", str(qp), "-g", "1", "-bf", "0",
                          "-pix_fmt", "yuv420p", "-threads", "1", "-f", "h264", "-"],
                         input=raw, capture_output=True, check=True).stdout
    dec = subprocess.run(["ffmpeg", "-v", "error", "-f", "h264", "-i", "-", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-threads", "1", "-"],
                         input=enc, capture_output=True, check=True).stdout
    out = np.frombuffer(dec, np.uint8).reshape(len(frames), h, w, 3)
    return [o.astype(np.float32) / 255 for o in out]

