#!/usr/bin/env bash
# Scan throughput: streamiq against the Python baseline (OpenCV + onnxruntime) on the
# same H.264 clip and the same bundle, alternating runs, medians printed side by side.
#
#   scripts/bench.sh [--runs N] [--seconds S] [--size WxH] [--bundle DIR]
#                    [--views global|crops:N|mixed:N] [--batch FRAMES]
#
# Both sides do the same work per frame: the same visual.onnx, the same views (default
# the daemon's, crops:4) and the same frames per model call (default 8, the daemon's
# scorer.max_batch). A third contestant, "streamiq-file", is streamiq with
# `model.graph_rewrites = false` (visual.onnx run exactly as the baseline runs it): what
# the rewrites of src/score/rewrite.rs are worth, in the same run.
#
# Needs `make build` (target/release/streamiq) and the venv (scripts/setup.sh). The
# baseline is scripts/bench_baseline.py, the clip comes from scripts/make_bench_clip.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3 SECONDS_=30 SIZE=1280x720 BUNDLE=models/streamiq-test VIEWS=crops:4 BATCH=8
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    --views) VIEWS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
VENV=${STREAMIQ_VENV:-/opt/streamiq/venv}
OUT=bench-out
mkdir -p "$OUT"
for f in scripts/bench_baseline.py scripts/make_bench_clip.sh target/release/streamiq "$BUNDLE/manifest.toml"; do
  [ -e "$f" ] || { echo "bench: $f is missing (run make build)" >&2; exit 2; }
done

clip="$OUT/clip-${SIZE}-${SECONDS_}s.mp4"
[ -f "$clip" ] || { echo "bench: making $clip" >&2; sh scripts/make_bench_clip.sh "$clip" "$SECONDS_" "$SIZE" 30; }
for rewrites in true false; do
  cat >"$OUT/bench-rewrites-$rewrites.toml" <<EOF
[model]
bundle = "$BUNDLE"
graph_rewrites = $rewrites
[scorer]
views = "$VIEWS"
max_batch = $BATCH
EOF
done

# Runs a command and prints "wall_s cpu_s peak_rss_mib".
measure() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
if p.returncode != 0:
    sys.stderr.write(p.stderr); sys.exit(p.returncode)
print(f"{wall:.3f} {ru.ru_utime + ru.ru_stime:.3f} {ru.ru_maxrss / 1024:.0f}")
sys.stderr.write(p.stdout[-400:])
PY
}

frames=$(ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames -of csv=p=0 "$clip")
echo "clip $clip: $frames frames ($SIZE, H.264), bundle $BUNDLE, views $VIEWS, $BATCH frames per call, $(nproc) cores, $RUNS runs each" >&2
: >"$OUT/runs.txt"
for i in $(seq "$RUNS"); do
  echo "run $i/$RUNS: python baseline" >&2
  echo "python $(measure "$VENV/bin/python" scripts/bench_baseline.py --bundle "$BUNDLE" --video "$clip" --views "$VIEWS" --batch "$BATCH" 2>/dev/null)" >>"$OUT/runs.txt"
  echo "run $i/$RUNS: streamiq scan" >&2
  echo "streamiq $(measure target/release/streamiq scan --config "$OUT/bench-rewrites-true.toml" "$clip" 2>/dev/null)" >>"$OUT/runs.txt"
  echo "run $i/$RUNS: streamiq scan, graph_rewrites = false" >&2
  echo "streamiq-file $(measure target/release/streamiq scan --config "$OUT/bench-rewrites-false.toml" "$clip" 2>/dev/null)" >>"$OUT/runs.txt"
done

python3 - "$frames" "$OUT/runs.txt" <<'PY'
import statistics, sys
frames = int(sys.argv[1])
runs = {}
for line in open(sys.argv[2]):
    name, wall, cpu, rss = line.split()
    runs.setdefault(name, []).append((float(wall), float(cpu), float(rss)))
print(f"{'':13} {'frames/s':>10} {'CPU-ms/frame':>13} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9}"
      f"   (median of {len(runs['python'])})")
res = {}
for name in ["python", "streamiq", "streamiq-file"]:
    wall, cpu, rss = (statistics.median(r[i] for r in runs[name]) for i in range(3))
    res[name] = (frames / wall, 1000 * cpu / frames)
    print(f"{name:13} {frames / wall:10.1f} {1000 * cpu / frames:13.2f} {wall:8.2f} {cpu:8.2f} {rss:9.0f}")
for name in ["streamiq", "streamiq-file"]:
    print(f"{name} against python: {res[name][0] / res['python'][0]:.2f}x frames/s, "
          f"{res['python'][1] / res[name][1]:.2f}x less CPU per frame")
PY
