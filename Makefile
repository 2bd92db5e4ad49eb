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
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup bundle build run test lint bench clean

all: build

setup:
	@scripts/setup.sh

$(TEST_BUNDLE)/manifest.toml: scripts/make_test_bundle.py scripts/bundle_io.py | setup
	$(PYTHON) scripts/make_test_bundle.py $(TEST_BUNDLE)

bundle: setup $(TEST_BUNDLE)/manifest.toml

build: bundle
	cargo build --release --locked --bins

run: build
	target/release/streamiq run --config $(CONFIG)

lint: setup
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet

test: bundle lint
	promtool check rules config/alerts/streamiq.rules.yml
	promtool test rules config/alerts/streamiq.rules.test.yml
	set -o pipefail; cargo test --locked --lib --bins --tests -- --test-threads=2 2>&1 | tee target/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "tests: %d passed, %d failed\n", p, f}' target/test.log

bench: build
	scripts/bench.sh

clean:
	cargo clean
	rm -rf $(TEST_BUNDLE)
