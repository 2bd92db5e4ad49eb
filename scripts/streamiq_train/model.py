"""streamiq-tiny's towers: the convolutional image tower (`TinyVisual`, with the optional
MSCN input `Mscn`), the text tower's configuration and initialisation (CLIP's causal
transformer, convert_clip.TextTower) and the compact CLIP BPE tokenizer."""
import torch
import torch.nn.functional as F
from torch import nn

import convert_clip as cc
from streamiq_train.model_input import CLIP_MEAN, CLIP_STD, SIZE

MSCN_C = 0.01       # `--mscn`: the MSCN constant unless one is given (luma in 0..1)
MSCN_CORE = 0.01    # `--mscn-core`: the coring threshold unless one is given (about 2.5 of 255)
CONTEXT = 32
WIDTH, LAYERS, HEADS, EMBED = 128, 3, 4, 128
# CLIP's pixel normalisation as [1,3,1,1] tensors.
MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


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
