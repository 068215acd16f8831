"""The examples of docs/openapi.yaml, taken from live Envoys with the filter.

    .venv/bin/python tests/openapi/examples.py           # rewrite the examples in docs/openapi.yaml
    .venv/bin/python tests/openapi/examples.py --check   # exit 1 if they no longer hold

Every example is a request the filter accepted or an answer it gave (or a webhook delivery it
sent) in this run, against the mock providers of deployment.py; nothing is written by hand but
the summaries. An answer's example shows the headers it came with (`x-headers`).
tests/e2e/test_openapi.py runs `capture()` again and compares its answers with the document's,
with ids, timestamps, latencies, signatures and the seconds to a window's end normalized
(`normalized_example`).

Jobs are team-b's (a key without limits); team-a's limits (`LIMITS`: a few submits a day)
give each refusal by a limit, in an order that reaches every one: a limit checked earlier
answers first, so that the budget is spent in an Envoy of its own.
"""

import argparse
import json
import re
import sys
import time
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deployment import (DOC, EXPIRED_KEY, KEY, OPENAI_ONLY_KEY, OTHER_KEY, SPEECH,  # noqa: E402
                        add_provider_rules, running)
from helpers import http_call  # noqa: E402  (tests/e2e, put on the path by deployment)
from waiting import eventually  # noqa: E402

MARKER = "  # GENERATED EXAMPLES BELOW\n"
USAGE = "/v1/async/usage"
# The answer headers an example shows beside its body (the others are Envoy's: date, server, …).
SHOWN_HEADERS = ("location", "retry-after", "allow", "ratelimit-policy", "ratelimit")

# team-a's limits in the examples' Envoys: a few submits reach each one, and the windows are a
# day and a week, so that the counts are the same in every run (see `clear_of_midnight`).
LIMITS = {"max_held_jobs": 2, "max_running_jobs": 1,
          "requests": {"max": 4, "per": "1d"},
          "characters": {"max": 1000, "per": "1d"},
          "budget": {"max_usd": 0.05, "per": "1w"}}
# 17 characters, at OpenAI's 15 dollars per million.
HELLO = {"model": "openai/gpt-4o-mini-tts", "input": "Hello from Envoy.", "voice": "alloy"}
# 300 characters at ElevenLabs' 180 dollars per million: 5.4 cents, past team-a's 5.
COSTLY = {"model": "elevenlabs/eleven_multilingual_v2", "input": ("Every word is paid for. " * 13)[:300],
          "voice": "JBFqnCBsd6RMkjVDRZzb"}
# Refusals whose Retry-After (and RateLimit `t`) count the seconds to the end of their window.
UNTIL_WINDOW_ENDS = {"request_limit_exceeded": "requests", "character_limit_exceeded": "characters",
                     "budget_exceeded": "budget"}

OPENAI = {"model": "openai/gpt-4o-mini-tts", "input": "Hello from Envoy.", "voice": "alloy",
          "instructions": "Speak warmly.", "response_format": "mp3", "fallbacks": ["azure/tts-deployment"]}
ELEVENLABS = {"model": "elevenlabs/eleven_multilingual_v2", "input": "Hola desde Envoy.",
              "voice": "JBFqnCBsd6RMkjVDRZzb", "language_code": "es", "speed": 1.1, "with_timestamps": True}
GEMINI = {"model": "gemini/gemini-2.5-flash-preview-tts", "input": "Joe: How is it going?\nJane: Not bad, and you?",
          "voice": [{"speaker": "Joe", "voice": "Kore"}, {"speaker": "Jane", "voice": "Puck"}],
          "response_format": "wav"}
# As Bifrost's own clients send it: every optional field present, null.
NULLS = {"model": "openai/tts-1", "input": "Nulls mean absent.", "voice": "nova", "fallbacks": None,
         "stream_format": None, "instructions": None, "response_format": None, "speed": None,
         "language_code": None, "pronunciation_dictionary_locators": None, "enable_logging": None,
         "optimize_streaming_latency": None, "with_timestamps": None}
FAILING = {"model": "openai/gpt-4o-mini-tts", "input": "This one fails.", "voice": "alloy",
           "fallbacks": ["azure/tts-deployment"]}
SLOW = "Take your time."
# Two parts for OpenAI (4096 characters a call); the second waits at the mock.
LONG = " ".join(f"Sentence {i} of a long text read in two parts." for i in range(90)) + " Last part, SLOW."

OPENAI_429 = {"error": {"message": "Rate limit reached for gpt-4o-mini-tts in organization org-mock on requests "
                                   "per min (RPM): Limit 3, Used 3, Requested 1.",
                        "type": "requests", "code": "rate_limit_exceeded", "param": None}}
AZURE_500 = {"error": {"code": "InternalServerError",
                       "message": "The server had an error while processing your request. Sorry about that!"}}


def example_rules(mock):
    """The answers the examples need, before every provider's usual answer."""
    mock.add_rule(path_prefix="/v1/audio/speech", status=429, body=OPENAI_429,
                  match_body=lambda j, b: (j or {}).get("input") == FAILING["input"])
    mock.add_rule(path_prefix="/azure/openai/", status=500, body=AZURE_500,
                  match_body=lambda j, b: (j or {}).get("input") == FAILING["input"])
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"", hang=True,
                  match_body=lambda j, b: (j or {}).get("input") == SLOW)
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"", hang=True,
                  match_body=lambda j, b: "SLOW" in (j or {}).get("input", ""))
    add_provider_rules(mock)


class Client:
    """Requests to one Envoy with one key (`None`: no key)."""

    def __init__(self, url, key):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.key = key

    def call(self, method, path, body=None, headers=None):
        return http_call(self.host, self.port, method, path, body, headers, self.key)

    def submit(self, body, **kw):
        status, headers, data = self.call("POST", SPEECH, body, **kw)
        assert status == 202, (status, data)
        return json.loads(data)

    def poll(self, job_id):
        status, _, data = self.call("GET", f"{SPEECH}/{job_id}")
        return status, json.loads(data)

    def wait(self, job_id, until=lambda job: job["status"] in ("completed", "failed"), timeout=20):
        return eventually(lambda: (job := self.poll(job_id)[1]) and until(job) and job, timeout,
                          what=f"job {job_id} to reach the state wanted")

    def delete(self, job_id):
        status, _, data = self.call("DELETE", f"{SPEECH}/{job_id}")
        assert status == 204, (status, data)

    def answer(self, status, method="POST", path=SPEECH, body=None, **kw):
        """The body and headers of an answer that must have `status`."""
        got, headers, data = self.call(method, path, body, **kw)
        assert got == status, (got, data)
        return json.loads(data), headers


def refused(client, status, method="POST", path=SPEECH, body=None, **kw):
    return client.answer(status, method, path, body, **kw)


def ratelimit(headers):
    """The RateLimit field of an answer: {limit: (remaining, seconds to its window's end)}."""
    out = {}
    for item in headers["ratelimit"].split(", "):
        name, r, t = item.split(";")
        out[name.strip('"')] = (int(r.removeprefix("r=")), int(t.removeprefix("t=")))
    return out


def clear_of_midnight(margin_s=90):
    """Waits, if it is that close, until UTC midnight (where day and week windows end) has
    passed, so that the next `margin_s` seconds of counting happen in one window."""
    eventually(lambda: 86400 - time.time() % 86400 > margin_s, margin_s + 5,
               what="UTC midnight to pass, so that the day's windows start afresh")


def capture():
    """Runs every example against live Envoys; returns {name: Example Object}, in document order.

    An answer's example shows its `SHOWN_HEADERS` as `x-headers`, as they came (lower case)."""
    out = {}

    def add(name, summary, value, headers=None):
        out[name] = {"summary": summary, "value": value}
        shown = {h: headers[h] for h in SHOWN_HEADERS if h in (headers or {})}
        if shown:
            out[name]["x-headers"] = shown

    with running(provider_rules=example_rules, team_a_limits=LIMITS) as live:
        # Jobs of team-b, a key without limits.
        c = Client(live.url, OTHER_KEY)

        # Requests the filter accepted, and what became of them.
        openai = c.submit(OPENAI)
        add("request-openai", "OpenAI, with a fallback on Azure", OPENAI)
        add("job-completed", "A completed job", c.wait(openai["id"]))
        add("request-elevenlabs", "ElevenLabs, with character timestamps", ELEVENLABS)
        add("job-completed-elevenlabs-timestamps", "A completed ElevenLabs job with timestamps",
            c.wait(c.submit(ELEVENLABS)["id"]))
        add("request-gemini-speakers", "Gemini, two speakers", GEMINI)
        assert c.wait(c.submit(GEMINI)["id"])["status"] == "completed"
        add("request-nulls", "Every optional field null, as Bifrost's clients send it", NULLS)
        assert c.wait(c.submit(NULLS)["id"])["status"] == "completed"
        add("usage-no-limits", "A key without limits, holding four finished jobs", *c.answer(200, "GET", USAGE))

        failed = c.wait(c.submit(FAILING)["id"])
        add("job-failed", "A failed job: both attempts, the last one's error", failed)
        status, _, data = c.call("GET", f"{SPEECH}/{failed['id']}/content")
        assert status == failed["status_code"], status
        add("content-failed", "The audio of a failed job: its error, with its status code", json.loads(data))

        long_id = c.submit({"model": "openai/tts-1", "input": LONG, "voice": "alloy", "response_format": "pcm"})["id"]
        add("job-processing-progress", "A long input, half done",
            c.wait(long_id, until=lambda j: j.get("progress", {}).get("chunks_done") == 1))

        # Webhooks: the job as polls show it, and the deliveries.
        hooked = c.submit(OPENAI, headers={"x-bf-async-webhook": "billing"})["id"]
        add("job-completed-webhook", "A completed job whose webhook was delivered",
            c.wait(hooked, until=lambda j: j.get("webhook", {}).get("status") == "delivered"))
        [delivery] = [d for d in live.receiver.got() if json.loads(d["body"])["data"]["job_id"] == hooked]
        add("webhook-completed", "async_job.completed", json.loads(delivery["body"]))
        add("webhook-header-id", "webhook-id", delivery["headers"]["webhook-id"])
        add("webhook-header-timestamp", "webhook-timestamp", delivery["headers"]["webhook-timestamp"])
        add("webhook-header-signature", "webhook-signature", delivery["headers"]["webhook-signature"])
        full = c.submit(OPENAI, headers={"x-bf-async-webhook": "billing-full"})["id"]
        add("webhook-completed-with-response", "async_job.completed, with include_response",
            json.loads(delivery_for(live.receiver, full)["body"]))
        failing = c.submit(FAILING, headers={"x-bf-async-webhook": "billing-full"})["id"]
        add("webhook-failed", "async_job.failed, with include_response",
            json.loads(delivery_for(live.receiver, failing)["body"]))
        live.late_receiver.script = [503]
        late = c.submit(OPENAI, headers={"x-bf-async-webhook": "billing-late", "x-bf-async-job-result-ttl": "1"})["id"]
        add("webhook-expired", "An attempt made after the job expired (its first attempt got a 503)",
            json.loads(delivery_for(live.late_receiver, late, attempt=2)["body"]))

        # Refusals.
        add("error-400-input", "input missing",
            *refused(c, 400, body={"model": "openai/gpt-4o-mini-tts", "voice": "alloy"}))
        add("error-400-format", "A format the provider does not make",
            *refused(c, 400, body={**GEMINI, "voice": "Kore", "response_format": "mp3"}))
        add("error-400-speakers", "A speaker list for a provider without multi-speaker speech",
            *refused(c, 400, body={**OPENAI, "voice": GEMINI["voice"], "fallbacks": None}))
        add("error-400-ttl", "A bad x-bf-async-job-result-ttl",
            *refused(c, 400, body=OPENAI, headers={"x-bf-async-job-result-ttl": "-5"}))
        add("error-400-webhook", "An unknown webhook endpoint",
            *refused(c, 400, body=OPENAI, headers={"x-bf-async-webhook": "nope"}))
        add("error-400-not-json", "A body that is not JSON",
            *refused(c, 400, body='{"model": "openai/tts-1",', headers={"content-type": "application/json"}))
        add("error-400-sse", "Streaming asked for", *refused(c, 400, body={**OPENAI, "stream_format": "sse"}))
        add("error-401-missing-key", "No virtual key", *refused(Client(live.url, None), 401, body=OPENAI))
        add("error-401-unknown-key", "A key that is not configured",
            *refused(Client(live.url, "sk-bf-not-configured"), 401, body=OPENAI))
        add("error-404", "Unknown, expired, or another key's job",
            *refused(c, 404, method="GET", path=f"{SPEECH}/{uuid.uuid4()}"))
        error_405 = refused(c, 405, method="PUT", path=f"{SPEECH}/{openai['id']}", body=OPENAI)
        assert error_405[1].get("allow") == "GET, DELETE", error_405
        add("error-405", "A method the path does not take", *error_405)
        add("error-413", "A body above max_body_bytes",
            *refused(c, 413, body=json.dumps({**OPENAI, "input": "x" * 700_000})))
        add("error-415", "Not JSON", *refused(c, 415, body="hello", headers={"content-type": "text/plain"}))

        # Governance: a key past its expiry, one kept to OpenAI's models, and team-a's limits.
        gone = Client(live.url, EXPIRED_KEY)
        expired = refused(gone, 403, body=OPENAI)
        add("error-403-expired", "A key past its expires_at (every request with it)", *expired)
        assert refused(gone, 403, method="GET", path=USAGE)[0] == expired[0]
        openai_only = Client(live.url, OPENAI_ONLY_KEY)
        add("error-403-model", "A model the key may not use",
            *refused(openai_only, 403, body=ELEVENLABS))
        add("error-403-fallback", "A fallback the key may not use",
            *refused(openai_only, 403, body=OPENAI))
        team_a_examples(Client(live.url, KEY), add)

    # A small Envoy: one call in flight, two jobs at most, and requests without a key let in.
    with running(provider_rules=example_rules, concurrency=1, max_in_flight=1, max_jobs=2,
                 allow_unauthenticated=True, team_a_limits=LIMITS) as narrow:
        n = Client(narrow.url, OTHER_KEY)
        slow = n.submit({**OPENAI, "input": SLOW, "fallbacks": None})["id"]
        add("job-processing", "A job with its provider",
            n.wait(slow, until=lambda j: j["status"] == "processing"))
        waiting = n.submit(OPENAI)["id"]
        add("job-pending", "A job waiting for a free call", n.wait(waiting, until=lambda j: j["status"] == "pending"))
        full = refused(Client(narrow.url, KEY), 503, body=HELLO)
        assert all(r == limit for r, limit in zip(remaining(full[1]), (4, 1000, 5))), full
        add("error-503-full", "The job store is full (max_jobs 2); a key with limits: nothing counted", *full)
        add("usage-no-key", "A request without a virtual key (allow_unauthenticated)",
            *Client(narrow.url, None).answer(200, "GET", USAGE))

    # team-a's budget, spent by one job.
    with running(provider_rules=example_rules, team_a_limits=LIMITS) as spent:
        a = Client(spent.url, KEY)
        clear_of_midnight()
        assert a.wait(a.submit(COSTLY)["id"])["status"] == "completed"
        budget = refused(a, 402, body=HELLO)
        assert remaining(budget[1]) == [3, 700, 0], budget
        add("error-402-budget", "The key's budget for the week is spent (5.4 of 5 cents)", *window_refusal(budget))
    return out


def remaining(headers):
    """What the RateLimit field says remains of each limit, in order."""
    return [r for r, _ in ratelimit(headers).values()]


def window_refusal(answer):
    """A refusal by a window's limit, checked: Retry-After is its RateLimit `t`, and none remains."""
    body, headers = answer
    limit = UNTIL_WINDOW_ENDS[body["error"]["type"]]
    r, t = ratelimit(headers)[limit]
    assert int(headers["retry-after"]) == t, headers
    assert limit == "characters" or r == 0, headers
    return answer


def team_a_examples(a, add):
    """team-a's submits, each refusal in turn: characters, held jobs, requests."""
    clear_of_midnight()
    status, headers, data = a.call("POST", SPEECH, HELLO)
    assert status == 202, (status, data)
    first = json.loads(data)
    add("submit-accepted", "The answer to an accepted submit (of a key with limits)", first, headers)
    assert remaining(headers) == [3, 983, 5], headers
    add("error-429-characters", "An input longer than what is left of the key's characters for the day",
        *window_refusal(refused(a, 429, body={**HELLO, "input": "Read this out. " * 66})))
    # Neither 400 nor 403 tells what remains.
    assert "ratelimit" not in refused(a, 400, body={**HELLO, "speed": 9})[1]
    second = a.submit(HELLO)["id"]
    held = refused(a, 429, body=HELLO)
    assert held[1]["retry-after"] == "1", held
    add("error-429-held", "The key holds max_held_jobs jobs", *held)
    for job in (first["id"], second):
        a.wait(job)
        a.delete(job)
    third = a.submit(HELLO)["id"]
    a.wait(third)
    a.delete(third)
    a.wait(a.submit(HELLO)["id"])
    add("error-429-requests", "The key's requests for the day are used up",
        *window_refusal(refused(a, 429, body=HELLO)))
    add("usage", "A key with every limit, holding one finished job", *a.answer(200, "GET", USAGE))


def delivery_for(receiver, job_id, attempt=1, timeout=20):
    def got():
        mine = [d for d in receiver.got() if json.loads(d["body"])["data"]["job_id"] == job_id]
        return len(mine) >= attempt and mine[attempt - 1]
    return eventually(got, timeout, what=f"attempt {attempt} of the delivery for job {job_id}")


# ------------------------------------------------------------------------ document and check

PATTERNS = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<id>"),
    (re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"), "<time>"),
    (re.compile(r"^msg_[0-9a-f]{32}$"), "<webhook-id>"),
    (re.compile(r"^v1,[A-Za-z0-9+/=]+( v1,[A-Za-z0-9+/=]+)*$"), "<signature>"),
    (re.compile(r"^\d{10}$"), "<unix-time>"),
    # RateLimit: the seconds to a window's end.
    (re.compile(r";t=\d+"), ";t=<s>"),
]


def normalized(value, key=None):
    """`value` with what changes from run to run (ids, times, latencies, signatures) replaced by markers."""
    if isinstance(value, dict):
        return {k: normalized(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if key == "latency" and isinstance(value, int):
        return "<ms>"
    if key == "resets_at":
        return "<window end>"
    if isinstance(value, str):
        for pattern, marker in PATTERNS:
            value = pattern.sub(marker, value)
    return value


def normalized_example(example):
    """`normalized`, and the Retry-After of a refusal by a window's limit (seconds to its end)."""
    out = normalized(example)
    value = example.get("value")
    kind = (value.get("error") or {}).get("type") if isinstance(value, dict) else None
    if kind in UNTIL_WINDOW_ENDS and "retry-after" in out.get("x-headers", {}):
        out["x-headers"]["retry-after"] = "<s>"
    return out


def document_examples(path=DOC):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)["components"]["examples"]


def render(examples):
    """The document's tail: the `examples` member of `components`, in YAML."""
    text = yaml.safe_dump({"examples": examples}, sort_keys=False, allow_unicode=True, width=1 << 20)
    return "".join("  " + line if line.strip() else line for line in text.splitlines(keepends=True))


def write(examples, path=DOC):
    with open(path, encoding="utf-8") as f:
        head, marker, _ = f.read().partition(MARKER)
    assert marker, f"{path} has no line {MARKER.strip()!r}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + MARKER + render(examples))


def differences(live, documented):
    """What the document says that the filter no longer answers, one line each."""
    out = []
    for name in sorted(set(live) | set(documented)):
        if name not in documented:
            out.append(f"{name}: answered live, missing from the document")
        elif name not in live:
            out.append(f"{name}: in the document, no longer captured")
        elif normalized_example(live[name]) != normalized_example(documented[name]):
            out.append(f"{name}: the document has {json.dumps(normalized_example(documented[name]))[:800]}\n"
                       f"    the filter answers {json.dumps(normalized_example(live[name]))[:800]}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    live = capture()
    if args.check:
        diff = differences(live, document_examples())
        print("\n".join(diff) or f"{len(live)} examples hold")
        return 1 if diff else 0
    write(live)
    print(f"wrote {len(live)} examples into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
