#!/usr/bin/env python3
"""Convert a CLIP checkpoint into a streamiq model bundle.

    convert_clip.py --checkpoint PATH --out BUNDLE_DIR [--arch ViT-B-16|ViT-B-32|auto]
                    [--name NAME] [--created ISO_TIME] [--text-heads N] [--vision-heads N]
                    [--force]
    convert_clip.py --random-weights SEED --arch ViT-B-16|ViT-B-32 --out BUNDLE_DIR
                    [--visual-only] [--force]

PATH is one of
  * an OpenAI CLIP file (`ViT-B-16.pt`, a TorchScript archive, or a plain state dict),
  * an open_clip state dict or training checkpoint (`.pt`, `.pth`, `.bin`, `.safetensors`),
  * a Hugging Face `CLIPModel` directory (`config.json` + `model.safetensors` or
    `pytorch_model.bin`), e.g. a download of `openai/clip-vit-base-patch16`.

--random-weights SEED converts no checkpoint: it makes one of the architecture's shape
with seeded random weights (CLIP's initialisation scales), for benchmarks and tests
that need the real tower's shape and cost but no real weights (its scores mean nothing).
With --visual-only the bundle has no text tower (no text/, no [text], no `ctx` or
attribute prompts; `quality` is a seeded random pair), so the CLIP tokenizer
(open_clip_torch) and safetensors are not needed: torch and numpy are enough.

The bundle (format in README.md, "Models"):
  visual.onnx               image tower: `pixels` f32 [N,3,H,W] -> `embeds` f32 [N,D],
                            projected and not normalised (opset 17).
  visual.pt                 the same tower traced to TorchScript (the daemon's torch
                            backend), checked against visual.onnx under ONNX Runtime.
  text/weights.safetensors  text tower in OpenAI CLIP naming, f32.
  text/tokens.json          CLIP BPE token ids of every prompt the text tower needs.
  prompts.safetensors       `quality` and `attr.<name>` text features [2,D] and the
                            initial context vectors `ctx` [4,W].
  manifest.toml             sizes, preprocessing, logit scale, sha256 of every file.

Quality and attribute prompts are CoOp prompts `[SOT] c1 c2 c3 c4 <words> [EOT]`; the
context vectors c1..c4 start as the token embeddings of "a photo of a", so the bundle
scores sensibly before any adaptation. Text features are computed in float64 and
stored as float32; every file is written deterministically, so the same checkpoint
always gives the same bytes.

Only ViT towers with QuickGELU activations (the OpenAI CLIP models) are supported.
An OpenAI-style state dict does not record the number of attention heads; it is taken
to be width / 64 (true for every OpenAI CLIP model) unless --text-heads/--vision-heads
say otherwise. A Hugging Face directory states them in its config.

Needs torch, onnx, safetensors, numpy and open_clip_torch (for the CLIP BPE tokenizer).
"""
import argparse
import copy
import json
import math
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bundle_io import save_safetensors, sha256
from streamiq_train.model_input import CLIP_MEAN as MEAN
from streamiq_train.model_input import CLIP_STD as STD
from torchscript_io import check_against_onnx, export_torchscript

# Architectures that --arch can insist on; "auto" accepts any ViT CLIP.
KNOWN_ARCHS = {
    "ViT-B-16": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                     text_width=512, text_layers=12, context_length=77, vocab_size=49408, embed_dim=512),
    "ViT-B-32": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                     text_width=512, text_layers=12, context_length=77, vocab_size=49408, embed_dim=512),
}

N_CTX = 4
CTX_INIT = "a photo of a"
PLACEHOLDER = "X"  # stands for one context vector in a prompt text
QUALITY = {"names": ["high", "low"], "words": ["high quality.", "low quality."]}
ATTRIBUTES = OrderedDict([
    ("sharp", {"names": ["sharp", "blurry"], "words": ["sharp photo.", "blurry photo."]}),
    ("clean", {"names": ["clean", "noisy"], "words": ["clean photo.", "noisy photo."]}),
    ("smooth", {"names": ["smooth", "blocky"], "words": ["smooth photo.", "blocky photo."]}),
    ("bright", {"names": ["well exposed", "badly exposed"],
                "words": ["well exposed photo.", "badly exposed photo."]}),
])
# Scene prompts of the gradient regulariser (GRMP-IQA, module 2); no context slots.
SCENES = ["animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others"]

# Text-tower tensors outside the residual blocks, in OpenAI naming.
TEXT_TOP = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            "text_projection"]
# Entries of OpenAI / open_clip state dicts that hold no weights the bundle needs.
IGNORED_KEYS = {"logit_scale", "logit_bias", "attn_mask", "input_resolution", "context_length", "vocab_size"}


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why."""


# ---------------------------------------------------------------------------------------
# Model: OpenAI CLIP ViT towers, parameter names as in OpenAI's checkpoints.
# ---------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with OpenAI's packed q/k/v projection, written out in
    plain tensor operations so that it exports to ONNX without fused kernels."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ConversionError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, mask=None):
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q * (width // self.heads) ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        out = scores.softmax(dim=-1) @ v  # [N, heads, L, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width, heads, hidden):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden), gelu=QuickGELU(), c_proj=nn.Linear(hidden, width)))

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, hidden):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualBlock(width, heads, hidden) for _ in range(layers)])

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTower(nn.Module):
    """CLIP's ViT image encoder: pixels [N,3,H,W] -> projected features [N,D]."""

    def __init__(self, c):
        super().__init__()
        w, p = c["vision_width"], c["patch_size"]
        grid = c["image_size"] // p
        self.conv1 = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, c["vision_layers"], c["vision_heads"], c["vision_hidden"])
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, c["embed_dim"]))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [N, grid*grid, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class TextTower(nn.Module):
    """CLIP's causal text encoder with CoOp context substitution.

    `forward(ids, eot_index, ctx)`: ids [N,L] token ids, eot_index [N] position of the
    EOT token, ctx [n_ctx,W] vectors that replace the token embeddings at positions
    1..n_ctx (or None). Returns projected features [N,D].
    """

    def __init__(self, c):
        super().__init__()
        w = c["text_width"]
        self.token_embedding = nn.Embedding(c["vocab_size"], w)
        self.positional_embedding = nn.Parameter(torch.empty(c["context_length"], w))
        self.transformer = Transformer(w, c["text_layers"], c["text_heads"], c["text_hidden"])
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, c["embed_dim"]))

    def forward(self, ids, eot_index, ctx=None):
        x = self.token_embedding(ids)
        if ctx is not None:
            x = torch.cat([x[:, :1], ctx.to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1 + ctx.shape[0]:]], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        length = x.shape[1]
        mask = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)
        x = self.ln_final(self.transformer(x, mask))
        return x[torch.arange(x.shape[0]), eot_index] @ self.text_projection


# ---------------------------------------------------------------------------------------
# Reading checkpoints.
# ---------------------------------------------------------------------------------------

def _is_torchscript(path):
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in z.namelist())
    except zipfile.BadZipFile:
        return False


def _load_weights_file(path):
    """A state dict from a safetensors file, a TorchScript archive or a torch.save file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if _is_torchscript(path):
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip training checkpoint
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_checkpoint(path):
    """Returns (state dict, Hugging Face config or None, files holding the weights)."""
    path = Path(path)
    hf_config = None
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{path}: a directory must be a Hugging Face CLIPModel (no config.json)")
        hf_config = json.loads(cfg_path.read_text())
        if (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        elif (path / "model.safetensors.index.json").is_file():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = [path / f for f in sorted(set(index["weight_map"].values()))]
        elif (path / "pytorch_model.bin").is_file():
            files = [path / "pytorch_model.bin"]
        else:
            raise ConversionError(f"{path}: no model.safetensors or pytorch_model.bin")
    elif path.is_file():
        files = [path]
        sibling = path.parent / "config.json"
        if sibling.is_file():
            cfg = json.loads(sibling.read_text())
            hf_config = cfg if cfg.get("model_type") == "clip" else None
    else:
        raise ConversionError(f"{path}: no such file or directory")
    state = {}
    for f in files:
        state.update(_load_weights_file(f))
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    return state, hf_config, files


def random_checkpoint(arch, seed):
    """An OpenAI-naming state dict of `arch`'s shape with seeded random weights:
    LayerNorms at identity, biases at 0, embeddings and projections N(0, width^-0.5),
    other weights N(0, 0.02) (CLIP's initialisation scales), logit scale 100."""
    c = dict(KNOWN_ARCHS[arch])
    for tower in ("vision", "text"):
        c[f"{tower}_heads"] = c[f"{tower}_width"] // 64
        c[f"{tower}_hidden"] = 4 * c[f"{tower}_width"]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, tower, width in (("visual.", VisionTower(c), c["vision_width"]), ("", TextTower(c), c["text_width"])):
        for name, p in tower.state_dict().items():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("bias"):
                value = torch.zeros(p.shape)
            elif leaf == "weight" and (".ln_" in f".{name}" or name.startswith("ln_")):
                value = torch.ones(p.shape)
            elif leaf in ("class_embedding", "positional_embedding", "proj", "text_projection"):
                value = torch.randn(p.shape, generator=g) * width ** -0.5
            else:
                value = torch.randn(p.shape, generator=g) * 0.02
            sd[prefix + name] = value
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    return sd


def random_visual(arch, seed):
    """The image tower of random_checkpoint(arch, seed), as convert() builds it (the
    eager module behind a --random-weights bundle's visual.onnx and visual.pt)."""
    sd, _ = canonical_state(random_checkpoint(arch, seed))
    c = infer_config(sd, None)
    visual = VisionTower(c).eval()
    visual.load_state_dict({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
    return visual


def _hf_to_openai(sd):
    """Maps Hugging Face CLIPModel names to OpenAI CLIP names (q/k/v packed, the
    projections transposed)."""
    out = {}

    def blocks(src, dst):
        i = 0
        while f"{src}.{i}.layer_norm1.weight" in sd:
            s, d = f"{src}.{i}", f"{dst}.{i}"
            a = f"{s}.self_attn"
            out[f"{d}.attn.in_proj_weight"] = torch.cat([sd[f"{a}.{p}_proj.weight"] for p in "qkv"])
            out[f"{d}.attn.in_proj_bias"] = torch.cat([sd[f"{a}.{p}_proj.bias"] for p in "qkv"])
            for name in ("weight", "bias"):
                out[f"{d}.attn.out_proj.{name}"] = sd[f"{a}.out_proj.{name}"]
                out[f"{d}.ln_1.{name}"] = sd[f"{s}.layer_norm1.{name}"]
                out[f"{d}.ln_2.{name}"] = sd[f"{s}.layer_norm2.{name}"]
                out[f"{d}.mlp.c_fc.{name}"] = sd[f"{s}.mlp.fc1.{name}"]
                out[f"{d}.mlp.c_proj.{name}"] = sd[f"{s}.mlp.fc2.{name}"]
            i += 1

    v, t = "vision_model", "text_model"
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    for name in ("weight", "bias"):
        out[f"visual.ln_pre.{name}"] = sd[f"{v}.pre_layrnorm.{name}"]
        out[f"visual.ln_post.{name}"] = sd[f"{v}.post_layernorm.{name}"]
        out[f"ln_final.{name}"] = sd[f"{t}.final_layer_norm.{name}"]
    out["visual.proj"] = sd["visual_projection.weight"].t()
    blocks(f"{v}.encoder.layers", "visual.transformer.resblocks")
    out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].t()
    blocks(f"{t}.encoder.layers", "transformer.resblocks")
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    return out


def canonical_state(sd):
    """The checkpoint's weights in OpenAI naming as contiguous float32 tensors, plus
    the log logit scale."""
    if "visual.layer1.0.conv1.weight" in sd or "visual.attnpool.positional_embedding" in sd:
        raise ConversionError("ResNet CLIP image towers are not supported; use a ViT checkpoint")
    if any(k.startswith("vision_model.") for k in sd):
        sd = _hf_to_openai(sd)
    elif any(k.startswith("text.") for k in sd):
        raise ConversionError("open_clip models with a custom text tower are not supported")
    missing = [k for k in ["visual.conv1.weight", "visual.proj", *TEXT_TOP] if k not in sd]
    if missing:
        raise ConversionError(f"not a CLIP ViT checkpoint: missing {', '.join(missing)}")
    if "logit_scale" not in sd:
        raise ConversionError("checkpoint has no logit_scale")
    log_scale = float(sd["logit_scale"].float().reshape(-1)[0])
    weights = {k: v.detach().float().contiguous() for k, v in sd.items()
               if torch.is_tensor(v) and k not in IGNORED_KEYS}
    return weights, log_scale


def _count_blocks(sd, prefix):
    return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})


def _hf_tower_config(hf_config, tower):
    """One tower's settings from a Hugging Face config; older files keep the values
    that differ from the defaults in `<tower>_config_dict`."""
    if not hf_config:
        return {}
    return {**(hf_config.get(f"{tower}_config") or {}), **(hf_config.get(f"{tower}_config_dict") or {})}


def infer_config(sd, hf_config, text_heads=None, vision_heads=None):
    """Sizes of both towers from the weights (heads from the Hugging Face config,
    the flags, or OpenAI's width / 64 rule)."""
    c = {}
    c["vision_width"], _, c["patch_size"], _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise ConversionError("visual.positional_embedding is not 1 + a square number of patches")
    c["image_size"] = grid * c["patch_size"]
    c["vision_layers"] = _count_blocks(sd, "visual.transformer.resblocks")
    c["vision_hidden"] = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    c["vocab_size"], c["text_width"] = sd["token_embedding.weight"].shape
    c["context_length"] = sd["positional_embedding"].shape[0]
    c["text_layers"] = _count_blocks(sd, "transformer.resblocks")
    c["text_hidden"] = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    c["embed_dim"] = sd["text_projection"].shape[1]
    if sd["visual.proj"].shape[1] != c["embed_dim"]:
        raise ConversionError(f"image embedding size {sd['visual.proj'].shape[1]} "
                              f"!= text embedding size {c['embed_dim']}")
    hf_text, hf_vision = _hf_tower_config(hf_config, "text"), _hf_tower_config(hf_config, "vision")
    for tower, tc in (("text_config", hf_text), ("vision_config", hf_vision)):
        act = tc.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ConversionError(f"{tower}.hidden_act = {act!r}: only quick_gelu (OpenAI CLIP) is supported")
        eps = tc.get("layer_norm_eps", 1e-5)
        if eps != 1e-5:
            raise ConversionError(f"{tower}.layer_norm_eps = {eps}: only 1e-5 is supported")
    c["text_heads"] = text_heads or hf_text.get("num_attention_heads") or max(1, c["text_width"] // 64)
    c["vision_heads"] = vision_heads or hf_vision.get("num_attention_heads") or max(1, c["vision_width"] // 64)
    return c


def resolve_arch(c, arch):
    """The architecture name; with a named --arch, the weights must match it."""
    shape = {k: c[k] for k in next(iter(KNOWN_ARCHS.values()))}
    if arch != "auto":
        want = KNOWN_ARCHS[arch]
        diff = [f"{k} = {shape[k]} (expected {v})" for k, v in want.items() if shape[k] != v]
        if diff:
            raise ConversionError(f"checkpoint is not {arch}: " + ", ".join(diff))
        return arch
    for name, want in KNOWN_ARCHS.items():
        if shape == want:
            return name
    return f"ViT-P{c['patch_size']}-W{c['vision_width']}x{c['vision_layers']}-{c['image_size']}"


# ---------------------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------------------

def make_tokenizer():
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise ConversionError(f"the CLIP tokenizer needs open_clip_torch, ftfy and regex ({e})") from e
    return SimpleTokenizer()


def tokenize(tok, texts, context_length):
    ids = tok(texts, context_length=context_length)
    eot = [int((row == tok.eot_token_id).nonzero()[0, 0]) for row in ids]
    return ids, eot


def prompt_group(tok, names, texts, context_length, ctx_id=None):
    ids, eot = tokenize(tok, texts, context_length)
    for text, row, e in zip(texts, ids, eot):
        if e == context_length - 1 and len(tok.encode(text)) > context_length - 2:
            raise ConversionError(f"prompt {text!r} is longer than the context ({context_length})")
        if ctx_id is not None and (row[1:1 + N_CTX] != ctx_id).any():
            raise ConversionError(f"prompt {text!r}: the placeholders do not fill positions 1..{N_CTX}")
    return {"names": list(names), "texts": list(texts), "ids": ids.tolist(), "eot_index": eot}


def build_tokens(tok, context_length):
    """The content of text/tokens.json."""
    ctx_id = tok.encode(PLACEHOLDER)
    if len(ctx_id) != 1:
        raise ConversionError(f"placeholder {PLACEHOLDER!r} is not a single token")
    slots = " ".join([PLACEHOLDER] * N_CTX)

    def coop(spec):
        return prompt_group(tok, spec["names"], [f"{slots} {w}" for w in spec["words"]], context_length, ctx_id[0])

    return {
        "context_length": context_length,
        "n_ctx": N_CTX,
        "ctx_positions": list(range(1, 1 + N_CTX)),
        "sot": tok.sot_token_id,
        "eot": tok.eot_token_id,
        "quality": coop(QUALITY),
        "attributes": {name: coop(spec) for name, spec in ATTRIBUTES.items()},
        "scenes": prompt_group(tok, SCENES, [f"a photo of a {s.replace('_', ' ')}." for s in SCENES],
                               context_length),
    }


def initial_ctx(tok, text_tower):
    ids = tok.encode(CTX_INIT)
    if len(ids) != N_CTX:
        raise ConversionError(f"{CTX_INIT!r} is {len(ids)} tokens, expected {N_CTX}")
    return text_tower.token_embedding.weight[torch.tensor(ids)].detach().clone()


def text_features(text_tower, group, ctx):
    """Features [2,D] of a CoOp prompt group with context vectors `ctx`, computed in the
    tower's precision and returned as float32."""
    ids = torch.tensor(group["ids"])
    eot = torch.tensor(group["eot_index"])
    return text_tower(ids, eot, ctx).float()


# ---------------------------------------------------------------------------------------
# Writing the bundle.
# ---------------------------------------------------------------------------------------

def dump_json(obj):
    """Indented JSON with every flat list (a row of token ids, a list of names) on one line."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    return re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)).strip() + "]", text) + "\n"


def export_visual(tower, path, image_size):
    example = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        torch.onnx.export(tower, example, str(path), input_names=["pixels"], output_names=["embeds"],
                          dynamic_axes={"pixels": {0: "n"}, "embeds": {0: "n"}}, opset_version=17,
                          do_constant_folding=True, dynamo=False)


def toml_str(s):
    return json.dumps(s, ensure_ascii=False)


def manifest_text(name, architecture, c, logit_scale, files, info, text=True):
    """The manifest; with `text` False, no [text] table (a bundle without a text tower)."""
    text_table = [
        "[text]",
        f"width = {c['text_width']}",
        f"layers = {c['text_layers']}",
        f"heads = {c['text_heads']}",
        f"context_length = {c['context_length']}",
        f"vocab_size = {c['vocab_size']}",
        f"n_ctx = {N_CTX}",
        "",
    ]
    lines = [
        "format = 1",
        f"name = {toml_str(name)}",
        f"architecture = {toml_str(architecture)}",
        f"embed_dim = {c['embed_dim']}",
        f"logit_scale = {logit_scale:.6f}",
        "",
        "[input]",
        f"size = {c['image_size']}",
        f"mean = {json.dumps(MEAN)}",
        f"std = {json.dumps(STD)}",
        'resize = "shorter_side_crop"',
        "",
        *(text_table if text else []),
        "[files]",
        *[f"{toml_str(k)} = {toml_str(v)}" for k, v in files.items()],
        "",
        "[info]",
        *[f"{k} = {toml_str(v)}" for k, v in info.items()],
        "",
    ]
    return "\n".join(lines)


def convert(checkpoint, out, arch="auto", name=None, created="1970-01-01T00:00:00+00:00",
            text_heads=None, vision_heads=None, force=False, random_seed=None, visual_only=False):
    """Converts `checkpoint` (or, with `random_seed`, random weights of `arch`'s shape)
    into a bundle at `out`; returns a one-line summary."""
    out = Path(out)
    if out.exists():
        if not force:
            raise ConversionError(f"{out} exists (use --force to replace it)")
        if not (out / "manifest.toml").is_file() and any(out.iterdir()):
            raise ConversionError(f"{out} is not a bundle; not replacing it")
    if random_seed is None:
        raw, hf_config, weight_files = load_checkpoint(checkpoint)
    else:
        if arch not in KNOWN_ARCHS:
            raise ConversionError(f"--random-weights needs --arch {' or '.join(KNOWN_ARCHS)}")
        raw, hf_config, weight_files = random_checkpoint(arch, random_seed), None, []
    hf_naming = any(k.startswith("vision_model.") for k in raw)
    sd, log_scale = canonical_state(raw)
    del raw
    c = infer_config(sd, hf_config, text_heads, vision_heads)
    arch_name = resolve_arch(c, arch)
    if c["vocab_size"] != 49408:
        raise ConversionError(f"vocab_size = {c['vocab_size']}: the CLIP BPE tokenizer needs 49408")

    visual, text = VisionTower(c).eval(), TextTower(c).eval()
    for tower, keys in ((visual, [k for k in sd if k.startswith("visual.")]),
                        (text, [k for k in sd if not k.startswith("visual.")])):
        prefix = "visual." if tower is visual else ""
        result = tower.load_state_dict({k[len(prefix):]: sd[k] for k in keys}, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ConversionError(f"weights do not fit a CLIP ViT: missing {result.missing_keys}, "
                                  f"unexpected {result.unexpected_keys}")
    del sd

    if visual_only:
        tokens = None
        g = torch.Generator().manual_seed(0 if random_seed is None else random_seed)
        prompts = {"quality": F.normalize(torch.randn(2, c["embed_dim"], generator=g), dim=1)}
    else:
        tok = make_tokenizer()
        tokens = build_tokens(tok, c["context_length"])
        with torch.no_grad():
            ctx = initial_ctx(tok, text)
            text64 = copy.deepcopy(text).double()
            prompts = {"ctx": ctx, "quality": text_features(text64, tokens["quality"], ctx.double())}
            for attr in ATTRIBUTES:
                prompts[f"attr.{attr}"] = text_features(text64, tokens["attributes"][attr], ctx.double())
            del text64
    architecture = "clip-" + arch_name.lower()
    source = f"convert_clip.py {arch_name}" + ("" if random_seed is None else f" random weights (seed {random_seed})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)
        with torch.no_grad():
            export_visual(visual, tmp / "visual.onnx", c["image_size"])
        export_torchscript(visual, tmp / "visual.pt", c["image_size"])
        parity = check_against_onnx(tmp / "visual.onnx", tmp / "visual.pt", c["image_size"], batches=(1, 3))
        rels = ["visual.onnx", "visual.pt", "prompts.safetensors"]
        if not visual_only:
            (tmp / "text").mkdir()
            save_safetensors(text.state_dict(), tmp / "text" / "weights.safetensors", metadata={})
            (tmp / "text" / "tokens.json").write_text(dump_json(tokens))
            rels += ["text/weights.safetensors", "text/tokens.json"]
        save_safetensors(prompts, tmp / "prompts.safetensors", metadata={
            "version": "0", "created": created, "labels": "0", "val_srcc": "", "parent": "", "source": source})
        files = {rel: sha256(tmp / rel) for rel in rels}
        generator = f"scripts/convert_clip.py --arch {arch}" + (f" (resolved {arch_name})" if arch == "auto" else "")
        if random_seed is not None:
            generator += f" --random-weights {random_seed}" + (" --visual-only" if visual_only else "")
        info = {"generator": generator}
        if random_seed is None:
            info["source"] = Path(checkpoint).name
            info["source_format"] = "huggingface" if hf_naming else "openai"
        else:
            info["random_arch"] = arch_name
            info["random_seed"] = str(random_seed)
        if len(weight_files) == 1:
            info["source_sha256"] = sha256(weight_files[0])
        info["vision"] = (f"width {c['vision_width']}, layers {c['vision_layers']}, heads {c['vision_heads']}, "
                          f"patch {c['patch_size']}")
        if not visual_only:
            info["prompt_init"] = f"context vectors = token embeddings of {CTX_INIT!r}"
        info["torchscript_parity"] = f"{parity:.1e}"
        (tmp / "manifest.toml").write_text(manifest_text(name or architecture, architecture, c,
                                                          math.exp(log_scale), files, info, text=not visual_only))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return (f"wrote {out} ({architecture}: image {c['image_size']}, embed_dim {c['embed_dim']}, "
            f"logit_scale {math.exp(log_scale):.4f}; visual.pt vs visual.onnx {parity:.1e})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="OpenAI/open_clip file or Hugging Face CLIPModel directory")
    source.add_argument("--random-weights", type=int, metavar="SEED",
                        help="no checkpoint: seeded random weights of --arch's shape")
    ap.add_argument("--arch", default="auto", choices=[*KNOWN_ARCHS, "auto"],
                    help="architecture the checkpoint must have (default: infer it)")
    ap.add_argument("--out", required=True, help="bundle directory to write")
    ap.add_argument("--name", help="bundle name (default: clip-<arch>)")
    ap.add_argument("--created", default="1970-01-01T00:00:00+00:00",
                    help="`created` metadata of the prompt set (fixed by default, for reproducible bytes)")
    ap.add_argument("--text-heads", type=int, help="attention heads of the text tower (default: width / 64)")
    ap.add_argument("--vision-heads", type=int, help="attention heads of the image tower (default: width / 64)")
    ap.add_argument("--visual-only", action="store_true",
                    help="no text tower: a seeded random quality pair (for benchmarks of the image tower)")
    ap.add_argument("--force", action="store_true", help="replace --out if it is an existing bundle")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # reductions in a fixed order: the same bytes from run to run
    try:
        print(convert(a.checkpoint, a.out, a.arch, a.name, a.created, a.text_heads, a.vision_heads, a.force,
                      random_seed=a.random_weights, visual_only=a.visual_only))
    except ConversionError as e:
        print(f"convert_clip.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
