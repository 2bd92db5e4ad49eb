#!/usr/bin/env bash
# Builds models/streamiq-tiny from nothing but this repository and freely licensed
# photographs (the scikit-image wheel; Debian packages that scripts/setup.sh installs)
# (`make tiny`; 45-75 minutes on 2 cores, by machine):
#   1. contrastive pre-training of the dual encoder (scripts/train_tiny.py);
#   2. a `streamiq distort` task set from training photographs;
#   3. its image embeddings (`streamiq eval --save-embeddings`);
#   4. meta-prompt pre-training of the context vectors (`streamiq-adapt pretrain`,
#      checkpoint chosen on held-out distortion types);
#   5. the bundle is installed at OUT and evaluated on four distortion sets made from
#      photographs it never saw (three scikit-image ones; eight photographs from Debian's
#      mate-backgrounds and lomiri-wallpapers-16.04, reduced to 768 px wide; twelve GCompris
#      photographs kept aside, reduced as for training; the eight wallpapers again at a
#      broadcast frame's 1080 px; global, crops:4 and mixed:1 views; the sets are distorted with
#      seed 0 whatever SEED is, so figures of different seeds compare), reports in WORK/.
# Usage: scripts/make_tiny.sh [OUT]   (env: WORK=target/tiny SEED=0 STEPS=2400 TRAIN_GROUPS=12000;
#        REUSE_BASE=1 skips step 1 when WORK/base holds a bundle; variants measured in
#        models/README.md and not shipped: MSCN=1 an image tower that also sees the MSCN luma
#        (MSCN_C=C its constant, else train_tiny's; MSCN_CORE=T its deviation cored by T),
#        VIDEO=SHARE that share of the groups H.264-encoded as a whole, GRAIN=SHARE that
#        share of the images with faint grain)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${STREAMIQ_VENV:-/opt/streamiq/venv}/bin/python
OUT=${1:-models/streamiq-tiny}
WORK=${WORK:-target/tiny}
SEED=${SEED:-0}
TRAIN_GROUPS=${TRAIN_GROUPS:-12000}
STEPS=${STEPS:-2400}
VAL_TYPES=${VAL_TYPES:-motion_blur,jpeg,contrast}
SQ=target/release/streamiq
ADAPT=target/release/streamiq-adapt
SK=$("$PY" -c 'import pathlib, skimage; print(pathlib.Path(skimage.__file__).parent / "data")')
TASK_PHOTOS=(astronaut.png hubble_deep_field.jpg ihc.png motorcycle_left.png camera.png grass.png)
EVAL_PHOTOS=(chelsea.png coffee.png rocket.jpg)
BG=/usr/share/backgrounds
EVAL_WALLPAPERS=("$BG"/mate/nature/{Storm,LadyBird}.jpg "$BG"/{Wine_by_Jakkub_Mede,Bridge_by_Sander_Klootwijk}.jpg
    "$BG"/{aitzgorri,life,friends}_by_Aitzol_Berasategi.jpg "$BG"/Picture_0B_by_freespace.jpg)

VARIANT=()
if [[ ${MSCN:-0} == 1 ]]; then VARIANT+=(--mscn ${MSCN_C:+"$MSCN_C"} ${MSCN_CORE:+--mscn-core "$MSCN_CORE"}); fi
if [[ ${VIDEO:-0} != 0 ]]; then VARIANT+=(--video "$VIDEO"); fi
if [[ ${GRAIN:-0} != 0 ]]; then VARIANT+=(--grain "$GRAIN"); fi

step() { echo "== make_tiny $(date +%H:%M:%S): $*"; }
for bin in "$SQ" "$ADAPT"; do
    [[ -x $bin ]] || { echo "make_tiny: $bin is missing; run make build first" >&2; exit 2; }
done
mkdir -p "$WORK"

if [[ ${REUSE_BASE:-0} == 1 && -f $WORK/base/manifest.toml ]]; then
    step "1/5 contrastive pre-training: reusing $WORK/base (REUSE_BASE=1)"
else
    step "1/5 contrastive pre-training ($TRAIN_GROUPS groups, $STEPS steps)"
    rm -rf "$WORK/base"
    "$PY" scripts/train_tiny.py --out "$WORK/base" --seed "$SEED" --groups "$TRAIN_GROUPS" --steps "$STEPS" \
        --cache "$WORK/cache" "${VARIANT[@]}"
fi

step "2/5 distortion tasks from ${#TASK_PHOTOS[@]} training photographs"
rm -rf "$WORK/tasks"
"$SQ" distort --out "$WORK/tasks" --seed "$SEED" "${TASK_PHOTOS[@]/#/$SK/}"

step "3/5 task embeddings"
"$SQ" eval --model "$WORK/base" --labels "$WORK/tasks/labels.csv" \
    --save-embeddings "$WORK/tasks.safetensors" > "$WORK/base-tasks.txt"

step "4/5 meta-prompt pre-training (validation types: $VAL_TYPES)"
rm -rf "$WORK/meta"
"$ADAPT" pretrain --model "$WORK/base" --embeddings "$WORK/tasks.safetensors" --out "$WORK/meta" \
    --val-types "$VAL_TYPES" --seed "$SEED"

step "5/5 install at $OUT and evaluate on photographs the model never saw"
rm -rf "$OUT.new"
cp -r "$WORK/meta" "$OUT.new"
rm -rf "$OUT"
mv "$OUT.new" "$OUT"
rm -rf "$WORK/heldout"
"$SQ" distort --out "$WORK/heldout" --seed 0 "${EVAL_PHOTOS[@]/#/$SK/}"
rm -rf "$WORK/heldout-photos" "$WORK/heldout-photos-src"
mkdir -p "$WORK/heldout-photos-src"
for f in "${EVAL_WALLPAPERS[@]}"; do
    ffmpeg -v error -y -i "$f" -vf scale=768:-2:flags=area "$WORK/heldout-photos-src/$(basename "${f%.*}").png"
done
"$SQ" distort --out "$WORK/heldout-photos" --seed 0 "$WORK"/heldout-photos-src/*.png
rm -rf "$WORK/heldout-gcompris" "$WORK/heldout-gcompris-src"
"$PY" scripts/train_tiny.py --write-held-out "$WORK/heldout-gcompris-src"
"$SQ" distort --out "$WORK/heldout-gcompris" --seed 0 "$WORK"/heldout-gcompris-src/*.png
rm -rf "$WORK/heldout-hd"
"$SQ" distort --out "$WORK/heldout-hd" --seed 0 --size 1080 "${EVAL_WALLPAPERS[@]}"
for set in heldout heldout-photos heldout-gcompris heldout-hd; do
    for views in global crops:4 mixed:1; do
        "$SQ" eval --model "$OUT" --labels "$WORK/$set/labels.csv" --views "$views" \
            | tee "$WORK/$set-${views/:/}.txt"
    done
done
du -sh "$OUT"
step "done: $OUT"
