"""Two filter replicas on a real three-member etcd cluster, under steady
submit and poll load, while one member fails: the leader killed, a follower
killed, a follower stopped (SIGSTOP) for 8 s.

The contract: submits and polls keep succeeding, except while the cluster
has no leader (then `503 job store unavailable` with Retry-After), and every
job that got its 202 ends. Each case prints the window and the share of 503s
it saw, and how long the cluster had no leader.
"""

import threading
import time
import uuid

import pytest

from conftest import Client, clusters_for, plugin_config
from envoy_harness import Envoy
from etcd_harness import EtcdCluster, envoy_cluster
from load import Load, describe, failed_jobs

BODY = {"model": "openai/tts-1", "input": "hello, cluster", "voice": "alloy"}
# The store's timeout_ms, as the shipped replica configuration has it.
STORE_TIMEOUT_MS = 2000
WARM_UP_S = 3
FAULT_S = 8
AFTER_S = 4
# Sampling the leader is not instant: a 503 this close to a leaderless spell counts as in it.
LEADER_SLACK_S = 0.5


class LeaderWatch(threading.Thread):
    """Samples, every 50 ms, whether the cluster has a running leader."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.samples = []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(0.05):
            self.samples.append((time.monotonic(), self.cluster.has_leader()))

    def stop(self):
        self.stopping.set()
        self.join(timeout=10)

    def leaderless(self):
        """The spells without a leader, as (start, end) pairs."""
        spells, start = [], None
        for t, ok in self.samples:
            if not ok and start is None:
                start = t
            elif ok and start is not None:
                spells.append((start, t))
                start = None
        if start is not None:
            spells.append((start, self.samples[-1][0]))
        return spells


@pytest.fixture
def cluster(request):
    failed_before = request.session.testsfailed
    c = EtcdCluster(3).start()
    yield c
    if request.session.testsfailed > failed_before:
        # The test failed: its members' data and logs stay for a look.
        for m in c:
            m.keep = True
        print(f"\netcd members kept in {', '.join(m.dir for m in c)}")
    c.stop()


@pytest.fixture
def replicas(cluster, mock, request):
    store = {"type": "etcd", "cluster": "etcd", "prefix": f"/cl-{uuid.uuid4().hex[:8]}/",
             "timeout_ms": STORE_TIMEOUT_MS}
    config = plugin_config(store=store, job_deadline_s=60)
    clusters = clusters_for(mock) + [envoy_cluster("etcd", cluster.client_ports)]
    envoys = []
    for _ in range(2):
        e = Envoy(config, clusters, concurrency=2).start()
        # Stopped after the report, so that a failing test keeps the logs.
        request.addfinalizer(e.stop)
        envoys.append(e)
    return envoys


def fault_leader_killed(cluster):
    member = cluster.leader()
    member.kill()
    return member, member.start


def fault_follower_killed(cluster):
    member = cluster.followers()[0]
    member.kill()
    return member, member.start


def fault_follower_stopped(cluster):
    member = cluster.followers()[0]
    member.pause()
    return member, member.resume


CASES = {
    "leader killed": fault_leader_killed,
    "follower killed": fault_follower_killed,
    "follower stopped 8 s": fault_follower_stopped,
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_member_down_under_load(case, cluster, replicas, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"spoken", delay=0.1)
    load = Load([Client(e.url) for e in replicas], BODY, submitters=2, pollers=2, rate=20, poll_pause=0.02,
                timeout=10)
    watch = LeaderWatch(cluster)
    try:
        watch.start()
        load.start()
        time.sleep(WARM_UP_S)
        fault_at = time.monotonic()
        member, undo = CASES[case](cluster)
        time.sleep(FAULT_S)
        undo()
        cluster.leader()
        time.sleep(AFTER_S)
        load.stop_submitting()
        unended = load.wait_all_ended(60)
        end = time.monotonic()
    finally:
        load.stop()
        watch.stop()

    during = load.between(fault_at, end)
    unavailable = [a for a in during if a.status == 503]
    spells = [(s - fault_at, e - fault_at) for s, e in watch.leaderless() if e >= fault_at]
    leaderless_s = sum(e - s for s, e in spells)

    def in_a_spell(a):
        return any(a.sent - fault_at <= e + LEADER_SLACK_S and a.answered - fault_at >= s - LEADER_SLACK_S
                   for s, e in spells)

    outside = [a for a in unavailable if not in_a_spell(a)]
    window = (f"from +{min(a.sent for a in unavailable) - fault_at:.2f} s to "
              f"+{max(a.answered for a in unavailable) - fault_at:.2f} s" if unavailable else "none")
    share = len(unavailable) / max(1, len(during))
    print(f"\n[etcd cluster, {case} ({member.name})] 503s: {len(unavailable)} of {len(during)} requests "
          f"({share:.1%}) {window} after the fault, {len(outside)} of them while the cluster had a leader; "
          f"no leader for {leaderless_s:.2f} s {[(round(s, 2), round(e, 2)) for s, e in spells]}; "
          f"by kind: {describe(unavailable)}")

    failed = [j for j in load.jobs.values() if j.final and j.final.get("status") != "completed"]
    others = [a for a in load.answers if a.status not in (200, 202, 503)]
    bad_503 = [a for a in unavailable if not a.retry_after or a.message != "job store unavailable"]
    problems = [text for bad, text in [
        (len(load.jobs) <= 100, f"too few jobs accepted to mean anything: {describe(load.failures())}"),
        (unended, f"{len(unended)} of {len(load.jobs)} accepted jobs never ended, e.g. {unended[:1]}"),
        (failed, f"{len(failed)} accepted jobs failed: {failed_jobs(failed)}"),
        (others, f"answers other than 200, 202 and 503: {describe(others)}"),
        (bad_503, f"503s that are not `job store unavailable` with Retry-After: {describe(bad_503)}"),
        (outside, f"{len(outside)} of {len(during)} requests ({len(outside) / max(1, len(during)):.1%}) answered "
                  f"503 while the cluster had a leader: {describe(outside)}"),
    ] if bad]
    assert not problems, "\n".join(problems)
