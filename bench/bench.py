"""make bench: the filter against direct_response and a plain route, on one Envoy.

For each Wasm runtime this Envoy build accepts (V8, WAMR, wasmtime), one run:

- a mock provider: a second Envoy (own --base-id, --concurrency 1) whose
  direct_response answers every request at once with 1 KiB of audio;
- the Envoy under test (--concurrency 1) with two listeners, each with the
  filter (own root_id and vm_id, so two separate job stores) and the same
  routes: `/direct/small` and `/direct/poll` (direct_response with bodies as
  large as a 202 and as a completed poll answer), `/sync` (a plain route to the
  mock provider, what a user would run without the filter). Listener A's store
  starts empty; listener B's is filled with 100,000 completed jobs first;
- wrk (one thread, keep-alive connections) drives each scenario for a few
  seconds, the scenarios in alternation, for a few rounds; a figure is the
  median over the rounds, and each ratio is taken within the run;
- a third listener C whose filter keeps its jobs in a real etcd (Debian's
  etcd-server, started here on free loopback ports, as the tests do): submit
  and poll through etcd, p50/p99 and rate, next to the same on shared data;
- then jobs per second end to end against the plain route's requests per
  second (and the same through etcd), and the 50,000-job soak (its own
  Envoy, max_jobs 5,000, 1 s TTL).

Prints a table, writes bench/results/<time>.json, exits 0. Goals that are
missed are shown as FAIL in the table, not as an exit status: this is a
benchmark, not a test.
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "async_speech.wasm"
LUA = ROOT / "bench" / "wrk"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

KEY = "sk-bf-bench"
SPEECH = "/v1/async/audio/speech"
BODY = json.dumps({"model": "mock/tts-1", "input": "bench", "voice": "alloy"})
AUDIO = bytes(range(256)) * 4  # 1 KiB
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
RUNTIMES = ["envoy.wasm.runtime.v8", "envoy.wasm.runtime.wasmtime", "envoy.wasm.runtime.wamr"]
HELD = 100_000
LONG_TTL = "86400"


def log(msg):
    print(msg, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------- bootstraps


def cluster(name, port):
    return {
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


def hcm(routes, http_filters):
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "bench",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
            "http_filters": [*http_filters, {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    }


def listener(name, port, routes, http_filters):
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [hcm(routes, http_filters)]}],
    }


def admin(port):
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def direct(prefix, status, body, headers):
    return {
        "match": {"path": prefix},
        "direct_response": {"status": status, "body": {"inline_bytes": base64.b64encode(body).decode()}},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for k, v in headers],
    }


def mock_bootstrap(port, admin_port):
    route = direct("/", 200, AUDIO, [("content-type", "audio/mpeg")])
    route["match"] = {"prefix": "/"}
    # Buffered, so that it reads the request body before answering and keeps the connection.
    return {"admin": admin(admin_port), "static_resources": {"listeners": [listener("mock", port, [route], [BUFFER])]}}


def plugin_config(max_jobs, **extra):
    config = {
        "providers": {"mock": {"type": "openai", "cluster": "mock", "base_path": "/v1", "timeout_ms": 5000}},
        "virtual_keys": [{"name": "bench", "value": KEY}],
        "max_jobs": max_jobs,
        "max_in_flight": 256,
        "max_result_ttl_s": 86400,
    }
    config.update(extra)
    return config


def wasm_filter(name, runtime, config):
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "allow_on_headers_stop_iteration": True,
                "failure_policy": "FAIL_RELOAD",
                "vm_config": {
                    "vm_id": name,
                    "runtime": runtime,
                    "code": {"local": {"filename": str(WASM)}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(config),
                },
            },
        },
    }


def bench_routes(sizes):
    """The listener's routes beside the filter's own paths (which it answers itself)."""
    return [
        # As large as a 202 answer, with its headers.
        direct("/direct/small", 202, b"x" * sizes["submit"],
               [("content-type", "application/json"), ("location", SPEECH + "/" + UNKNOWN_ID), ("retry-after", "1")]),
        # As large as a completed job's poll answer.
        direct("/direct/poll", 200, b"x" * sizes["poll"], [("content-type", "application/json")]),
        # What a user would run without the filter: a synchronous call to the provider.
        {"match": {"path": "/sync"}, "route": {"cluster": "mock", "prefix_rewrite": "/v1/audio/speech"},
         "typed_per_filter_config": {"envoy.filters.http.buffer": NO_BUFFER}},
        {"match": {"prefix": "/"}, "route": {"cluster": "mock"},
         "typed_per_filter_config": {"envoy.filters.http.buffer": NO_BUFFER}},
    ]


# After the filter: a direct_response route answers a POST before its body is
# read, and Envoy then closes the connection (no keep-alive), which would make
# the baseline pay a TCP handshake per request. Buffering the body first makes
# `POST /direct/small` do what a submit must at least do: read the body, answer.
# The filter answers its own paths before this filter sees them.
BUFFER = {
    "name": "envoy.filters.http.buffer",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                     "max_request_bytes": 65536},
}
NO_BUFFER = {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute", "disabled": True}


# ---------------------------------------------------------------- processes


class Envoy:
    def __init__(self, name, bootstrap_fn, workdir):
        self.name = name
        self.admin_port = free_port()
        self.config_path = workdir / f"{name}.json"
        self.log_path = workdir / f"{name}.log"
        self.bootstrap = bootstrap_fn(self.admin_port)
        self.config_path.write_text(json.dumps(self.bootstrap))
        self.proc = None

    def start(self, timeout=60):
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [str(ENVOY), "-c", str(self.config_path), "--concurrency", "1",
                 "--base-id", str(self.admin_port), "--log-level", "warn", "--component-log-level", "wasm:warn"],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: envoy exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name}: envoy did not become ready:\n{self.log()[-3000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stats(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter=async_speech", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name.startswith("wasmcustom.async_speech."):
                try:
                    out[name[len("wasmcustom.async_speech."):]] = int(value)
                except ValueError:
                    pass
        return out

    def rss_kib(self):
        return rss_kib(self.proc.pid)


def finished(s):
    return s.get("jobs_completed", 0) + sum(v for k, v in s.items() if k.startswith("jobs_failed"))


def check_accepted(envoy, before, wanted, out):
    """The filter's own count of 202s (jobs_submitted) against wrk's."""
    got = envoy.stats().get("jobs_submitted", 0) - before.get("jobs_submitted", 0)
    if got != wanted or out["accepted"] != wanted:
        log(f"  warning: {wanted} submits wanted, filter counted {got}, wrk {out['accepted']}: {out}")
    return got


def wait_until(envoy, predicate, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    s = envoy.stats()
    while not predicate(s) and time.monotonic() < deadline:
        time.sleep(interval)
        s = envoy.stats()
    return s, predicate(s)


def http(port, method, path, body=None, ttl=None):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"authorization": f"Bearer {KEY}"}
    if body is not None:
        headers["content-type"] = "application/json"
    if ttl:
        headers["x-bf-async-job-result-ttl"] = ttl
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def completed_job(port, ttl=LONG_TTL):
    """Submits one job and waits until it is completed; returns (id, poll body)."""
    status, data = http(port, "POST", SPEECH, BODY, ttl)
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {data[:300]!r}")
    job_id = json.loads(data)["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, poll = http(port, "GET", f"{SPEECH}/{job_id}")
        if status == 200:
            if json.loads(poll)["status"] != "completed":
                raise RuntimeError(f"the probe job did not complete: {poll[:500]!r}")
            return job_id, data, poll
        time.sleep(0.05)
    raise RuntimeError("the probe job did not finish within 30 s")


# --------------------------------------------------------------------- wrk


def wrk(port, path, seconds, connections, method="GET", body="", ttl="", script="static.lua", extra_env=None,
        timeout_s="5s"):
    env = dict(os.environ, BENCH_METHOD=method, BENCH_BODY=body, BENCH_KEY=KEY, BENCH_TTL=ttl)
    env.update(extra_env or {})
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout_s}", "-s", str(LUA / script),
           f"http://127.0.0.1:{port}{path}"]
    done_file = env.get("BENCH_DONE_FILE")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    if done_file:
        # count.lua writes done_file once its count is reached; SIGINT makes wrk print and exit.
        deadline = time.monotonic() + seconds + 5
        while proc.poll() is None and time.monotonic() < deadline and not os.path.exists(done_file):
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    m = re.search(r"^BENCH_(RESULT|COUNT) (\{.*\})$", stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result:\n{stdout}\n{stderr}")
    out = json.loads(m.group(2))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    out["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    if "requests" in out:
        out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
    return out


def submit_count(port, count, ttl, connections, max_seconds=600, filler="/direct/poll"):
    """Submits until exactly `count` were accepted; returns wrk's counts and the wall time."""
    started = time.monotonic()
    fd, done_file = tempfile.mkstemp(prefix="bench-done-")
    os.close(fd)
    os.unlink(done_file)
    try:
        out = wrk(port, SPEECH, max_seconds, connections, script="count.lua", ttl=ttl,
                  extra_env={"BENCH_COUNT": str(count), "BENCH_BODY": BODY, "BENCH_FILLER": filler,
                             "BENCH_DONE_FILE": done_file})
    finally:
        if os.path.exists(done_file):
            os.unlink(done_file)
    out["wall_s"] = time.monotonic() - started
    return out


# --------------------------------------------------------------- the runs


class Run:
    def __init__(self, runtime, args, workdir, mock_port, sizes, etcd_port):
        self.etcd_port = etcd_port
        self.port_c = free_port()
        self.runtime = runtime
        self.args = args
        self.workdir = workdir
        self.mock_port = mock_port
        self.sizes = sizes
        self.port_a = free_port()
        self.port_b = free_port()
        short = runtime.rsplit(".", 1)[-1]
        self.envoy = Envoy(f"filter-{short}", self.bootstrap, workdir)

    def bootstrap(self, admin_port):
        routes = bench_routes(self.sizes)
        # B holds HELD jobs plus what the submit rounds add while they run.
        a = wasm_filter("bench_a", self.runtime, plugin_config(120_000))
        b = wasm_filter("bench_b", self.runtime, plugin_config(self.args.held + 60_000))
        store = {"type": "etcd", "cluster": "etcd", "prefix": f"/bench-{os.getpid()}-{time.time_ns()}/", "timeout_ms": 2000}
        c = wasm_filter("bench_c", self.runtime, plugin_config(1000, store=store))
        return {
            "admin": admin(admin_port),
            "static_resources": {
                "listeners": [listener("a", self.port_a, routes, [a, BUFFER]), listener("b", self.port_b, routes, [b, BUFFER]),
                              listener("c", self.port_c, routes, [c, BUFFER])],
                "clusters": [cluster("mock", self.mock_port), cluster("etcd", self.etcd_port)],
            },
        }

    def settle(self, held_baseline, timeout=300):
        """Waits until every accepted job has finished and the short-TTL ones expired."""
        s, ok = wait_until(self.envoy, lambda s: finished(s) >= s.get("jobs_submitted", 0)
                           and s.get("jobs_held", 0) <= held_baseline, timeout, interval=0.1)
        if not ok:
            log(f"  warning: store did not settle within {timeout} s: {s}")
        return s

    def scenarios(self, poll_id, etcd_poll_id):
        a, b, c, e = self.port_a, self.port_b, self.args.connections, self.port_c
        return {
            "direct_small": lambda d: wrk(a, "/direct/small", d, c),
            "direct_small_post": lambda d: wrk(a, "/direct/small", d, c, "POST", BODY),
            "direct_poll": lambda d: wrk(a, "/direct/poll", d, c),
            "poll_completed": lambda d: wrk(a, f"{SPEECH}/{poll_id}", d, c),
            "poll_404": lambda d: wrk(a, f"{SPEECH}/{UNKNOWN_ID}", d, c),
            "submit_empty": lambda d: wrk(a, SPEECH, d, c, "POST", BODY, ttl="1"),
            "submit_100k": lambda d: wrk(b, SPEECH, d, c, "POST", BODY, ttl="1"),
            "sync_route": lambda d: wrk(a, "/sync", d, c, "POST", BODY),
            "etcd_submit": lambda d: wrk(e, SPEECH, d, c, "POST", BODY, ttl="1"),
            "etcd_poll": lambda d: wrk(e, f"{SPEECH}/{etcd_poll_id}", d, c),
        }

    def go(self):
        res = {"runtime": self.runtime}
        env = self.envoy.start()
        try:
            time.sleep(1)
            env.stats()
            # Warm up both filters and every route.
            completed_job(self.port_a, "1")
            completed_job(self.port_b, "1")
            for path in ("/direct/small", "/direct/poll", "/sync"):
                wrk(self.port_a, path, 1, self.args.connections, "POST" if path != "/direct/poll" else "GET", BODY)
            self.settle(0)
            time.sleep(1.5)
            self.settle(0)

            # Fill B with HELD completed jobs (long TTL): RSS per held job, and the submit-at-fill scenario.
            rss0 = env.rss_kib()
            t0 = time.monotonic()
            before = env.stats()
            fill = submit_count(self.port_b, self.args.held, LONG_TTL, self.args.connections)
            fill["accepted"] = check_accepted(env, before, self.args.held, fill)
            s, ok = wait_until(env, lambda s: finished(s) >= s.get("jobs_submitted", 0), 600, interval=0.1)
            fill_s = time.monotonic() - t0
            time.sleep(1)
            s = env.stats()
            rss1 = env.rss_kib()
            res["fill"] = {"accepted": fill["accepted"], "refused": fill["refused"], "seconds": fill_s,
                           "jobs_held": s.get("jobs_held"), "jobs_completed": s.get("jobs_completed"),
                           "failed": finished(s) - s.get("jobs_completed", 0),
                           "rss_before_kib": rss0, "rss_after_kib": rss1}
            res["rss_per_held_job_bytes"] = (rss1 - rss0) * 1024 / self.args.held
            log(f"  filled {fill['accepted']} jobs in {fill_s:.1f} s; held {s.get('jobs_held')}; "
                f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB ({res['rss_per_held_job_bytes']:.0f} B/job)")
            held_b = s.get("jobs_held", 0)

            poll_id, submit_body, poll_body = completed_job(self.port_a)
            etcd_poll_id = completed_job(self.port_c)[0]
            held_base = held_b + 1
            res["answer_sizes"] = {"submit": len(submit_body), "poll": len(poll_body),
                                   "poll_404": len(http(self.port_a, "GET", f"{SPEECH}/{UNKNOWN_ID}")[1])}
            self.settle(held_base)

            scen = self.scenarios(poll_id, etcd_poll_id)
            names = list(scen)
            rounds = {n: [] for n in names}
            for r in range(self.args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for n in order:
                    before = env.stats()
                    out = scen[n](self.args.seconds)
                    if n.startswith("submit"):
                        after = env.stats()
                        out["accepted"] = after.get("jobs_submitted", 0) - before.get("jobs_submitted", 0)
                        out["held_at_end"] = after.get("jobs_held", 0)
                        self.settle(held_base)
                    rounds[n].append(out)
                    log(f"  round {r + 1} {n:15s} {out['rps']:9.0f} req/s  p50 {out['p50_us'] / 1000:6.2f} ms  "
                        f"p99 {out['p99_us'] / 1000:6.2f} ms  non-2xx {out['non2xx']}")
            res["scenarios"] = {n: summarize(v) for n, v in rounds.items()}

            # End to end: N jobs submitted as fast as possible until all completed, against /sync.
            e2e, sync = [], []
            for r in range(self.args.e2e_rounds):
                before = env.stats()
                t0 = time.monotonic()
                out = submit_count(self.port_a, self.args.e2e_jobs, "1", self.args.connections)
                check_accepted(env, before, self.args.e2e_jobs, out)
                target = finished(before) + self.args.e2e_jobs
                s, ok = wait_until(env, lambda s: finished(s) >= target, 300, interval=0.02)
                elapsed = time.monotonic() - t0
                done = s.get("jobs_completed", 0) - before.get("jobs_completed", 0)
                e2e.append({"jobs": self.args.e2e_jobs, "completed": done, "failed": finished(s) - finished(before) - done,
                            "seconds": elapsed, "jobs_per_s": done / elapsed, "submit_wall_s": out["wall_s"],
                            "refused": out["refused"]})
                log(f"  round {r + 1} end-to-end     {done / elapsed:9.0f} jobs/s ({done} completed in {elapsed:.1f} s)")
                self.settle(held_base)
                out = wrk(self.port_a, "/sync", self.args.seconds, self.args.connections, "POST", BODY)
                sync.append(out)
                log(f"  round {r + 1} sync_route     {out['rps']:9.0f} req/s")
            res["e2e"] = {"rounds": e2e, "jobs_per_s": statistics.median(x["jobs_per_s"] for x in e2e)}
            # The same through etcd (fewer jobs: each takes a few etcd round trips).
            before = env.stats()
            t0 = time.monotonic()
            n = max(1, self.args.e2e_jobs // 4)
            out = submit_count(self.port_c, n, "1", self.args.connections)
            target = finished(before) + n
            s, ok = wait_until(env, lambda s: finished(s) >= target, 300, interval=0.02)
            elapsed = time.monotonic() - t0
            done = s.get("jobs_completed", 0) - before.get("jobs_completed", 0)
            res["e2e_etcd"] = {"jobs": n, "completed": done, "seconds": elapsed, "jobs_per_s": done / elapsed}
            log(f"  etcd end-to-end        {done / elapsed:9.0f} jobs/s ({done} completed in {elapsed:.1f} s)")
            res["e2e_sync"] = summarize(sync)
            res["rss_end_kib"] = env.rss_kib()
            res["wasm_errors"] = [l for l in env.log().splitlines() if "error" in l.lower()][:20]
        finally:
            env.stop()
        if self.args.soak_jobs:
            res["soak"] = soak(self.runtime, self.args, self.workdir, self.mock_port)
        return res


def summarize(rounds):
    return {
        "rps": statistics.median(x["rps"] for x in rounds),
        "p50_ms": statistics.median(x["p50_us"] for x in rounds) / 1000,
        "p99_ms": max(x["p99_us"] for x in rounds) / 1000,
        "non2xx": sum(x["non2xx"] for x in rounds),
        "errors": sum(x["connect"] + x["read"] + x["write"] + x["timeout"] for x in rounds),
        "rounds": rounds,
    }


def soak(runtime, args, workdir, mock_port):
    """The 50,000-job soak: 1 s TTL through max_jobs 5,000 (503s retried); RSS growth and jobs lost."""
    port = free_port()
    sizes = {"submit": 100, "poll": 100}

    def bootstrap(admin_port):
        f = wasm_filter("soak", runtime, plugin_config(args.soak_max_jobs))
        return {"admin": admin(admin_port), "static_resources": {
            "listeners": [listener("soak", port, bench_routes(sizes), [f, BUFFER])], "clusters": [cluster("mock", mock_port)]}}

    env = Envoy(f"soak-{runtime.rsplit('.', 1)[-1]}", bootstrap, workdir).start()
    try:
        time.sleep(1)
        t0 = time.monotonic()
        first = submit_count(port, args.soak_first, "1", args.connections)
        first["accepted"] = check_accepted(env, {}, args.soak_first, first)
        s, _ = wait_until(env, lambda s: finished(s) >= s.get("jobs_submitted", 0), 120, interval=0.05)
        rss_first = env.rss_kib()
        before = env.stats()
        rest = submit_count(port, args.soak_jobs - args.soak_first, "1", args.connections)
        rest["accepted"] = check_accepted(env, before, args.soak_jobs - args.soak_first, rest)
        accepted = first["accepted"] + rest["accepted"]
        s, _ = wait_until(env, lambda s: finished(s) >= accepted, 300, interval=0.05)
        elapsed = time.monotonic() - t0
        s, _ = wait_until(env, lambda s: s.get("jobs_held", 0) == 0
                          and s.get("jobs_expired", 0) + s.get("jobs_deleted", 0) >= accepted, 120, interval=0.1)
        rss_last = env.rss_kib()
    finally:
        env.stop()
    failed = finished(s) - s.get("jobs_completed", 0)
    refused = {}
    for part in (first, rest):
        for k, v in part["refused"].items():
            refused[k] = refused.get(k, 0) + v
    out = {
        "accepted": accepted, "submitted_stat": s.get("jobs_submitted"), "refused_retried": refused,
        "completed": s.get("jobs_completed"), "failed": failed, "lost": accepted - s.get("jobs_completed", 0) - failed,
        "expired": s.get("jobs_expired"), "rss_first_kib": rss_first, "rss_last_kib": rss_last,
        "growth_pct": 100.0 * (rss_last - rss_first) / rss_first, "seconds": elapsed,
        "jobs_per_s": s.get("jobs_completed", 0) / elapsed,
    }
    log(f"  soak: {accepted} accepted, {out['lost']} lost, {out['expired']} expired, RSS "
        f"{rss_first / 1024:.1f} -> {rss_last / 1024:.1f} MiB ({out['growth_pct']:+.1f} %), "
        f"{out['jobs_per_s']:.0f} jobs/s")
    return out


# ------------------------------------------------------------------ table


def table(res):
    sc = res["scenarios"]
    rows = []

    def row(name, fig, base_name, base, goal, ok, p50=None, p99=None, unit="req/s"):
        ratio = f"{fig / base:.2f} × {base_name}" if base else ""
        rows.append((name, f"{fig:,.0f} {unit}", "" if p50 is None else f"{p50:.2f}", "" if p99 is None else f"{p99:.2f}",
                     ratio, goal, "" if ok is None else ("PASS" if ok else "FAIL")))

    def s(n):
        return sc[n]["rps"]

    row("direct_response, 202-sized, GET", s("direct_small"), "", None, "", None, sc["direct_small"]["p50_ms"], sc["direct_small"]["p99_ms"])
    row("direct_response, 202-sized, POST", s("direct_small_post"), "", None, "", None, sc["direct_small_post"]["p50_ms"], sc["direct_small_post"]["p99_ms"])
    row("direct_response, poll-sized", s("direct_poll"), "", None, "", None, sc["direct_poll"]["p50_ms"], sc["direct_poll"]["p99_ms"])
    row("plain sync route to the mock", s("sync_route"), "", None, "", None, sc["sync_route"]["p50_ms"], sc["sync_route"]["p99_ms"])
    row("poll completed", s("poll_completed"), "direct poll-sized", s("direct_poll"), "≥ 0.85",
        s("poll_completed") >= 0.85 * s("direct_poll"), sc["poll_completed"]["p50_ms"], sc["poll_completed"]["p99_ms"])
    row("poll 404", s("poll_404"), "direct 202-sized GET", s("direct_small"), "≥ 0.9",
        s("poll_404") >= 0.9 * s("direct_small"), sc["poll_404"]["p50_ms"], sc["poll_404"]["p99_ms"])
    row("submit, store empty", s("submit_empty"), "direct 202-sized POST", s("direct_small_post"), "≥ 0.7; p99 ≤ 10 ms",
        s("submit_empty") >= 0.7 * s("direct_small_post") and sc["submit_empty"]["p99_ms"] <= 10,
        sc["submit_empty"]["p50_ms"], sc["submit_empty"]["p99_ms"])
    row("submit, 100,000 held", s("submit_100k"), "submit empty", s("submit_empty"), "≥ 0.9; p99 ≤ 10 ms",
        s("submit_100k") >= 0.9 * s("submit_empty") and sc["submit_100k"]["p99_ms"] <= 10,
        sc["submit_100k"]["p50_ms"], sc["submit_100k"]["p99_ms"])
    e2e, sync = res["e2e"]["jobs_per_s"], res["e2e_sync"]["rps"]
    row("jobs end to end", e2e, "sync route", sync, "≥ 0.8", e2e >= 0.8 * sync, unit="jobs/s")
    if "etcd_submit" in sc:
        row("etcd store: submit", s("etcd_submit"), "shared-data submit", s("submit_empty"), "", None,
            sc["etcd_submit"]["p50_ms"], sc["etcd_submit"]["p99_ms"])
        row("etcd store: poll completed", s("etcd_poll"), "shared-data poll", s("poll_completed"), "", None,
            sc["etcd_poll"]["p50_ms"], sc["etcd_poll"]["p99_ms"])
    if "e2e_etcd" in res:
        x = res["e2e_etcd"]["jobs_per_s"]
        row("etcd store: jobs end to end", x, "shared-data jobs", e2e, "", None, unit="jobs/s")
    per_job = res["rss_per_held_job_bytes"]
    rows.append(("RSS per held job (1 KiB audio)", f"{per_job:,.0f} B", "", "", f"{per_job / 1024:.2f} × audio", "", ""))
    if "soak" in res:
        so = res["soak"]
        rows.append((f"soak RSS growth ({so['accepted']:,} jobs)", f"{so['growth_pct']:+.1f} %", "", "",
                     f"{so['lost']} lost", "≤ 5 %, 0 lost",
                     "PASS" if so["growth_pct"] <= 5 and so["lost"] == 0 else "FAIL"))
    head = ("scenario", "rate", "p50 ms", "p99 ms", "ratio", "goal", "")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(head, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def probe_sizes(workdir, mock_port):
    """The sizes of a real 202 and a real completed poll answer, for the direct_response bodies."""
    run = Run(RUNTIMES[0], argparse.Namespace(connections=1, held=1), workdir, mock_port, {"submit": 100, "poll": 1600},
              etcd_port=free_port())
    run.envoy.start()
    try:
        _, submit_body, poll_body = completed_job(run.port_a, "1")
    finally:
        run.envoy.stop()
    return {"submit": len(submit_body), "poll": len(poll_body)}


def accepted_runtimes(workdir, wanted):
    """Which runtimes this Envoy build takes: validate a bootstrap with each."""
    ok = []
    for rt in wanted:
        f = wasm_filter("probe", rt, plugin_config(10))
        cfg = {"static_resources": {"listeners": [listener("p", free_port(), bench_routes({"submit": 1, "poll": 1}), [f])],
                                    "clusters": [cluster("mock", free_port())]}}
        path = workdir / f"validate-{rt.rsplit('.', 1)[-1]}.json"
        path.write_text(json.dumps(cfg))
        p = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--base-id", str(free_port())],
                           capture_output=True, text=True, timeout=120)
        if p.returncode == 0:
            ok.append(rt)
        else:
            lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
            why = [l.split("] ", 2)[-1] for l in lines if "Failed to create Wasm VM" in l] or lines[-1:]
            log(f"runtime {rt}: not accepted by this Envoy build: {why[0].split('] ')[-1][:200]}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated; short names (v8) work too")
    ap.add_argument("--seconds", type=int, default=4, help="seconds per scenario per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--held", type=int, default=HELD, help="jobs held in store B")
    ap.add_argument("--e2e-jobs", type=int, default=20_000)
    ap.add_argument("--e2e-rounds", type=int, default=2)
    ap.add_argument("--soak-jobs", type=int, default=50_000, help="0 skips the soak")
    ap.add_argument("--soak-first", type=int, default=5_000)
    ap.add_argument("--soak-max-jobs", type=int, default=5_000)
    args = ap.parse_args()

    if not shutil.which("wrk"):
        sys.exit("bench: wrk is missing (make bench installs it from Debian)")
    if not WASM.exists():
        sys.exit(f"bench: {WASM} is missing; make build first")
    wanted = [r if r.startswith("envoy.") else f"envoy.wasm.runtime.{r}" for r in args.runtimes.split(",") if r]
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    mock_port = free_port()
    mock = Envoy("mock", lambda admin_port: mock_bootstrap(mock_port, admin_port), workdir).start()
    from etcd_harness import Etcd  # tests/e2e: a real etcd on free loopback ports, stopped by pid

    etcd = Etcd().start()
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "envoy": subprocess.run(
        [str(ENVOY), "--version"], capture_output=True, text=True).stdout.strip(), "args": vars(args),
        "cpus": os.cpu_count(), "runs": []}
    try:
        runtimes = accepted_runtimes(workdir, wanted)
        log(f"runtimes accepted: {', '.join(runtimes) or 'none'}")
        sizes = probe_sizes(workdir, mock_port)
        results["direct_sizes"] = sizes
        log(f"answer sizes: 202 {sizes['submit']} B, completed poll {sizes['poll']} B")
        for rt in runtimes:
            log(f"== {rt}")
            try:
                results["runs"].append(Run(rt, args, workdir, mock_port, sizes, etcd.client_port).go())
            except Exception as e:  # a runtime that fails to run the filter is reported, not fatal
                log(f"  {rt} failed: {e}")
                results["runs"].append({"runtime": rt, "error": str(e)[:3000]})
    finally:
        mock.stop()
        etcd.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_path.write_text(json.dumps(results, indent=1))
    for res in results["runs"]:
        log(f"\n== {res['runtime']} (Envoy --concurrency 1, wrk -t1 -c{args.connections}, "
            f"{args.rounds} × {args.seconds} s per scenario, medians; p99 the worst round)")
        log(res["error"] if "error" in res else table(res))
    log(f"\nresults: {out_path.relative_to(ROOT)}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
