#!/usr/bin/env python3
"""Plain PyTorch on a bundle's visual tower, the reference that scripts/bench_gpu.sh sets
beside the daemon's own scoring path: images/s of the model alone, its input already on
the device (no preprocessing, no host-to-device copy).

    bench_torch.py --bundle DIR [--device cpu|cuda:N] [--precision fp32|fp16]
                   [--batches 8,64,256] [--iters N] [--warmup N] [--modes jit,eager,compile]

Modes, one JSON line each per batch:
  jit      the bundle's visual.pt under torch.jit.load (the very module the daemon runs);
  eager    the tower as a plain nn.Module: rebuilt from the seed for a
           `convert_clip.py --random-weights` bundle, else visual.onnx through onnx2torch
           (skipped with a note where neither is available);
  compile  torch.compile of the eager module (mode max-autotune-no-cudagraphs on CUDA,
           the default on the CPU); a failure is reported, not fatal.
fp16 is CUDA autocast to float16 (what `scorer.precision = "fp16"` runs); on the CPU only
fp32 is measured. Needs torch and numpy (onnx2torch and onnx for the eager module of a
bundle that was not made from random weights).
"""
import argparse
import json
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def manifest_values(bundle):
    text = (Path(bundle) / "manifest.toml").read_text()

    def value(key):
        m = re.search(rf'(?m)^{key} = "?([^"\n]+)"?$', text)
        return m.group(1) if m else None

    return {"name": value("name"), "size": int(value("size")), "random_arch": value("random_arch"),
            "random_seed": value("random_seed")}


def eager_module(bundle, info):
    """(module, how it was made) or (None, why not)."""
    if info["random_arch"] and info["random_seed"] is not None:
        import convert_clip
        return convert_clip.random_visual(info["random_arch"], int(info["random_seed"])), "convert_clip random_visual"
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as e:
        return None, f"no eager module ({e.name} is not installed)"
    return convert(onnx.load(str(Path(bundle) / "visual.onnx"))), "onnx2torch"


def timed(fn, x, iters, warmup, sync):
    for _ in range(warmup):
        fn(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    sync()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--batches", default="8,64,256")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default="jit,eager,compile")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if a.precision == "fp16" and not cuda:
        raise SystemExit("bench_torch: fp16 is CUDA autocast; measure fp32 on the CPU")
    info = manifest_values(a.bundle)
    size = info["size"]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def precision():
        return torch.autocast("cuda", dtype=torch.float16) if a.precision == "fp16" else nullcontext()

    modules = {}
    modes = a.modes.split(",")
    if "jit" in modes:
        modules["jit"] = (torch.jit.load(str(Path(a.bundle) / "visual.pt"), map_location=device).eval(), "visual.pt")
    if "eager" in modes or "compile" in modes:
        eager, how = eager_module(a.bundle, info)
        if eager is None:
            for mode in ("eager", "compile"):
                if mode in modes:
                    print(json.dumps({"bundle": info["name"], "mode": mode, "skipped": how}), flush=True)
        else:
            eager = eager.to(device).eval()
            if "eager" in modes:
                modules["eager"] = (eager, how)
            if "compile" in modes:
                kw = {"mode": "max-autotune-no-cudagraphs"} if cuda else {}
                modules["compile"] = (torch.compile(eager, **kw), f"torch.compile({kw.get('mode', 'default')})")
    for batch in [int(b) for b in a.batches.split(",")]:
        x = torch.randn(batch, 3, size, size, device=device)
        for mode, (module, how) in modules.items():
            row = {"bundle": info["name"], "mode": mode, "module": how, "device": a.device,
                   "precision": a.precision, "batch": batch}
            try:
                with torch.inference_mode(), precision():
                    t_first = time.perf_counter()
                    module(x)
                    sync()
                    row["first_call_s"] = round(time.perf_counter() - t_first, 3)
                    seconds = timed(module, x, a.iters, a.warmup, sync)
                row["images_per_s"] = round(batch * a.iters / seconds, 1)
                row["ms_per_batch"] = round(1e3 * seconds / a.iters, 3)
            except Exception as e:  # noqa: BLE001  (a mode that does not work here is reported)
                row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
