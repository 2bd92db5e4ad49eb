#!/usr/bin/env python3
"""Store an ONNX model's large float32 weights as float16, computing in float32.

usage: onnx_fp16.py IN.onnx OUT.onnx [--min-elements N]
       onnx_fp16.py --bundle DIR   (DIR/visual.onnx in place, its manifest checksum updated)

Each float32 weight of a Conv, Gemm or MatMul with at least N elements (default 1024) is
stored as float16 and followed by a Cast back to float32, so the graph computes exactly as before with weights
rounded to half precision: the file is about half the size, ONNX Runtime folds the Casts
when it loads the model (run time and memory unchanged), and no operator needs float16
kernels. Inputs, outputs, biases and every other constant (feature standardisation,
normalisation) stay float32. The cosine similarity of the two models' outputs on random
inputs is printed, and must stay above 0.9999.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bundle_io import sha256


def to_fp16(model, min_elements):
    """Rewrites `model` in place; returns (tensors converted, bytes saved)."""
    g = model.graph
    weights = {n.input[1] for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    converted, saved = 0, 0
    keep, casts = [], []
    for init in g.initializer:
        if (init.data_type != onnx.TensorProto.FLOAT or init.name not in weights
                or int(np.prod(init.dims)) < min_elements):
            keep.append(init)
            continue
        w = numpy_helper.to_array(init)
        if not np.all(np.isfinite(w.astype(np.float16))):
            raise SystemExit(f"onnx_fp16: {init.name} does not fit in float16 (|w| max {np.abs(w).max():g})")
        half = numpy_helper.from_array(w.astype(np.float16), f"{init.name}__fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT,
                                      name=f"{init.name}__to_fp32"))
        converted += 1
        saved += w.nbytes // 2
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    return converted, saved


def min_cosine(a, b, size, batch=4, seed=0):
    """Smallest cosine similarity between the two models' outputs, row by row."""
    import onnxruntime as ort
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    outs = []
    for path in (a, b):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        outs.append(sess.run(None, {name: x})[0].reshape(batch, -1))
    u, v = outs
    cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
    return float(cos.min())


def convert(src, dst, min_elements, size):
    """src -> dst with float16 weights; refuses (dst untouched) when the output turns."""
    model = onnx.load(src)
    n, saved = to_fp16(model, min_elements)
    onnx.checker.check_model(model)
    tmp = Path(dst).with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    cos = min_cosine(src, tmp, size)
    if not cos > 0.9999:
        tmp.unlink()
        sys.exit(f"onnx_fp16: float16 weights turn the output by cosine {cos:.6f} (limit 0.9999)")
    tmp.replace(dst)
    print(f"onnx_fp16: {n} tensors as float16, {saved / 1e6:.1f} MB saved, "
          f"{Path(dst).stat().st_size / 1e6:.1f} MB; output cosine similarity >= {cos:.6f}")


def convert_bundle(bundle, min_elements):
    """A bundle's visual.onnx in place, at the manifest's input size; the manifest's
    [files] checksum of visual.onnx follows."""
    import tomllib
    bundle = Path(bundle)
    manifest = bundle / "manifest.toml"
    text = manifest.read_text()
    m = tomllib.loads(text)
    old = m["files"]["visual.onnx"]
    visual = bundle / "visual.onnx"
    if sha256(visual) != old:
        sys.exit(f"onnx_fp16: {visual} does not match its manifest checksum")
    convert(visual, visual, min_elements, int(m["input"]["size"]))
    manifest.write_text(text.replace(old, sha256(visual)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("--bundle", help="convert DIR/visual.onnx in place and update DIR/manifest.toml")
    ap.add_argument("--min-elements", type=int, default=1024)
    ap.add_argument("--size", type=int, default=224, help="input side for the check")
    a = ap.parse_args()
    if a.bundle:
        convert_bundle(a.bundle, a.min_elements)
    elif a.src and a.dst:
        convert(a.src, a.dst, a.min_elements, a.size)
    else:
        ap.error("give IN.onnx OUT.onnx or --bundle DIR")


if __name__ == "__main__":
    main()
