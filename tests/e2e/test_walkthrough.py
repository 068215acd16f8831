"""The README's walk-through on the shipped envoy/envoy.yaml with the real local
speech server (espeak-ng): real audio, no API key, no internet."""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import Client
from envoy_harness import ROOT, EnvoyProcess
from helpers import LOCAL_TTS, start_local_tts, stop_process

DEMO_KEY = "sk-bf-demo-key"


@pytest.fixture(scope="module")
def shipped_envoy(tmp_path_factory):
    if not LOCAL_TTS.exists() or not shutil.which("espeak-ng"):
        pytest.fail("make build and espeak-ng are needed (make test installs both)")
    tts, tts_port = start_local_tts(tmp_path_factory.mktemp("walkthrough") / "local-tts.log")
    try:
        text = (ROOT / "envoy" / "envoy.yaml").read_text()
        # Envoy's own listener and admin bind port 0; the harness reads where they went.
        for old, new in (("port_value: 8090", f"port_value: {tts_port}"), ("port_value: 10000", "port_value: 0"),
                         ("port_value: 9901", "port_value: 0")):
            assert old in text, old
            text = text.replace(old, new)
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        envoy = EnvoyProcess(text, "envoy.yaml", concurrency=2, env=env, cwd=ROOT).start()
        try:
            yield Client(envoy.url)
        finally:
            envoy.stop()
    finally:
        stop_process(tts)


def probe(audio, suffix):
    with tempfile.TemporaryDirectory(prefix="walkthrough-") as d:
        path = os.path.join(d, "audio" + suffix)
        with open(path, "wb") as f:
            f.write(audio)
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=format_name,duration",
                              "-of", "json", path], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["format"]


@pytest.mark.parametrize("fmt,content_type,container", [
    ("mp3", "audio/mpeg", "mp3"), ("wav", "audio/wav", "wav"), ("opus", "audio/ogg", "ogg"),
])
def test_the_readme_walkthrough_speaks(shipped_envoy, fmt, content_type, container):
    client = shipped_envoy
    r = client.submit({"model": "local/tts-1", "input": "Hello from Envoy!", "voice": "alloy",
                       "response_format": fmt}, key=DEMO_KEY)
    assert r.status == 202, r
    job = client.wait(r.json()["id"], key=DEMO_KEY, timeout=30).json()
    assert job["status"] == "completed", job
    content = client.call("GET", f"/v1/async/audio/speech/{job['id']}/content", key=DEMO_KEY)
    assert content.status == 200
    assert content.headers["content-type"] == content_type
    info = probe(content.body, "." + fmt)
    assert container in info["format_name"]
    assert 0.5 < float(info["duration"]) < 10, info


def test_openai_without_a_key_fails_at_once_naming_the_variable(shipped_envoy):
    client = shipped_envoy
    r = client.submit({"model": "openai/gpt-4o-mini-tts", "input": "x", "voice": "alloy"}, key=DEMO_KEY)
    job = client.wait(r.json()["id"], key=DEMO_KEY).json()
    assert job["status"] == "failed" and job["status_code"] == 401
    assert "OPENAI_API_KEY" in job["error"]["error"]["message"]


def test_other_paths_reach_the_route_behind_the_filter(shipped_envoy):
    r = shipped_envoy.call("GET", "/anything", key=None)
    assert (r.status, r.body) == (200, b"passed through the async speech filter\n")
