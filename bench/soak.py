"""Soak benchmark (make bench): many short-lived jobs through one Envoy.

50,000 jobs with a 1 s result TTL through Envoy (concurrency 2, max_jobs 5,000)
in front of a mock provider that answers at once. Prints Envoy's RSS after the
first 5,000 jobs and after the last job has expired, the growth, the jobs lost
(accepted but never completed) and the jobs completed per second.

A 503 (store full) is retried after a short pause, as a client honouring
Retry-After would; those retries are counted, not lost.
"""

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from conftest import KEY_A, SPEECH, clusters_for, plugin_config, stats  # noqa: E402
from envoy_harness import Envoy  # noqa: E402
from mock_provider import MockProvider  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def submit_range(port, start, stop, threads, counters):
    lock = threading.Lock()
    next_i = [start]

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"authorization": f"Bearer {KEY_A}", "content-type": "application/json",
                   "x-bf-async-job-result-ttl": "1"}
        while True:
            with lock:
                i = next_i[0]
                if i >= stop:
                    break
                next_i[0] += 1
            body = json.dumps({"model": "openai/tts-1", "input": f"soak {i}", "voice": "alloy"})
            while True:
                try:
                    conn.request("POST", SPEECH, body=body, headers=headers)
                    r = conn.getresponse()
                    r.read()
                except (http.client.HTTPException, OSError):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    with lock:
                        counters["errors"] += 1
                    continue
                if r.status == 202:
                    with lock:
                        counters["accepted"] += 1
                    break
                with lock:
                    counters[f"http_{r.status}"] = counters.get(f"http_{r.status}", 0) + 1
                time.sleep(0.05)
        conn.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def wait_for(envoy, predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stats(envoy)
        if predicate(s):
            return s
        time.sleep(0.2)
    return stats(envoy)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50_000)
    ap.add_argument("--first", type=int, default=5_000)
    ap.add_argument("--max-jobs", type=int, default=5_000)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()

    mock = MockProvider().start()
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"\x00" * 1024, headers={"content-type": "audio/mpeg"})
    envoy = Envoy(plugin_config(max_jobs=args.max_jobs), clusters_for(mock), concurrency=2).start()
    counters = {"accepted": 0, "errors": 0}
    try:
        started = time.monotonic()
        submit_range(envoy.port, 0, args.first, args.threads, counters)
        wait_for(envoy, lambda s: s["jobs_completed"] + sum(v for k, v in s.items() if k.startswith("jobs_failed")) >= counters["accepted"], 120)
        rss_first = rss_kib(envoy.proc.pid)
        submit_range(envoy.port, args.first, args.jobs, args.threads, counters)
        s = wait_for(envoy, lambda s: s["jobs_completed"] + sum(v for k, v in s.items() if k.startswith("jobs_failed")) >= counters["accepted"], 300)
        elapsed = time.monotonic() - started
        s = wait_for(envoy, lambda s: s["jobs_held"] == 0 and s["jobs_expired"] + s["jobs_deleted"] >= counters["accepted"], 60)
        rss_last = rss_kib(envoy.proc.pid)
        failed = sum(v for k, v in s.items() if k.startswith("jobs_failed"))
        lost = counters["accepted"] - s["jobs_completed"] - failed
        growth = 100.0 * (rss_last - rss_first) / rss_first
        print(f"jobs submitted (202):        {counters['accepted']}")
        print(f"store-full answers retried:  {counters.get('http_503', 0)}")
        print(f"jobs completed / failed:     {s['jobs_completed']} / {failed}")
        print(f"jobs lost:                   {lost}")
        print(f"jobs expired (swept):        {s['jobs_expired']}")
        print(f"upstream requests:           {len(mock.recorded())}")
        print(f"Envoy RSS after first {args.first}: {rss_first / 1024:.1f} MiB")
        print(f"Envoy RSS after all expired: {rss_last / 1024:.1f} MiB")
        print(f"RSS growth:                  {growth:+.1f}% (goal: at most +10%)")
        print(f"throughput:                  {s['jobs_completed'] / elapsed:.0f} jobs completed/s over {elapsed:.1f} s")
        ok = lost == 0 and growth <= 10.0
        print("soak: " + ("PASS" if ok else "FAIL"))
        return 0 if ok else 1
    finally:
        envoy.stop()
        mock.stop()


if __name__ == "__main__":
    sys.exit(main())
