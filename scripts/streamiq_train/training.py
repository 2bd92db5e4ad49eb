"""Training streamiq-tiny: batches of random crops, the objective (`Objective`, shared
with train_two_stream.py), the optimisation loop and the bundle export."""
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import convert_clip as cc
from bundle_io import save_safetensors, sha256
from streamiq_train import log
from streamiq_train.data import STORE
from streamiq_train.levels import KINDS
from streamiq_train.model import CONTEXT, HEADS, MEAN, STD, TinyVisual, init_text, text_config
from streamiq_train.model_input import SIZE
from torchscript_io import check_against_onnx, export_torchscript

TRAIN_CROP = 160
# Attribute pairs of the bundle (convert_clip.ATTRIBUTES) and the kinds each one names.
ATTR_KINDS = {
    "sharp": {"gaussian_blur", "motion_blur", "rescale", "pixelate"},
    "clean": {"gaussian_noise", "impulse_noise"},
    "smooth": {"jpeg", "h264", "pixelate", "quantize"},
    "bright": {"brightness", "contrast"},
}


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


def fit(visual, params, embed, objective, tok, steps, batch_groups, g, lr=2e-3):
    """Trains `params` (the image tower's trainable ones) with a new text tower and the
    logit scale against `objective`: AdamW, one-cycle lr, gradient clipping, progress lines.
    `embed(idx)` gives the image tower's output for the images of batch `idx`, or a tuple
    (output, the data rows of its rows, a function of the normalised output that is added
    to the loss); `g` draws the batches. Returns (text tower, logit scale, seconds)."""
    text = cc.TextTower(text_config(len(tok.clip_ids)))
    init_text(text)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(params) + list(text.parameters()) + [logit_scale]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.08)
    n_groups, per = objective.n_groups, objective.per

    visual.train(), text.train()
    t0, hist = time.time(), []
    for step in range(steps):
        gsel = torch.randint(0, n_groups, (batch_groups,), generator=g)
        idx = (gsel[:, None] * per + torch.arange(per)).flatten()
        out, extra = embed(idx), None
        if isinstance(out, tuple):
            # (embeddings, the data rows they stand for, a term of the loss over the
            # normalised embeddings): a recipe that adds rows, e.g. paired grain twins.
            out, idx, extra = out
        img = F.normalize(out, dim=-1)
        s = logit_scale.clamp(max=math.log(100)).exp()

        loss, l_con, l_q, l_rank = objective.loss(img, idx, s, text)
        l_x = extra(img) if extra is not None else torch.zeros(())
        loss = loss + l_x
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        hist.append([loss.item(), l_con.item(), l_q.item(), l_rank.item(), l_x.item()])
        if (step + 1) % 50 == 0 or step == 0 or step + 1 == steps:
            h = np.mean(hist[-50:], axis=0)
            el_s = time.time() - t0
            rate = (step + 1) * len(idx) / el_s
            log(f"step {step + 1}/{steps}: loss {h[0]:.3f} (contrastive {h[1]:.3f}, quality {h[2]:.3f}, "
                f"rank {h[3]:.3f}" + (f", pairs {h[4]:.4f}" if extra is not None else "")
                + f"), scale {s.item():.1f}, {rate:.0f} img/s, "
                f"{(steps - step - 1) * el_s / (step + 1) / 60:.1f} min left")
    visual.eval(), text.eval()
    log(f"training: {steps} steps of {batch_groups * per} images in {(time.time() - t0) / 60:.1f} min")
    return text, float(logit_scale.detach().clamp(max=math.log(100)).exp()), time.time() - t0


def train(images, meta, caps, tok, tokens, steps, batch_groups, seed, lr=2e-3, mscn=None, mscn_core=0.0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    visual = TinyVisual(mscn=mscn, mscn_core=mscn_core).to(memory_format=torch.channels_last)

    def embed(idx):
        x = batch_pixels(images, idx.numpy(), rng, TRAIN_CROP).contiguous(memory_format=torch.channels_last)
        return visual(x)

    text, scale, _ = fit(visual, visual.parameters(), embed, Objective(meta, caps, tok, tokens), tok,
                         steps, batch_groups, g, lr)
    return visual, text, scale


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
        export_torchscript(visual, out / "visual.pt", SIZE)
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
    check_against_onnx(out / "visual.onnx", out / "visual.pt", SIZE)
    rels = ["visual.onnx", "visual.pt", "prompts.safetensors", "text/weights.safetensors", "text/tokens.json",
            "text/vocab.json"]
    files = {r: sha256(out / r) for r in rels}
    c = text_config(len(tok.clip_ids))
    c["text_heads"] = HEADS
    (out / "manifest.toml").write_text(
        cc.manifest_text("streamiq-tiny", "streamiq-tiny-convnet", c, scale, files, info))

