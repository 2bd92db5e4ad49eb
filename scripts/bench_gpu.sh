#!/usr/bin/env bash
# GPU scoring benchmark: decoded-frame-to-score throughput through the daemon's own path
# (`streamiq bench-engine`: preprocessing, batching, host-to-device copies, the torch
# backend) at each batch size and precision, beside plain PyTorch on the same module and
# batch in the same run (bench_torch.py: visual.pt under torch.jit, the eager module and
# torch.compile), plus the daemon path's frame-to-score latency at batch 8. Two bundles:
# the shipped models/streamiq-tiny and a ViT-B/32-shaped bundle of random weights
# (convert_clip.py --random-weights 0 --visual-only, made on first use).
#
#   scripts/bench_gpu.sh [--device cuda:0|cpu] [--quick] [--batches 8,64,256]
#                        [--precisions fp16,fp32] [--bundles tiny,vit] [--out DIR]
#                        [--bin PATH] [--python PATH] [--no-compile]
#   scripts/bench_gpu.sh --pack DIR     a folder to carry to a GPU machine (below)
#
# Writes OUT/results.jsonl (one JSON object per measurement) and OUT/report.md (the
# tables); default OUT is target/bench-gpu-DEVICE. fp16 (CUDA autocast) is measured on
# CUDA devices only. --quick: few iterations (`make bench-gpu-smoke` runs it on the CPU).
#
# The binary is a release build with the torch feature (`make build-torch`:
# target/release/streamiq-torch). A GPU machine without cargo or GStreamer runs it from
# `--pack DIR`: the stripped binary, the GStreamer libraries it links (found through
# LD_LIBRARY_PATH=DIR/lib), these scripts and models/streamiq-tiny, about 30 MB. There,
# `cd DIR && scripts/bench_gpu.sh --device cuda:0 --python /path/to/venv/bin/python`;
# libtorch is that Python's torch (its lib/ goes first on LD_LIBRARY_PATH), the ViT
# bundle is made there with torch and numpy alone (its visual.onnx export and check need
# torch's ONNX exporter and onnxruntime).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

DEVICE=cuda:0 BATCHES=8,64,256 PRECISIONS=fp16,fp32 BUNDLES=tiny,vit OUT="" QUICK=0 COMPILE=1 PACK=""
BIN=target/release/streamiq-torch
PY=${STREAMIQ_VENV:-/opt/streamiq/venv}/bin/python
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift ;;
    --batches) BATCHES=$2; shift ;;
    --precisions) PRECISIONS=$2; shift ;;
    --bundles) BUNDLES=$2; shift ;;
    --out) OUT=$2; shift ;;
    --bin) BIN=$2; shift ;;
    --python) PY=$2; shift ;;
    --quick) QUICK=1 ;;
    --no-compile) COMPILE=0 ;;
    --pack) PACK=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_gpu.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
  shift
done
log() { printf '[bench-gpu] %s\n' "$*" >&2; }
[ -x "$BIN" ] || { echo "bench_gpu.sh: $BIN is missing: run make build-torch (or pass --bin)" >&2; exit 2; }

if [ -n "$PACK" ]; then
  rm -rf "$PACK" && mkdir -p "$PACK/target/release" "$PACK/lib" "$PACK/scripts/streamiq_train" "$PACK/models"
  strip -o "$PACK/target/release/streamiq-torch" "$BIN"
  # Every library the binary links but libc's own, the C++ runtime's and those of the
  # Python torch (libtorch, CUDA, NCCL: the GPU machine's own torch provides them).
  ldd "$BIN" | awk '$3 ~ /^\// {print $3}' \
    | grep -Ev '/(libc|libm|libdl|libpthread|librt|libutil|ld-linux[^/]*|libgcc_s|libstdc\+\+)\.so' \
    | grep -Ev '/site-packages/|/nvidia/|/(libtorch|libc10|libcuda|libcudart|libnv|libcu|libgomp)[^/]*$' \
    | while read -r lib; do cp -L "$lib" "$PACK/lib/"; done
  cp scripts/bench_gpu.sh scripts/bench_torch.py scripts/convert_clip.py scripts/bundle_io.py \
    scripts/torchscript_io.py "$PACK/scripts/"
  cp scripts/streamiq_train/__init__.py scripts/streamiq_train/model_input.py "$PACK/scripts/streamiq_train/"
  cp -r models/streamiq-tiny "$PACK/models/"
  log "packed $(du -sh "$PACK" | cut -f1) into $PACK: cd $PACK && scripts/bench_gpu.sh --device cuda:0 --python PYTHON"
  exit 0
fi

TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -d "$ROOT/lib" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$ROOT/lib"
OUT=${OUT:-target/bench-gpu-${DEVICE/:/}}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
# Timed model calls per batch size (PyTorch) and batches per daemon run; both are warmed
# up by two calls first (TorchScript's profiling executor optimises after its second run).
if [ "$QUICK" = 1 ]; then ITERS=3 ROUNDS=5 BATCHES_PER_RUN=2; else ITERS=50 ROUNDS=100 BATCHES_PER_RUN=16; fi

bundle_dir() {
  case $1 in
    tiny) echo models/streamiq-tiny ;;
    vit)
      local dir="$OUT/vit-b-32-random"
      if [ ! -f "$dir/manifest.toml" ]; then
        log "making $dir (ViT-B/32 shape, random weights)"
        "$PY" scripts/convert_clip.py --random-weights 0 --arch ViT-B-32 --visual-only --out "$dir" --force >&2
      fi
      echo "$dir" ;;
    *) echo "bench_gpu.sh: unknown bundle $1 (tiny, vit)" >&2; exit 2 ;;
  esac
}

# Tags each JSON line of stdin with the path it measured.
tag() { "$PY" -c 'import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        row = json.loads(line); row["path"] = sys.argv[1]; print(json.dumps(row), flush=True)' "$1"; }

{
  echo "device=$DEVICE quick=$QUICK $(date -u +%FT%TZ)"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  grep -m1 'model name' /proc/cpuinfo || true
  echo "cpus $(nproc)"
} >"$OUT/machine.txt"

IFS=, read -ra batches <<<"$BATCHES"
for name in ${BUNDLES//,/ }; do
  dir=$(bundle_dir "$name")
  for precision in ${PRECISIONS//,/ }; do
    if [ "$precision" = fp16 ] && [ "${DEVICE%%:*}" != cuda ]; then
      log "$name fp16: skipped on $DEVICE (fp16 is CUDA autocast)"
      echo "{\"bundle\": \"$name\", \"precision\": \"fp16\", \"skipped\": \"not measured on $DEVICE: fp16 is CUDA autocast\"}" >>"$RESULTS"
      continue
    fi
    for b in "${batches[@]}"; do
      frames=$((b * BATCHES_PER_RUN))
      lat=()
      [ "$b" = 8 ] && lat=(--latency-rounds "$ROUNDS")
      log "$name $precision batch $b: daemon path, torch backend on $DEVICE"
      "$BIN" bench-engine --model "$dir" --backend torch --device "$DEVICE" --precision "$precision" \
        --batch "$b" --warmup $((2 * b)) --frames "$frames" "${lat[@]}" | tag daemon >>"$RESULTS"
      if [ "$DEVICE" = cpu ]; then
        log "$name $precision batch $b: daemon path, ONNX Runtime (CPU)"
        "$BIN" bench-engine --model "$dir" --backend onnxruntime --batch "$b" --warmup $((2 * b)) \
          --frames "$frames" "${lat[@]}" | tag daemon-onnxruntime >>"$RESULTS"
      fi
    done
    modes=jit,eager; [ "$COMPILE" = 1 ] && modes=$modes,compile
    log "$name $precision: plain PyTorch ($modes)"
    "$PY" scripts/bench_torch.py --bundle "$dir" --device "$DEVICE" --precision "$precision" \
      --batches "$BATCHES" --iters "$ITERS" --warmup 2 --modes "$modes" | tag pytorch >>"$RESULTS"
  done
done

"$PY" - "$RESULTS" "$OUT/machine.txt" >"$OUT/report.md" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("# GPU scoring benchmark\n\n```\n" + open(sys.argv[2]).read() + "```\n")
print("Frames (or images) per second. daemon: `streamiq bench-engine` (398x224 RGB frames -> "
      "preprocessing -> batching -> device copy -> model -> scores); PyTorch: the model alone, "
      "input already on the device.\n")
print("| bundle | precision | batch | daemon (torch backend) | daemon (ONNX Runtime, CPU) | PyTorch jit (visual.pt) "
      "| PyTorch eager | torch.compile | daemon latency p50 / p99 ms |")
print("|---|---|---|---|---|---|---|---|---|")
keys = sorted({(r["bundle"], r["precision"], r["batch"]) for r in rows if "batch" in r},
              key=lambda k: (k[0], k[1], k[2]))
def cell(path, key, mode=None):
    for r in rows:
        if r.get("path") == path and (r.get("bundle"), r.get("precision"), r.get("batch")) == key \
                and (mode is None or r.get("mode") == mode):
            if "failed" in r:
                return "failed"
            v = r.get("frames_per_s", r.get("images_per_s"))
            return f"{v:,.1f}" if v is not None else "-"
    return "-"
for k in keys:
    lat = next((r["latency"] for r in rows if r.get("path") == "daemon" and
                (r["bundle"], r["precision"], r["batch"]) == k and r.get("latency")), None)
    lat = f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f}" if lat else "-"
    print(f"| {k[0]} | {k[1]} | {k[2]} | {cell('daemon', k)} | {cell('daemon-onnxruntime', k)} | "
          f"{cell('pytorch', k, 'jit')} | {cell('pytorch', k, 'eager')} | {cell('pytorch', k, 'compile')} | {lat} |")
notes = [r for r in rows if "skipped" in r or "failed" in r]
if notes:
    print()
for r in notes:
    what = " ".join(str(r[k]) for k in ("bundle", "precision", "mode", "batch") if r.get(k) is not None)
    print(f"- {what}: {r.get('skipped') or r.get('failed')}")
EOF
log "wrote $OUT/report.md and $RESULTS"
cat "$OUT/report.md"
