"""Fixtures: a recording mock provider and one Envoy with the filter in front of it.

When a test fails, the logs of the Envoys running at that moment are added to
its report and their directories are kept (their paths are in the report).
"""

import base64
import hashlib
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import envoy_harness  # noqa: E402
from envoy_harness import Envoy, RefusedPort, cluster  # noqa: E402
from etcd_harness import Etcd  # noqa: E402
from mock_provider import MockProvider  # noqa: E402
from helpers import http_call  # noqa: E402
from waiting import eventually, stays  # noqa: E402,F401  (the tests import them from here)

KEY_A = "sk-bf-team-a-secret"
KEY_B = "sk-bf-team-b-secret"
PROVIDER_KEY = "sk-provider-secret-123"
AZURE_KEY = "azure-secret-456"
ELEVEN_KEY = "xi-secret-789"
GEMINI_KEY = "goog-secret-000"
SPEECH = "/v1/async/audio/speech"


def plugin_config(mock_cluster="mock", **overrides):
    config = {
        "providers": {
            "openai": {"type": "openai", "cluster": mock_cluster, "authority": "api.openai.test",
                       "base_path": "/v1", "api_key": PROVIDER_KEY, "timeout_ms": 5000},
            "backup": {"type": "openai", "cluster": mock_cluster, "authority": "backup.test",
                       "base_path": "/backup/v1", "timeout_ms": 5000},
            "slow": {"type": "openai", "cluster": mock_cluster, "base_path": "/slow/v1", "timeout_ms": 700},
            "down": {"type": "openai", "cluster": "down", "timeout_ms": 2000},
            "azure": {"type": "azure", "cluster": mock_cluster, "authority": "res.openai.azure.com",
                      "base_path": "/azure", "api_key": AZURE_KEY, "api_version": "2025-03-01-preview"},
            "elevenlabs": {"cluster": mock_cluster, "authority": "api.elevenlabs.io", "base_path": "/el",
                           "api_key": ELEVEN_KEY},
            "gemini": {"cluster": mock_cluster, "authority": "generativelanguage.googleapis.com",
                       "base_path": "/gem", "api_key": GEMINI_KEY},
        },
        "virtual_keys": [
            {"name": "team-a", "value": KEY_A},
            {"name": "team-b", "sha256": hashlib.sha256(KEY_B.encode()).hexdigest()},
        ],
        "default_result_ttl_s": 3600,
        "max_result_ttl_s": 86400,
        "max_jobs": 10000,
        "max_input_chars": 1000,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def mock():
    m = MockProvider()
    m.start()
    yield m
    m.stop()


_refused = None


def refused_port():
    """A port held open for the whole session and never listened on."""
    global _refused
    if _refused is None:
        _refused = RefusedPort()
    return _refused.port


def clusters_for(mock):
    # "down" points at a port that refuses connections; "app" is the rest of the chain.
    return [cluster("mock", mock.port), cluster("down", refused_port()), cluster("app", mock.port)]


LOG_TAIL = 20_000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for e in list(envoy_harness.RUNNING):
            e.keep = True
            report.sections.append((f"envoy log (kept in {e.dir})", e.log()[-LOG_TAIL:]))


@pytest.fixture(scope="session")
def envoy(mock):
    e = Envoy(plugin_config(), clusters_for(mock), concurrency=2).start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def etcd():
    """One etcd member for the module's tests (each test takes a prefix of its own)."""
    e = Etcd().start()
    yield e
    e.stop()


@pytest.fixture(autouse=True)
def fresh_mock(mock):
    mock.clear()
    yield


class Client:
    def __init__(self, base_url):
        host, port = base_url.replace("http://", "").split(":")
        self.host, self.port = host, int(port)

    def call(self, method, path, body=None, headers=None, key=KEY_A):
        return Response(*http_call(self.host, self.port, method, path, body, headers, key))

    def submit(self, body, **kw):
        return self.call("POST", SPEECH, body, **kw)

    def poll(self, job_id, **kw):
        return self.call("GET", f"{SPEECH}/{job_id}", **kw)

    def wait(self, job_id, timeout=15, **kw):
        """Polls until the job ends and returns the final poll; fails with the
        last answer if it is still 202 after `timeout` seconds."""
        last = None

        def ended():
            nonlocal last
            last = self.poll(job_id, **kw)
            return last.status != 202 and last

        return eventually(ended, timeout, what=lambda: f"job {job_id} to end; last poll: {last!r}")


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


@pytest.fixture
def client(envoy):
    return Client(envoy.url)


def audio_of(job):
    return base64.b64decode(job["result"]["audio"])


@pytest.fixture
def make_envoy(mock):
    """Starts an Envoy with plugin_config(**overrides); stopped after the test.
    `stats_config` is the bootstrap's (see envoy_harness.shipped_stats_config)."""
    started = []

    def start(extra_clusters=(), stats_config=None, **overrides):
        e = Envoy(plugin_config(**overrides), clusters_for(mock) + list(extra_clusters), concurrency=2,
                  stats_config=stats_config).start()
        started.append(e)
        return e, Client(e.url)

    yield start
    for e in started:
        e.stop()


def read_stats(envoy, prefix):
    out = {}
    for line in envoy.admin("/stats?filter=async_speech").splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
            out[name[len(prefix):]] = int(value)
    return out


def stats(envoy, prefix="wasmcustom.async_speech."):
    """The filter's counters and gauges from Envoy's admin, as a dict. The
    filter writes them on its tick (every 200 ms), so this waits until two
    reads a tick and a half apart agree."""
    last = read_stats(envoy, prefix)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.3)  # longer than the filter's tick, which writes them
        now = read_stats(envoy, prefix)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the filter's stats did not settle within 5 s: {last}")
