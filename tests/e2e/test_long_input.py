"""Long input: split into parts, synthesized in parallel within bounds, joined into one file."""

import base64
import json
import subprocess
import tempfile

import pytest

from conftest import SPEECH, eventually, stays
from envoy_harness import cluster
from helpers import start_local_tts, stop_process

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "How vexingly quick daft zebras jump!",
             "Pack my box with five dozen liquor jugs?", "Sphinx of black quartz, judge my vow."]


def text_of(n_chars):
    out, i = "", 0
    while len(out) < n_chars:
        out += f"{i} {SENTENCES[i % len(SENTENCES)]} "
        i += 1
    return out[:n_chars].rstrip()


def long_envoy(make_envoy, **provider):
    providers = {
        "openai": {"type": "openai", "cluster": "mock", "base_path": "/v1", "timeout_ms": 5000,
                   "max_input_chars": 100, "max_parallel_chunks": 2, **provider},
        "backup": {"type": "openai", "cluster": "mock", "base_path": "/backup/v1", "timeout_ms": 5000,
                   "max_input_chars": 150},
        "elevenlabs": {"cluster": "mock", "base_path": "/el", "api_key": "xi", "max_input_chars": 100},
    }
    return make_envoy(providers=providers)


def echo_pcm(record):
    """A part's "audio": its own text, padded to whole 16-bit samples."""
    data = record["json"]["input"].encode()
    return 200, {"content-type": "audio/pcm"}, data + b" " * (len(data) % 2)


def test_parts_respect_the_limit_and_come_back_in_order(make_envoy, mock):
    envoy, client = long_envoy(make_envoy)
    mock.add_rule(path_prefix="/v1/audio/speech", body=echo_pcm, delay=0.3)
    text = text_of(1000)
    r = client.submit({"model": "openai/tts-1", "input": text, "voice": "alloy", "response_format": "pcm"})
    assert r.status == 202, r
    job = r.json()["id"]
    running = eventually(lambda: (j := client.poll(job).json()).get("progress") and j, 5, what="progress")
    done = client.wait(job, timeout=30).json()
    assert done["status"] == "completed", done
    sent = mock.recorded()
    inputs = [s["json"]["input"] for s in sent]
    assert all(len(i) <= 100 for i in inputs), [len(i) for i in inputs]
    assert running["progress"] == {"chunks_done": running["progress"]["chunks_done"], "chunks_total": len(inputs)}
    # Split at sentence ends: every part but the last ends a sentence.
    assert all(i.rstrip()[-1] in ".!?" for i in inputs[:-1]), inputs
    assert " ".join(i.strip() for i in sorted(inputs, key=text.index)) == " ".join(text.split()), "nothing lost"
    # At most two parts of the job out at once.
    spans = sorted((s["time"], s["answered_at"]) for s in sent)
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most <= 2, spans
    audio = base64.b64decode(done["result"]["audio"])
    assert audio.replace(b" ", b"") == "".join(sorted(inputs, key=text.index)).replace(" ", "").encode()


def test_a_failed_part_moves_the_whole_job_to_the_fallback(make_envoy, mock):
    envoy, client = long_envoy(make_envoy)
    mock.add_rule(path_prefix="/v1/audio/speech", status=500, body={"error": {"message": "one part failed"}},
                  match_body=lambda j, b: j and "zebras" in j["input"])
    mock.add_rule(path_prefix="/v1/audio/speech", body=echo_pcm)
    mock.add_rule(path_prefix="/backup/v1/audio/speech", body=echo_pcm)
    text = text_of(600)
    r = client.submit({"model": "openai/tts-1", "input": text, "voice": "alloy", "response_format": "pcm",
                       "fallbacks": ["backup/b"]})
    done = client.wait(r.json()["id"], timeout=30).json()
    assert done["status"] == "completed" and done["result"]["extra_fields"]["provider"] == "backup", done
    backup = [s["json"]["input"] for s in mock.recorded() if s["path"].startswith("/backup/")]
    assert " ".join(i.strip() for i in sorted(backup, key=text.index)) == " ".join(text.split()), "every part again"
    assert all(len(i) <= 150 for i in backup)


def test_flac_is_refused_only_when_parts_are_needed(make_envoy, mock):
    envoy, client = long_envoy(make_envoy)
    mock.add_rule(path_prefix="/", body=b"fLaC")
    long = client.submit({"model": "openai/tts-1", "input": text_of(300), "voice": "a", "response_format": "flac"})
    assert long.status == 400 and long.json()["error"]["param"] == "response_format", long
    # Also when only a fallback would need parts.
    fb = client.submit({"model": "backup/b", "input": text_of(120), "voice": "a", "response_format": "flac",
                        "fallbacks": ["openai/x"]})
    assert fb.status == 400 and fb.json()["error"]["param"] == "response_format", fb
    short = client.submit({"model": "openai/tts-1", "input": "short", "voice": "a", "response_format": "flac"})
    assert short.status == 202
    stays(lambda: all(r["json"]["input"] == "short" for r in mock.recorded()), 0.3, what="only the short one sent")


def test_timestamps_are_joined_with_time_offsets(make_envoy, mock):
    envoy, client = long_envoy(make_envoy)

    def answer(record):
        part = record["json"]["text"]
        pcm = b"\x00\x01" * 44100  # one second at 44.1 kHz, 16-bit mono
        chars = list(part)
        align = {"characters": chars, "character_start_times_seconds": [i / 100 for i in range(len(chars))],
                 "character_end_times_seconds": [(i + 1) / 100 for i in range(len(chars))]}
        return 200, {"content-type": "application/json"}, json.dumps(
            {"audio_base64": base64.b64encode(pcm).decode(), "alignment": align, "normalized_alignment": align}).encode()

    mock.add_rule(path_prefix="/el/", body=answer)
    text = text_of(250)
    r = client.submit({"model": "elevenlabs/m", "input": text, "voice": "v", "response_format": "pcm",
                       "with_timestamps": True})
    done = client.wait(r.json()["id"], timeout=30).json()
    assert done["status"] == "completed", done
    parts = [s["json"]["text"] for s in mock.recorded()]
    ordered = sorted(parts, key=text.index)
    align = done["result"]["alignment"]
    assert "".join(align["characters"]) == "".join(ordered)
    second_start = len(ordered[0])
    assert align["character_start_times_seconds"][second_start] == pytest.approx(1.0, abs=0.01), "offset by part 1"
    assert len(base64.b64decode(done["result"]["audio"])) == 2 * 44100 * len(parts)


@pytest.fixture(scope="module")
def local_tts(tmp_path_factory):
    tts, port = start_local_tts(tmp_path_factory.mktemp("long") / "local-tts.log")
    yield port
    stop_process(tts)


def probe(audio, suffix):
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(audio)
        f.flush()
        decode = subprocess.run(["ffmpeg", "-v", "error", "-i", f.name, "-f", "null", "-"], capture_output=True, text=True)
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", f.name],
                             capture_output=True, text=True, check=True).stdout
    return decode.stderr.strip(), float(json.loads(out)["format"]["duration"])


@pytest.mark.parametrize("fmt,suffix", [("mp3", ".mp3"), ("opus", ".ogg"), ("wav", ".wav"), ("aac", ".aac")])
def test_a_20000_character_text_becomes_one_valid_file(make_envoy, mock, local_tts, fmt, suffix):
    local = {"type": "openai", "cluster": "tts", "base_path": "/v1", "timeout_ms": 60000,
             "max_input_chars": 4096, "max_parallel_chunks": 3}
    whole = dict(local, max_input_chars=100_000)
    envoy, client = make_envoy(extra_clusters=[cluster("tts", local_tts)], providers={"local": local, "whole": whole},
                               max_input_chars=100_000, max_audio_bytes=64 * 1024 * 1024, job_deadline_s=600)
    text = text_of(20_000)
    body = {"input": text, "voice": "alloy", "response_format": fmt, "speed": 2.5}
    parts = client.submit(dict(body, model="local/tts-1"))
    once = client.submit(dict(body, model="whole/tts-1"))
    assert parts.status == once.status == 202, (parts, once)
    running = eventually(lambda: (j := client.poll(parts.json()["id"]).json()).get("progress") or j["status"] != "pending" and j,
                         30, what="the long job to start")
    if isinstance(running, dict) and "chunks_total" in running:
        assert running["chunks_total"] == 5
    durations = []
    for job in (parts.json()["id"], once.json()["id"]):
        done = client.wait(job, timeout=240).json()
        assert done["status"] == "completed", done
        content = client.call("GET", f"{SPEECH}/{job}/content")
        assert content.status == 200
        errors, duration = probe(content.body, suffix)
        assert errors == "", f"{fmt}: {errors[:500]}"
        durations.append(duration)
    joined, spoken_at_once = durations
    assert joined > 120, "20,000 characters make minutes of audio"
    assert joined == pytest.approx(spoken_at_once, rel=0.05), durations
