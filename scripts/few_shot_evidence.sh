#!/usr/bin/env bash
# The few-shot evidence run (`make few-shot-evidence`): does adapting the prompts to
# 50 operator labels teach the model a distortion family it has never seen?
#   1. 45 source pictures: three crops of each of 15 scikit-image photographs, 384 px;
#   2. `streamiq distort --kinds color_cast`: the family that neither the contrastive
#      nor the meta-prompt pre-training of the shipped models saw (270 images, 5 levels
#      plus the pristine picture);
#   3. their image embeddings through the bundle (`streamiq eval --save-embeddings`);
#   4. `streamiq-adapt bench`: 10 random splits of 50 training labels, comparing the
#      unadapted prompts with adaptation at lambda = 0 and lambda = 5 (GRMP), SRCC and
#      PLCC on the rest of each split.
# Usage: scripts/few_shot_evidence.sh [MODEL]   (env: WORK=target/few-shot SPLITS=10 TRAIN=50)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${STREAMIQ_VENV:-/opt/streamiq/venv}/bin/python
MODEL=${1:-models/streamiq-tiny}
WORK=${WORK:-target/few-shot}
SPLITS=${SPLITS:-10}
TRAIN=${TRAIN:-50}
SQ=target/release/streamiq
ADAPT=target/release/streamiq-adapt
step() { echo "== few_shot_evidence $(date +%H:%M:%S): $*"; }
for bin in "$SQ" "$ADAPT"; do
    [[ -x $bin ]] || { echo "few_shot_evidence: $bin is missing; run make build first" >&2; exit 2; }
done
rm -rf "$WORK"
mkdir -p "$WORK/sources"

step "1/4 source crops"
"$PY" - "$WORK/sources" <<'EOF'
import pathlib, sys
import cv2
import skimage
data = pathlib.Path(skimage.__file__).parent / "data"
names = ["astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "camera.png", "brick.png",
         "grass.png", "gravel.png", "moon.png", "coins.png", "cell.png", "chelsea.png", "coffee.png", "rocket.jpg",
         "retina.jpg"]
out = pathlib.Path(sys.argv[1])
for name in names:
    img = cv2.imread(str(data / name), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    side = int(min(h, w) * 0.75)
    for i, (fy, fx) in enumerate([(0.5, 0.5), (0.1, 0.9), (0.9, 0.1)]):
        y, x = int((h - side) * fy), int((w - side) * fx)
        crop = cv2.resize(img[y:y + side, x:x + side], (384, 384), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / f"{pathlib.Path(name).stem}-{i}.png"), crop)
print(f"{len(names) * 3} crops in {out}")
EOF

step "2/4 color_cast set"
"$SQ" distort --kinds color_cast --out "$WORK/cast" "$WORK"/sources/*.png

step "3/4 embeddings (and the unadapted model's agreement)"
"$SQ" eval --model "$MODEL" --labels "$WORK/cast/labels.csv" --save-embeddings "$WORK/cast.safetensors" \
    | tee "$WORK/eval.txt"

step "4/4 few-shot protocol: $TRAIN labels, $SPLITS splits, lambda 0 and 5"
"$ADAPT" bench --model "$MODEL" --embeddings "$WORK/cast.safetensors" --train "$TRAIN" --splits "$SPLITS" \
    --lambdas 0,5 | tee "$WORK/bench.txt"
step "done: $WORK/bench.txt"
