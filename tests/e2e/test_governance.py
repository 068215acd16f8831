"""Governance per virtual key, end to end on a real Envoy (and a real etcd):
each refusal with its status, type and headers, the order of the checks,
windows rolling over, characters given back, money charged at the price of
the model that served the job, the usage endpoint, exact counts under
parallel submits, fair dispatch between keys, caps on running jobs and on
calls in flight, and the stats per key and model.

Windows are either short (`2s`, to watch one roll over) or long (`30m`, `1h`,
`1d`) with the test steered clear of their ends, so that every count of a
test falls in one window whatever the hour it runs at.
"""

import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import SPEECH, Client, clusters_for, eventually, plugin_config, stays, stats
from envoy_harness import Envoy, bootstrap, cluster, shipped_stats_config, validate

USAGE = "/v1/async/usage"
HALF_HOUR, HOUR, DAY = 1800, 3600, 86400
# Dollars per million characters, i.e. micro-dollars per character: a
# fallback three times the primary's price, so that a charge tells which
# model served the job.
# The exact entries also name the models in the per-key stats.
PRICING = {"openai/tts-1": 1000.0, "backup/tts-1": 3000.0, "openai/*": 1000.0, "backup/*": 3000.0}


# --- helpers ---------------------------------------------------------------

def vk(name, **settings):
    """A virtual key named `name` whose value is `sk-bf-<name>`."""
    return {"name": name, "value": secret(name), **settings}


def secret(name):
    return f"sk-bf-{name}"


def speech(text="hello", model="openai/tts-1", **fields):
    return {"model": model, "input": text, "voice": "alloy", **fields}


def starts(prefix):
    """A mock rule's body predicate: the provider call's input starts with `prefix`."""
    return lambda body, raw: isinstance(body, dict) and str(body.get("input", "")).startswith(prefix)


def inputs(mock, prefix=""):
    return [r["json"]["input"] for r in mock.recorded() if r["json"] and r["json"]["input"].startswith(prefix)]


def accept(client, name, body):
    r = client.submit(body, key=secret(name))
    assert r.status == 202, r
    return r


def usage(client, name):
    r = client.call("GET", USAGE, key=secret(name))
    assert r.status == 200, r
    return r.json()


def ratelimit(answer):
    """RateLimit-Policy and RateLimit of an answer, merged by limit name:
    {"requests": {"q": 3, "w": 3600, "r": 2, "t": 1613}, ...}; None when the
    answer has neither."""
    policy, now = answer.headers.get("ratelimit-policy"), answer.headers.get("ratelimit")
    if policy is None and now is None:
        return None
    assert policy is not None and now is not None, answer.headers
    fields = {}
    for header in (policy, now):
        for item in header.split(", "):
            name, *params = item.split(";")
            for param in params:
                k, v = param.split("=")
                fields.setdefault(json.loads(name), {})[k] = int(v)
    return fields


def window_end(length_s, at=None):
    """Where the window of `length_s` seconds holding `at` (now) ends, in
    Unix seconds (windows in seconds, minutes, hours and days are aligned to
    multiples of their length since 1970)."""
    at = time.time() if at is None else at
    return (int(at) // length_s + 1) * length_s


def clear_of_window_ends(*lengths_s, need=30):
    """Waits, if need be, until none of these windows ends within `need`
    seconds: a test that needs that long then counts in one window."""
    eventually(lambda: all(window_end(n) - time.time() >= need for n in lengths_s), need + 2, interval=0.2,
               what=f"to be {need} s clear of the end of windows of {lengths_s} s")


def assert_to_window_end(seconds, length_s, before, after):
    """`seconds` is what remained of the window, as the filter saw it some
    time between `before` and `after` (its clock is read in whole seconds)."""
    end = window_end(length_s, before)
    assert end - after - 1 <= seconds <= end - before + 1, (seconds, end - before, end - after)


def refusal(answer, status, kind, param=None):
    """`answer` is the refusal `status` with `error.type` `kind` (and `param`)."""
    assert answer.status == status, answer
    body = answer.json()
    assert (body["status_code"], body["is_bifrost_error"]) == (status, True), body
    assert body["error"]["type"] == kind, body
    assert body["error"].get("param") == param, body
    assert body["error"]["message"], body


def in_parallel(fn, items, threads):
    """fn(item) for every item, `threads` at a time; when there are no more
    items than threads, all start together."""
    items = list(items)
    barrier = threading.Barrier(len(items)) if len(items) <= threads else None

    def run(item):
        if barrier is not None:
            barrier.wait(timeout=10)
        return fn(item)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(run, items))


def most_at_once(records):
    """The most calls the mock held at once, from when each came and when it
    was answered (one not answered yet is still open)."""
    events = [(r["time"], 1) for r in records]
    events += [(r["answered_at"] if r["answered_at"] is not None else math.inf, -1) for r in records]
    most = held = 0
    for _, step in sorted(events):  # an answer sorts before an arrival at the same instant
        held += step
        most = max(most, held)
    return most


def submit_late(*clients):
    """The key "late" submits 5 jobs, one after another, through `clients` in
    turn; returns their ids and when the first was accepted (the mock's clock)."""
    ids, since = [], None
    for i in range(5):
        ids.append(accept(clients[i % len(clients)], "late", speech(f"late {i}")).json()["id"])
        since = since or time.monotonic()
    return ids, since


def assert_started_promptly(mock, since, timeout):
    """The late key's 5 calls are among the first 15 that reach the mock
    after its first submit was accepted. Taken in turn with one other key they
    would be among the first 10; the slack is for calls decided on different
    threads at the same tick, which reach the mock in either order (the exact
    bound for a key's first job has a test of its own). A first-come queue
    would put the whole backlog first."""
    eventually(lambda: len(inputs(mock, "late")) == 5, timeout, what=lambda: f"the late key's calls; got {inputs(mock)}")
    after = sorted((r for r in mock.recorded() if r["time"] >= since), key=lambda r: r["time"])
    timeline = [f"{r['json']['input']} at {r['time'] - since:+.3f} s" for r in after[:20]]
    assert [r["json"]["input"].split()[0] for r in after[:15]].count("late") == 5, timeline


def wait_all(client, name, ids, timeout=20):
    return [client.wait(i, timeout=timeout, key=secret(name)).json() for i in ids]


# --- refusals ----------------------------------------------------------------

REFUSING_KEYS = [
    vk("held", limits={"max_held_jobs": 2, "requests": {"max": 10, "per": "1h"}}),
    vk("reqs", limits={"requests": {"max": 2, "per": "1h"}}),
    vk("chars", limits={"characters": {"max": 10, "per": "30m"}}),
    # 10 characters at openai's 1,000 micro-dollars each: one cent, the whole budget.
    vk("money", limits={"budget": {"max_usd": 0.01, "per": "1d"}}),
    vk("models", allowed_models=["openai/*"], limits={"requests": {"max": 10, "per": "1h"}}),
]


def test_each_refusal_has_its_status_type_and_headers_and_counts_nothing(make_envoy, mock):
    clear_of_window_ends(HALF_HOUR, HOUR, DAY)
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    _, client = make_envoy(virtual_keys=REFUSING_KEYS, pricing=PRICING)
    jobs = []

    def ok(name, body):
        before = time.time()
        r = accept(client, name, body)
        jobs.append((name, r.json()["id"]))
        return r, before, time.time()

    def refused(name, body, status, kind, param=None):
        counted = usage(client, name)
        before = time.time()
        r = client.submit(body, key=secret(name))
        after = time.time()
        refusal(r, status, kind, param)
        assert usage(client, name) == counted, "a refusal counts nothing"
        return r, before, after

    # Held jobs: Retry-After 1, and the RateLimit fields of the key's requests window.
    assert ratelimit(ok("held", speech())[0])["requests"]["r"] == 9
    assert ratelimit(ok("held", speech())[0])["requests"]["r"] == 8
    r, before, after = refused("held", speech(), 429, "held_jobs_limit_exceeded")
    assert r.headers["retry-after"] == "1"
    fields = ratelimit(r)
    assert {k: fields["requests"][k] for k in "qwr"} == {"q": 10, "w": 3600, "r": 8}, fields
    assert_to_window_end(fields["requests"]["t"], HOUR, before, after)

    # Requests: Retry-After to the window's end.
    assert ratelimit(ok("reqs", speech())[0])["requests"]["r"] == 1
    last, before, after = ok("reqs", speech())
    fields = ratelimit(last)["requests"]
    assert (fields["q"], fields["w"], fields["r"]) == (2, 3600, 0), fields
    assert_to_window_end(fields["t"], HOUR, before, after)
    r, before, after = refused("reqs", speech(), 429, "request_limit_exceeded")
    assert_to_window_end(int(r.headers["retry-after"]), HOUR, before, after)
    assert ratelimit(r) == {"requests": {"q": 2, "w": 3600, "r": 0, "t": int(r.headers["retry-after"])}}

    # Characters: a submit that would pass the max is refused whole; one that reaches it is not.
    first, before, after = ok("chars", speech("123456"))
    fields = ratelimit(first)["characters"]
    assert (fields["q"], fields["w"], fields["r"]) == (10, 1800, 4), fields
    assert_to_window_end(fields["t"], HALF_HOUR, before, after)
    r, before, after = refused("chars", speech("12345"), 429, "character_limit_exceeded")
    assert_to_window_end(int(r.headers["retry-after"]), HALF_HOUR, before, after)
    assert ratelimit(r)["characters"]["r"] == 4, "nothing counted"
    assert ratelimit(ok("chars", speech("1234"))[0])["characters"]["r"] == 0

    # Budget, in whole cents: spent once the job completes, then 402 to the day's end.
    paid, before, after = ok("money", speech("0123456789"))
    fields = ratelimit(paid)["budget"]
    assert (fields["q"], fields["w"], fields["r"]) == (1, 86400, 1), "charged at completion, not at submit"
    assert_to_window_end(fields["t"], DAY, before, after)
    assert client.wait(paid.json()["id"], key=secret("money")).json()["status"] == "completed"
    assert usage(client, "money")["limits"]["budget"]["spent_usd"] == 0.01
    r, before, after = refused("money", speech(), 402, "budget_exceeded")
    assert_to_window_end(int(r.headers["retry-after"]), DAY, before, after)
    assert ratelimit(r)["budget"]["r"] == 0

    # Models: 403 naming the field, with neither Retry-After nor RateLimit fields.
    ok("models", speech(fallbacks=["openai/tts-1-hd"]))
    r, _, _ = refused("models", speech(model="backup/tts-1"), 403, "model_blocked", "model")
    assert "retry-after" not in r.headers and ratelimit(r) is None, r.headers
    r, _, _ = refused("models", speech(fallbacks=["openai/tts-1-hd", "backup/tts-1"]), 403, "model_blocked",
                      "fallbacks[1]")
    assert ratelimit(r) is None, r.headers
    # A 400 carries no RateLimit fields either.
    r = client.submit(speech(speed=9), key=secret("models"))
    assert r.status == 400 and ratelimit(r) is None, (r, r.headers)

    for name, job in jobs:
        assert client.wait(job, key=secret(name)).json()["status"] == "completed"
    # Only the 8 accepted jobs ever reached a provider.
    stays(lambda: len(mock.recorded()) == len(jobs) == 8, 0.5, what="the mock to have exactly the accepted jobs")


def test_an_expired_key_is_refused_every_request_even_for_its_own_jobs(make_envoy, mock):
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    # Expires a few seconds from now: time for Envoy to start and one job to
    # run (on a busy machine too), then every request is a 403.
    expires = int(time.time()) + 6
    expires_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    _, client = make_envoy(virtual_keys=[
        vk("soon", expires_at=expires_at, limits={"requests": {"max": 5, "per": "1h"}}),
        vk("past", expires_at="2020-01-01T00:00:00Z", limits={"requests": {"max": 5, "per": "1h"}})])
    job = accept(client, "soon", speech()).json()["id"]
    assert client.wait(job, key=secret("soon")).status == 200
    assert usage(client, "soon")["expires_at"] == expires_at
    eventually(lambda: time.time() >= expires + 0.05, 8, interval=0.1, what="the key's expiry")
    calls = [("POST", SPEECH, speech()), ("GET", f"{SPEECH}/{job}", None), ("GET", f"{SPEECH}/{job}/content", None),
             ("DELETE", f"{SPEECH}/{job}", None), ("GET", USAGE, None)]
    for name in ("soon", "past"):
        for method, path, body in calls:
            r = client.call(method, path, body, key=secret(name))
            refusal(r, 403, "virtual_key_blocked")
            assert ratelimit(r) is None and "retry-after" not in r.headers, (method, path, r.headers)
    assert len(mock.recorded()) == 1, "the refused submits sent nothing upstream"


def test_the_first_check_that_applies_answers(make_envoy, mock):
    clear_of_window_ends(HOUR, DAY)
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    models = ["openai/*"]
    # One job each reaches every limit a key has: "abcd" is 4 of 5 characters,
    # its one request, and 4,000 micro-dollars, the whole budget.
    budget = {"max_usd": 0.004, "per": "1d"}
    keys = [
        vk("k-held", allowed_models=models, limits={"max_held_jobs": 1, "requests": {"max": 1, "per": "1h"},
                                                    "characters": {"max": 5, "per": "1h"}, "budget": budget}),
        vk("k-reqs", allowed_models=models, limits={"requests": {"max": 1, "per": "1h"},
                                                    "characters": {"max": 5, "per": "1h"}, "budget": budget}),
        vk("k-chars", allowed_models=models, limits={"characters": {"max": 5, "per": "1h"}, "budget": budget}),
        vk("k-money", allowed_models=models, limits={"budget": budget}),
        vk("k-free"),
        vk("k-counted", limits={"requests": {"max": 10, "per": "1h"}}),
        vk("k-old", expires_at="2020-01-01T00:00:00Z", allowed_models=models),
    ]
    # The four jobs fill the store too, so that 503 applies to every later submit.
    _, client = make_envoy(virtual_keys=keys, pricing=PRICING, max_jobs=4)
    for name in ("k-held", "k-reqs", "k-chars", "k-money"):
        job = accept(client, name, speech("abcd")).json()["id"]
        assert client.wait(job, key=secret(name)).json()["status"] == "completed"
    for name in ("k-held", "k-reqs", "k-chars", "k-money"):
        assert usage(client, name)["limits"]["budget"]["spent_usd"] == 0.004

    def submit(name, body=None, **kw):
        return client.submit(body or speech("abcd"), key=secret(name) if name else None, **kw)

    blocked_and_bad = speech("abcd", model="backup/tts-1", speed=9)
    refusal(submit("k-free"), 503, "service_unavailable")
    # A full store's 503 is a submit answer too: the RateLimit fields, nothing counted.
    full = submit("k-counted")
    refusal(full, 503, "service_unavailable")
    assert {k: v for k, v in ratelimit(full)["requests"].items() if k != "t"} == {"q": 10, "w": 3600, "r": 10}
    refusal(submit("k-money"), 402, "budget_exceeded")
    refusal(submit("k-chars"), 429, "character_limit_exceeded")
    refusal(submit("k-reqs"), 429, "request_limit_exceeded")
    refusal(submit("k-held"), 429, "held_jobs_limit_exceeded")
    refusal(submit("k-held", speech("abcd", model="backup/tts-1")), 403, "model_blocked", "model")
    refusal(submit("k-held", blocked_and_bad), 400, "invalid_request_error", "speed")
    refusal(submit("k-held", headers={"x-bf-async-job-result-ttl": "soon"}), 400, "invalid_request_error",
            "x-bf-async-job-result-ttl")
    refusal(submit("k-old", blocked_and_bad), 403, "virtual_key_blocked")
    assert submit(None, blocked_and_bad).status == 401
    assert client.submit(blocked_and_bad, key="sk-bf-nobody").status == 401
    stays(lambda: len(mock.recorded()) == 4, 0.5, what="no refused submit to reach the mock")


def test_a_full_window_refuses_until_it_ends_then_accepts(make_envoy, mock):
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    _, client = make_envoy(virtual_keys=[vk("roll", limits={"requests": {"max": 1, "per": "2s"}})])
    # Start early in a 2 s window, so that the refusal below falls in the same one.
    eventually(lambda: 0.05 <= time.time() % 2 <= 0.5, 3, interval=0.01, what="the start of a 2 s window")
    before = time.time()
    first = accept(client, "roll", speech())
    end = window_end(2, before)
    fields = ratelimit(first)["requests"]
    assert (fields["q"], fields["w"], fields["r"]) == (1, 2, 0), fields
    assert_to_window_end(fields["t"], 2, before, time.time())
    tries = []

    def accepted():
        sent = time.time()
        r = client.submit(speech(), key=secret("roll"))
        tries.append((sent, time.time(), r))
        return r.status == 202

    eventually(accepted, 5, interval=0.05, what="a submit accepted in the next window")
    refused = [(sent, got, r) for sent, got, r in tries if r.status != 202]
    assert refused, "the window was full at first"
    for sent, got, r in refused:
        refusal(r, 429, "request_limit_exceeded")
        assert sent < end, f"refused {sent - end:.2f} s after the window ended"
        assert_to_window_end(int(r.headers["retry-after"]), 2, sent, got)
    sent, got, last = tries[-1]
    assert got >= end and sent < end + 1, "accepted once the window ended, not before, not much later"
    assert ratelimit(last)["requests"]["r"] == 0
    assert usage(client, "roll")["limits"]["requests"]["used"] == 1
    mock.wait_for_requests(2)
    stays(lambda: len(mock.recorded()) == 2, 0.3, what="only the two accepted jobs upstream")


# --- characters and money ---------------------------------------------------

def test_characters_come_back_when_a_job_fails_or_is_deleted_before_its_audio(make_envoy, mock):
    clear_of_window_ends(HOUR)
    mock.add_rule("/v1/audio/speech", status=500, body={"error": {"message": "no"}}, match_body=starts("fail"))
    # Held at the provider long enough to delete it while it runs.
    mock.add_rule("/v1/audio/speech", body=b"AUDIO", delay=3, match_body=starts("slow"))
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    # One running job at a time, so that a second one stays pending.
    envoy, client = make_envoy(virtual_keys=[vk("chars", limits={
        "characters": {"max": 30, "per": "1h"}, "max_running_jobs": 1})], pricing={"openai/tts-1": 0})

    def used():
        return usage(client, "chars")["limits"]["characters"]["used"]

    failing = accept(client, "chars", speech("fail-67890"))
    assert ratelimit(failing)["characters"]["r"] == 20
    assert client.wait(failing.json()["id"], key=secret("chars")).json()["status"] == "failed"
    eventually(lambda: used() == 0, 5, what="the failed job's characters back")

    running = accept(client, "chars", speech("slow-67890")).json()["id"]
    mock.wait_for_requests(2)
    pending = accept(client, "chars", speech("pend-67890")).json()["id"]
    assert client.poll(pending, key=secret("chars")).json()["status"] == "pending"
    assert used() == 20
    assert client.call("DELETE", f"{SPEECH}/{pending}", key=secret("chars")).status == 204
    assert used() == 10, "a deleted pending job gives its characters back"
    assert client.poll(running, key=secret("chars")).json()["status"] == "processing"
    assert client.call("DELETE", f"{SPEECH}/{running}", key=secret("chars")).status == 204
    assert used() == 0, "so does one deleted before its provider answered"

    whole = accept(client, "chars", speech("x" * 30))
    assert ratelimit(whole)["characters"]["r"] == 0, "the whole window is back"
    client.wait(whole.json()["id"], key=secret("chars"))
    assert used() == 30
    assert inputs(mock, "pend") == [], "the deleted pending job never went upstream"
    # 60 counted (10 failed, 10 + 10 deleted, 30 kept), 30 of them given back.
    chars = "key.chars.model.openai/tts-1.characters"
    eventually(lambda: (stats(envoy).get(chars), stats(envoy).get(chars + "_returned")) == (60, 30), 5,
               what=lambda: f"the characters counted and given back: {stats(envoy)}")


def test_the_budget_is_charged_at_the_price_of_the_fallback_that_served(make_envoy, mock):
    clear_of_window_ends(DAY)
    mock.add_rule("/v1/audio/speech", status=500, body={"error": {"message": "primary down"}})
    mock.add_rule("/backup/v1/audio/speech", body=b"AUDIO")
    mock.add_rule("/slow/v1/audio/speech", body=b"AUDIO")
    # 5 cents: two 10-character jobs at the fallback's 3 cents each spend it
    # (at the primary's 1 cent, five would be needed).
    envoy, client = make_envoy(virtual_keys=[vk("spender", limits={"budget": {"max_usd": 0.05, "per": "1d"}})],
                               pricing=PRICING)
    # A model without a price costs nothing.
    unpriced = accept(client, "spender", speech("0123456789", model="slow/tts-1"))
    assert client.wait(unpriced.json()["id"], key=secret("spender")).json()["status"] == "completed"
    assert usage(client, "spender")["limits"]["budget"]["spent_usd"] == 0
    body = speech("0123456789", fallbacks=["backup/tts-1"])
    first = accept(client, "spender", body)
    assert ratelimit(first)["budget"]["r"] == 5
    done = client.wait(first.json()["id"], key=secret("spender")).json()
    assert done["result"]["extra_fields"]["provider"] == "backup", done
    assert usage(client, "spender")["limits"]["budget"]["spent_usd"] == 0.03
    second = accept(client, "spender", body)
    assert ratelimit(second)["budget"]["r"] == 2
    client.wait(second.json()["id"], key=secret("spender"))
    # Jobs already accepted run to the end: the spend may pass the max.
    assert usage(client, "spender")["limits"]["budget"] == {
        "max_usd": 0.05, "spent_usd": 0.06, "window": "1d",
        "resets_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(window_end(DAY)))}
    r = client.submit(body, key=secret("spender"))
    refusal(r, 402, "budget_exceeded")
    assert ratelimit(r)["budget"] == {**ratelimit(r)["budget"], "q": 5, "r": 0}
    assert len(mock.recorded()) == 5, "the unpriced job, then two tried on the primary then the fallback"
    s = stats(envoy)
    assert s.get("key.spender.model.backup/tts-1.spend_micros") == 60_000, s
    assert s.get("key.spender.model.openai/tts-1.spend_micros", 0) == 0, s


# --- the usage endpoint -----------------------------------------------------

def test_usage_shows_the_callers_own_key_after_known_traffic(make_envoy, mock):
    clear_of_window_ends(HALF_HOUR, HOUR, DAY)
    mock.add_rule("/v1/audio/speech", status=500, body={"error": {"message": "no"}}, match_body=starts("fail"))
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    limits = {"max_held_jobs": 10, "max_running_jobs": 3, "requests": {"max": 50, "per": "1h"},
              "characters": {"max": 1000, "per": "30m"}, "budget": {"max_usd": 2.5, "per": "1d"}}
    _, client = make_envoy(virtual_keys=[
        vk("team-a", expires_at="2099-06-30T00:00:00Z", limits=limits), vk("team-b", limits=limits),
        vk("plain")], pricing=PRICING, allow_unauthenticated=True)
    # team-a: 5 + 7 characters served by openai (12,000 micro-dollars) and 9 that fail.
    ids = [accept(client, "team-a", speech(text)).json()["id"] for text in ("abcde", "abcdefg", "fail-abcd")]
    assert [j["status"] for j in wait_all(client, "team-a", ids)] == ["completed", "completed", "failed"]
    # team-b's traffic shows in its own usage only.
    b_ids = [accept(client, "team-b", speech("x" * 100)).json()["id"] for _ in range(2)]
    wait_all(client, "team-b", b_ids)

    def resets(length_s):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(window_end(length_s)))

    expected_a = {
        "virtual_key": "team-a", "expires_at": "2099-06-30T00:00:00Z",
        "held_jobs": 3, "running_jobs": 0, "max_held_jobs": 10, "max_running_jobs": 3,
        "limits": {
            "requests": {"max": 50, "used": 3, "window": "1h", "resets_at": resets(HOUR)},
            "characters": {"max": 1000, "used": 12, "window": "30m", "resets_at": resets(HALF_HOUR)},
            "budget": {"max_usd": 2.5, "spent_usd": 0.012, "window": "1d", "resets_at": resets(DAY)}}}
    assert usage(client, "team-a") == expected_a
    # Whatever the request says, the answer is the caller's own key's.
    for path in (f"{USAGE}?virtual_key=team-b", f"{USAGE}/", f"{USAGE}?key={secret('team-b')}"):
        r = client.call("GET", path, key=secret("team-a"))
        assert (r.status, r.json()) == (200, expected_a), path
    b = usage(client, "team-b")
    assert (b["virtual_key"], b["held_jobs"], b["limits"]["requests"]["used"],
            b["limits"]["characters"]["used"], b["limits"]["budget"]["spent_usd"]) == ("team-b", 2, 2, 200, 0.2)
    assert "expires_at" not in b
    # Deleting a finished job frees its hold and nothing else.
    assert client.call("DELETE", f"{SPEECH}/{ids[0]}", key=secret("team-a")).status == 204
    assert usage(client, "team-a") == {**expected_a, "held_jobs": 2}
    # A key without limits, and an owner without a key.
    assert usage(client, "plain") == {"virtual_key": "plain", "held_jobs": 0, "running_jobs": 0, "limits": {}}
    r = client.call("GET", USAGE, key=None)
    assert (r.status, r.json()) == (200, {"virtual_key": None, "limits": {}})
    assert client.call("GET", USAGE, key="sk-bf-nobody").status == 401
    r = client.call("POST", USAGE, {}, key=secret("team-a"))
    assert r.status == 405, r


# --- exact counts, fair dispatch and caps -------------------------------------

def test_parallel_submits_on_two_workers_are_counted_exactly(make_envoy, mock):
    clear_of_window_ends(HOUR)
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    # 60 submits at once against a max of 20: two Envoy workers race for the
    # counter, and a lost update would let more than 20 through.
    envoy, client = make_envoy(virtual_keys=[vk("racer", limits={"requests": {"max": 20, "per": "1h"}})],
                               pricing=PRICING)
    answers = in_parallel(lambda i: client.submit(speech(f"job {i}"), key=secret("racer")), range(60), 60)
    accepted = [r for r in answers if r.status == 202]
    assert len(accepted) == 20, sorted(r.status for r in answers)
    for r in answers:
        if r.status != 202:
            refusal(r, 429, "request_limit_exceeded")
    # Each accepted submit saw its own count: what remained after it, 19 down to 0, once each.
    assert sorted(ratelimit(r)["requests"]["r"] for r in accepted) == list(range(20))
    assert usage(client, "racer")["limits"]["requests"]["used"] == 20
    mock.wait_for_requests(20)
    stays(lambda: len(mock.recorded()) == 20, 0.5, what="exactly the 20 accepted jobs upstream")
    s = stats(envoy)
    assert s["key.racer.model.openai/tts-1.submits"] == 20, s
    assert s["key.racer.model.openai/tts-1.refusals.request_limit_exceeded"] == 40, s


def test_a_late_key_is_not_held_behind_another_keys_backlog(make_envoy, mock):
    mock.add_rule("/v1/audio/speech", body=b"AUDIO", delay=1.0)
    # 2 calls per worker, 2 workers: 4 at once (6 while the main thread takes
    # jobs too, see the max_in_flight test), 1 s each. A backlog of 100 would
    # hold a first-come queue for 15 s or more; taken in turn, the late key's
    # 5 start within a few seconds.
    envoy, client = make_envoy(virtual_keys=[vk("bulk"), vk("late")], max_in_flight=2)
    in_parallel(lambda i: accept(client, "bulk", speech(f"bulk {i}")), range(100), 8)
    mock.wait_for_requests(4)
    late, since = submit_late(client, client)
    assert_started_promptly(mock, since, 15)
    assert all(j["status"] == "completed" for j in wait_all(client, "late", late, timeout=10))


def calls_lasting(first_s, then_s, step_s):
    """A mock answer whose call lasts by the job's number (the input's last
    word): job 0 `first_s`, job k `then_s + k * step_s`, "late" jobs 0.2 s."""
    def answer(record):
        text = record["json"]["input"]
        n = int(text.split()[-1])
        time.sleep(0.2 if text.startswith("late") else first_s if n == 0 else then_s + n * step_s)
        return 200, {"content-type": "audio/mpeg"}, b"AUDIO"

    return answer


def test_a_keys_first_job_starts_before_another_key_has_two_more(make_envoy, mock):
    # Calls of staggered lengths, so that one slot frees at a time and the
    # order of calls at the mock is the order the filter took the jobs in.
    # Every slot is busy when the late key submits; the first to free (bulk
    # 0's, 1.5 s) goes to the backlog's next job, in turn: that is the one
    # "more" allowed. The next slot frees 4.5 s later (bulk 1's, 6 s), long
    # enough for every lane to be looked at by the store's upkeep (one lane
    # of 18 per 200 ms tick): it must go to the late key.
    mock.add_rule("/v1/audio/speech", body=calls_lasting(1.5, 5.5, 0.5))
    providers = {"openai": {"type": "openai", "cluster": "mock", "base_path": "/v1", "timeout_ms": 15000}}
    _, client = make_envoy(virtual_keys=[vk("bulk"), vk("late")], providers=providers, max_in_flight=1)
    for i in range(10):
        accept(client, "bulk", speech(f"bulk {i}"))
    first = mock.wait_for_requests(1)[0]
    assert first["json"]["input"] == "bulk 0"
    # Every slot has taken a job by now (each worker looks for work every 200 ms).
    eventually(lambda: time.monotonic() >= first["time"] + 0.7, 2, what="the slots to fill")
    busy = len(mock.recorded())
    accept(client, "late", speech("late 0"))
    since = time.monotonic()
    eventually(lambda: inputs(mock, "late"), 15, what=lambda: f"the late key's call; got {inputs(mock)}")
    after = sorted((r for r in mock.recorded()[busy:]), key=lambda r: r["time"])
    order = [f"{r['json']['input']} at {r['time'] - since:+.3f} s" for r in after]
    assert [r["json"]["input"] for r in after].index("late 0") <= 1, order


def test_a_key_has_at_most_max_running_jobs_with_providers(make_envoy, mock):
    mock.add_rule("/v1/audio/speech", body=b"AUDIO", delay=1.0)
    envoy, client = make_envoy(virtual_keys=[vk("capped", limits={"max_running_jobs": 2}), vk("free")])
    capped = [accept(client, "capped", speech(f"capped {i}")).json()["id"] for i in range(6)]
    # While the first two run, the other four wait, pending.
    statuses = eventually(
        lambda: sorted(s := [client.poll(j, key=secret("capped")).json()["status"] for j in capped]) ==
        ["pending"] * 4 + ["processing"] * 2 and s, 5, interval=0.02, what="2 processing and 4 pending")
    assert statuses[4:] == ["pending", "pending"], statuses
    assert usage(client, "capped")["running_jobs"] == 2
    # Another key's jobs do not wait behind the capped key's queue: they
    # reach the mock before the capped key's fifth call (which needs two of
    # its 1 s calls to have ended twice over).
    free = [accept(client, "free", speech(f"free {i}")).json()["id"] for i in range(2)]
    eventually(lambda: len(inputs(mock, "free")) == 2, 5, what="the free key's calls")
    assert len(inputs(mock, "capped")) <= 4, inputs(mock)
    wait_all(client, "capped", capped)
    wait_all(client, "free", free)
    assert most_at_once([r for r in mock.recorded() if r["json"]["input"].startswith("capped")]) == 2
    assert usage(client, "capped")["running_jobs"] == 0


def test_max_in_flight_bounds_each_engine_exactly(make_envoy, mock):
    mock.add_rule("/v1/audio/speech", body=b"AUDIO", delay=0.5)
    # One call per engine: Envoy runs one per worker and one on its main
    # thread, so with two workers never more than 3 at the mock. 20 jobs of
    # 0.5 s keep every engine busy for seconds.
    _, client = make_envoy(virtual_keys=[vk("one"), vk("two")], max_in_flight=1)
    jobs = in_parallel(lambda i: (name := ("one", "two")[i % 2], accept(client, name, speech(f"j{i}")).json()["id"]),
                       range(20), 20)
    for name, job in jobs:
        assert client.wait(job, timeout=30, key=secret(name)).json()["status"] == "completed"
    assert len(mock.recorded()) == 20
    assert most_at_once(mock.recorded()) <= 3, [(r["time"], r["answered_at"]) for r in mock.recorded()]


# --- stats per key and model ------------------------------------------------

def test_stats_per_key_and_model_after_known_traffic_with_prometheus_labels(make_envoy, mock):
    clear_of_window_ends(HOUR)
    mock.add_rule("/v1/audio/speech", status=500, body={"error": {"message": "no"}}, match_body=starts("f"))
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    mock.add_rule("/backup/v1/audio/speech", body=b"AUDIO")
    keys = [vk("stat", allowed_models=["openai/*", "backup/*"], limits={"requests": {"max": 4, "per": "1h"}}),
            vk("other")]
    envoy, client = make_envoy(virtual_keys=keys, pricing=PRICING, stats_config=shipped_stats_config(),
                               allow_unauthenticated=True)
    anonymous = client.submit(speech("anon"), key=None)
    assert anonymous.status == 202, anonymous
    client.wait(anonymous.json()["id"], key=None)                              # no key: "none", 4 chars, 4,000 µ$
    jobs = [
        accept(client, "stat", speech("hello")),                                 # openai: 5 chars, 5,000 µ$
        accept(client, "stat", speech("fb-4567", fallbacks=["backup/tts-1"])),   # backup: 7 chars, 21,000 µ$
        accept(client, "stat", speech("fail-6"))]                                # fails: 6 chars come back
    refusal(client.submit(speech(model="elevenlabs/v2"), key=secret("stat")), 403, "model_blocked", "model")
    jobs.append(accept(client, "stat", speech("hi")))                            # openai: 2 chars, 2,000 µ$
    refusal(client.submit(speech(), key=secret("stat")), 429, "request_limit_exceeded")
    jobs.append(accept(client, "other", speech("abc", model="backup/tts-1")))    # another key: 3 chars, 9,000 µ$
    for r, name in zip(jobs, ["stat"] * 4 + ["other"]):
        client.wait(r.json()["id"], key=secret(name))
    expected = {
        "key.stat.model.openai/tts-1.submits": 4,
        "key.stat.model.openai/tts-1.completed": 2,
        "key.stat.model.openai/tts-1.failed": 1,
        "key.stat.model.openai/tts-1.characters": 5 + 7 + 6 + 2,
        "key.stat.model.openai/tts-1.characters_returned": 6,
        "key.stat.model.openai/tts-1.spend_micros": 7_000,
        "key.stat.model.openai/tts-1.refusals.request_limit_exceeded": 1,
        "key.stat.model.backup/tts-1.completed": 1,
        "key.stat.model.backup/tts-1.spend_micros": 21_000,
        "key.stat.model.elevenlabs/other.refusals.model_blocked": 1,
        "key.other.model.backup/tts-1.submits": 1,
        "key.other.model.backup/tts-1.completed": 1,
        "key.other.model.backup/tts-1.characters": 3,
        "key.other.model.backup/tts-1.spend_micros": 9_000,
        "key.none.model.openai/tts-1.submits": 1,
        "key.none.model.openai/tts-1.completed": 1,
        "key.none.model.openai/tts-1.characters": 4,
        "key.none.model.openai/tts-1.spend_micros": 4_000,
    }

    def per_key():
        return {k: v for k, v in stats(envoy).items() if k.startswith("key.") and v != 0}

    eventually(lambda: per_key() == expected, 5, what=lambda: f"the per-key stats; got {per_key()}")
    prometheus = envoy.admin("/stats/prometheus").splitlines()
    for name, value in expected.items():
        _, key, _, model, stat = name.split(".", 4)
        line = f'async_speech_key_model_{stat.replace(".", "_")}{{key="{key}",model="{model}"}} {value}'
        assert line in prometheus, (line, [l for l in prometheus if "key_model" in l])


def test_refusals_before_the_body_count_under_the_callers_key_with_model_none(make_envoy, mock):
    envoy, client = make_envoy(virtual_keys=[vk("live"), vk("gone", expires_at="2020-01-01T00:00:00Z")])
    refusal(client.submit(speech(), key=secret("gone")), 403, "virtual_key_blocked")
    refusal(client.submit(speech(), key=secret("live"), headers={"x-bf-async-job-result-ttl": "-1"}), 400,
            "invalid_request_error", "x-bf-async-job-result-ttl")
    assert client.submit(speech(), key="sk-bf-nobody").status == 401
    s = {k: v for k, v in stats(envoy).items() if k.startswith("key.")}
    assert s == {"key.gone.model.none.refusals.virtual_key_blocked": 1,
                 "key.live.model.none.refusals.invalid_request_error": 1,
                 "key.none.model.none.refusals.authentication_error": 1}, s


def test_a_job_failing_on_its_fallback_gives_its_characters_back_under_its_primary(make_envoy, mock):
    mock.add_rule("/v1/audio/speech", status=500, body={"error": {"message": "no"}})
    mock.add_rule("/backup/v1/audio/speech", status=500, body={"error": {"message": "no either"}})
    envoy, client = make_envoy(virtual_keys=[vk("net")], pricing={"openai/tts-1": 0, "backup/tts-1": 0})
    job = accept(client, "net", speech("123456789", fallbacks=["backup/tts-1"])).json()["id"]
    assert client.wait(job, key=secret("net")).json()["status"] == "failed"
    eventually(lambda: stats(envoy).get("key.net.model.backup/tts-1.failed") == 1, 5, what="the failure counted")
    chars = {k: v for k, v in stats(envoy).items() if k.startswith("key.net.") and ".characters" in k}
    assert chars == {"key.net.model.openai/tts-1.characters": 9,
                     "key.net.model.openai/tts-1.characters_returned": 9}, chars


def test_a_model_the_configuration_does_not_name_counts_as_its_providers_other(make_envoy, mock):
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    envoy, client = make_envoy(virtual_keys=[vk("free")], pricing={"openai/tts-1": 0})
    for model in ("openai/tts-1", "openai/made-up-1", "openai/made-up-2"):
        job = accept(client, "free", speech("abc", model=model)).json()["id"]
        client.wait(job, key=secret("free"))
    eventually(lambda: stats(envoy).get("key.free.model.openai/other.submits") == 2, 5,
               what=lambda: f"two submits under openai/other: {stats(envoy)}")
    names = {k for k in stats(envoy) if k.startswith("key.free.")}
    assert not [n for n in names if "made-up" in n], names
    assert stats(envoy).get("key.free.model.openai/tts-1.submits") == 1


# --- the etcd store: counters shared by replicas ------------------------------

@pytest.fixture
def replicas(etcd, mock):
    """make(n, **overrides): n Envoys on one etcd and one fresh prefix."""
    started = []

    def make(n, **overrides):
        store = {"type": "etcd", "cluster": "etcd", "prefix": f"/gov-{uuid.uuid4().hex[:8]}/", "timeout_ms": 2000}
        config = plugin_config(store=store, **overrides)
        out = []
        for _ in range(n):
            e = Envoy(config, clusters_for(mock) + [cluster("etcd", etcd.client_port)], concurrency=2).start()
            started.append(e)
            out.append((e, Client(e.url)))
        return out

    yield make
    for e in started:
        e.stop()


def test_a_requests_limit_binds_two_replicas_together(replicas, mock):
    clear_of_window_ends(HOUR)
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    (_, ca), (_, cb) = replicas(2, virtual_keys=[vk("shared", limits={"requests": {"max": 10, "per": "1h"}})])
    # One submit after another, to each replica in turn: 10 for both together.
    answers = []
    for i in range(12):
        before = time.time()
        answers.append(((ca, cb)[i % 2].submit(speech(f"job {i}"), key=secret("shared")), before, time.time()))
    assert [r.status for r, _, _ in answers] == [202] * 10 + [429] * 2, [r for r, _, _ in answers]
    assert [ratelimit(r)["requests"]["r"] for r, _, _ in answers] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0]
    for r, before, after in answers[10:]:
        refusal(r, 429, "request_limit_exceeded")
        assert_to_window_end(int(r.headers["retry-after"]), HOUR, before, after)
    wait_all(ca, "shared", [r.json()["id"] for r, _, _ in answers[:10]])
    on_a, on_b = usage(ca, "shared"), usage(cb, "shared")
    assert on_a == on_b, (on_a, on_b)
    assert (on_a["limits"]["requests"]["used"], on_a["held_jobs"], on_a["running_jobs"]) == (10, 10, 0), on_a
    stays(lambda: len(mock.recorded()) == 10, 0.5, what="exactly the 10 accepted jobs upstream")


def test_parallel_submits_to_two_replicas_are_counted_exactly(replicas, mock):
    clear_of_window_ends(HOUR)
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    (_, ca), (_, cb) = replicas(2, virtual_keys=[vk("shared", limits={"requests": {"max": 10, "per": "1h"}})])
    # 30 submits at once, half to each replica, against a max of 10 for both.
    answers = in_parallel(lambda i: (ca, cb)[i % 2].submit(speech(f"job {i}"), key=secret("shared")), range(30), 30)
    assert sorted(r.status for r in answers) == [202] * 10 + [429] * 20, [r for r in answers if r.status != 202]
    accepted = [r for r in answers if r.status == 202]
    for r in answers:
        if r.status != 202:
            refusal(r, 429, "request_limit_exceeded")
    assert sorted(ratelimit(r)["requests"]["r"] for r in accepted) == list(range(10))
    wait_all(ca, "shared", [r.json()["id"] for r in accepted])
    on_a, on_b = usage(ca, "shared"), usage(cb, "shared")
    assert on_a == on_b and on_a["limits"]["requests"]["used"] == 10, (on_a, on_b)
    stays(lambda: len(mock.recorded()) == 10, 0.5, what="exactly the 10 accepted jobs upstream")


def test_characters_come_back_on_failure_across_replicas(replicas, mock):
    clear_of_window_ends(HOUR)
    mock.add_rule("/v1/audio/speech", status=500, body={"error": {"message": "no"}}, match_body=starts("fail"))
    mock.add_rule("/v1/audio/speech", body=b"AUDIO")
    (_, ca), (_, cb) = replicas(2, virtual_keys=[vk("chars", limits={"characters": {"max": 20, "per": "1h"}})])
    failing = accept(ca, "chars", speech("fail-67890"))
    kept = accept(cb, "chars", speech("ok-4567890"))
    assert sorted(ratelimit(r)["characters"]["r"] for r in (failing, kept)) == [0, 10]
    refusal(ca.submit(speech("1"), key=secret("chars")), 429, "character_limit_exceeded")
    assert cb.wait(failing.json()["id"], key=secret("chars")).json()["status"] == "failed"
    assert ca.wait(kept.json()["id"], key=secret("chars")).json()["status"] == "completed"
    eventually(lambda: usage(ca, "chars")["limits"]["characters"]["used"] == 10, 5,
               what="the failed job's characters back")
    assert usage(cb, "chars")["limits"]["characters"]["used"] == 10
    again = accept(cb, "chars", speech("0123456789"))
    assert ratelimit(again)["characters"]["r"] == 0


def test_fair_dispatch_holds_across_replicas(replicas, mock):
    mock.add_rule("/v1/audio/speech", body=b"AUDIO", delay=1.0)
    # One call per worker, two workers per replica, two replicas: 4 at once
    # (6 while main threads take jobs too), 1 s each. A backlog of 40 would
    # hold a first-come queue for 6 s or more; taken in turn, the late key's
    # 5 start within a few seconds.
    (_, ca), (_, cb) = replicas(2, virtual_keys=[vk("bulk"), vk("late")], max_in_flight=1)
    # One after another: parallel submits of one key on etcd are another test's business.
    for i in range(40):
        accept((ca, cb)[i % 2], "bulk", speech(f"bulk {i}"))
    mock.wait_for_requests(4, timeout=15)
    late, since = submit_late(ca, cb)
    assert_started_promptly(mock, since, 20)
    assert all(j["status"] == "completed" for j in wait_all(ca, "late", late, timeout=15))


# --- settings refused at load -------------------------------------------------

@pytest.mark.parametrize("change,message", [
    # A key's name is part of stat names: a dot would split them.
    ({"virtual_keys": [vk("team.a")]}, "virtual_keys[0].name must be 1 to 64"),
    ({"virtual_keys": [{"name": "k" * 65, "value": secret("long")}]}, "virtual_keys[0].name must be 1 to 64"),
    ({"virtual_keys": [vk("a", expires_at="2027-06-30")]}, "virtual_keys[0].expires_at"),
    ({"virtual_keys": [vk("a", allowed_models=["open*ai/x"])]}, "virtual_keys[0].allowed_models[0]"),
    ({"virtual_keys": [vk("a", limits={"requests": {"max": 5, "per": "1x"}})]}, "virtual_keys[0].limits.requests.per"),
    ({"virtual_keys": [vk("a", limits={"requests": {"max": 5, "per": "13M"}})]}, "virtual_keys[0].limits.requests.per"),
    ({"virtual_keys": [vk("a", limits={"characters": {"max": 0, "per": "1d"}})]},
     "virtual_keys[0].limits.characters.max must be between 1"),
    ({"virtual_keys": [vk("a", limits={"budget": {"max_usd": 0, "per": "1M"}})]},
     "virtual_keys[0].limits.budget.max_usd must be above 0"),
    ({"max_jobs": 10, "virtual_keys": [vk("a", limits={"max_held_jobs": 11})]},
     "virtual_keys[0].limits.max_held_jobs must be between 1 and 10"),
    ({"virtual_keys": [vk("a", limits={"max_running_jobs": 65536})]}, "virtual_keys[0].limits.max_running_jobs"),
    ({"virtual_keys": [vk("a", limits={"rps": 5})]}, "unknown field `rps`"),
    ({"pricing": {"openai/tts-1": -1}}, 'pricing["openai/tts-1"]'),
])
def test_a_bad_governance_setting_is_refused_when_envoy_loads_it(change, message, tmp_path):
    path = tmp_path / "bad.json"
    config = bootstrap(plugin_config(**change), [cluster("mock", 1), cluster("down", 2), cluster("app", 3)], 0, 0)
    path.write_text(json.dumps(config))
    code, out = validate(path)
    assert code != 0, out
    assert "configuration rejected" in out and message in out, out[-2000:]


def test_max_running_jobs_holds_across_replicas(replicas, mock):
    mock.add_rule("/v1/audio/speech", body=b"AUDIO", delay=1.0)
    (_, ca), (_, cb) = replicas(2, virtual_keys=[vk("capped", limits={"max_running_jobs": 2})])
    capped = [accept((ca, cb)[i % 2], "capped", speech(f"capped {i}")).json()["id"] for i in range(6)]
    statuses = eventually(
        lambda: sorted(s := [cb.poll(j, key=secret("capped")).json()["status"] for j in capped]) ==
        ["pending"] * 4 + ["processing"] * 2 and s, 10, interval=0.02, what="2 processing and 4 pending")
    assert statuses[4:] == ["pending", "pending"], statuses
    assert usage(ca, "capped")["running_jobs"] == usage(cb, "capped")["running_jobs"] == 2
    wait_all(ca, "capped", capped)
    assert len(mock.recorded()) == 6
    assert most_at_once(mock.recorded()) == 2
    assert usage(cb, "capped")["running_jobs"] == 0
