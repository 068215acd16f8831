"""Starts a real etcd (Debian's etcd-server, /usr/bin/etcd, installed by
scripts/setup.sh) on loopback, for the etcd store's tests.

One member, its client and peer ports picked free on 127.0.0.1 (etcd cannot
report a port it bound to 0, so they are picked just before the start; a
port taken in between makes etcd exit at once and the first start retries on
new ports). Its data directory and log live in a temporary directory that
`stop()` removes (unless `keep` is set). It runs in its own session and is
signalled by pid only. Faults: `pause()`/`resume()` (SIGSTOP/SIGCONT: etcd
hangs, connections stay open), `kill()` (SIGKILL), and `start()` again on
the same data directory and ports (the keys written before are back).

    etcd = Etcd().start()
    etcd.call("/v3/kv/put", {"key": b64("k"), "value": b64("v")})  # -> (200, {...})
    etcd.stop()

`EtcdCluster(3)` is a real cluster of three such members on loopback, each
with the same faults; `leader()` names the member the others follow (from
`etcdctl endpoint status`), `followers()` the rest.

    cluster = EtcdCluster(3).start()
    cluster.leader().kill()      # a new leader is elected among the other two
    cluster.stop()
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request

from waiting import eventually

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def b64(data):
    """Standard base64 of bytes (or of a str as UTF-8), as the gateway writes keys and values."""
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member on loopback."""

    def __init__(self, binary=ETCD, args=(), name="default"):
        if not os.path.exists(binary):
            raise RuntimeError(f"etcd is not installed ({binary}); run `make setup` (Debian's etcd-server)")
        self.binary = binary
        self.args = list(args)
        self.name = name
        # Set by EtcdCluster: every member's peer URL, and the cluster's token.
        self.initial_cluster = None
        self.cluster_token = None
        self.dir = tempfile.mkdtemp(prefix=f"etcd-e2e-{name}-")
        self.data_dir = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "etcd.log")
        self.client_port = None
        self.peer_port = None
        self.proc = None
        self.paused = False
        # Set to leave the directory (data and log) behind on stop().
        self.keep = False
        self._log_file = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def peer_url(self):
        return f"http://127.0.0.1:{self.peer_port}"

    def _command(self):
        client = f"http://127.0.0.1:{self.client_port}"
        peer = self.peer_url
        cluster = ["--initial-cluster", self.initial_cluster or f"{self.name}={peer}"]
        if self.cluster_token:
            cluster += ["--initial-cluster-token", self.cluster_token, "--initial-cluster-state", "new"]
        return [self.binary, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                *cluster, "--log-level", "warn", *self.args]

    def pick_ports(self, taken=()):
        self.client_port, self.peer_port = free_port(), free_port()
        while self.peer_port == self.client_port or {self.client_port, self.peer_port} & set(taken):
            self.client_port, self.peer_port = free_port(), free_port()

    def launch(self):
        """Starts the process without waiting (a cluster's members must all be
        up before any of them is ready)."""
        assert not self.running(), "etcd is running already"
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self._command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.paused = False

    def wait_ready(self, timeout=20):
        eventually(self._ready, timeout, what=f"etcd {self.name} to answer /health and /v3/kv/range",
                   interval=0.05, retry_on=(AssertionError, OSError))

    def lost_its_ports(self):
        """Whether it exited because a port was taken between picking and binding."""
        return self.proc is not None and self.proc.poll() is not None and "address already in use" in self.log()

    def start(self, timeout=20):
        """Starts etcd (again, after `kill()`, on the same data and ports) and
        waits until it answers; returns self."""
        assert not self.running(), "etcd is running already"
        first = self.client_port is None
        for _ in range(3 if first else 1):
            if first:
                self.pick_ports()
            self.launch()
            try:
                self.wait_ready(timeout)
                return self
            except Exception as e:
                exited = self.proc.poll() is not None
                self._halt()
                if first and exited and "address already in use" in self.log():
                    continue
                self.keep = True
                raise RuntimeError(f"etcd did not become ready ({e}); its files are in {self.dir}:\n"
                                   f"{self.log()[-4000:]}") from e
        raise RuntimeError(f"etcd found no free ports; its files are in {self.dir}")

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"etcd {self.name} exited with {self.proc.returncode}")
        with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
            if json.loads(r.read()).get("health") != "true":
                return False
        status, _ = self.call("/v3/kv/range", {"key": b64(b"\0")}, timeout=1)
        return status == 200

    def call(self, path, body, timeout=5):
        """POSTs `body` (JSON-encoded unless bytes) to the gateway; returns
        (HTTP status, the answer's JSON, or its text when not JSON). Raises
        OSError when etcd cannot be reached or does not answer in time."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def put(self, key, value, lease=None):
        body = {"key": b64(key), "value": b64(value)}
        if lease is not None:
            body["lease"] = str(lease)
        status, answer = self.call("/v3/kv/put", body)
        assert status == 200, answer
        return answer

    def get(self, key):
        """The value of `key` (bytes), or None."""
        status, answer = self.call("/v3/kv/range", {"key": b64(key)})
        assert status == 200, answer
        kvs = answer.get("kvs", [])
        return unb64(kvs[0].get("value", "")) if kvs else None

    def _signal(self, sig):
        assert self.running(), "etcd is not running"
        os.kill(self.proc.pid, sig)

    def pause(self):
        """SIGSTOP: etcd stops answering, its sockets stay open."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        self._signal(signal.SIGCONT)
        self.paused = False

    def kill(self):
        """SIGKILL, as a crash: the data directory stays for `start()`."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._halt()

    def _halt(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                if self.paused:
                    os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            else:
                self.proc.wait()
        self.paused = False
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def stop(self):
        """Stops etcd (SIGTERM, SIGKILL after 10 s) and removes its directory unless `keep`."""
        self._halt()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class EtcdCluster:
    """`size` etcd members on loopback forming one cluster (a fresh token each
    time, so two clusters never mistake each other's members)."""

    def __init__(self, size=3, binary=ETCD, args=()):
        self.members = [Etcd(binary, args, name=f"m{i}") for i in range(size)]
        self.token = f"e2e-{os.getpid()}-{id(self):x}"

    def __iter__(self):
        return iter(self.members)

    def __getitem__(self, i):
        return self.members[i]

    @property
    def client_ports(self):
        return [m.client_port for m in self.members]

    def running(self):
        return [m for m in self.members if m.running()]

    def start(self, timeout=30):
        """Starts every member and waits until each answers; returns self. A
        port taken between picking and binding starts the whole cluster again
        on new ports (with fresh data)."""
        for _ in range(3):
            taken = []
            for m in self.members:
                m.pick_ports(taken)
                taken += [m.client_port, m.peer_port]
            spec = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for m in self.members:
                m.initial_cluster, m.cluster_token = spec, self.token
                m.launch()
            try:
                for m in self.members:
                    m.wait_ready(timeout)
                return self
            except Exception as e:
                lost = any(m.lost_its_ports() for m in self.members)
                for m in self.members:
                    m._halt()
                if lost:
                    for m in self.members:
                        shutil.rmtree(m.data_dir, ignore_errors=True)
                    continue
                for m in self.members:
                    m.keep = True
                logs = "\n".join(f"--- {m.name} ({m.dir}):\n{m.log()[-2000:]}" for m in self.members)
                raise RuntimeError(f"the etcd cluster did not become ready ({e}):\n{logs}") from e
        raise RuntimeError("the etcd cluster found no free ports")

    def endpoint_status(self, members=None, timeout=3):
        """`etcdctl endpoint status` of the running (not paused) members: a list
        of (member, its id, the leader's id as it sees it)."""
        members = [m for m in (members or self.members) if m.running() and not m.paused]
        if not members:
            return []
        out = subprocess.run(
            [ETCDCTL, "--endpoints", ",".join(m.url for m in members), "--command-timeout", f"{timeout}s",
             "endpoint", "status", "-w", "json"],
            capture_output=True, text=True, timeout=timeout + 5, env=dict(os.environ, ETCDCTL_API="3"))
        by_url = {m.url: m for m in members}
        found = []
        for entry in json.loads(out.stdout or "[]"):
            member = by_url.get(entry["Endpoint"])
            status = entry.get("Status", {})
            if member is not None:
                found.append((member, status["header"]["member_id"], status.get("leader", 0)))
        return found

    def member_ids(self):
        return {m.name: member_id for m, member_id, _ in self.endpoint_status()}

    def leader(self, timeout=20):
        """The member every running member follows (waits for an election to end)."""
        def agreed():
            status = self.endpoint_status()
            leaders = {leader for _, _, leader in status}
            by_id = {member_id: m for m, member_id, _ in status}
            return len(leaders) == 1 and by_id.get(leaders.pop())

        return eventually(agreed, timeout, what="the etcd members to agree on a leader",
                          retry_on=(AssertionError, OSError, ValueError, KeyError, subprocess.SubprocessError))

    def followers(self):
        leader = self.leader()
        return [m for m in self.members if m is not leader]

    def has_leader(self, timeout=0.3):
        """Whether a running member answers with a leader that is running: asked
        of each member's own status through the gateway (quicker than etcdctl,
        for watching an election as it happens)."""
        ids = {}
        leaders = set()
        for m in self.members:
            if not m.running() or m.paused:
                continue
            try:
                status, body = m.call("/v3/maintenance/status", {}, timeout=timeout)
            except OSError:
                continue
            if status == 200 and isinstance(body, dict):
                ids[body["header"]["member_id"]] = m
                leaders.add(body.get("leader", "0"))
        return any(l in ids for l in leaders)

    def stop(self):
        for m in self.members:
            m.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def envoy_cluster(name, ports):
    """The Envoy cluster a filter replica reaches etcd through: every member,
    checked on etcd's `/health` twice a second (a member without a leader, or
    stopped, answers false or nothing, and is taken out after two checks),
    and ejected after repeated 5xx or connection failures."""
    from envoy_harness import cluster

    c = cluster(name, list(ports))
    c["connect_timeout"] = "0.25s"
    c["health_checks"] = [{
        "timeout": "0.4s", "interval": "0.5s", "no_traffic_interval": "0.5s",
        "unhealthy_threshold": 2, "healthy_threshold": 1,
        "http_health_check": {"path": "/health"},
    }]
    c["outlier_detection"] = {
        "consecutive_5xx": 3, "consecutive_gateway_failure": 3, "interval": "0.5s",
        "base_ejection_time": "5s", "max_ejection_percent": 34,
    }
    return c
