#!/usr/bin/env python3
"""Make streamiq's small deterministic test bundle.

    make_test_bundle.py OUT_DIR [--seed 0] [--dim 64] [--size 224]

The visual encoder (visual.onnx, and visual.pt in TorchScript for the daemon's torch
backend) is a small seeded random convolutional network (random conv
features respond to texture energy at several scales). Its prompt pairs are not
learnt by gradient descent but calibrated: each pair is the mean embedding of clean
versus degraded versions of seeded synthetic textures, so the bundle already ranks
blurred, noisy and blocky pictures below clean ones. `logit_scale` is set so that
the clean and degraded calibration sets score about 0.85 and 0.15.

Pairs: `quality` (clean vs blur+noise+JPEG), `attr.sharp` (sharp vs blurred),
`attr.clean` (clean vs noisy). The bundle obeys the format in README.md ("Models").
"""
import argparse
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from bundle_io import save_safetensors, sha256
from streamiq_train.model_input import CLIP_MEAN as MEAN
from streamiq_train.model_input import CLIP_STD as STD
from torchscript_io import check_against_onnx, export_torchscript


class Encoder(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 5, stride=2, padding=2), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        )
        self.proj = torch.nn.Linear(128, dim)

    def forward(self, pixels):
        f = self.body(pixels)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)
        return self.proj(pooled)


def texture(rng, size):
    """A seeded multi-scale texture with edges, in RGB uint8."""
    img = np.zeros((size, size, 3), np.float32)
    for octave in range(1, 6):
        n = 2 ** octave
        noise = rng.standard_normal((n, n, 3)).astype(np.float32)
        layer = np.asarray(Image.fromarray(((noise * 0.5 + 0.5).clip(0, 1) * 255).astype(np.uint8))
                           .resize((size, size), Image.BICUBIC), np.float32) / 255.0
        img += layer / octave
    img = (img - img.min()) / (img.max() - img.min() + 1e-6)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(6):  # hard-edged shapes
        cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 10, size // 3))]
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.random(3)
    return Image.fromarray((img * 255).astype(np.uint8))


def blur(img, rng):
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2.0, 4.0))))


def noise(img, rng):
    a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(20, 40), (img.height, img.width, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def jpeg(img, rng):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(3, 10)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def to_tensor(imgs):
    x = torch.tensor(np.stack([np.asarray(i, np.float32) / 255.0 for i in imgs])).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=48)
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    torch.set_num_threads(1)  # bit-identical reductions from run to run
    rng = np.random.default_rng(a.seed)
    model = Encoder(a.dim).eval()

    clean = [texture(rng, a.size) for _ in range(a.samples)]
    sets = {
        "clean": clean,
        "blurred": [blur(i, rng) for i in clean],
        "noisy": [noise(i, rng) for i in clean],
        "degraded": [jpeg(noise(blur(i, rng), rng), rng) for i in clean],
    }
    with torch.no_grad():
        # Standardise each output dimension over the calibration images, folded into the
        # projection, so that cosine similarity sees differences rather than the common mean.
        raw = torch.cat([model(to_tensor(v)) for v in sets.values()])
        mu, sd = raw.mean(0), raw.std(0) + 1e-6
        model.proj.weight.div_(sd[:, None])
        model.proj.bias.sub_(mu).div_(sd)
        emb = {k: torch.nn.functional.normalize(model(to_tensor(v)), dim=1) for k, v in sets.items()}

    def pair(good, bad):
        return torch.stack([emb[good].mean(0), emb[bad].mean(0)])

    prompts = {"quality": pair("clean", "degraded"), "attr.sharp": pair("clean", "blurred"),
               "attr.clean": pair("clean", "noisy")}
    q = torch.nn.functional.normalize(prompts["quality"], dim=1)
    margin = ((emb["clean"] @ q.T)[:, 0] - (emb["clean"] @ q.T)[:, 1]).mean().item()
    logit_scale = float(min(1000.0, max(10.0, math.log(0.85 / 0.15) / max(margin, 1e-6))))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, to_tensor(clean[:2]), str(out / "visual.onnx"), input_names=["pixels"],
                      output_names=["embeds"], dynamic_axes={"pixels": {0: "n"}, "embeds": {0: "n"}},
                      opset_version=17, dynamo=False)
    export_torchscript(model, out / "visual.pt", a.size)
    check_against_onnx(out / "visual.onnx", out / "visual.pt", a.size)
    created = datetime(2026, 1, 1, tzinfo=UTC).isoformat()  # fixed: reproducible bytes
    save_safetensors({k: v.round(decimals=6) for k, v in prompts.items()}, out / "prompts.safetensors",
                     metadata={"version": "0", "created": created, "labels": "0", "val_srcc": "",
                        "parent": "", "source": f"make_test_bundle.py --seed {a.seed}"})
    files = {name: sha256(out / name) for name in ["visual.onnx", "visual.pt", "prompts.safetensors"]}
    lines = [
        "format = 1",
        'name = "streamiq-test"',
        f'architecture = "convnet-random-{a.dim}"',
        f"embed_dim = {a.dim}",
        f"logit_scale = {logit_scale:.6f}",
        "",
        "[input]",
        f"size = {a.size}",
        f"mean = {json.dumps(MEAN)}",
        f"std = {json.dumps(STD)}",
        'resize = "shorter_side_crop"',
        "",
        "[files]",
        *[f'"{k}" = "{v}"' for k, v in files.items()],
        "",
        "[info]",
        f'generator = "scripts/make_test_bundle.py --seed {a.seed} --dim {a.dim} --size {a.size}"',
        'purpose = "tests and benchmarks; a seeded random encoder with calibrated prompt pairs"',
        "",
    ]
    (out / "manifest.toml").write_text("\n".join(lines))
    print(f"wrote {out} (dim {a.dim}, logit_scale {logit_scale:.2f}, clean margin {margin:.4f})")


if __name__ == "__main__":
    main()
