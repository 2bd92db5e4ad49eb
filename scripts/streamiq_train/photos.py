"""The source pictures of the training data: the photographs (scikit-image's, Debian
packages', GCompris' and Palapeli's; scripts/setup.sh installs them, licences in
models/README.md), those kept aside for evaluation, and seeded procedural "dead leaves"
pictures."""
import functools
import math
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

from streamiq_train.model_input import SIZE

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

