"""One live deployment of the filter, as docs/openapi.yaml describes it: a real Envoy with the
built filter, every provider type behind a mock that answers as the real API does (with real,
joinable audio of each format), and webhook endpoints behind verifying receivers.

Shared by tests/openapi/examples.py (which takes the document's examples from it) and
tests/e2e/test_openapi.py (which holds the filter to the document with schemathesis).

The configuration keeps every default the document states (`max_input_chars`, TTLs,
`max_fallbacks`, `max_jobs`, each provider's `max_input_chars`) and names each provider after
its type, so that the document's per-provider rules apply to it as written. Its virtual keys
and prices give every governance answer: a key with limits (team-a), one without (team-b), an
expired one and one kept to some models.
"""

import base64
import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from envoy_harness import Envoy, cluster  # noqa: E402
from mock_provider import MockProvider  # noqa: E402
from webhook_receiver import Receiver  # noqa: E402

DOC = ROOT / "docs" / "openapi.yaml"
SPEECH = "/v1/async/audio/speech"
# team-a has every limit a key can have; team-b none; team-gone expired in 2020; team-openai may
# use OpenAI's models only. Each answer the document describes comes from one of them.
KEY = "sk-bf-docs-team-a"
OTHER_KEY = "sk-bf-docs-team-b"
EXPIRED_KEY = "sk-bf-docs-team-gone"
OPENAI_ONLY_KEY = "sk-bf-docs-team-openai"
# team-a's limits unless a deployment gives others. Windows of seconds, so that a schemathesis run
# of a minute sees its submits accepted, and refused by the requests and budget limits, in turn;
# held jobs are many (a finished job is held for an hour), so that the run goes on accepting.
TEAM_A_LIMITS = {
    "max_held_jobs": 5000, "max_running_jobs": 4,
    "requests": {"max": 30, "per": "1s"},
    "characters": {"max": 2000, "per": "1s"},
    "budget": {"max_usd": 0.02, "per": "2s"},
}
# US dollars per million input characters; Gemini's models are left unpriced (they cost 0).
PRICING = {"openai/*": 15.0, "openai/tts-1-hd": 30.0, "azure/*": 15.0, "elevenlabs/*": 180.0}
# A fixed secret, so that a delivery captured here can be checked with it later.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"openapi-examples-webhook-secret!").decode()
PROVIDER_KEYS = {"openai": "sk-openai-mock", "azure": "azure-mock", "elevenlabs": "xi-mock", "gemini": "goog-mock"}


def plugin_config(team_a_limits=TEAM_A_LIMITS, **overrides):
    config = {
        "providers": {
            "openai": {"cluster": "mock", "authority": "api.openai.com", "base_path": "/v1",
                       "api_key": PROVIDER_KEYS["openai"], "timeout_ms": 10000},
            "azure": {"cluster": "mock", "authority": "example.openai.azure.com", "base_path": "/azure",
                      "api_key": PROVIDER_KEYS["azure"], "api_version": "2025-03-01-preview", "timeout_ms": 10000},
            "elevenlabs": {"cluster": "mock", "authority": "api.elevenlabs.io", "base_path": "/el",
                           "api_key": PROVIDER_KEYS["elevenlabs"], "timeout_ms": 10000},
            "gemini": {"cluster": "mock", "authority": "generativelanguage.googleapis.com", "base_path": "/gem",
                       "api_key": PROVIDER_KEYS["gemini"], "timeout_ms": 10000},
        },
        "virtual_keys": [
            {"name": "team-a", "value": KEY, "expires_at": "2100-01-01T00:00:00Z", "limits": team_a_limits},
            {"name": "team-b", "value": OTHER_KEY},
            {"name": "team-gone", "value": EXPIRED_KEY, "expires_at": "2020-01-01T00:00:00Z"},
            {"name": "team-openai", "value": OPENAI_ONLY_KEY, "allowed_models": ["openai/*"]},
        ],
        "pricing": PRICING,
        "webhooks": {
            "billing": {"cluster": "hooks", "authority": "hooks.internal", "path": "/speech-events",
                        "secret": WEBHOOK_SECRET, "retry_backoff_initial_seconds": 1,
                        "retry_backoff_max_seconds": 2, "attempt_timeout_seconds": 2, "max_retries": 2},
            "billing-full": {"cluster": "hooks", "authority": "hooks.internal", "path": "/speech-events",
                             "secret": WEBHOOK_SECRET, "include_response": True,
                             "retry_backoff_initial_seconds": 1, "retry_backoff_max_seconds": 2,
                             "attempt_timeout_seconds": 2, "max_retries": 2},
            # Its receiver refuses the first attempt; the retry comes after a 1 s TTL has run out.
            "billing-late": {"cluster": "hooks-late", "authority": "hooks.internal", "path": "/speech-events",
                             "secret": WEBHOOK_SECRET, "retry_backoff_initial_seconds": 2,
                             "retry_backoff_max_seconds": 2, "attempt_timeout_seconds": 2, "max_retries": 2},
        },
    }
    config.update(overrides)
    return config


# ------------------------------------------------------------------------------------ audio

def mp3_frames(n=4):
    """Silent MPEG-2 Layer III frames (24 kHz, 8 kbit/s, mono): 24 bytes each, header and zeros."""
    return (b"\xff\xf3\x14\xc0" + bytes(20)) * n


def pcm16(n_samples, seed=1):
    """A quiet, deterministic 16-bit little-endian signal."""
    return b"".join(struct.pack("<h", ((i * 37 + seed) % 64) - 32) for i in range(n_samples))


def wav_of(pcm, rate=24000):
    return (b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(pcm)) + pcm)


@functools.lru_cache(maxsize=None)
def ffmpeg_audio(fmt):
    """A short real file made by ffmpeg (for the formats Python cannot make by hand)."""
    muxer = {"aac": ["-c:a", "aac", "-f", "adts"], "opus": ["-c:a", "libopus", "-f", "ogg"],
             "flac": ["-f", "flac"]}[fmt]
    out = tempfile.mkdtemp(prefix="openapi-audio-")
    try:
        path = os.path.join(out, "a")
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=0.1:sample_rate=48000",
                        "-ac", "1", *muxer, path], check=True, timeout=60)
        with open(path, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(out, ignore_errors=True)


CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}


def audio_for(fmt):
    if fmt == "mp3":
        return mp3_frames()
    if fmt == "pcm":
        return pcm16(48)
    if fmt == "wav":
        return wav_of(pcm16(48))
    return ffmpeg_audio(fmt)


# ------------------------------------------------------------------------------- providers

def openai_answer(record):
    """OpenAI and Azure: the audio bytes of the asked format."""
    fmt = (record["json"] or {}).get("response_format") or "mp3"
    return 200, {"content-type": CONTENT_TYPES.get(fmt, "application/octet-stream")}, audio_for(fmt)


def elevenlabs_answer(record):
    output = record["query"].get("output_format", ["mp3_44100_128"])[0]
    audio = {"mp3_44100_128": mp3_frames(), "opus_48000_128": audio_for("opus")}.get(output, pcm16(48))
    if record["path_only"].endswith("/with-timestamps"):
        text = (record["json"] or {}).get("text", "")[:8]
        times = [round(i * 0.05, 2) for i in range(len(text) + 1)]
        alignment = {"characters": list(text), "character_start_times_seconds": times[:-1],
                     "character_end_times_seconds": times[1:]}
        body = {"audio_base64": base64.b64encode(audio).decode(), "alignment": alignment,
                "normalized_alignment": alignment}
        return 200, {"content-type": "application/json"}, json.dumps(body).encode()
    return 200, {"content-type": "audio/mpeg" if output.startswith("mp3") else "application/octet-stream"}, audio


def gemini_answer(record):
    body = {"candidates": [{"content": {"role": "model", "parts": [{"inlineData": {
        "mimeType": "audio/L16;codec=pcm;rate=24000", "data": base64.b64encode(pcm16(48)).decode()}}]},
        "finishReason": "STOP"}]}
    return 200, {"content-type": "application/json"}, json.dumps(body).encode()


def text_of(record):
    """The text a provider call asks for, whichever provider's body it is."""
    body = record["json"] or {}
    if "contents" in body:
        return body["contents"][0]["parts"][0]["text"]
    return body.get("input") or body.get("text") or ""


# Each provider's own error body for "too many requests".
RATE_LIMITED = {
    "/v1/": {"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}},
    "/azure/": {"error": {"code": "429", "message": "Requests to the Audio API have exceeded the rate limit."}},
    "/el/": {"detail": {"status": "too_many_concurrent_requests", "message": "Too many concurrent requests."}},
    "/gem/": {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Resource has been exhausted."}},
}


def is_refused(body):
    """One text in four (by its CRC) is refused by `add_failing_provider_rules`."""
    return zlib.crc32(text_of({"json": body}).encode("utf-8", "replace")) % 4 == 0


def add_failing_provider_rules(mock):
    """As `add_provider_rules`, but the calls `is_refused` picks get the provider's own 429, so that
    failed jobs (their JSON, their `/content`) are part of what a run sees. A 429, not a 5xx:
    `/content` answers a failed job's status, and schemathesis would take a 5xx for a crash."""
    for prefix, body in RATE_LIMITED.items():
        mock.add_rule(path_prefix=prefix, status=429, body=body, method="POST",
                      match_body=lambda j, b: is_refused(j))
    add_provider_rules(mock)


def add_provider_rules(mock):
    """Every provider type answers any request as its real API would, successfully."""
    mock.add_rule(path_prefix="/v1/audio/speech", body=openai_answer, method="POST")
    mock.add_rule(path_prefix="/azure/openai/", body=openai_answer, method="POST")
    mock.add_rule(path_prefix="/el/v1/text-to-speech/", body=elevenlabs_answer, method="POST")
    mock.add_rule(path_prefix="/gem/v1beta/models/", body=gemini_answer, method="POST")


# ------------------------------------------------------------------------------ the whole

class Deployment:
    def __init__(self, envoy, mock, receiver, late_receiver):
        self.envoy, self.mock, self.receiver, self.late_receiver = envoy, mock, receiver, late_receiver

    @property
    def url(self):
        return self.envoy.url


@contextmanager
def running(provider_rules=add_provider_rules, concurrency=2, **overrides):
    """Starts the mock, the receivers and Envoy; stops them all (by pid / by server) on exit.

    `provider_rules(mock)` sets the mock's answers (rules added later match only if no earlier
    one did; the mock can be given more rules while it runs)."""
    with ExitStack() as stack:
        mock = MockProvider().start()
        stack.callback(mock.stop)
        provider_rules(mock)
        receiver = Receiver([WEBHOOK_SECRET])
        stack.callback(receiver.stop)
        late = Receiver([WEBHOOK_SECRET])
        stack.callback(late.stop)
        envoy = Envoy(plugin_config(**overrides), [
            cluster("mock", mock.port), cluster("app", mock.port),
            cluster("hooks", receiver.port), cluster("hooks-late", late.port)], concurrency=concurrency).start()
        stack.callback(envoy.stop)
        yield Deployment(envoy, mock, receiver, late)
