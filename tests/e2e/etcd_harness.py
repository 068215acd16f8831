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

    def __init__(self, binary=ETCD, args=()):
        if not os.path.exists(binary):
            raise RuntimeError(f"etcd is not installed ({binary}); run `make setup` (Debian's etcd-server)")
        self.binary = binary
        self.args = list(args)
        self.dir = tempfile.mkdtemp(prefix="etcd-e2e-")
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

    def _command(self):
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [self.binary, "--name", "default", "--data-dir", self.data_dir,
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}", "--log-level", "warn", *self.args]

    def start(self, timeout=20):
        """Starts etcd (again, after `kill()`, on the same data and ports) and
        waits until it answers; returns self."""
        assert not self.running(), "etcd is running already"
        first = self.client_port is None
        for _ in range(3 if first else 1):
            if first:
                self.client_port, self.peer_port = free_port(), free_port()
                while self.peer_port == self.client_port:
                    self.peer_port = free_port()
            self._log_file = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self._command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            self.paused = False
            try:
                eventually(self._ready, timeout, what="etcd to answer /health and /v3/kv/range",
                           interval=0.05, retry_on=(AssertionError, OSError))
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
            raise RuntimeError(f"etcd exited with {self.proc.returncode}")
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
