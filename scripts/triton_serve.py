#!/usr/bin/env python3
"""Serve a streamiq bundle's visual.onnx through a real Triton server (PyTriton), CPU only:
the server `make test` scores against with `scorer.backend = "kserve"`, and a quick way to
try remote scoring without a GPU.

The model speaks the KServe v2 protocol (gRPC and HTTP) like any Triton model:
  input  `pixels` FP32 [-1, 3, H, W]   (dims [3, H, W] + batch dimension), or with --uint8
         UINT8 0-255 RGB, normalised here with the bundle's mean and std
  output `embeds` FP32 [-1, D]
with Triton's dynamic batcher in front. The infer function runs onnxruntime
(CPUExecutionProvider) because pytriton's bundled tritonserver has only the
Python backend. GPU fleets serve the repository `streamiq export-triton` writes instead.

    /opt/streamiq/triton-venv/bin/python scripts/triton_serve.py --bundle models/streamiq-tiny \
        --grpc-port 18001 --http-port 18000 --metrics-port 18002

Prints one line `STREAMIQ-TRITON READY grpc=HOST:PORT http=... metrics=... model=NAME ...`
on stdout once the model answers; exits 0 on SIGTERM/SIGINT after stopping tritonserver.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
from pytriton.triton import Triton, TritonConfig

T0 = time.monotonic()


def _pin_libpython() -> None:
    """Make the Python backend stub load *this* interpreter's libpython.

    pytriton's triton_python_backend_stub links libpython3.X.so.1.0 by soname. Without help the
    loader finds the distribution's copy (Debian's libpython3.11 = 3.11.2) while the stub then
    imports this venv's stdlib (e.g. pyenv 3.11.7): the model fails to load with
    "AttributeError: '_thread.RLock' object has no attribute '_recursion_count'". Putting this
    interpreter's LIBDIR first in LD_LIBRARY_PATH (inherited by tritonserver and the stub) fixes it.
    """
    import sysconfig

    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and os.path.exists(os.path.join(libdir, soname)):
        cur = os.environ.get("LD_LIBRARY_PATH", "")
        if libdir not in cur.split(":"):
            os.environ["LD_LIBRARY_PATH"] = libdir + (":" + cur if cur else "")




def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=pathlib.Path, help="streamiq model bundle dir (holds visual.onnx)")
    p.add_argument("--model-name", default="streamiq_visual")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--address", default="127.0.0.1", help="bind address for gRPC/HTTP/metrics (default 127.0.0.1)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="sleep this long in every batch (a slow server)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batcher max_queue_delay_microseconds")
    p.add_argument("--max-queue-size", type=int, default=0,
                   help="dynamic batcher queue limit; 0 = unbounded. Over it Triton answers UNAVAILABLE")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    p.add_argument("--workspace", type=pathlib.Path,
                   help="pytriton's working files (default: a new directory under ~/.cache/pytriton)")
    p.add_argument("--uint8", action="store_true", help="declare `pixels` UINT8 (0-255 RGB) and normalise here")
    p.add_argument("--log-verbose", type=int, default=0)
    return p.parse_args(argv)


def onnx_dims(shape):
    """ONNX shape without the batch dim; symbolic/unknown dims become -1."""
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])


def main(argv=None) -> int:
    args = parse_args(argv)
    _pin_libpython()  # before tritonserver starts: it inherits LD_LIBRARY_PATH
    logging.basicConfig(level=logging.INFO if args.log_verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # Fail fast on a taken port: tritonserver would die at bind time while pytriton keeps polling
    # for readiness for 120 s before it gives up.
    import socket

    for what, port in (("grpc", args.grpc_port), ("http", args.http_port), ("metrics", args.metrics_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((args.address, port))
            except OSError as e:
                print(f"STREAMIQ-TRITON FAILED {what} port {args.address}:{port}: {e}", flush=True)
                return 2

    onnx_path = args.bundle / "visual.onnx"
    so = ort.SessionOptions()
    if args.threads:
        so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    in_dims, out_dims = onnx_dims(inp.shape), onnx_dims(out.shape)
    if inp.name != "pixels" or out.name != "embeds":
        print(f"warning: {onnx_path}: input/output named {inp.name}/{out.name}, serving them as pixels/embeds",
              file=sys.stderr)
    delay_s = args.delay_ms / 1000.0
    mean = std = None
    if args.uint8:
        import tomllib

        manifest = tomllib.loads((args.bundle / "manifest.toml").read_text())
        mean = np.array(manifest["input"]["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.array(manifest["input"]["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    lock = threading.Lock()  # one onnxruntime run at a time (the session has its own threads)

    @batch
    def infer(pixels: np.ndarray):
        if delay_s:
            time.sleep(delay_s)
        if mean is not None:
            pixels = (pixels.astype(np.float32) / 255.0 - mean) / std
        with lock:
            (embeds,) = sess.run([out.name], {inp.name: np.ascontiguousarray(pixels, dtype=np.float32)})
        return {"embeds": embeds.astype(np.float32, copy=False)}

    queue_policy = QueuePolicy(max_queue_size=args.max_queue_size) if args.max_queue_size else None
    model_config = ModelConfig(
        max_batch_size=args.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us,
                               default_queue_policy=queue_policy),
    )
    triton_config = TritonConfig(
        grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
        grpc_address=args.address, http_address=args.address, metrics_address=args.address,
        allow_gpu_metrics=False, log_verbose=args.log_verbose, exit_timeout_secs=5,
    )

    stop = threading.Event()
    got = {}

    def on_signal(signum, _frame):
        got["sig"] = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    triton = Triton(config=triton_config, workspace=args.workspace)
    triton.bind(
        model_name=args.model_name,
        infer_func=infer,
        inputs=[Tensor(name="pixels", dtype=np.uint8 if args.uint8 else np.float32, shape=in_dims)],
        outputs=[Tensor(name="embeds", dtype=np.float32, shape=out_dims)],
        config=model_config,
        strict=True,
    )
    try:
        triton.run()  # starts tritonserver + the proxy backend, waits until server and model are ready
        print(f"STREAMIQ-TRITON READY grpc={args.address}:{args.grpc_port} http={args.address}:{args.http_port} "
              f"metrics={args.address}:{args.metrics_port} model={args.model_name} "
              f"input=pixels{list((-1,) + in_dims)} output=embeds{list((-1,) + out_dims)} "
              f"pid={os.getpid()} startup_s={time.monotonic() - T0:.2f}", flush=True)
        while not stop.wait(1.0):
            if not triton.is_alive():
                print("tritonserver or the model proxy died; exiting", file=sys.stderr, flush=True)
                return 1
    finally:
        t = time.monotonic()
        triton.stop()
        print(f"STREAMIQ-TRITON STOPPED signal={got.get('sig', '-')} stop_s={time.monotonic() - t:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
