"""make bench: what the filter costs next to what Envoy does without it.

Every Envoy here is started with the end-to-end tests' harness
(tests/e2e/envoy_harness.py, etcd_harness.py), with one worker
(`--concurrency 1`), so that a submit and its own dispatch share that worker.

- A provider: an Envoy whose `direct_response` answers every request at once
  with 1 KiB of audio (behind the buffer filter, so that it reads the request
  body first and keeps the connection).
- The Envoy under test, two listeners, each with the filter scoped to the
  API's routes as the shipped configs scope it (`disabled: true`, turned on by
  `typed_per_filter_config`), in a VM of its own (so two job stores), beside
  `direct_response` routes as large as the filter's own answers (a completed
  job's poll; a 404) and `/sync`, a plain route to the provider: what a user
  runs without the filter. Listener "a" starts empty; "b" is first filled with
  100,000 completed jobs (1 KiB of audio each), which gives RSS per held job.
  Key "bench" has no limits; key "limited" has requests, characters and budget
  limits far above what the run uses.
- An Envoy whose filter keeps its jobs in a real etcd (etcd_harness).
- Each shipped config with the filter (envoy/sidecar.yaml, envoy/envoy.yaml,
  pointed at loopback) and the same config with the filter taken out: a
  request that is not the API's, through each.
- wrk (-t2 -c32 unless told) drives each scenario for a few seconds. The
  scenarios are grouped with their baselines; each round runs every group,
  the order within a group reversed every other round, and each ratio is the
  median over the rounds of that round's ratio. Submits carry a 1 s TTL, and
  after any scenario that made jobs the runner waits until they all finished
  and expired, so that no scenario pays for another's jobs.
- Submit is measured with its dispatch: the jobs accepted while wrk ran,
  divided by the time from wrk's start until the last of them completed.
  Jobs end to end: each wrk connection submits, and polls each of its jobs
  once it had time to finish (bench/wrk/e2e.lua); jobs per second are
  (jobs accepted and completed + polls that found their job completed) / 2
  per second, so that the jobs between their call and their poll when wrk
  starts and stops count half.
- The soak, twice, each on an Envoy of its own: 50,000 jobs (1 s TTL)
  through a store of 5,000 (`max_jobs`; a 503 is sent again): RSS after the
  first 5,000 and after the last expired, and jobs lost.
- Fair dispatch, on an Envoy of its own in front of a slow mock provider
  (tests/e2e/mock_provider.py, 0.5 to 1.5 s per call, so that calls end one
  by one), `max_in_flight` 20: how long 5 jobs of one key take to reach the
  provider, alone and behind another key's backlog of 200.
- The runtime: V8 (the one the shipped configs name); `--runtimes all`
  runs the table on each runtime this Envoy build accepts.
- Host calls per operation: not measurable from outside Envoy. The native
  test engine::tests::costs counts the store's on the simulated host and
  writes target/host-calls.json (`cargo test`, or `make test`); when it
  exists, its counts are put in the results and the table.
- `--wasm PATH` measures another build (say, of an earlier commit) in the
  same conditions, leaving out the settings it may not know (governance).

With the defaults (3 rounds of 4 s) the whole run takes about 7 minutes on
2 cores. Prints the table (`--markdown`: as Markdown for docs/benchmark.md, with the
date and the command), writes bench/results/<time>.json, exits 0: a missed
goal shows as FAIL in the table, not as an exit status. `--report FILE`
prints the table of an earlier results file; `--parts` runs some parts only
(`--parts soak` is the soak alone). A job that never finishes is reported
(as unfinished, in the log and the results), and the run goes on. To look
into a run, BENCH_WASM_LOG=info (or trace) sets the filter's log level.
"""

import argparse
import base64
import http.client
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from envoy_harness import (  # noqa: E402
    ENVOY, WASM, EnvoyProcess, cluster, enabled_on, http_listener, runnable, validate, wasm_filter)
from etcd_harness import Etcd  # noqa: E402
from mock_provider import MockProvider  # noqa: E402
from waiting import eventually  # noqa: E402

LUA = ROOT / "bench" / "wrk"
RESULTS = ROOT / "bench" / "results"
# The hook for the host-call count per operation, which only the Rust side can
# count (crates/core's simulated host counts every call). The file it writes:
#   {"source": "<how it was counted>",
#    "operations": {"submit": 12, "poll_completed": 6, ...}}
# or, to show a change, each operation as {"before": 31, "after": 12}.
HOST_CALLS = ROOT / "target" / "host-calls.json"

KEY = "sk-bf-bench"
KEY_LIMITED = "sk-bf-bench-limited"
KEY_BACKLOG = "sk-bf-bench-backlog"
KEY_NEWCOMER = "sk-bf-bench-newcomer"
SPEECH = "/v1/async/audio/speech"
BODY = json.dumps({"model": "mock/tts-1", "input": "bench", "voice": "alloy"})
AUDIO = bytes(range(256)) * 4  # 1 KiB
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
# Not an id at all: answered 404 (the same answer as UNKNOWN_ID's) from the path alone.
NOT_AN_ID = "not-a-job"
RUNTIMES = ["envoy.wasm.runtime.v8", "envoy.wasm.runtime.wasmtime", "envoy.wasm.runtime.wamr"]
LONG_TTL = "86400"
SHIPPED = ["sidecar.yaml", "envoy.yaml"]
# Headers that depend on the moment or the connection, not on the answer.
TRANSPORT_HEADERS = {"date", "server", "content-length", "connection", "transfer-encoding", "keep-alive",
                     "x-envoy-upstream-service-time"}
# Per-key limits no run comes near: what checking and counting them costs, never a refusal.
HUGE = 2 ** 53
LIMITS = {"requests": {"max": HUGE, "per": "1d"}, "characters": {"max": HUGE, "per": "1d"},
          "budget": {"max_usd": 1e9, "per": "1M"}}


STARTED = time.monotonic()


def log(msg):
    """Progress, with the minutes and seconds since the start."""
    t = time.monotonic() - STARTED
    print(f"[{int(t // 60):2d}:{int(t % 60):02d}] {msg}", flush=True)


# ------------------------------------------------------------------ configs


# The module under test: the built one, or another build given with --wasm
# (to compare with an earlier commit in the same conditions).
MODULE = WASM


def other_build():
    """Whether the module is another build than this tree's, which may not
    know the settings added since (governance): the bench leaves them out."""
    return Path(MODULE).resolve() != WASM.resolve()


def plugin_config(max_jobs, **extra):
    config = {
        "providers": {"mock": {"type": "openai", "cluster": "provider", "base_path": "/v1", "timeout_ms": 5000}},
        "virtual_keys": [{"name": "bench", "value": KEY},
                         {"name": "limited", "value": KEY_LIMITED, "limits": LIMITS}],
        "pricing": {"mock/*": 15.0},
        "max_jobs": max_jobs,
        "max_result_ttl_s": 86400,
    }
    if other_build():
        config["virtual_keys"] = config["virtual_keys"][:1]
        del config["pricing"]
    config.update(extra)
    return config


def direct(path, status, body_len, headers=()):
    return {
        "match": {"path": path},
        "direct_response": {"status": status, "body": {"inline_string": "x" * body_len}},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for k, v in headers],
    }


def api_route():
    """The API's routes, the only ones the filter runs on (what it does not answer goes to the provider)."""
    return enabled_on({"match": {"prefix": "/v1/async/"}, "route": {"cluster": "provider"}})


def bench_listener(name, config, runtime, answers):
    """The filter (in a VM named after the listener) beside direct_responses
    shaped like its answers, a plain route to the provider, and a small
    direct_response for everything else."""
    routes = [
        api_route(),
        direct("/direct/poll", 200, answers["poll"]["length"], answers["poll"]["headers"]),
        direct("/direct/404", 404, answers["poll_404"]["length"], answers["poll_404"]["headers"]),
        {"match": {"path": "/sync"}, "route": {"cluster": "provider", "prefix_rewrite": "/v1/audio/speech"}},
        direct("/", 200, 2),
    ]
    routes[-1]["match"] = {"prefix": "/"}
    return http_listener(name, routes, [wasm_filter(config, runtime=runtime, vm_id=f"bench_{name}", disabled=True,
                                                    code=MODULE)])


def bootstrap(listeners, clusters):
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


BUFFER = {"name": "envoy.filters.http.buffer", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 65536}}


# The filter's log level in every Envoy (BENCH_WASM_LOG=info or trace, to look into a run).
WASM_LOG = os.environ.get("BENCH_WASM_LOG", "warn")


def start(doc, concurrency=1, cwd=None, env=None):
    """An Envoy on `doc`, with one worker unless told."""
    return EnvoyProcess(json.dumps(doc), "envoy.json", concurrency=concurrency, cwd=cwd, env=env,
                        args=["--log-level", "warn", "--component-log-level", f"wasm:{WASM_LOG}"]).start(timeout=60)


def start_provider():
    """An Envoy answering every request at once with 1 KiB of audio. The
    buffer filter reads the request body before the direct_response answers,
    so that the connection stays open (a direct_response answering a POST
    before its body closes the connection)."""
    route = {"match": {"prefix": "/"},
             "direct_response": {"status": 200, "body": {"inline_bytes": base64.b64encode(AUDIO).decode()}},
             "response_headers_to_add": [{"header": {"key": "content-type", "value": "audio/mpeg"},
                                          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}
    return start(bootstrap([http_listener("provider", [route], [BUFFER])], []))


def without_filter(doc):
    """The same config with the async speech filter and its per-route configs taken out."""
    doc = json.loads(json.dumps(doc))
    names = set()
    for l in doc["static_resources"]["listeners"]:
        for chain in l["filter_chains"]:
            for f in chain["filters"]:
                hcm = f.get("typed_config", {})
                if "http_filters" not in hcm:
                    continue
                kept = []
                for h in hcm["http_filters"]:
                    if h.get("typed_config", {}).get("@type", "").endswith("filters.http.wasm.v3.Wasm"):
                        names.add(h["name"])
                    else:
                        kept.append(h)
                hcm["http_filters"] = kept
                for vh in hcm.get("route_config", {}).get("virtual_hosts", []):
                    for r in vh.get("routes", []):
                        per = r.get("typed_per_filter_config", {})
                        for n in list(per):
                            if n in names:
                                del per[n]
                        if not per:
                            r.pop("typed_per_filter_config", None)
    assert names, "no Wasm filter found"
    return doc


# ------------------------------------------------------------------ clients


def call(port, method, path, body=None, key=KEY, ttl=None):
    """One request on a fresh connection; returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        headers["content-type"] = "application/json"
    if ttl:
        headers["x-bf-async-job-result-ttl"] = ttl
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, [(k.lower(), v) for k, v in r.getheaders()], data
    finally:
        conn.close()


def completed_job(port, ttl=LONG_TTL, timeout=60):
    """Submits one job and waits until it completed; returns its id and the poll's answer."""
    status, _, data = call(port, "POST", SPEECH, BODY, ttl=ttl)
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {data[:300]!r}")
    job_id = json.loads(data)["id"]

    def finished():
        answer = call(port, "GET", f"{SPEECH}/{job_id}")
        return answer if answer[0] != 202 else None

    status, headers, poll = eventually(finished, timeout, what=f"job {job_id} to finish", retry_on=(OSError,))
    if json.loads(poll)["status"] != "completed":
        raise RuntimeError(f"the probe job did not complete: {poll[:500]!r}")
    return job_id, (status, headers, poll)


def shape(answer):
    status, headers, body = answer
    return {"status": status, "length": len(body),
            "headers": [(k, v) for k, v in headers if k not in TRANSPORT_HEADERS]}


# -------------------------------------------------------------------- wrk


def wrk(port, path, seconds, args, script="static.lua", method="GET", body="", key=KEY, ttl="", env=None,
        threads=None, marker="BENCH_RESULT"):
    threads = threads or args.threads
    e = dict(os.environ, BENCH_METHOD=method, BENCH_BODY=body, BENCH_KEY=key, BENCH_TTL=ttl, BENCH_PATH=path)
    e.update(env or {})
    cmd = ["wrk", f"-t{threads}", f"-c{args.connections}", f"-d{seconds}s", "--timeout=5s", "-s", str(LUA / script),
           f"http://127.0.0.1:{port}{path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                            start_new_session=True)
    done_file = e.get("BENCH_DONE_FILE")
    if done_file:
        # count.lua writes done_file once its count is reached; SIGINT makes wrk print and exit.
        deadline = time.monotonic() + seconds
        while proc.poll() is None and time.monotonic() < deadline and not os.path.exists(done_file):
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    m = re.search(rf"^{marker} (\{{.*\}})$", stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result:\n{stdout}\n{stderr}")
    out = json.loads(m.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    out["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    out["seconds"] = out["duration_us"] / 1e6
    return out


def submit_count(port, count, ttl, args, key=KEY, max_seconds=900):
    """Submits until exactly `count` were accepted (refusals are sent again); one wrk thread."""
    fd, done_file = tempfile.mkstemp(prefix="bench-done-")
    os.close(fd)
    os.unlink(done_file)
    try:
        return wrk(port, SPEECH, max_seconds, args, script="count.lua", ttl=ttl, key=key, body=BODY, threads=1,
                   env={"BENCH_COUNT": str(count), "BENCH_FILLER": "/", "BENCH_DONE_FILE": done_file},
                   marker="BENCH_COUNT")
    finally:
        if os.path.exists(done_file):
            os.unlink(done_file)


def finished(s):
    return s.get("jobs_completed", 0) + sum(v for k, v in s.items() if k.startswith("jobs_failed"))


def failed(s):
    return sum(v for k, v in s.items() if k.startswith("jobs_failed"))


def wait_stats(envoy, predicate, timeout, what, interval=0.05):
    return eventually(lambda: (lambda s: predicate(s) and s)(envoy.filter_stats()), timeout, what=what,
                      interval=interval, retry_on=(OSError,))


def settle(envoy, held_at_most=None, timeout=60):
    """Until every accepted job finished (and, given `held_at_most`, the
    short-lived ones expired); after `timeout` s it says what is left and
    goes on (a job that never ends is the filter's failure, reported, not the
    benchmark's)."""
    def done(s):
        return finished(s) >= s.get("jobs_submitted", 0) and (
            held_at_most is None or s.get("jobs_held", 0) <= held_at_most)
    try:
        return wait_stats(envoy, done, timeout, "every job to finish and expire", interval=0.1)
    except AssertionError:
        s = envoy.filter_stats()
        log(f"  warning: after {timeout} s, {s.get('jobs_submitted', 0) - finished(s)} jobs unfinished, "
            f"{s.get('jobs_held', 0)} held (at most {held_at_most} wanted); going on")
        return s


# -------------------------------------------------------------- scenarios


def rate_of(out):
    return {"rate": out["requests"] / out["seconds"], "p50_ms": out["p50_us"] / 1000,
            "p99_ms": out["p99_us"] / 1000, "non2xx": out["non2xx"],
            "errors": out["connect"] + out["read"] + out["write"] + out["timeout"], "wrk": out}


def static(port, path, method="GET", body="", key=KEY):
    def run(seconds, args):
        return rate_of(wrk(port, path, seconds, args, method=method, body=body, key=key))
    return run


def submits(envoy, port, key, held_at_most, settle_s=60, drain_s=None):
    """Submits with their dispatch: the jobs accepted while wrk ran, over the
    time from wrk's start until the last of them finished (or, when some do
    not finish within `drain_s`, the jobs that did, over that time)."""
    def run(seconds, args):
        before = envoy.filter_stats()
        cpu0 = envoy.cpu_s()
        out = wrk(port, SPEECH, seconds, args, method="POST", body=BODY, key=key, ttl="1")
        ended = time.monotonic()
        after = envoy.filter_stats()
        accepted = after.get("jobs_submitted", 0) - before.get("jobs_submitted", 0)
        target = finished(before) + accepted
        try:
            s = wait_stats(envoy, lambda s: finished(s) >= target, drain_s or args.drain_s, f"{accepted} jobs to finish",
                           interval=0.01)
        except AssertionError:
            s = envoy.filter_stats()
        drain = time.monotonic() - ended
        done = min(accepted, finished(s) - finished(before))
        cpu = envoy.cpu_s() - cpu0
        res = rate_of(out)
        # Envoy's CPU for each job, its submit and its dispatch (the HTTP work included).
        res["cpu_us_per_job"] = cpu * 1e6 / max(done, 1)
        res.update({"rate": done / (out["seconds"] + drain), "wrk_rate": res["rate"], "accepted": accepted,
                    "unfinished_at_end": target - finished(after), "drain_s": drain,
                    "unfinished_after_drain": accepted - done, "failed": failed(s) - failed(before)})
        settle(envoy, held_at_most, settle_s)
        return res
    return run


def end_to_end(envoy, port, held_at_most, ttl="1", settle_s=60):
    def run(seconds, args):
        before = envoy.filter_stats()
        lag = 2 * args.connections // args.threads
        out = wrk(port, SPEECH, seconds, args, script="e2e.lua", body=BODY, ttl=ttl, env={"BENCH_LAG": str(lag)},
                  marker="BENCH_E2E")
        after = envoy.filter_stats()
        accepted = after.get("jobs_submitted", 0) - before.get("jobs_submitted", 0)
        called = after.get("jobs_completed", 0) - before.get("jobs_completed", 0)
        # A job is its submit and call, then its poll: each half counts once done,
        # so that the jobs between the two when wrk starts and stops count half.
        res = {"rate": (min(accepted, called) + out["completed"]) / 2 / out["seconds"],
               "p50_ms": out["p50_us"] / 1000,
               "p99_ms": out["p99_us"] / 1000, "non2xx": sum(out["other"].values()),
               "completed": out["completed"], "failed": out["failed"], "accepted": accepted, "called": called,
               "unfinished_polls": out["unfinished"], "lag": out["lag"], "other": out["other"], "wrk": out}
        settle(envoy, held_at_most, settle_s)
        return res
    return run


# ------------------------------------------------------------------- runs


class Run:
    """One runtime: the Envoys, the fill, the rounds."""

    def __init__(self, runtime, args, provider, etcd):
        self.runtime, self.args, self.provider, self.etcd = runtime, args, provider, etcd
        self.envoys = []
        self.res = {"runtime": runtime}

    def start(self, doc, **kw):
        e = start(doc, **kw)
        self.envoys.append(e)
        return e

    def clusters(self):
        return [cluster("provider", self.provider.port)]

    def probe_answers(self):
        """The filter's own answers (status, headers, size), which the direct_responses copy."""
        placeholder = {"poll": {"length": 1, "headers": []}, "poll_404": {"length": 1, "headers": []}}
        e = start(bootstrap([bench_listener("a", plugin_config(100), self.runtime, placeholder)], self.clusters()))
        try:
            _, poll = completed_job(e.port)
            answers = {"poll": shape(poll), "poll_404": shape(call(e.port, "GET", f"{SPEECH}/{UNKNOWN_ID}"))}
        finally:
            e.stop()
        return answers

    def go(self):
        try:
            return self._go()
        finally:
            for e in self.envoys:
                e.stop()

    def _go(self):
        a, res = self.args, self.res
        parts = set(a.parts)
        answers = self.probe_answers()
        res["answers"] = answers
        log(f"  the filter's answers: completed poll {answers['poll']['length']} B, 404 {answers['poll_404']['length']} B")
        listeners = [bench_listener("a", plugin_config(a.max_jobs), self.runtime, answers)]
        if "held" in parts:
            listeners.append(bench_listener("b", plugin_config(a.held + 1000), self.runtime, answers))
        main = self.start(bootstrap(listeners, self.clusters()))
        port_a = main.ports["a"]
        groups = {}
        if "polls" in parts or "held" in parts or "submits" in parts:
            poll_id, poll = completed_job(port_a)
            if shape(poll)["length"] != answers["poll"]["length"]:
                log(f"  warning: this completed poll is {shape(poll)['length']} B, the direct_response "
                    f"{answers['poll']['length']} B")
        held = 1
        if "held" in parts:
            held = self.fill(main)
            poll_id_b, poll_b = completed_job(main.ports["b"])
            res["answers"]["poll_b_length"] = shape(poll_b)["length"]
            held += 1
        settle(main, held)
        if "polls" in parts or "held" in parts:
            g = {"direct_poll": static(port_a, "/direct/poll")}
            if "polls" in parts:
                g.update({"poll_completed": static(port_a, f"{SPEECH}/{poll_id}"),
                          "direct_404": static(port_a, "/direct/404"),
                          "poll_404": static(port_a, f"{SPEECH}/{UNKNOWN_ID}"),
                          # The cheapest answer the filter gives (no store call): the floor of any.
                          "floor_404": static(port_a, f"{SPEECH}/{NOT_AN_ID}")})
            if "held" in parts:
                g["poll_completed_held"] = static(main.ports["b"], f"{SPEECH}/{poll_id_b}")
            groups["polls"] = g
        if "submits" in parts:
            groups["submits"] = {
                "sync": static(port_a, "/sync", "POST", BODY),
                "submit": submits(main, port_a, KEY, held),
                **({} if other_build() else {"submit_limited": submits(main, port_a, KEY_LIMITED, held)}),
                "e2e": end_to_end(main, port_a, held),
            }
        if "etcd" in parts:
            groups["etcd"] = self.etcd_group()
        if "shipped" in parts:
            for name in SHIPPED:
                groups[name] = self.shipped_group(name)
        if groups:
            res["scenarios"] = self.rounds(groups)
        res["rss_end_kib"] = main.rss_kib()
        res["errors_in_log"] = [line for e in self.envoys for line in e.log().splitlines()
                                if "error" in line.lower() or "critical" in line.lower()][:20]
        for e in self.envoys:
            e.stop()
        self.envoys = []
        if "soak" in parts:
            res["soak"] = [self.soak(i) for i in range(a.soak_runs)]
        if "fairness" in parts:
            res["fairness"] = fairness(self.runtime, a)
        return res

    def fill(self, main):
        """Fills store "b" with completed jobs; RSS per held job."""
        a = self.args
        port = main.ports["b"]
        settle(main, 1)
        rss0 = main.rss_kib()
        before = main.filter_stats()
        t0 = time.monotonic()
        out = submit_count(port, a.held, LONG_TTL, a)
        target = finished(before) + a.held
        s = wait_stats(main, lambda s: finished(s) >= target, 600, f"{a.held} jobs to complete", interval=0.1)
        seconds = time.monotonic() - t0
        # Let what the filling left behind (timers, buffers) be freed before reading RSS.
        time.sleep(1)
        rss1 = main.rss_kib()
        s = main.filter_stats()
        per_job = (rss1 - rss0) * 1024 / a.held
        self.res["fill"] = {"jobs": a.held, "accepted": out["accepted"], "refused": out["refused"],
                            "seconds": seconds, "jobs_held": s.get("jobs_held"), "failed": failed(s) - failed(before),
                            "rss_before_kib": rss0, "rss_after_kib": rss1, "rss_per_held_job_bytes": per_job}
        log(f"  filled {a.held:,} jobs in {seconds:.1f} s; RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB "
            f"({per_job:,.0f} B per held job)")
        return s.get("jobs_held", 0)

    def etcd_group(self):
        store = {"type": "etcd", "cluster": "etcd", "prefix": f"/bench-{os.getpid()}-{time.time_ns()}/",
                 "timeout_ms": 2000}
        answers = self.res["answers"]
        e = self.start(bootstrap([bench_listener("c", plugin_config(self.args.max_jobs, store=store), self.runtime,
                                                 answers)], self.clusters() + [cluster("etcd", self.etcd.client_port)]))
        port = e.port
        poll_id, _ = completed_job(port)
        return {
            "etcd_submit": submits(e, port, KEY, None, settle_s=5, drain_s=5),
            "etcd_poll": static(port, f"{SPEECH}/{poll_id}"),
            # etcd's lease TTLs are whole seconds and a job takes several etcd round trips:
            # a longer TTL, so that a job is never gone before its poll.
            "etcd_e2e": end_to_end(e, port, None, ttl="30", settle_s=5),
        }

    def shipped_group(self, name):
        """A request that is not the API's, through the shipped config and through it without the filter."""
        doc = runnable(yaml.safe_load((ROOT / "envoy" / name).read_text()), self.provider.port)
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        short = name.split(".")[0]
        with_filter = self.start(doc, cwd=ROOT, env=env)
        bare = self.start(without_filter(doc), cwd=ROOT, env=env)
        # Not the API's, and not in the filter's VM: the app's own traffic (sidecar) or the fixed reply (envoy).
        return {f"{short}_bare": static(bare.port, "/app/page"), short: static(with_filter.port, "/app/page")}

    def rounds(self, groups):
        a = self.args
        names = [n for g in groups.values() for n in g]
        out = {n: [] for n in names}
        log(f"  warm-up: every scenario for {a.warmup} s")
        for g in groups.values():
            for n, run in g.items():
                run(a.warmup, a)
        for r in range(a.rounds):
            order = list(groups)
            order = order[r % len(order):] + order[:r % len(order)]
            for gname in order:
                scen = list(groups[gname].items())
                if r % 2:
                    scen.reverse()
                for n, run in scen:
                    x = run(a.seconds, a)
                    out[n].append(x)
                    extra = ""
                    if "drain_s" in x:
                        extra = (f"  (wrk {x['wrk_rate']:,.0f}/s; {x['accepted']:,} accepted, "
                                 f"{x['unfinished_at_end']:,} unfinished when wrk ended, "
                                 f"{x['unfinished_after_drain']:,} {x['drain_s']:.2f} s later; "
                                 f"Envoy CPU {x['cpu_us_per_job']:.0f} µs a job)")
                    elif "unfinished_polls" in x:
                        extra = (f"  ({x['accepted']:,} accepted, {x['completed']:,} polled completed, "
                                 f"{x['unfinished_polls']:,} polls too early, lag {x['lag']})")
                    log(f"  round {r + 1} {n:20s} {x['rate']:9,.0f}/s  p50 {x['p50_ms']:6.2f} ms  "
                        f"p99 {x['p99_ms']:6.2f} ms  non-2xx {x.get('non2xx', 0)}{extra}")
        return out

    def soak(self, i):
        """50,000 jobs, 1 s TTL, through a store of 5,000: RSS growth and jobs lost."""
        a = self.args
        e = self.start(bootstrap([bench_listener("soak", plugin_config(a.soak_max_jobs), self.runtime, {
            "poll": {"length": 2, "headers": []}, "poll_404": {"length": 2, "headers": []}})], self.clusters()))
        try:
            t0 = time.monotonic()
            first = submit_count(e.port, a.soak_first, "1", a)
            wait_stats(e, lambda s: finished(s) >= first["accepted"], 120, "the first jobs to finish")
            rss_first = e.rss_kib()
            rest = submit_count(e.port, a.soak_jobs - a.soak_first, "1", a)
            accepted = first["accepted"] + rest["accepted"]
            s = wait_stats(e, lambda s: finished(s) >= accepted, 300, "every soak job to finish", interval=0.1)
            seconds = time.monotonic() - t0
            s = wait_stats(e, lambda s: s.get("jobs_held", 0) == 0
                           and s.get("jobs_expired", 0) + s.get("jobs_deleted", 0) >= accepted, 120,
                           "every soak job to expire", interval=0.1)
            rss_last = e.rss_kib()
        finally:
            e.stop()
            self.envoys.remove(e)
        refused = {}
        for part in (first, rest):
            for k, v in part["refused"].items():
                refused[k] = refused.get(k, 0) + v
        out = {"jobs": a.soak_jobs, "store": a.soak_max_jobs, "accepted": accepted, "refused_sent_again": refused,
               "completed": s.get("jobs_completed"), "failed": failed(s),
               "lost": accepted - s.get("jobs_completed", 0) - failed(s), "expired": s.get("jobs_expired"),
               "rss_first_kib": rss_first, "rss_last_kib": rss_last,
               "growth_pct": 100.0 * (rss_last - rss_first) / rss_first, "seconds": seconds,
               "jobs_per_s": s.get("jobs_completed", 0) / seconds}
        log(f"  soak {i + 1}: {accepted:,} accepted, {out['lost']} lost, {out['expired']:,} expired, RSS "
            f"{rss_first / 1024:.1f} -> {rss_last / 1024:.1f} MiB ({out['growth_pct']:+.1f} %), "
            f"{out['jobs_per_s']:,.0f} jobs/s")
        return out


def fairness(runtime, a):
    """Key "backlog" submits a.fair_backlog slow jobs, then key "newcomer" submits
    a.fair_jobs: how long the newcomer's jobs take to reach the provider, with
    that backlog and alone."""
    mock = MockProvider().start()
    spread = random.Random(7)

    def slow_answer(record):
        # Between half and one and a half times fair_call_s, so that the slots free one by one.
        time.sleep(a.fair_call_s * spread.uniform(0.5, 1.5))
        return 200, {"content-type": "audio/mpeg"}, AUDIO

    mock.add_rule(path_prefix="/v1/audio/speech", body=slow_answer)
    config = {
        "providers": {"slow": {"type": "openai", "cluster": "slow", "base_path": "/v1", "timeout_ms": 60000}},
        "virtual_keys": [{"name": "backlog", "value": KEY_BACKLOG}, {"name": "newcomer", "value": KEY_NEWCOMER}],
        "max_in_flight": a.fair_in_flight,
        "max_jobs": 10000,
    }
    routes = [api_route(), {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]
    routes[0]["route"]["cluster"] = "slow"
    e = start(bootstrap([http_listener("fair", routes, [wasm_filter(config, runtime=runtime, vm_id="bench_fair",
                                                                     disabled=True, code=MODULE)])],
                        [cluster("slow", mock.port)]))
    out = {"backlog": a.fair_backlog, "jobs": a.fair_jobs, "call_s": a.fair_call_s, "max_in_flight": a.fair_in_flight,
           "rounds": []}

    def body(tag):
        return json.dumps({"model": "slow/tts-1", "input": tag, "voice": "alloy"})

    def submit_all(key, tags):
        conn = http.client.HTTPConnection("127.0.0.1", e.port, timeout=15)
        sent = {}
        try:
            for tag in tags:
                sent[tag] = time.monotonic()
                conn.request("POST", SPEECH, body=body(tag),
                             headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if r.status != 202:
                    raise RuntimeError(f"submit answered {r.status}: {data[:300]!r}")
        finally:
            conn.close()
        return sent

    def started(tags):
        """When the mock had each job's request."""
        def seen():
            got = {r["json"]["input"]: r["time"] for r in mock.recorded() if r.get("json") and r["json"].get("input") in tags}
            return len(got) == len(tags) and got
        return eventually(seen, 60 + a.fair_backlog * a.fair_call_s / a.fair_in_flight,
                          what="the newcomer's jobs to reach the provider", interval=0.005)

    def newcomer(tag):
        in_flight = e.filter_stats().get("jobs_in_flight", 0)
        tags = [f"{tag}-{i}" for i in range(a.fair_jobs)]
        sent = submit_all(KEY_NEWCOMER, tags)
        at = started(tags)
        waits = [at[t] - sent[t] for t in tags]
        first_sent = min(sent.values())
        # The keys of the calls that reached the provider after the first of these submits, in order
        # (n: this key, b: the backlog's), up to this key's last.
        after = sorted((r["time"], "n" if r["json"]["input"] in sent else "b") for r in mock.recorded()
                       if r.get("json") and r["time"] >= first_sent)
        order = "".join(k for _, k in after)
        order = order[:order.rfind("n") + 1]
        timeline = [(k, round((t - first_sent) * 1000, 1)) for t, k in after[:len(order)]]
        return {"waits_s": waits, "max_s": max(waits), "median_s": statistics.median(waits), "order": order,
                "in_flight_at_submit": in_flight, "backlog_before_first": order.find("n"),
                "backlog_between": order[order.find("n"):].count("b"),
                "timeline_ms": timeline}

    try:
        for r in range(a.fair_rounds):
            alone = newcomer(f"r{r}-alone")
            settle(e)
            backlog = [f"r{r}-with-backlog-{i}" for i in range(a.fair_backlog)]
            # The newcomer's submits follow the backlog's at once, as in a client's day.
            submit_all(KEY_BACKLOG, backlog)
            behind = newcomer(f"r{r}-with")
            out["rounds"].append({"alone": alone, "with_backlog": behind})
            log(f"  fairness round {r + 1}: the newcomer's {a.fair_jobs} jobs reached the provider within "
                f"{alone['max_s'] * 1000:,.0f} ms alone, {behind['max_s'] * 1000:,.0f} ms behind "
                f"{a.fair_backlog} jobs of another key ({behind['in_flight_at_submit']} of them with the provider); "
                f"the calls from its submit on, in the order they came (n newcomer, b backlog): {behind['order']}")
            settle(e, timeout=120 + a.fair_backlog * a.fair_call_s / a.fair_in_flight)
    finally:
        e.stop()
        mock.stop()
    out["alone_max_s"] = statistics.median(x["alone"]["max_s"] for x in out["rounds"])
    out["with_backlog_max_s"] = statistics.median(x["with_backlog"]["max_s"] for x in out["rounds"])
    return out


def accepted_runtimes(wanted):
    """Which runtimes this Envoy build takes: validate a bootstrap with each."""
    ok = []
    placeholder = {"poll": {"length": 1, "headers": []}, "poll_404": {"length": 1, "headers": []}}
    workdir = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    try:
        for rt in wanted:
            path = workdir / f"{rt}.json"
            path.write_text(json.dumps(bootstrap([bench_listener("p", plugin_config(10), rt, placeholder)],
                                                 [cluster("provider", 1)])))
            code, output = validate(path)
            why = [l for l in output.splitlines() if "Failed to create Wasm VM" in l]
            if code == 0:
                ok.append(rt)
            elif why:
                log(f"runtime {rt}: not accepted by this Envoy build: {why[0].split('] ')[-1][:200]}")
            else:
                raise RuntimeError(f"the benchmark's bootstrap does not validate with {rt}:\n{output[-3000:]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ok


def envoy_version():
    out = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version: \S+?/(\d+\.\d+\.\d+)/", out)
    return m.group(1) if m else out.strip()


def host_calls(path):
    """The host-call counts the Rust side wrote (HOST_CALLS), or None."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        return {"error": f"{path}: {e}"}


# ------------------------------------------------------------------ table


def median_ratio(sc, fig, base):
    """The median over the rounds of fig/base, each round's own pair."""
    ratios = [f["rate"] / b["rate"] for f, b in zip(sc[fig], sc[base]) if b["rate"]]
    return statistics.median(ratios) if ratios else float("nan")


def rows_of(res, args):
    """(figure, measured, baseline, ratio, goal, verdict) for every row of the table."""
    rows = []
    sc = res.get("scenarios", {})

    def med(n, key="rate"):
        return statistics.median(x[key] for x in sc[n])

    def p(n):
        return f"p50 {med(n, 'p50_ms'):.2f} ms, p99 {max(x['p99_ms'] for x in sc[n]):.2f} ms"

    def ratio_row(figure, fig, base, base_label, goal, unit="req/s", base_unit="req/s"):
        if fig not in sc or base not in sc:
            return
        r = median_ratio(sc, fig, base)
        rows.append((figure, f"{med(fig):,.0f} {unit} ({p(fig)})", f"{base_label}: {med(base):,.0f} {base_unit}",
                     f"{r:.2f}", f"≥ {goal}", "PASS" if r >= goal else "FAIL"))

    ans = res.get("answers", {})
    poll_len = ans.get("poll", {}).get("length", "?")
    ratio_row("poll of a completed job", "poll_completed", "direct_poll",
              f"`direct_response` of {poll_len} B", 0.9)
    ratio_row("poll of an unknown id (404)", "poll_404", "direct_404",
              f"`direct_response` 404 of {ans.get('poll_404', {}).get('length', '?')} B", 0.9)
    if "floor_404" in sc and "direct_404" in sc:
        r = median_ratio(sc, "floor_404", "direct_404")
        rows.append(("bound: the filter's cheapest answer (404 from the path alone, no store call)",
                     f"{med('floor_404'):,.0f} req/s ({p('floor_404')})",
                     f"`direct_response` 404: {med('direct_404'):,.0f} req/s", f"{r:.2f}", "", ""))
    ratio_row("submit, with its own dispatch on the same worker", "submit", "sync",
              "the synchronous route to the same provider", 0.8, "jobs/s")
    if "submit" in sc and all("cpu_us_per_job" in x for x in sc["submit"]):
        rows.append(("Envoy CPU per submitted job (its submit and dispatch, HTTP included)",
                     f"{med('submit', 'cpu_us_per_job'):,.0f} µs", "", "", "", ""))
    ratio_row("jobs end to end (submit, provider call, one poll)", "e2e", "sync",
              "the synchronous route", 0.65, "jobs/s")
    if "fill" in res:
        ratio_row(f"poll of a completed job, {res['fill']['jobs']:,} held", "poll_completed_held", "direct_poll",
                  f"`direct_response` of {poll_len} B", 0.85)
    for name in SHIPPED:
        short = name.split(".")[0]
        ratio_row(f"a request that is not the API's, through `{name}`", short, f"{short}_bare",
                  f"`{name}` without the filter", 0.97)
    if "fill" in res:
        b = res["fill"]["rss_per_held_job_bytes"]
        rows.append(("RSS per held completed job (1 KiB of audio)", f"{b:,.0f} B",
                     f"{res['fill']['jobs']:,} jobs held: {res['fill']['rss_before_kib'] / 1024:.1f} → "
                     f"{res['fill']['rss_after_kib'] / 1024:.1f} MiB", "", "≤ 2,000 B", "PASS" if b <= 2000 else "FAIL"))
    for i, so in enumerate(res.get("soak", [])):
        ok = so["growth_pct"] <= 5 and so["lost"] == 0
        rows.append((f"soak {i + 1}: RSS growth over {so['jobs']:,} jobs through a {so['store']:,}-job store",
                     f"{so['growth_pct']:+.1f} %",
                     f"{so['rss_first_kib'] / 1024:.1f} → {so['rss_last_kib'] / 1024:.1f} MiB; {so['lost']} lost",
                     "", "≤ 5 %, 0 lost", "PASS" if ok else "FAIL"))
    ratio_row("submit by a key with requests, characters and budget limits", "submit_limited", "submit",
              "submit by a key without limits", 0.8, "jobs/s", "jobs/s")
    if "fairness" in res:
        f = res["fairness"]
        at_once = max(max(x["with_backlog"]["order"].count("b"), x["with_backlog"]["in_flight_at_submit"])
                      for x in f["rounds"]) or 1
        fifo = f["backlog"] / at_once * f["call_s"]
        rows.append((f"fair dispatch: {f['jobs']} jobs of a key submitted right after {f['backlog']} of another "
                     f"({f['call_s'] / 2:g} to {f['call_s'] * 1.5:g} s a call, max_in_flight {f['max_in_flight']})",
                     f"all started within {f['with_backlog_max_s'] * 1000:,.0f} ms; of the backlog's, "
                     f"{statistics.median(x['with_backlog']['backlog_before_first'] for x in f['rounds']):g} "
                     f"started after their submits and before the first of them, "
                     f"{statistics.median(x['with_backlog']['backlog_between'] for x in f['rounds']):g} "
                     f"between the first and the last",
                     f"alone: within {f['alone_max_s'] * 1000:,.0f} ms (in turn after the backlog: ~{fifo:,.0f} s)",
                     "", "report both", ""))
    for fig, base, label in (("etcd_submit", "submit", "submit"), ("etcd_poll", "poll_completed", "poll"),
                             ("etcd_e2e", "e2e", "jobs end to end")):
        if fig in sc and base in sc:
            unit = "req/s" if fig == "etcd_poll" else "jobs/s"
            rows.append((f"etcd store: {label}", f"{med(fig):,.0f} {unit} ({p(fig)})",
                         f"shared data: {med(base):,.0f} {unit}", f"{median_ratio(sc, fig, base):.2f}", "", ""))
    hc = res.get("host_calls")
    if hc and "error" not in hc:
        for op, n in hc.get("operations", hc).items():
            if isinstance(n, dict):
                rows.append((f"host calls: {op}", f"{n.get('after', '?')}", f"before: {n.get('before', '?')}", "", "", ""))
            elif isinstance(n, (int, float)):
                rows.append((f"host calls: {op}", f"{n}", "", "", "", ""))
    # What the ratios are taken against, as measured.
    for n, label in (("direct_poll", "`direct_response`, completed-poll sized"),
                     ("direct_404", "`direct_response`, 404 sized"), ("sync", "synchronous route to the provider")):
        if n in sc:
            rows.append((f"baseline: {label}", f"{med(n):,.0f} req/s ({p(n)})", "", "", "", ""))
    return rows


HEAD = ("figure", "measured", "against", "ratio", "goal", "")


def plain_table(rows):
    widths = [max(len(str(r[i])) for r in rows + [HEAD]) for i in range(len(HEAD))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(HEAD, widths)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def markdown_table(rows):
    esc = [tuple(str(c).replace("|", "\\|") for c in r) for r in rows]
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def setup_line(results):
    a = results["args"]
    return (f"Envoy {results['envoy_version']}, one worker (`--concurrency 1`) per Envoy; "
            f"wrk -t{a['threads']} -c{a['connections']}, {a['rounds']} rounds of {a['seconds']} s per scenario "
            f"(medians; each ratio the median of the rounds' own ratios; p99 the worst round's); "
            f"{results['cpus']} cores, shared with other work while it ran")


def report(results, markdown=False):
    out = []
    for res in results["runs"]:
        if "error" in res:
            out.append(f"{res['runtime']}: failed: {res['error']}")
            continue
        rows = rows_of(res, results["args"])
        if markdown:
            out.append(f"Measured on {results['started'][:10]} with `{results['command']}` "
                       f"({res['runtime'].rsplit('.', 1)[-1]}): {setup_line(results)}.\n")
            out.append(markdown_table(rows))
        else:
            out.append(f"== {res['runtime']}: {setup_line(results)}")
            out.append(plain_table(rows))
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------- main


PARTS = ["polls", "held", "submits", "etcd", "shipped", "soak", "fairness"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default="v8", help="comma-separated (v8, wasmtime, wamr, or all)")
    ap.add_argument("--wasm", default=str(WASM),
                    help="the module to measure (another build, e.g. of an earlier commit, to compare with "
                         "this one; settings it may not know, governance, are left out)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    ap.add_argument("--seconds", type=int, default=4, help="seconds per scenario per round")
    ap.add_argument("--warmup", type=int, default=1, help="seconds per scenario before the rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--drain-s", type=float, default=20,
                    help="how long a submit scenario waits for its jobs to finish")
    ap.add_argument("--max-jobs", type=int, default=200_000, help="max_jobs of the stores the rounds use")
    ap.add_argument("--held", type=int, default=100_000, help="completed jobs held in store b")
    ap.add_argument("--soak-jobs", type=int, default=50_000)
    ap.add_argument("--soak-first", type=int, default=5_000)
    ap.add_argument("--soak-max-jobs", type=int, default=5_000)
    ap.add_argument("--soak-runs", type=int, default=2)
    ap.add_argument("--fair-backlog", type=int, default=200)
    ap.add_argument("--fair-jobs", type=int, default=5)
    ap.add_argument("--fair-call-s", type=float, default=1.0,
                    help="seconds the slow provider takes per call, on average (half to one and a half times it)")
    ap.add_argument("--fair-in-flight", type=int, default=20, help="max_in_flight of the fairness Envoy")
    ap.add_argument("--fair-rounds", type=int, default=2)
    ap.add_argument("--host-calls", default=str(HOST_CALLS), help="host-call counts written by the Rust side")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    ap.add_argument("--report", metavar="RESULTS_JSON", help="print the table of an earlier run and exit")
    args = ap.parse_args()

    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(report(results, markdown=args.markdown))
        return 0
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        sys.exit(f"bench: unknown parts {sorted(unknown)}; known: {PARTS}")
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is missing (make bench installs it from Debian)")
    global MODULE
    MODULE = Path(args.wasm).resolve()
    if not MODULE.exists():
        sys.exit(f"bench: {MODULE} is missing; make build first")
    wanted = RUNTIMES if args.runtimes == "all" else [
        r if r.startswith("envoy.") else f"envoy.wasm.runtime.{r}" for r in args.runtimes.split(",") if r]
    command = "make bench" + (f" BENCH_ARGS=\"{' '.join(sys.argv[1:])}\"" if sys.argv[1:] else "")
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
               "envoy_version": envoy_version(),
               "args": vars(args), "cpus": os.cpu_count(), "load_before": os.getloadavg(), "runs": []}
    # Counted on this tree's code: not another build's.
    results["host_calls"] = None if other_build() else host_calls(args.host_calls)
    t0 = time.monotonic()
    runtimes = accepted_runtimes(wanted)
    log(f"runtimes accepted: {', '.join(runtimes) or 'none'}")
    provider = start_provider()
    etcd = Etcd().start() if "etcd" in args.parts else None
    try:
        for rt in runtimes:
            log(f"== {rt}")
            try:
                res = Run(rt, args, provider, etcd).go()
                res["host_calls"] = results["host_calls"]
                results["runs"].append(res)
            except Exception as e:  # a runtime that fails is reported, not fatal
                log(f"  {rt} failed: {e}")
                results["runs"].append({"runtime": rt, "error": str(e)[:3000]})
    finally:
        provider.stop()
        if etcd:
            etcd.stop()
    results["seconds"] = time.monotonic() - t0
    results["load_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"{time.strftime('%Y%m%dT%H%M%S')}.json"
    out_path.write_text(json.dumps(results, indent=1))
    print("")
    print(report(results))
    if args.markdown:
        print(report(results, markdown=True))
    if results["host_calls"] is None and not other_build():
        log(f"host calls per operation: {args.host_calls} not found (the Rust side writes it); not in the table")
    log(f"results: {out_path.relative_to(ROOT)} ({results['seconds'] / 60:.1f} min; load average "
        f"{results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
