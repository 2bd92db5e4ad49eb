#!/usr/bin/env python3
"""Train streamiq-tiny, streamiq's own small CLIP-style quality model, from scratch.

    train_tiny.py --out DIR [--seed 0] [--groups 12000] [--steps 2400] [--workers N] [--cache DIR]

Everything comes from this repository, the photographs that ship inside the scikit-image
wheel and photographs from Debian packages (scripts/setup.sh installs them; licences in
models/README.md); nothing is downloaded.

1. Data. Random square crops of the 188 training photographs (TRAIN_PHOTOS, DEBIAN_PHOTOS,
   GCOMPRIS_PHOTOS, PALAPELI_PHOTOS; each reduced to a short side of at most PHOTO_SIDE,
   WebP ones by at least WEBP_REDUCTION) and of seeded procedural
   "dead leaves" pictures are taken at a random scale (224 to 672 pixels, the
   range the daemon's `global` and `crops:N` views see), distorted with Python
   re-implementations of the 13 standard `streamiq distort` kinds at continuous levels
   0.5-5.5 (H.264 through ffmpeg/libx264), and reduced to the 224-pixel model input.
   A group is a clean crop with three distorted versions of it (two levels of one kind,
   one of another; with `--video SHARE`, that share of the groups is also H.264-encoded
   as a whole at a mild quantiser, as stream frames are; with `--grain SHARE`, that share
   of the images gets faint grain). `color_cast` is never made: it is the family kept
   for few-shot evidence. EVAL_PHOTOS and the eight wallpapers of make_tiny's evaluation
   are never read.
2. Captions name the content and the degradation ("a heavily blurry photo of a cat.",
   "a high quality photo of a rocket.") and are tokenised with the real CLIP BPE; the
   text tower's vocabulary is the set of BPE ids those captions and the bundle's
   prompts use, renumbered from 0 (text/vocab.json maps them back).
3. Model. Image tower: a 7-layer convolutional network with mean, standard-deviation and
   power-mean pooling at five scales (local statistics are what blur, noise and
   blockiness change; the power mean keeps sharp detail in part of a picture visible),
   then a 2-layer head to D=128. Text tower: CLIP's causal transformer (width 128,
   3 layers, 4 heads, context 32), OpenAI naming, so the daemon and `streamiq-adapt`
   run it with the same code as a converted CLIP.
4. Loss. Contrastive (CLIP InfoNCE with every identical caption in the batch counted as
   a positive) + the quality prompt pair as CLIP-IQA scores it (softmax over "X X X X
   high quality." / "X X X X low quality." with the context vectors = embeddings of
   "a photo of a"; binary cross-entropy against 1 - level/6) + the attribute pairs on
   the kinds they name + a pairwise ranking loss inside each group.
5. Export: visual.onnx, visual.pt (TorchScript, checked against visual.onnx), text/,
   prompts.safetensors, manifest.toml with checksums,
   through the same writers as scripts/convert_clip.py.

The code lives in the package scripts/streamiq_train/ (photos, distortions, data, model,
training); this file is its command line and keeps the package's names under
`train_tiny.` for train_two_stream.py. The distortion levels come from
src/distort/levels.toml, which `streamiq distort` reads too.

Meta-prompt pre-training (`streamiq-adapt pretrain`) runs afterwards on this bundle:
`make tiny` runs both (see models/README.md).
"""
import argparse
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_clip as cc  # noqa: E402
from streamiq_train import log  # noqa: E402
from streamiq_train.data import (  # noqa: E402
    CHUNKS,
    GRAIN_SIGMA,
    KIND_WORDS,
    SCALES,
    SEVERITY,
    STORE,
    VIDEO_QP,
    build_dataset,
    caption,
    data_fingerprint,
    load_dataset,
    make_chunk,
    severity_word,
    to_input,
)
from streamiq_train.distortions import LOG_INTERP, distort, h264_batch, motion_kernel, param  # noqa: E402
from streamiq_train.levels import KINDS, TABLES  # noqa: E402
from streamiq_train.model import (  # noqa: E402
    CONTEXT,
    EMBED,
    HEADS,
    LAYERS,
    MEAN,
    MSCN_C,
    MSCN_CORE,
    STD,
    WIDTH,
    CompactTokenizer,
    Mscn,
    TinyVisual,
    init_text,
    pool_stats,
    text_config,
)
from streamiq_train.model_input import SIZE  # noqa: E402
from streamiq_train.photos import (  # noqa: E402
    ADDED_SHARE,
    DEBIAN_PHOTOS,
    EVAL_PHOTOS,
    GCOMPRIS_HELD_OUT,
    GCOMPRIS_PHOTOS,
    PALAPELI_PHOTOS,
    PHOTO_SIDE,
    TRAIN_PHOTOS,
    WEBP_REDUCTION,
    dead_leaves,
    gcompris_pictures,
    load_photo,
    manifest_names,
    photo_sources,
    training_photos,
    write_held_out,
)
from streamiq_train.training import (  # noqa: E402
    ATTR_KINDS,
    TRAIN_CROP,
    Objective,
    all_texts,
    batch_pixels,
    encode_text,
    export,
    fit,
    group_loss,
    train,
)

# The package's names, kept under `train_tiny.` (train_two_stream.py imports this module).
__all__ = [
    "ADDED_SHARE", "ATTR_KINDS", "CHUNKS", "CONTEXT", "DEBIAN_PHOTOS", "EMBED", "EVAL_PHOTOS",
    "GCOMPRIS_HELD_OUT", "GCOMPRIS_PHOTOS", "GRAIN_SIGMA", "HEADS", "KINDS", "KIND_WORDS", "LAYERS",
    "LOG_INTERP", "MEAN", "MSCN_C", "MSCN_CORE", "PALAPELI_PHOTOS", "PHOTO_SIDE", "SCALES", "SEVERITY",
    "SIZE", "STD", "STORE", "TABLES", "TRAIN_CROP", "TRAIN_PHOTOS", "VIDEO_QP", "WEBP_REDUCTION", "WIDTH",
    "CompactTokenizer", "Mscn", "Objective", "TinyVisual", "all_texts", "batch_pixels", "build_dataset",
    "caption", "data_fingerprint", "dead_leaves", "distort", "encode_text", "export", "fit", "gcompris_pictures",
    "group_loss", "h264_batch", "init_text", "load_dataset", "load_photo", "log", "make_chunk", "main",
    "manifest_names", "motion_kernel", "param", "photo_sources", "pool_stats", "severity_word", "text_config",
    "to_input", "train", "training_photos", "write_held_out",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", type=int, default=12000, help="training groups of 4 images")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-groups", type=int, default=16, help="groups per batch (4 images each)")
    ap.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    ap.add_argument("--cache", default="", help="directory to keep the generated data in (reused when present)")
    ap.add_argument("--data-only", action="store_true", help="stop after making the data")
    ap.add_argument("--write-held-out", metavar="DIR",
                    help="write the GCompris photographs kept aside for evaluation to DIR (PNG) and stop")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--mscn", nargs="?", type=float, const=MSCN_C, default=None, metavar="C",
                    help="image tower variant: the first stage also sees the MSCN luma, with the "
                         f"stabilising constant C (default {MSCN_C}; luma in 0..1) (models/README.md)")
    ap.add_argument("--mscn-core", nargs="?", type=float, const=MSCN_CORE, default=0.0, metavar="T",
                    help="with --mscn: core the MSCN deviation by T first, so faint grain is not read "
                         f"as detail (default {MSCN_CORE}; luma in 0..1) (models/README.md)")
    ap.add_argument("--video", type=float, default=0.0, metavar="SHARE",
                    help="data variant: this share of the groups is H.264-encoded as a whole at a mild "
                         "quantiser, clean picture included (models/README.md)")
    ap.add_argument("--grain", type=float, default=0.0, metavar="SHARE",
                    help="data variant: this share of the images gets faint grain, targets unchanged "
                         "(models/README.md)")
    a = ap.parse_args()
    if a.mscn is not None and not a.mscn > 0:
        ap.error(f"--mscn {a.mscn}: the constant must be positive")
    if a.mscn_core and (a.mscn is None or not 0 < a.mscn_core < 1):
        ap.error(f"--mscn-core {a.mscn_core}: needs --mscn and a threshold between 0 and 1")
    for opt in ("video", "grain"):
        if not 0 <= getattr(a, opt) <= 1:
            ap.error(f"--{opt} {getattr(a, opt)}: the share must be between 0 and 1")
    if a.write_held_out:
        write_held_out(a.write_held_out)
        return
    if not a.out:
        ap.error("--out is required")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    images, meta, caps, _ = load_dataset(a.groups, a.workers, a.seed, a.cache, a.video, a.grain)
    if a.data_only:
        return
    tok = CompactTokenizer(all_texts(caps))
    tokens = cc.build_tokens(tok, CONTEXT)
    log(f"text: vocabulary of {len(tok.clip_ids)} CLIP BPE ids")
    visual, text, scale = train(images, meta, caps, tok, tokens, a.steps, a.batch_groups, a.seed,
                                 mscn=a.mscn, mscn_core=a.mscn_core)
    info = OrderedDict(
        generator=f"scripts/train_tiny.py --seed {a.seed} --groups {a.groups} --steps {a.steps} "
                  f"--batch-groups {a.batch_groups}"
                  + ("" if a.mscn is None else f" --mscn {a.mscn:g}")
                  + (f" --mscn-core {a.mscn_core:g}" if a.mscn_core else "")
                  + (f" --video {a.video:g}" if a.video else "") + (f" --grain {a.grain:g}" if a.grain else ""),
        purpose="streamiq's own quality model, trained on synthetic distortions of freely licensed photographs",
        train_photos=" ".join([f for f, _ in TRAIN_PHOTOS] + [Path(r).parent.parent.parent.name if "/contents/" in r
                                                                   else Path(r).name for r, _ in DEBIAN_PHOTOS]
                              + [f"{n}.jpg" for n, _ in PALAPELI_PHOTOS]
                              + manifest_names(GCOMPRIS_PHOTOS)),
        held_out_photos=" ".join(EVAL_PHOTOS + manifest_names(GCOMPRIS_HELD_OUT)),
        held_out_kinds="color_cast",
    )
    export(a.out, visual, text, tok, tokens, scale, info)
    log(f"wrote {a.out} (logit_scale {scale:.2f}) in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
