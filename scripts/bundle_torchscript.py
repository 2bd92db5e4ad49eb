#!/usr/bin/env python3
"""Add `visual.pt` (TorchScript, for the daemon's torch backend) to a bundle from its
`visual.onnx`, for bundles whose training is too long to rerun.

    bundle_torchscript.py --bundle DIR [--check]

`visual.onnx` is turned into a PyTorch module by onnx2torch (operator by operator, the
same weights; weights stored as float16 by onnx_fp16.py are widened to float32 first, as
ONNX Runtime does when it loads them, and kept as float16 in visual.pt too), traced (the
batch dimension kept dynamic: checked at batches 1 and 5), and
checked against `visual.onnx` under ONNX Runtime at batches 1, 3 and 8 (L2 distance of
the normalised embeddings at most torchscript_io.EMBED_TOLERANCE). Then `visual.pt` is
written and its sha256 entered in the manifest's `[files]`, after `visual.onnx`'s.
`--check` only checks an existing `visual.pt` against `visual.onnx` and the manifest.

Bundles written by convert_clip.py, make_test_bundle.py, train_tiny.py and
train_two_stream.py carry `visual.pt` already, traced from the module they trained.
"""
import argparse
import re
import sys
import tempfile
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from bundle_io import sha256
from torchscript_io import check_against_onnx, export_torchscript


def fold_weight_casts(model):
    """Replaces each Cast of a constant weight to float32 (the float16-stored weights of
    onnx_fp16.py) by the float32 weight itself, as ONNX Runtime folds them when it loads
    the model (float16 -> float32 is exact), so that onnx2torch sees plain weights."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep, folded = [], 0
    for node in g.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and node.input[0] in inits and to == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(inits[node.input[0]]).astype("float32")
            g.initializer.append(numpy_helper.from_array(w, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    unused = [i for i in g.initializer if i.name not in used]
    for i in unused:
        g.initializer.remove(i)
    return folded


class HalfStoredConv(nn.Module):
    """A Conv2d whose weight is kept as float16 and widened to float32 at every call:
    the same numbers (each weight was a float16 in visual.onnx) in half the bytes."""

    def __init__(self, conv):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().half())
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x):
        return F.conv2d(x, self.weight.float(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class HalfStoredLinear(nn.Module):
    """HalfStoredConv's twin for a Linear layer (an ONNX Gemm)."""

    def __init__(self, linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().half())
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight.float(), self.bias)


def store_half(module, min_elements=1024):
    """Swaps each zero-padded Conv2d and each Linear of `module` whose weight (at least
    `min_elements`) is exactly a float16 tensor for its half-stored twin; returns how many."""
    swapped = 0
    for name, child in list(module.named_modules()):
        kind = type(child)
        if (kind not in (nn.Conv2d, nn.Linear) or getattr(child, "padding_mode", "zeros") != "zeros"
                or child.weight.numel() < min_elements
                or not torch.equal(child.weight.detach().half().float(), child.weight.detach())):
            continue
        parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        setattr(parent, name.rpartition(".")[2], (HalfStoredConv if kind is nn.Conv2d else HalfStoredLinear)(child))
        swapped += 1
    return swapped


def set_file_checksum(manifest, rel, digest):
    """The manifest text with `"rel" = "digest"` in [files]: replaced where present,
    else inserted after `visual.onnx`'s line."""
    line = f'"{rel}" = "{digest}"'
    pattern = re.compile(rf'(?m)^"{re.escape(rel)}" = "[0-9a-fA-F]*"$')
    if pattern.search(manifest):
        return pattern.sub(line, manifest)
    anchor = re.compile(r'(?m)^"visual\.onnx" = "[0-9a-fA-F]+"$')
    m = anchor.search(manifest)
    if not m:
        raise SystemExit("bundle_torchscript: the manifest's [files] has no visual.onnx entry")
    return manifest[:m.end()] + "\n" + line + manifest[m.end():]


def input_size(manifest):
    m = re.search(r"(?m)^size = (\d+)$", manifest)
    if not m:
        raise SystemExit("bundle_torchscript: the manifest has no [input] size")
    return int(m.group(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    ap.add_argument("--check", action="store_true", help="only check an existing visual.pt")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # reductions in a fixed order
    mpath, onnx_path, pt_path = a.bundle / "manifest.toml", a.bundle / "visual.onnx", a.bundle / "visual.pt"
    manifest = mpath.read_text()
    size = input_size(manifest)
    if a.check:
        listed = re.search(r'(?m)^"visual\.pt" = "([0-9a-fA-F]+)"$', manifest)
        if not listed or listed.group(1).lower() != sha256(pt_path):
            raise SystemExit(f"bundle_torchscript: {pt_path} is not the visual.pt the manifest lists")
        print(f"{pt_path}: matches {onnx_path} within {check_against_onnx(onnx_path, pt_path, size):.1e}")
        return 0
    from onnx2torch import convert
    model = onnx.load(str(onnx_path))
    half = fold_weight_casts(model)
    module = convert(model).eval()
    if half:
        store_half(module)
    with tempfile.TemporaryDirectory(dir=a.bundle) as tmp:
        tmp_pt = Path(tmp) / "visual.pt"
        traced = export_torchscript(module, tmp_pt, size)
        parity = check_against_onnx(onnx_path, tmp_pt, size)
        tmp_pt.replace(pt_path)
    mpath.write_text(set_file_checksum(manifest, "visual.pt", sha256(pt_path)))
    print(f"wrote {pt_path} ({pt_path.stat().st_size / 1e6:.1f} MB, sha256 {sha256(pt_path)}): "
          f"trace vs module {traced:.1e}, vs visual.onnx under ONNX Runtime {parity:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
