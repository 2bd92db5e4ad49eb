# streamiq — the README's two commands are `make run` and `make test`.
# Every target installs what is missing first (scripts/setup.sh is idempotent).

SHELL := /bin/bash
VENV ?= /opt/streamiq/venv
PYTHON := $(VENV)/bin/python
TEST_BUNDLE := models/streamiq-test
CONFIG ?= config/streamiq.toml
export STREAMIQ_VENV := $(VENV)
export LIBTORCH := $(VENV)/torch
export LIBTORCH_CXX11_ABI := 1
# ONNX Runtime sends usage events to Microsoft unless this is set when it loads (also in
# the tests' own processes, which load it in-process).
export ORT_DISABLE_TELEMETRY := 1
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup bundle demo build build-daemon build-torch torchscript deb run test lint bench bench-streams bench-gpu bench-gpu-smoke soak peers tiny model few-shot-evidence clean

all: build

setup:
	@scripts/setup.sh

$(TEST_BUNDLE)/manifest.toml: scripts/make_test_bundle.py scripts/bundle_io.py scripts/torchscript_io.py scripts/streamiq_train/model_input.py | setup
	$(PYTHON) scripts/make_test_bundle.py $(TEST_BUNDLE)

bundle: setup $(TEST_BUNDLE)/manifest.toml

# The default config's two streams loop over these frames: slow pans over the
# photographs in the scikit-image wheel (12 s, 640x360, 25 fps, 300 JPEG frames).
DEMO := state/demo
$(DEMO)/clean/00300.jpg: scripts/make_pan_clip.py | setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)/clean
	$(PYTHON) scripts/make_pan_clip.py $(DEMO)/pans.mp4 --seconds 12 --size 640x360 --shot 4 --crf 18 > /dev/null
	ffmpeg -v error -i $(DEMO)/pans.mp4 -q:v 2 $(DEMO)/clean/%05d.jpg
	rm $(DEMO)/pans.mp4

demo: $(DEMO)/clean/00300.jpg

# Both binaries: the daemon (this package) and the sidecar (adapt/, the only one that
# links libtorch). `build-daemon` builds the daemon alone, with no libtorch anywhere.
build: bundle
	cargo build --release --locked --workspace --bins

build-daemon: setup
	cargo build --release --locked -p streamiq --bins

# The daemon with the libtorch scorer backend (`scorer.backend = "torch"`; README, "GPU
# scoring"), as target/release/streamiq-torch. The plain daemon is rebuilt after it, so
# target/release/streamiq stays the build without libtorch.
build-torch: setup
	cargo build --release --locked -p streamiq --features torch --bins
	cp target/release/streamiq target/release/streamiq-torch
	cargo build --release --locked -p streamiq --bins

# Adds visual.pt (the TorchScript tower the torch backend runs) to a bundle from its
# visual.onnx, checked against it: `make torchscript BUNDLE=models/streamiq-effnet`.
torchscript: setup
	@test -n "$(BUNDLE)" || { echo "usage: make torchscript BUNDLE=path/to/bundle" >&2; exit 2; }
	$(PYTHON) scripts/bundle_torchscript.py --bundle $(BUNDLE)

# The daemon's Debian package (target/deb/streamiq_VERSION_ARCH.deb; scripts/make_deb.sh
# lists its contents). The sidecar is not in it (README, "Install").
deb: build-daemon
	scripts/make_deb.sh

run: build demo
	target/release/streamiq run --config $(CONFIG)

lint: setup
	$(VENV)/bin/ruff check scripts
	cargo fmt --all --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	cargo clippy --locked -p streamiq --features torch --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps --quiet
	RUSTDOCFLAGS="-D warnings" cargo doc --locked -p streamiq --features torch --no-deps --quiet
	@# The daemon crate must never depend on libtorch, also through feature unification.
	@if cargo tree --locked -p streamiq -e normal,build --prefix none | grep -E '^(tch|torch-sys) '; then \
		echo "lint: the streamiq crate depends on libtorch (above)" >&2; exit 1; \
	else echo "lint: cargo tree -p streamiq has no tch / torch-sys"; fi

test: bundle demo lint
	promtool check rules config/alerts/streamiq.rules.yml
	promtool test rules config/alerts/streamiq.rules.test.yml
	set -o pipefail; cargo test --locked --workspace --lib --bins --tests -- --test-threads=2 2>&1 | tee target/test.log
	@# The libtorch scorer backend against ONNX Runtime (a build with the torch feature).
	set -o pipefail; cargo test --locked -p streamiq --features torch --test torch_backend -- --test-threads=2 2>&1 | tee -a target/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "tests: %d passed, %d failed\n", p, f}' target/test.log

bench: build
	scripts/bench.sh

# Streams per core: N live 720p25 H.264 UDP streams (2-s GOP) watched with fps and
# keyframe sampling and by one ffmpeg blackdetect/freezedetect per stream
# (target/bench-streams/report.md). Not part of `make test`. BENCH_COUNTS=1,2,4 to choose N.
BENCH_COUNTS ?= 1,2,4,6,8
bench-streams: build-daemon
	$(PYTHON) scripts/bench_streams.py --counts $(BENCH_COUNTS)

# GPU scoring: the daemon's scoring path with the torch backend against plain PyTorch on
# the same module, batches 8/64/256, fp16 and fp32, on a CUDA device (or a folder packed
# for a GPU machine: scripts/bench_gpu.sh --pack DIR). target/bench-gpu-cuda0/report.md.
# `make bench-gpu-smoke` runs the same script on the CPU with few iterations
# (target/bench-gpu-cpu/report.md). Neither is part of `make test`.
bench-gpu: build-torch
	scripts/bench_gpu.sh --device $(or $(DEVICE),cuda:0)

bench-gpu-smoke: build-torch
	scripts/bench_gpu.sh --device cpu --quick

# 30 minutes of nine mixed streams whose sources are killed, paused and restored in
# cycles while labels are posted and prompt sets rolled back; RSS, threads and fds over
# time (target/soak/report.md). Not part of `make test`. SOAK_MINUTES=N for another length.
SOAK_MINUTES ?= 30
soak: build-daemon
	$(PYTHON) scripts/soak.py --minutes $(SOAK_MINUTES)

# The classic blind IQA peers (BRISQUE, NIQE) on any `streamiq eval` label CSV, reported
# as `streamiq eval` reports the model: `make peers LABELS=set/labels.csv`.
peers: setup
	@test -n "$(LABELS)" || { echo "usage: make peers LABELS=path/to/labels.csv" >&2; exit 2; }
	scripts/peers.py --labels $(LABELS)

# Retrains the shipped model models/streamiq-tiny from scratch (45-75 minutes on 2
# cores; see models/README.md). Not part of `make test`.
tiny: build
	scripts/make_tiny.sh models/streamiq-tiny

# Builds the default model models/streamiq-effnet from the EfficientNet-Lite0 wheels and
# models/streamiq-tiny's image tower (about an hour on 2 cores; see models/README.md).
# Not part of `make test`.
model: build
	scripts/make_model.sh models/streamiq-effnet

# The few-shot protocol on the held-out color_cast family (figures in README.md, The few-shot loop).
few-shot-evidence: build
	scripts/few_shot_evidence.sh models/streamiq-tiny

clean:
	cargo clean
	rm -rf $(TEST_BUNDLE)
