# make run       — install what is missing, build, start Envoy + the local speech server
# make test      — the same set-up and build, then unit tests, lints and end-to-end tests on real Envoy
# make lint      — rustfmt --check, and clippy (-D warnings) natively and for wasm32-wasip1
# make e2e       — build what the end-to-end tests run (filter and local-tts), then run them
# make bench     — the benchmark: every row of docs/benchmark.md's table, the soak included (about 10 minutes)
# make wasm-sha256 — the sha256 of the built plugin (pins it in envoy/istio-wasmplugin.yaml)
# make clean     — remove build output; the installed Envoy in .venv stays
# make distclean — clean, and remove .venv too
WASM := target/wasm32-wasip1/release/async_speech.wasm
VENV := .venv

.PHONY: setup build run test unit lint fmt-check clippy e2e bench clean distclean

setup:
	@scripts/setup.sh

# Cargo rebuilds only what changed, so depending on this is cheap once built.
build: setup
	cargo build --release --target wasm32-wasip1 -p async-speech
	cargo build --release -p local-tts

run: build
	@scripts/run.sh

unit:
	cargo test --workspace

lint: fmt-check clippy

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p async-speech --target wasm32-wasip1 -- -D warnings

e2e: build
	$(VENV)/bin/python -m pytest -q -rs tests/e2e tests/webhooks

test: build unit lint e2e

bench: build
	@command -v wrk >/dev/null || { echo "bench: installing wrk from Debian"; \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends wrk >/dev/null; }
	$(VENV)/bin/python bench/bench.py $(BENCH_ARGS)
# Parts alone, e.g. the soak: make bench BENCH_ARGS="--parts soak"; the table as Markdown: --markdown;
# every knob: .venv/bin/python bench/bench.py --help

clean:
	cargo clean
	rm -rf .pytest_cache tests/e2e/__pycache__ bench/__pycache__

distclean: clean
	rm -rf $(VENV)

# The sha256 of the built module, which pins it in envoy/istio-wasmplugin.yaml
# (it changes with every build: publish that very file).
.PHONY: wasm-sha256
wasm-sha256:
	@test -f $(WASM) || { echo "$(WASM) is missing: run make build" >&2; exit 1; }
	@sha256sum $(WASM) | cut -d' ' -f1
