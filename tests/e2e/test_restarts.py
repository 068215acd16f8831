"""Envoy restarts, with jobs running.

With the etcd store, jobs outlive the Envoy process: across a hot restart
(`--restart-epoch 1` with the same `--base-id`: the new process takes the
listening sockets over and the old one drains and exits) and across a stop
(SIGTERM) and start of every replica, each accepted job ends, completed, and
can be polled afterwards. A job whose call was under way in the old process
is taken over by a new one once the old claim's lease lapses.

With shared data, jobs live in the memory of one Envoy process: a hot
restart starts a process with empty shared data, so the new process answers
404 for every job of the old one, finished or not. The old process goes on
with its running calls while it drains, but nobody can fetch what they made.
"""

import itertools
import re
import time
import uuid

import pytest

from conftest import Client, clusters_for, plugin_config
from envoy_harness import Envoy, cluster
from load import Load, describe, failed_jobs
from mock_provider import fake_audio

BODY = {"model": "openai/tts-1", "input": "hello across restarts", "voice": "alloy"}
# Long enough that calls are under way at the restart.
PROVIDER_DELAY_S = 1.5
DRAIN_TIME_S = 2
PARENT_SHUTDOWN_TIME_S = 4


def etcd_setup(etcd, mock):
    store = {"type": "etcd", "cluster": "etcd", "prefix": f"/rs-{uuid.uuid4().hex[:8]}/", "timeout_ms": 2000}
    config = plugin_config(store=store, job_deadline_s=60)
    return config, clusters_for(mock) + [cluster("etcd", etcd.client_port)]


def check_every_job_completed_and_polled(load, clients):
    """Every accepted job completed; polled once more now, through `clients`, it is still there."""
    jobs = list(load.jobs.values())
    failed = [j for j in jobs if j.final and j.final.get("status") != "completed"]
    assert not failed, f"{len(failed)} of {len(jobs)} jobs did not complete: {failed_jobs(failed)}"
    again = [load.poll_one(j.id, client=clients[i % len(clients)])[0] for i, j in enumerate(jobs)]
    missing = [a for a in again if a.status != 200]
    assert not missing, f"{len(missing)} of {len(jobs)} finished jobs not found afterwards: {describe(missing)}"


def sent_jobs(envoy):
    """The jobs whose provider call this Envoy sent, from its log."""
    return set(re.findall(r"job ([0-9a-f-]{36}) attempt \d+ sent", envoy.log()))


def test_etcd_jobs_survive_a_hot_restart(etcd, mock, request):
    # Every third call outlasts the old process's drain, so the new one must take it over.
    turn = itertools.count()

    def answer(_record):
        time.sleep(4.5 if next(turn) % 3 == 2 else PROVIDER_DELAY_S)  # within timeout_ms (5 s)
        return 200, {"content-type": "audio/mpeg"}, b"spoken"

    mock.add_rule(path_prefix="/v1/audio/speech", body=answer)
    config, clusters = etcd_setup(etcd, mock)
    parent = Envoy(config, clusters, hot_restart=True, drain_time_s=DRAIN_TIME_S,
                   parent_shutdown_time_s=PARENT_SHUTDOWN_TIME_S).start()
    request.addfinalizer(parent.stop)
    client = Client(parent.url)
    load = Load([client], BODY, submitters=2, pollers=2, rate=15, poll_pause=0.02)
    try:
        load.start()
        time.sleep(3)
        in_flight = len(mock.recorded()) - sum(1 for r in mock.recorded() if r["answered_at"])
        restarted_at = time.monotonic()
        child = parent.hot_restart()
        request.addfinalizer(child.stop)
        assert child.port == parent.port and child.epoch == 1
        # The old process drains, then exits; the new one serves on alone.
        parent.proc.wait(timeout=DRAIN_TIME_S + PARENT_SHUTDOWN_TIME_S + 20)
        parent_exited = time.monotonic()
        time.sleep(2)
        load.stop_submitting()
        unended = load.wait_all_ended(60)
    finally:
        load.stop()

    others = load.failures()
    taken_over = sent_jobs(parent) & sent_jobs(child)
    print(f"\n[etcd, hot restart] {len(load.jobs)} jobs ({in_flight} calls under way at the restart, "
          f"{len(taken_over)} jobs taken over by the new process), {len(unended)} unended; "
          f"answers other than 200/202: {describe(others)}; the old process exited "
          f"{parent_exited - restarted_at:.1f} s after the restart, with code {parent.proc.returncode}")
    assert in_flight > 0, "no call was under way at the restart: the test proves nothing"
    assert taken_over, "no job of the old process was taken over: the test proves nothing"
    assert not unended, f"{len(unended)} of {len(load.jobs)} jobs never ended, e.g. {unended[0]}"
    assert not others, f"requests that failed across the hot restart: {describe(others)}"
    check_every_job_completed_and_polled(load, [Client(child.url)])
    jobs_after = [j for j in load.jobs.values() if j.submitted > restarted_at]
    assert jobs_after, "jobs were submitted to the new process too"


def test_etcd_jobs_survive_stopping_and_starting_every_replica(etcd, mock, request):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"spoken", delay=PROVIDER_DELAY_S)
    config, clusters = etcd_setup(etcd, mock)
    old = [Envoy(config, clusters).start() for _ in range(2)]
    for e in old:
        request.addfinalizer(e.stop)
    load = Load([Client(e.url) for e in old], BODY, submitters=2, pollers=2, rate=15, poll_pause=0.02)
    try:
        load.start()
        time.sleep(4)
        load.stop()
        in_flight = [r for r in mock.recorded() if r["answered_at"] is None]
        for e in old:
            e.halt()  # SIGTERM: Envoy exits without waiting for the calls under way
        assert all(e.proc.returncode is not None for e in old)
        new = [Envoy(config, clusters).start() for _ in range(2)]
        for e in new:
            request.addfinalizer(e.stop)
        load.clients[:] = [Client(e.url) for e in new]
        load.start(submit=False)
        unended = load.wait_all_ended(60)
    finally:
        load.stop()

    print(f"\n[etcd, SIGTERM and start of both replicas] {len(load.jobs)} jobs, {len(in_flight)} calls under way "
          f"at the stop, {len(unended)} unended; answers other than 200/202: {describe(load.failures())}")
    assert in_flight, "no call was under way at the stop: the test proves nothing"
    assert not unended, f"{len(unended)} of {len(load.jobs)} jobs never ended, e.g. {unended[0]}"
    assert not load.failures(), f"requests that failed: {describe(load.failures())}"
    check_every_job_completed_and_polled(load, load.clients)


def test_shared_data_jobs_are_lost_on_a_hot_restart(mock, request):
    audio = fake_audio(512, seed=5)
    mock.add_rule(path_prefix="/v1/audio/speech", body=audio, times=1)
    mock.add_rule(path_prefix="/v1/audio/speech", body=audio, delay=PROVIDER_DELAY_S)
    parent = Envoy(plugin_config(), clusters_for(mock), hot_restart=True, drain_time_s=DRAIN_TIME_S,
                   parent_shutdown_time_s=PARENT_SHUTDOWN_TIME_S).start()
    request.addfinalizer(parent.stop)
    old = Client(parent.url)
    finished = old.submit(BODY).json()["id"]
    assert old.wait(finished).json()["status"] == "completed"
    running = old.submit(BODY).json()["id"]
    mock.wait_for_requests(2)

    child = parent.hot_restart()
    request.addfinalizer(child.stop)
    new = Client(child.url)
    assert child.port == parent.port
    # Through the same port, now the new process's: neither job is known there.
    assert new.poll(finished).status == 404
    assert new.poll(running).status == 404
    assert new.call("GET", f"/v1/async/audio/speech/{finished}/content").status == 404
    # The old process finished the running call during its drain, for nobody.
    parent.proc.wait(timeout=DRAIN_TIME_S + PARENT_SHUTDOWN_TIME_S + 20)
    assert f"job {running} completed" in parent.log()
    assert new.poll(running).status == 404
    # The new process serves new jobs as usual.
    again = new.submit(BODY).json()["id"]
    assert new.wait(again).json()["status"] == "completed"
