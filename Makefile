# make run   — install what is missing, build, start Envoy + the local speech server
# make test  — the same set-up, then unit tests, lints and end-to-end tests on real Envoy
# make bench — the soak benchmark (see README)
WASM := target/wasm32-wasip1/release/async_speech.wasm
VENV := .venv

.PHONY: setup build run test unit lint e2e bench clean

setup:
	@scripts/setup.sh

build: setup
	cargo build --release --target wasm32-wasip1 -p async-speech
	cargo build --release -p local-tts

run: build
	@scripts/run.sh

unit:
	cargo test --workspace

lint:
	cargo clippy -p async-speech --all-targets -- -D warnings
	cargo clippy -p async-speech --target wasm32-wasip1 -- -D warnings

e2e:
	$(VENV)/bin/python -m pytest -q tests/e2e

test: build unit lint e2e

bench: build
	@command -v wrk >/dev/null || { echo "bench: installing wrk from Debian"; \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends wrk >/dev/null; }
	$(VENV)/bin/python bench/bench.py $(BENCH_ARGS)

# The earlier soak alone, with the Python mock provider (concurrency 2).
.PHONY: bench-soak
bench-soak: build
	$(VENV)/bin/python bench/soak.py

clean:
	cargo clean
	rm -rf $(VENV)
