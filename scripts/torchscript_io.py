"""`visual.pt`, the TorchScript export of a bundle's visual tower (what the daemon's torch
backend runs), shared by the scripts that write `visual.onnx` (convert_clip.py,
make_test_bundle.py, train_tiny.py, train_two_stream.py, bundle_torchscript.py).

Both exports are checked at export time: the traced module against the Python module at
other batch sizes than the one traced (the batch dimension must stay dynamic), and
`visual.pt` against `visual.onnx` under ONNX Runtime on the same inputs.
"""
import numpy as np
import torch

# Largest L2 distance allowed between two exports' normalised embeddings of one image. A
# score, softmax(logit_scale * [cos_high, cos_low])[0], moves by at most logit_scale / 2
# times that distance: 1e-5 keeps streamiq-tiny's scores (logit_scale 16) within 1e-4 of
# each other; a wrong export is off by about 1. The daemon's own parity test compares
# scores directly.
EMBED_TOLERANCE = 1e-5


def inputs(size, batch, seed=0):
    """Seeded pixels [batch, 3, size, size] in the normalised range the towers see."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=g) - 0.45) / 0.27


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def distance(a, b):
    """Largest L2 distance between corresponding rows of `a` and `b`, normalised."""
    return float(np.linalg.norm(_unit(a) - _unit(b), axis=1).max())


def export_torchscript(module, path, size, trace_batch=2, check_batches=(1, 5)):
    """Traces `module` (pixels [N,3,size,size] -> embeds [N,D]) at `trace_batch`, checks
    the trace at `check_batches` against the module and saves it to `path`. Returns the
    largest embedding difference seen."""
    module = module.eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs(size, trace_batch), check_trace=False)
        worst = 0.0
        for b in check_batches:
            x = inputs(size, b, seed=b)
            want, got = module(x), traced(x)
            if got.shape != want.shape:
                raise SystemExit(f"torchscript: traced module gives {tuple(got.shape)} at batch {b}, "
                                 f"the module {tuple(want.shape)}: the batch dimension is not dynamic")
            worst = max(worst, distance(got, want))
    if not worst <= EMBED_TOLERANCE:
        raise SystemExit(f"torchscript: traced module differs from the module by {worst:.2e}")
    torch.jit.save(traced, str(path))
    return worst


def check_against_onnx(onnx_path, pt_path, size, batches=(1, 3, 8)):
    """Largest distance between the normalised embeddings of `visual.onnx` (ONNX
    Runtime, CPU) and `visual.pt` (libtorch, CPU, fp32) on seeded inputs; exits if it is
    above EMBED_TOLERANCE or the shapes differ."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = torch.jit.load(str(pt_path), map_location="cpu").eval()
    worst = 0.0
    for b in batches:
        x = inputs(size, b, seed=100 + b)
        want = sess.run(["embeds"], {"pixels": x.numpy()})[0]
        with torch.no_grad():
            got = module(x).numpy()
        if got.shape != want.shape:
            raise SystemExit(f"torchscript: {pt_path} gives {got.shape} at batch {b}, {onnx_path} {want.shape}")
        worst = max(worst, distance(got, want))
    if not worst <= EMBED_TOLERANCE:
        raise SystemExit(f"torchscript: {pt_path} differs from {onnx_path} by {worst:.2e} "
                         f"(normalised embeddings; allowed {EMBED_TOLERANCE:.0e})")
    return worst
