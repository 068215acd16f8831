#!/usr/bin/env bash
# Starts the local espeak-ng speech server and Envoy with the filter, in the
# foreground; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

TTS_ADDR=127.0.0.1:8090
setsid target/release/local-tts --listen "$TTS_ADDR" &
tts_pid=$!
trap 'kill "$tts_pid" 2>/dev/null || true' EXIT INT TERM

for _ in $(seq 50); do
  curl -fs "http://$TTS_ADDR/health" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "run: local speech server on $TTS_ADDR; Envoy on 127.0.0.1:10000 (admin 127.0.0.1:9901)"
.venv/bin/envoy -c envoy/envoy.yaml --concurrency 2 --log-level warn --component-log-level wasm:info
