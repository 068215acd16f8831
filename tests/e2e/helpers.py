"""Helpers that several test modules share. Test modules import them from here (or from
conftest), never from one another."""

import base64
import http.client
import json
import os
import re
import subprocess

import yaml

from envoy_harness import ROOT
from waiting import eventually

# --- Requests and answers of the speech API -----------------------------------

def http_call(host, port, method, path, body=None, headers=None, key=None):
    """One request on a connection of its own: (status, headers by lower-case
    name, body). A `body` that is not bytes or str is sent as JSON; `key`
    goes in `Authorization: Bearer`."""
    h = {} if key is None else {"authorization": f"Bearer {key}"}
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        h["content-type"] = "application/json"
    h.update(headers or {})
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


NOT_FOUND = {"is_bifrost_error": False, "status_code": 404, "error": {"message": "job not found or expired"}}


def speech(**fields):
    body = {"model": "openai/gpt-4o-mini-tts", "input": "Hello from Envoy", "voice": "alloy"}
    body.update(fields)
    return body


# --- The local speech server (tools/local-tts) ---------------------------------

LOCAL_TTS = ROOT / "target" / "release" / "local-tts"


def start_local_tts(log_path):
    """Starts local-tts on a port of its own choosing; returns (process, port)."""
    with open(log_path, "wb") as log:
        tts = subprocess.Popen([str(LOCAL_TTS), "--listen", "127.0.0.1:0"], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=log)

    def bound_port():
        text = log_path.read_text(errors="replace")
        if tts.poll() is not None:
            raise RuntimeError(f"local-tts exited with {tts.returncode}: {text}")
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        return found and int(found.group(1))

    try:
        return tts, eventually(bound_port, timeout=10, what="local-tts to say where it listens")
    except BaseException:
        stop_process(tts)
        raise


def stop_process(p):
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# --- Reading the shipped Envoy configs (envoy/) --------------------------------

ENVOY_DIR = ROOT / "envoy"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


def load(name):
    return yaml.safe_load((ENVOY_DIR / name).read_text())


def nodes(node):
    """Every mapping in a parsed document, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from nodes(v)


def wasm_filters(doc):
    """The HTTP filter entries (name + typed_config) that run the Wasm filter."""
    return [n for n in nodes(doc) if isinstance(n.get("typed_config"), dict)
            and n["typed_config"].get("@type") == WASM_TYPE and "name" in n]


def plugin_configs(doc):
    """Every async speech plugin configuration found in a document."""
    found = []
    for f in wasm_filters(doc):
        cfg = f["typed_config"]["config"]
        assert cfg["allow_on_headers_stop_iteration"] is True
        assert cfg["failure_policy"] == "FAIL_RELOAD"
        found.append(json.loads(cfg["configuration"]["value"]))
    return found


def routes(doc):
    return [r for vh in (n for n in nodes(doc) if "routes" in n and "domains" in n) for r in vh["routes"]]


def enables_filter(route, filter_name):
    per_filter = route.get("typed_per_filter_config", {}).get(filter_name)
    return per_filter is not None and per_filter["@type"] == FILTER_CONFIG_TYPE and not per_filter.get("disabled")


# --- Webhook endpoints -----------------------------------------------------------

WEBHOOK_SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


def webhook_endpoint(**over):
    """A webhook endpoint on the 'hooks' cluster, signed with WEBHOOK_SECRET, short retries."""
    e = {"cluster": "hooks", "authority": "hooks.internal", "path": "/speech-events", "secret": WEBHOOK_SECRET,
         "headers": {"X-Team": "platform"}, "retry_backoff_initial_seconds": 1, "retry_backoff_max_seconds": 2,
         "attempt_timeout_seconds": 2, "max_retries": 3}
    e.update(over)
    return e
