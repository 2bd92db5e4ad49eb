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
5. Export: visual.onnx, text/, prompts.safetensors, manifest.toml with checksums,
   through the same writers as scripts/convert_clip.py.

Meta-prompt pre-training (`streamiq-adapt pretrain`) runs afterwards on this bundle:
`make tiny` runs both (see models/README.md).
"""
import argparse
import functools
import hashlib
import inspect
import json
import math
import os
import subprocess
import struct
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_clip as cc  # noqa: E402
from bundle_io import save_safetensors, sha256  # noqa: E402

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"
# Training photographs (file in skimage/data, what the caption calls it).
TRAIN_PHOTOS = [
    ("astronaut.png", "an astronaut"),
    ("hubble_deep_field.jpg", "galaxies in space"),
    ("ihc.png", "a microscope slide"),
    ("motorcycle_left.png", "a motorcycle"),
    ("motorcycle_right.png", "a motorcycle"),
    ("camera.png", "a man with a camera"),
    ("brick.png", "a brick wall"),
    ("grass.png", "grass"),
    ("gravel.png", "gravel"),
    ("moon.png", "the moon"),
    ("coins.png", "coins"),
    ("cell.png", "a cell"),
]
# Further training photographs from Debian packages that scripts/setup.sh installs
# (opencv-doc, plasma-workspace-wallpapers, mate-backgrounds, lomiri-wallpapers-16.04 and
# -20.04; licences in models/README.md): (path under /usr/share, what the caption calls it).
SHARE = Path("/usr/share")
CV = "doc/opencv-doc/examples/data/"
PW = "wallpapers/{}/contents/images/"
DEBIAN_PHOTOS = [
    ("doc/opencv-doc/examples/alphamat/input_images/plant.jpg", "a plant"),
    (CV + "fruits.jpg", "fruit"), (CV + "baboon.jpg", "a baboon"), (CV + "leuvenA.jpg", "an old street"),
    (CV + "squirrel_cls.jpg", "a squirrel"), (CV + "home.jpg", "a house"), (CV + "aloeL.jpg", "a plant"),
    (CV + "board.jpg", "a circuit board"), (CV + "basketball1.png", "people indoors"),
    (CV + "orange.jpg", "an orange"), (CV + "chicky_512.png", "a dog"), (CV + "rubberwhale1.png", "toys"),
    (CV + "smarties.png", "sweets"), (CV + "messi5.jpg", "a football player"),
    (CV + "ela_original.jpg", "a notebook"), (CV + "graf1.png", "graffiti"), (CV + "aero1.jpg", "a town"),
    (CV + "building.jpg", "a building"), (CV + "box_in_scene.png", "boxes"), (CV + "apple.jpg", "an apple"),
    (CV + "butterfly.jpg", "a butterfly"),
    (PW.format("BytheWater") + "2560x1600.jpg", "boats on a lake"),
    (PW.format("ColdRipple") + "2560x1600.jpg", "a pier in fog"),
    (PW.format("ColorfulCups") + "2560x1600.jpg", "cups"),
    (PW.format("DarkestHour") + "2560x1600.jpg", "a lake at night"),
    (PW.format("EveningGlow") + "2560x1600.jpg", "boats at sunset"),
    (PW.format("FallenLeaf") + "2560x1600.jpg", "a leaf"),
    (PW.format("Grey") + "2560x1600.jpg", "a building"),
    (PW.format("Kite") + "2560x1600.jpg", "a kite in the sky"),
    (PW.format("OneStandsOut") + "2560x1600.jpg", "trees"),
    (PW.format("Path") + "2560x1600.jpg", "a forest"),
    (PW.format("Volna") + "5120x2880.jpg", "a beach"),
    (PW.format("summer_1am") + "2560x1600.jpg", "a lake"),
    ("backgrounds/Dragonfly_by_Bolly.jpg", "leaves"), ("backgrounds/Kleiber_by_Lukas_Baubkus.jpg", "a bird"),
    ("backgrounds/Picture_1A_by_freespace.jpg", "brushes"), ("backgrounds/free_by_Peter_Nerlich.jpg", "a bird"),
    ("backgrounds/greentock_by_Peter_Nerlich.jpg", "a clock"),
    ("backgrounds/picosdeeuropa_by_Aitzol_Berasategi.jpg", "mountains"),
    ("backgrounds/seeding_by_Clements_Engelhardt.jpg", "flowers"),
    ("backgrounds/sunset_by_Aitzol_Berasategi.jpg", "a sunset"),
    *((f"backgrounds/mate/nature/{f}.jpg", c) for f, c in [
        ("Aqua", "a water drop"), ("Blinds", "a leaf"), ("Dune", "grass on a dune"), ("FreshFlower", "a flower"),
        ("Garden", "a flower"), ("GreenMeadow", "grass"), ("RainDrops", "leaves with rain drops"),
        ("TwoWings", "a flower"), ("Wood", "wood"), ("YellowFlower", "a flower")]),
]
# Photographs inside GCompris' Qt resource files (gcompris-qt-data; GPL-3+, some CC-BY-SA
# or public domain, per its debian/copyright): the folder of each resource file that holds
# them, then (resource file, names, what the caption calls them). Only photographs; the
# paintings and drawings are left out.
GCOMPRIS = Path("/usr/share/gcompris-qt/rcc")
GCOMPRIS_FOLDERS = {
    "erase": "gcompris/src/activities/erase/resource/",
    "explore_world_animals": "gcompris/src/activities/explore_world_animals/resource/animals/",
    "explore_farm_animals": "gcompris/src/activities/explore_farm_animals/resource/animals/",
    "explore_monuments": "gcompris/src/activities/explore_monuments/resource/",
    "details": "gcompris/src/activities/details/resource/image/",
    "explore_world_music": "gcompris/src/activities/explore_world_music/resource/music/",
    "clickgame": "gcompris/src/activities/clickgame/resource/",
}
GCOMPRIS_PHOTOS = [
    ("erase", """alpaca bee butterfly calf camels caterpillar
     chamaeleon cheetah crab dolphin flying_fox gibbon giraffe goat gorilla gosling heron horse kingfisher
     long_nosed_monkey macaque meerkats northern_harrier nubian_ibex pika rhinoceros spoonbills squirrel
     swans""", "an animal"),
    ("explore_world_animals", """bison
     chameleon crocodile dragon giraffe hedgehog jaguar kangaroo lemur narwhal panda polar_bear
     scarlet_macaw""", "an animal"),
    ("explore_farm_animals", "cat chicken cow dog duck horse owl pig", "a farm animal"),
    ("explore_monuments", """egypt/bentPyramid
     egypt/greatPyramidOfGiza egypt/meidumPyramid egypt/redPyramid france/arlesAmphitheater
     france/chateaudeChambord france/chateaudeChenonceau france/citedeCarcassonne france/eiffelTower
     france/palaisdesPapes france/pontduGard france/reimsCathedral france/rocamadour germany/aulaPalatina
     germany/berlinCathedral germany/brandenburgGate germany/neuschwansteinCastle germany/schwerinPalace
     germany/trierImperialBaths germany/wormsCathedral india/ajantaCave india/charminar
     india/gatewayofIndia india/goldenTemple india/greatStupa india/konarkSunTemple india/mysorePalace
     india/qutubMinar india/rangGhar india/victoriaMemorial usa/cabrillo usa/canyondeChelly
     usa/castillodeSanMarcos usa/castleClinton usa/fortSumter usa/georgeWashingtonBirthplace
     usa/lincolnMemorial usa/navajo usa/statueofLiberty wonders/chichenItza wonders/christTheRedeemer
     wonders/greatWallofChina wonders/machuPicchu wonders/petra wonders/tajMahal""", "a monument"),
    ("details", """Chenonceau_background
     EgeskovSlotSpejling_background EilanDonanCastle_background FanoeWindmill_background
     GizahPyramids_background NDP_background Nagoya_background Neuschwanstein_background
     OperaSidney_background TajMahal_background TowerBridgeLondon_background""", "a monument"),
    ("explore_world_music", "africa america australia ireland italy japan mexico middleeast", "musicians"),
    ("clickgame", "sea1 sea2 sea3 sea4 sea5 sea6", "a coral reef"),
]
# Never used for training: GCompris photographs kept aside for the third evaluation set of
# scripts/make_tiny.sh (`--write-held-out`).
GCOMPRIS_HELD_OUT = [
    ("erase", "kitten penguin red_panda toucan"),
    ("explore_world_animals", "koala moose"),
    ("explore_farm_animals", "sheep"),
    ("explore_monuments", "france/montStMichel india/hawaMahal usa/mountRushmore wonders/colosseum"),
    ("explore_world_music", "orchestra"),
]
# Palapeli's puzzle photographs (palapeli-data; public domain or GNU FDL).
PALAPELI_PHOTOS = [("castle-maintenon", "a castle"), ("cincinnati-bridge", "a bridge at night"),
                   ("citrus-fruits", "fruit"), ("european-honey-bee", "a bee"),
                   ("panther-chameleon-female", "a chameleon")]
PHOTO_SIDE = 600    # photographs are reduced at load to at most this short side
ADDED_SHARE = 0.3   # share of the photograph draws that go to GCompris' and Palapeli's pictures
WEBP_REDUCTION = 1.6  # GCompris' WebP pictures are reduced at least this much (down to 224 px),
                      # so their compression does not show in what the model learns is clean
# Never used for training: the evaluation sets are made from these (models/README.md)
# and from the eight wallpapers scripts/make_tiny.sh names.
EVAL_PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg"]

SIZE = 224          # model input
STORE = 176         # stored centre crop of the 224 image; training crops TRAIN_CROP from it
TRAIN_CROP = 160
SCALES = [224, 256, 320, 384, 448, 544, 672]  # crop side before reduction to 224
CHUNKS = 8          # the data is made in this many seeded chunks, whatever the worker count
VIDEO_QP = (16, 26)  # `--video`: the mild encode's quantiser range, below the h264 kind's level 1 (30)
GRAIN_SIGMA = (0.002, 0.008)  # `--grain`: 0.5-2 of 255; the noise kind's level 0.5 is 0.0106
MSCN_C = 0.01       # `--mscn`: the MSCN constant unless one is given (luma in 0..1)
MSCN_CORE = 0.01    # `--mscn-core`: the coring threshold unless one is given (about 2.5 of 255)
CONTEXT = 32
WIDTH, LAYERS, HEADS, EMBED = 128, 3, 4, 128

# Parameters at levels 1..5, as in src/distort/mod.rs.
TABLES = {
    "gaussian_blur": [0.8, 1.5, 2.5, 4.0, 6.0],
    "motion_blur": [3, 7, 11, 17, 25],
    "gaussian_noise": [0.015, 0.03, 0.05, 0.08, 0.12],
    "impulse_noise": [0.005, 0.015, 0.03, 0.06, 0.1],
    "jpeg": [40, 20, 10, 5, 2],
    "h264": [30, 35, 40, 45, 50],
    "rescale": [2.0, 3.0, 4.0, 6.0, 8.0],
    "contrast": [0.75, 0.55, 0.4, 0.28, 0.18],
    "brightness": [0.12, 0.22, 0.32, 0.42, 0.52],
    "desaturate": [0.7, 0.5, 0.3, 0.15, 0.0],
    "quantize": [24, 12, 7, 4, 3],
    "oversharpen": [1.0, 2.0, 3.5, 5.5, 8.0],
    "pixelate": [3, 5, 8, 12, 18],
}
KINDS = list(TABLES)
LOG_INTERP = {"jpeg", "quantize", "gaussian_noise", "impulse_noise", "rescale", "pixelate"}
# Caption words per kind.
KIND_WORDS = {
    "gaussian_blur": "blurry", "motion_blur": "motion-blurred", "gaussian_noise": "noisy",
    "impulse_noise": "speckled", "jpeg": "jpeg-compressed", "h264": "blocky", "rescale": "upscaled",
    "contrast": "washed-out", "brightness": None, "desaturate": "faded", "quantize": "posterized",
    "oversharpen": "oversharpened", "pixelate": "pixelated",
}
SEVERITY = [(1.5, "slightly"), (3.0, "moderately"), (4.5, "heavily"), (9.0, "extremely")]
# Attribute pairs of the bundle (convert_clip.ATTRIBUTES) and the kinds each one names.
ATTR_KINDS = {
    "sharp": {"gaussian_blur", "motion_blur", "rescale", "pixelate"},
    "clean": {"gaussian_noise", "impulse_noise"},
    "smooth": {"jpeg", "h264", "pixelate", "quantize"},
    "bright": {"brightness", "contrast"},
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# Source pictures.
# ---------------------------------------------------------------------------------------

def rcc_entries(path):
    """{name: bytes} of a Qt resource file (rcc format 1-3, zlib-compressed or stored)."""
    b = Path(path).read_bytes()
    if b[:4] != b"qres":
        raise SystemExit(f"train_tiny: {path} is not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 22 if version >= 2 else 14

    def name(off):
        (n,) = struct.unpack(">H", b[names + off:names + off + 2])
        return b[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    out, stack = {}, [(0, "")]
    while stack:
        i, prefix = stack.pop()
        p = tree + i * node
        name_off, flags = struct.unpack(">IH", b[p:p + 6])
        here = prefix + (name(name_off) if i else "")
        if flags & 2:  # directory
            count, first = struct.unpack(">II", b[p + 6:p + 14])
            stack.extend((first + c, here + "/") for c in range(count))
            continue
        (off,) = struct.unpack(">I", b[p + 10:p + 14])
        (size,) = struct.unpack(">I", b[data + off:data + off + 4])
        raw = b[data + off + 4:data + off + 4 + size]
        if flags & 4:
            raise SystemExit(f"train_tiny: {path}: zstd-compressed entries are not supported")
        out[here.lstrip("/")] = zlib.decompress(raw[4:]) if flags & 1 else raw
    return out


@functools.lru_cache(maxsize=None)
def gcompris_resource(rcc):
    """The entries of one GCompris resource file, parsed once per process."""
    return rcc_entries(GCOMPRIS / f"{rcc}.rcc")


def read_resource(rcc, name):
    try:
        return gcompris_resource(rcc)[name]
    except (FileNotFoundError, KeyError):
        raise SystemExit(f"train_tiny: {name} not found in {GCOMPRIS / rcc}.rcc "
                         "(scripts/setup.sh installs gcompris-qt-data)") from None


@functools.lru_cache(maxsize=None)
def load_photo(path):
    """RGB uint8, reduced (area) to a short side of at most PHOTO_SIDE. `path` is a file or
    'rcc:RESOURCE:NAME' for a picture inside a GCompris resource file."""
    path, webp = str(path), str(path).endswith(".webp")
    if path.startswith("rcc:"):
        _, rcc, name = path.split(":", 2)
        img = cv2.imdecode(np.frombuffer(read_resource(rcc, name), np.uint8), cv2.IMREAD_COLOR)
    else:
        img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"train_tiny: cannot read {path} (scripts/setup.sh installs the training photographs)")
    h, w = img.shape[:2]
    f = max(min(h, w) / PHOTO_SIDE, min(WEBP_REDUCTION, min(h, w) / SIZE) if webp else 1.0)
    if f > 1:
        img = cv2.resize(img, (round(w / f), round(h / f)), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def photo_sources():
    """[(path, caption content, from GCompris or Palapeli?)] for every training photograph."""
    out = [(SKIMAGE_DATA / f, content, False) for f, content in TRAIN_PHOTOS]
    out += [(SHARE / rel, content, False) for rel, content in DEBIAN_PHOTOS]
    out += [(path, content, True) for path, content in gcompris_pictures(GCOMPRIS_PHOTOS)]
    out += [(SHARE / "palapeli/collection" / f"{n}.jpg", content, True) for n, content in PALAPELI_PHOTOS]
    return out


def training_photos():
    """[(path, caption content, colour?, from GCompris or Palapeli?)] for every training photograph."""
    return [(path, content, is_colour(load_photo(path)), added) for path, content, added in photo_sources()]


def is_colour(img):
    return float(np.abs(img.astype(np.int16) - img[..., :1]).mean()) > 2.0


def gcompris_pictures(table):
    """[(load_photo path, caption content or None)] of a GCOMPRIS_PHOTOS-like table."""
    return [(f"rcc:{row[0]}:{GCOMPRIS_FOLDERS[row[0]]}{n}.webp", row[2] if len(row) > 2 else None)
            for row in table for n in row[1].split()]


def manifest_names(table):
    return [f"gcompris:{row[0]}/{n}" for row in table for n in row[1].split()]


def write_held_out(out):
    """The GCompris photographs kept aside, as PNG, reduced as for training."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path, _ in gcompris_pictures(GCOMPRIS_HELD_OUT):
        name = Path(path.rsplit(":", 1)[1]).stem
        cv2.imwrite(str(out / f"{name}.png"), cv2.cvtColor(load_photo(path), cv2.COLOR_RGB2BGR))


def dead_leaves(rng, size=704):
    """A seeded 'dead leaves' picture: occluding shapes with power-law sizes, flat,
    gradient or textured fills, slightly soft edges (natural-image-like statistics)."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    for _ in range(int(rng.integers(300, 900))):
        r = int(min(size / 3, 4 * (1 - rng.random()) ** (-1 / 1.8)))
        cx, cy = (int(v) for v in rng.integers(-r, size + r, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        mask = np.zeros((size, size), np.uint8)
        shape = rng.integers(0, 3)
        if shape == 0:
            cv2.circle(mask, (cx, cy), r, 255, -1, cv2.LINE_AA)
        elif shape == 1:
            box = ((cx, cy), (2 * r, int(2 * r * rng.uniform(0.3, 1))), float(rng.uniform(0, 180)))
            cv2.fillPoly(mask, [cv2.boxPoints(box).astype(np.int32)], 255, cv2.LINE_AA)
        else:
            pts = np.array([[cx + r * math.cos(a), cy + r * math.sin(a)]
                            for a in np.sort(rng.uniform(0, 2 * math.pi, 5))], np.int32)
            cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
        x0, x1, y0, y1 = max(cx - r, 0), min(cx + r + 1, size), max(cy - r, 0), min(cy + r + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        m = mask[y0:y1, x0:x1, None].astype(np.float32) / 255.0
        fill = np.empty((y1 - y0, x1 - x0, 3), np.float32)
        fill[:] = colour
        kind = rng.random()
        if kind < 0.25:  # linear gradient
            other = rng.integers(0, 256, 3).astype(np.float32)
            t = np.linspace(0, 1, x1 - x0, dtype=np.float32)[None, :, None]
            fill = fill * (1 - t) + other * t
        elif kind < 0.45:  # texture
            tex = rng.standard_normal((max(2, (y1 - y0) // 4), max(2, (x1 - x0) // 4))).astype(np.float32)
            tex = cv2.resize(tex, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
            fill = fill + tex[..., None] * rng.uniform(10, 40)
        region = img[y0:y1, x0:x1].astype(np.float32)
        img[y0:y1, x0:x1] = np.clip(region * (1 - m) + fill * m, 0, 255).astype(np.uint8)
    return cv2.GaussianBlur(img, (0, 0), 0.6)


# ---------------------------------------------------------------------------------------
# Distortions (float RGB in 0..1), parameters interpolated at a continuous level.
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# Groups of training images.
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------

def conv(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def pool_stats(x):
    """Per channel: mean, standard deviation and the power mean (p = 4) of the
    non-negative activations. The power mean follows the strongest responses, so sharp
    detail in part of a picture (a bridge against a plain sky) still registers."""
    m = x.mean(dim=(2, 3))
    v = (x - m[:, :, None, None]).pow(2).mean(dim=(2, 3))
    p4 = (x.pow(4).mean(dim=(2, 3)) + 1e-6).pow(0.25)
    return torch.cat([m, (v + 1e-6).sqrt(), p4], dim=1)


def gaussian_window(size=7, sigma=7 / 6):
    """BRISQUE's normalised 2-D Gaussian window, [1,1,size,size]."""
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


class Mscn(nn.Module):
    """Mean-subtracted, contrast-normalised luma (BRISQUE's MSCN coefficients, a divisive
    normalisation): (Y - mu) / (sigma + c) over a 7x7 Gaussian window, Y in [0, 1]
    recovered from the CLIP-normalised pixels. Local contrast is divided out, so a dark
    or flat picture that is sharp gives the statistics of a sharp one. With `core` > 0
    the deviation Y - mu is cored first (shrunk towards 0 by `core`, values within it
    dropped): faint grain on the flat regions a blur leaves is then no longer as large a
    signal as real detail (`--mscn-core`, models/README.md)."""

    def __init__(self, c=MSCN_C, core=0.0):
        super().__init__()
        self.register_buffer("window", gaussian_window())
        self.register_buffer("mean", MEAN.clone())
        self.register_buffer("std", STD.clone())
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))
        self.c = c
        self.core = core

    def forward(self, pixels):
        y = ((pixels * self.std + self.mean) * self.luma).sum(dim=1, keepdim=True)
        pad = self.window.shape[-1] // 2

        def smooth(t):
            return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="replicate"), self.window)

        mu = smooth(y)
        sigma = (smooth(y * y) - mu * mu).clamp(min=0).sqrt()
        d = y - mu
        if self.core > 0:
            d = d - d.clamp(-self.core, self.core)
        return d / (sigma + self.c)


class TinyVisual(nn.Module):
    """pixels [N,3,H,W] (CLIP-normalised) -> projected features [N,D]. With `mscn` (its
    constant c) the first stage also sees the pixels' MSCN luma (`Mscn`, cored by
    `mscn_core`; `--mscn`, a variant measured in models/README.md, not the shipped model)."""

    def __init__(self, dim=EMBED, mscn=None, mscn_core=0.0):
        super().__init__()
        self.mscn = None if mscn is None else Mscn(mscn, mscn_core)
        self.s1 = conv(3 if mscn is None else 4, 32, 2)
        self.s2 = nn.Sequential(conv(32, 48, 2), conv(48, 48, 1))
        self.s3 = conv(48, 96, 2)
        self.s4 = nn.Sequential(conv(96, 128, 2), conv(128, 128, 1))
        self.s5 = conv(128, 192, 2)
        self.head = nn.Sequential(nn.Linear(3 * (32 + 48 + 96 + 128 + 192), 256), nn.ReLU(inplace=True),
                                  nn.Linear(256, dim))

    def forward(self, pixels):
        x = pixels if self.mscn is None else torch.cat([pixels, self.mscn(pixels)], dim=1)
        feats = []
        for stage in (self.s1, self.s2, self.s3, self.s4, self.s5):
            x = stage(x)
            feats.append(pool_stats(x))
        return self.head(torch.cat(feats, dim=1))


def text_config(vocab_size):
    return dict(text_width=WIDTH, text_layers=LAYERS, text_heads=HEADS, text_hidden=4 * WIDTH,
                context_length=CONTEXT, vocab_size=vocab_size, embed_dim=EMBED, image_size=SIZE)


def init_text(text):
    w = WIDTH
    nn.init.normal_(text.token_embedding.weight, std=0.02)
    nn.init.normal_(text.positional_embedding, std=0.01)
    proj_std, attn_std, fc_std = w ** -0.5 * (2 * LAYERS) ** -0.5, w ** -0.5, (2 * w) ** -0.5
    for block in text.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.zeros_(block.mlp.c_fc.bias)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.zeros_(block.mlp.c_proj.bias)
    nn.init.normal_(text.text_projection, std=w ** -0.5)


class CompactTokenizer:
    """The CLIP BPE tokenizer restricted to the ids a fixed set of texts uses, renumbered
    0..V-1 (0 stays the padding id). Same interface as open_clip's SimpleTokenizer for
    what convert_clip.build_tokens needs."""

    def __init__(self, texts):
        self.base = cc.make_tokenizer()
        used = {0, self.base.sot_token_id, self.base.eot_token_id}
        for t in texts:
            used.update(self.base.encode(t))
        self.clip_ids = sorted(used)
        self.table = torch.full((49408,), -1, dtype=torch.long)
        self.table[torch.tensor(self.clip_ids)] = torch.arange(len(self.clip_ids))
        self.sot_token_id = int(self.table[self.base.sot_token_id])
        self.eot_token_id = int(self.table[self.base.eot_token_id])

    def encode(self, text):
        ids = self.table[torch.tensor(self.base.encode(text), dtype=torch.long)]
        if (ids < 0).any():
            raise ValueError(f"{text!r} uses words outside the tiny vocabulary")
        return ids.tolist()

    def __call__(self, texts, context_length):
        ids = self.table[self.base(texts, context_length=context_length)]
        if (ids < 0).any():
            raise ValueError("a text uses words outside the tiny vocabulary")
        return ids


# ---------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------

MEAN = torch.tensor(cc.MEAN).view(1, 3, 1, 1)
STD = torch.tensor(cc.STD).view(1, 3, 1, 1)


def batch_pixels(images, idx, rng, crop):
    o = rng.integers(0, STORE - crop + 1, (len(idx), 2))
    x = np.stack([images[i, a:a + crop, b:b + crop] for i, (a, b) in zip(idx, o)])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD


def encode_text(text, ids, eot, ctx, ctx_rows):
    """TextTower.forward for a mixed batch: rows in `ctx_rows` get the context vectors at
    positions 1..n_ctx. Sequences are cut after the last EOT of the batch, which changes
    nothing under the causal mask and saves most of the work on short captions."""
    length = int(eot.max()) + 1
    ids = ids[:, :length]
    x = text.token_embedding(ids)
    n = ctx.shape[0]
    sub = torch.cat([x[:, :1], ctx.expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)
    x = torch.where(ctx_rows[:, None, None], sub, x) + text.positional_embedding[:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = text.ln_final(text.transformer(x, mask))
    return x[torch.arange(x.shape[0]), eot] @ text.text_projection


def group_loss(z, u, gid):
    """Pairwise ranking inside each group: the less distorted image should have the
    larger quality logit margin `z`."""
    same = gid[:, None] == gid[None, :]
    better = (u[:, None] + 0.3) < u[None, :]
    pairs = same & better
    if not pairs.any():
        return z.sum() * 0
    diff = z[:, None] - z[None, :]
    return F.softplus(-diff[pairs]).mean()


class Objective:
    """The training objective over a data set (`meta` rows: kind, level, group; one caption
    per image): CLIP's InfoNCE over the batch's captions (identical captions are all
    positives), the quality pair as CLIP-IQA scores it (binary cross-entropy against
    1 - level/6), 2 x the ranking loss inside each group, and 0.25 x the attribute pairs
    on the kinds they name. Shared by every recipe that trains a tower against this data
    (`train_two_stream.py` too)."""

    def __init__(self, meta, caps, tok, tokens):
        cap_ids, cap_eot = cc.tokenize(tok, caps, CONTEXT)
        uniq = {c: i for i, c in enumerate(dict.fromkeys(caps))}
        self.cap_ids = cap_ids
        self.cap_class = torch.tensor([uniq[c] for c in caps])
        self.ctx_ids = torch.tensor(tok.encode(cc.CTX_INIT))
        self.cap_eot = torch.tensor(cap_eot)
        groups = [tokens["quality"]] + [tokens["attributes"][a] for a in cc.ATTRIBUTES]
        self.prompt_ids = torch.tensor([row for gr in groups for row in gr["ids"]])
        self.prompt_eot = torch.tensor([e for gr in groups for e in gr["eot_index"]])
        self.attr_mask = {a: torch.tensor([k in ATTR_KINDS[a] for k in KINDS]) for a in cc.ATTRIBUTES}
        self.kind = torch.from_numpy(meta[:, 0]).long()
        self.u = torch.from_numpy(meta[:, 1])
        self.target = 1 - self.u / 6
        self.n_groups = int(meta[:, 2].max()) + 1
        self.per = len(meta) // self.n_groups

    def loss(self, img, idx, s, text):
        """(total, contrastive, quality, rank) for the normalised image embeddings `img` of
        the images `idx` (whole groups), at logit scale `s`, through the text tower."""
        cap_class, cap_ids, cap_eot = self.cap_class, self.cap_ids, self.cap_eot
        prompt_ids, prompt_eot, ctx_ids = self.prompt_ids, self.prompt_eot, self.ctx_ids
        target, u, kind, attr_mask, per = self.target, self.u, self.kind, self.attr_mask, self.per
        # Captions of the batch (each distinct one once), quality and attribute prompts,
        # through the text tower in one call.
        uniq_cls, inv = torch.unique(cap_class[idx], return_inverse=True)
        first = torch.zeros(len(uniq_cls), dtype=torch.long).scatter_(0, inv.flip(0), torch.arange(len(idx)).flip(0))
        rows = idx[first]
        ids = torch.cat([cap_ids[rows], prompt_ids])
        eot = torch.cat([cap_eot[rows], prompt_eot])
        ctx_rows = torch.cat([torch.zeros(len(rows), dtype=torch.bool), torch.ones(len(prompt_ids), dtype=torch.bool)])
        ctx = text.token_embedding(ctx_ids)
        feats = F.normalize(encode_text(text, ids, eot, ctx, ctx_rows), dim=-1)
        txt, prompt_feats = feats[:len(rows)], feats[len(rows):]

        # Contrastive, with every identical caption a positive.
        logits = s * img @ txt.T  # [B, C]
        pos = F.one_hot(inv, len(uniq_cls)).bool()
        l_i2t = F.cross_entropy(logits, inv)
        lt = logits.T  # [C, B]
        l_t2i = -(torch.logsumexp(lt.masked_fill(~pos.T, -1e4), 1) - torch.logsumexp(lt, 1)).mean()
        l_con = (l_i2t + l_t2i) / 2

        # Quality pair (CLIP-IQA) and attribute pairs.
        ql = s * img @ prompt_feats[:2].T
        z = ql[:, 0] - ql[:, 1]
        tgt = target[idx]
        l_q = F.binary_cross_entropy_with_logits(z, tgt)
        l_rank = group_loss(z, u[idx], idx // per)
        l_attr = 0
        k = kind[idx]
        for j, a in enumerate(cc.ATTRIBUTES):
            m = (k < 0) | attr_mask[a][k.clamp(min=0)]
            if m.any():
                al = s * img[m] @ prompt_feats[2 + 2 * j:4 + 2 * j].T
                l_attr = l_attr + F.binary_cross_entropy_with_logits(al[:, 0] - al[:, 1], tgt[m])
        loss = l_con + l_q + 2 * l_rank + 0.25 * l_attr
        return loss, l_con, l_q, l_rank


def train(images, meta, caps, tok, tokens, steps, batch_groups, seed, lr=2e-3, mscn=None, mscn_core=0.0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    visual = TinyVisual(mscn=mscn, mscn_core=mscn_core).to(memory_format=torch.channels_last)
    text = cc.TextTower(text_config(len(tok.clip_ids)))
    init_text(text)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(visual.parameters()) + list(text.parameters()) + [logit_scale]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.08)

    objective = Objective(meta, caps, tok, tokens)
    n_groups, per = objective.n_groups, objective.per

    visual.train(), text.train()
    t0, hist = time.time(), []
    for step in range(steps):
        gsel = torch.randint(0, n_groups, (batch_groups,), generator=g)
        idx = (gsel[:, None] * per + torch.arange(per)).flatten()
        x = batch_pixels(images, idx.numpy(), rng, TRAIN_CROP).contiguous(memory_format=torch.channels_last)
        img = F.normalize(visual(x), dim=-1)
        s = logit_scale.clamp(max=math.log(100)).exp()

        loss, l_con, l_q, l_rank = objective.loss(img, idx, s, text)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        hist.append([loss.item(), l_con.item(), l_q.item(), l_rank.item()])
        if (step + 1) % 50 == 0 or step == 0 or step + 1 == steps:
            h = np.mean(hist[-50:], axis=0)
            rate = (step + 1) * len(idx) / (time.time() - t0)
            log(f"step {step + 1}/{steps}: loss {h[0]:.3f} (contrastive {h[1]:.3f}, quality {h[2]:.3f}, "
                f"rank {h[3]:.3f}), scale {s.item():.1f}, {rate:.0f} img/s")
    visual.eval(), text.eval()
    return visual, text, float(logit_scale.detach().clamp(max=math.log(100)).exp())


def all_texts(caps):
    texts = set(caps) | {cc.CTX_INIT, cc.PLACEHOLDER}
    for spec in [cc.QUALITY, *cc.ATTRIBUTES.values()]:
        texts.update(spec["words"])
    texts.update(f"a photo of a {s.replace('_', ' ')}." for s in cc.SCENES)
    return sorted(texts)


def export(out, visual, text, tok, tokens, scale, info):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text").mkdir(exist_ok=True)
    with torch.no_grad():
        cc.export_visual(visual, out / "visual.onnx", SIZE)
        ctx = text.token_embedding.weight[torch.tensor(tok.encode(cc.CTX_INIT))].detach().clone()
        t64 = __import__("copy").deepcopy(text).double()
        prompts = {"ctx": ctx, "quality": cc.text_features(t64, tokens["quality"], ctx.double())}
        for a in cc.ATTRIBUTES:
            prompts[f"attr.{a}"] = cc.text_features(t64, tokens["attributes"][a], ctx.double())
    save_safetensors(text.state_dict(), out / "text" / "weights.safetensors", metadata={})
    (out / "text" / "tokens.json").write_text(cc.dump_json(tokens))
    (out / "text" / "vocab.json").write_text(cc.dump_json({
        "note": "token id i of this bundle is CLIP BPE id clip_ids[i] (open_clip SimpleTokenizer)",
        "clip_ids": tok.clip_ids}))
    save_safetensors(prompts, out / "prompts.safetensors", metadata={
        "version": "0", "created": "1970-01-01T00:00:00+00:00", "labels": "0", "val_srcc": "", "parent": "",
        "source": "train_tiny.py"})
    rels = ["visual.onnx", "prompts.safetensors", "text/weights.safetensors", "text/tokens.json", "text/vocab.json"]
    files = {r: sha256(out / r) for r in rels}
    c = text_config(len(tok.clip_ids))
    c["text_heads"] = HEADS
    (out / "manifest.toml").write_text(cc.manifest_text("streamiq-tiny", "streamiq-tiny-convnet", c, scale, files, info))


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
    variant = (f"-video{a.video:g}" if a.video else "") + (f"-grain{a.grain:g}" if a.grain else "")
    name = f"data-{data_fingerprint()}-seed{a.seed}-groups{a.groups}{variant}.npz"
    cache = Path(a.cache) / name if a.cache else None
    if cache and cache.is_file():
        with np.load(cache) as z:
            images, meta, caps = z["images"], z["meta"], [str(c) for c in z["caps"]]
        log(f"data: loaded {cache}")
    else:
        # (The photographs are read in the workers only: OpenCV's thread pool does not survive a fork.)
        log(f"data: {a.groups} groups x 4 images from {len(photo_sources())} photographs "
            "and dead-leaves pictures")
        images, meta, caps = build_dataset(a.groups, a.workers, a.seed, a.video, a.grain)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, images=images, meta=meta, caps=np.array(caps))
            tmp.rename(cache)
    log(f"data: {len(images)} images, {len(set(caps))} distinct captions, {time.time() - t0:.0f} s")
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
