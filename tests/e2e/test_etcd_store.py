"""The etcd store: a real etcd and two Envoy replicas; any replica
answers any job, jobs outlive Envoys, and an unreachable etcd is a 503."""

import base64
import json
import time
import uuid

import pytest

from conftest import KEY_B, SPEECH, Client, clusters_for, eventually, plugin_config, stats
from envoy_harness import Envoy, cluster
from etcd_harness import Etcd, b64
from helpers import WEBHOOK_SECRET, webhook_endpoint
from mock_provider import fake_audio
from webhook_receiver import Receiver

BASIC = {"model": "openai/tts-1", "input": "hello", "voice": "alloy"}


def keys_under(etcd, prefix):
    status, body = etcd.call("/v3/kv/range", {"key": b64(prefix.encode()), "range_end": b64(prefix.encode()[:-1] + b"0"),
                                              "keys_only": True})
    assert status == 200, body
    return sorted(base64.b64decode(kv["key"]).decode() for kv in body.get("kvs", []))


class Replicas:
    """Envoys sharing one etcd and prefix; started and stopped by the test."""

    def __init__(self, etcd, mock, **overrides):
        self.prefix = f"/t-{uuid.uuid4().hex[:8]}/"
        store = {"type": "etcd", "cluster": "etcd", "prefix": self.prefix, "timeout_ms": 800}
        self.config = plugin_config(store=store, **overrides)
        self.clusters = clusters_for(mock) + [cluster("etcd", etcd.client_port)]
        self.envoys = []

    def start(self):
        e = Envoy(self.config, self.clusters, concurrency=2).start()
        self.envoys.append(e)
        return e, Client(e.url)

    def stop(self):
        for e in self.envoys:
            e.stop()


@pytest.fixture
def replicas(etcd, mock):
    made = []

    def make(**overrides):
        r = Replicas(etcd, mock, **overrides)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def submit(client, body=BASIC, **kw):
    r = client.submit(body, **kw)
    assert r.status == 202, r
    return r.json()["id"]


def test_a_job_submitted_on_one_replica_is_polled_fetched_and_deleted_on_the_other(replicas, mock, etcd):
    r = replicas()
    (a, ca), (b, cb) = r.start(), r.start()
    audio = fake_audio(4096, seed=7)
    mock.add_rule(path_prefix="/v1/audio/speech", body=audio)
    job = submit(ca)
    done = cb.wait(job).json()
    assert done["status"] == "completed" and base64.b64decode(done["result"]["audio"]) == audio
    assert ca.poll(job).json() == done
    content = cb.call("GET", f"{SPEECH}/{job}/content")
    assert (content.status, content.body) == (200, audio)
    assert len(mock.recorded()) == 1, "run once, by one replica"
    # Another key sees the same 404 as for an unknown job, on either replica.
    assert cb.poll(job, key=KEY_B).status == 404 and ca.call("DELETE", f"{SPEECH}/{job}", key=KEY_B).status == 404
    assert cb.call("DELETE", f"{SPEECH}/{job}").status == 204
    assert ca.poll(job).status == 404
    assert [k for k in keys_under(etcd, r.prefix) if job in k] == [], "a deleted job leaves no key"
    s = stats(a)
    assert s.get("store_calls", 0) > 0


def test_jobs_survive_restarting_every_envoy(replicas, mock):
    r = replicas()
    (a, ca), (b, cb) = r.start(), r.start()
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"kept")
    done = submit(ca)
    ca.wait(done)
    # A job whose call is still running when both Envoys go away.
    mock.clear()
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"later", delay=1.0)
    slow = submit(cb)
    mock.wait_for_requests(1)
    a.stop()
    b.stop()
    mock.clear()
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"again")
    (_, c1), (_, c2) = r.start(), r.start()
    assert c2.poll(done).json()["status"] == "completed"
    # The new replicas take the slow job over once the old claim's lease lapses.
    final = c1.wait(slow, timeout=40).json()
    assert final["status"] == "completed" and base64.b64decode(final["result"]["audio"]) == b"again"


def test_killing_the_replica_that_runs_a_job_lets_the_other_finish_it(replicas, mock):
    r = replicas()
    (a, ca), (b, cb) = r.start(), r.start()
    mock.add_rule(path_prefix="/v1/audio/speech", hang=True, times=1)
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"finished by the survivor")
    job = submit(ca)
    mock.wait_for_requests(1)
    runner = eventually(lambda: next((e for e in (a, b) if f"job {job} attempt 0 sent" in e.log()), None), 5,
                        what="the replica that claimed the job")
    survivor = cb if runner is a else ca
    runner.proc.kill()  # kill -9: no goodbye, its lease lapses on its own
    runner.proc.wait()
    done = survivor.wait(job, timeout=40).json()
    assert done["status"] == "completed", done
    assert base64.b64decode(done["result"]["audio"]) == b"finished by the survivor"


def test_expiry_is_etcds_and_removes_every_key(replicas, mock, etcd):
    r = replicas()
    _, ca = r.start()
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"short-lived")
    job = submit(ca, headers={"x-bf-async-job-result-ttl": "1"})
    ca.wait(job)
    assert any(job in k for k in keys_under(etcd, r.prefix))
    eventually(lambda: ca.poll(job).status == 404, 5, what="404 after the TTL")
    eventually(lambda: [k for k in keys_under(etcd, r.prefix) if job in k] == [], 10,
               what="etcd to remove the job's keys")
    # What stays is the store's own, one per replica and one per key: nothing per job.
    left = {k[len(r.prefix):].split("/")[0] for k in keys_under(etcd, r.prefix)}
    assert left <= {"replicas", "alive", "lanes", "round"}, left


def test_three_megabytes_of_audio_round_trip_in_parts(replicas, mock, etcd):
    r = replicas()
    (_, ca), (_, cb) = r.start(), r.start()
    audio = fake_audio(3_000_000, seed=3)
    mock.add_rule(path_prefix="/v1/audio/speech", body=audio)
    job = submit(ca)
    done = cb.wait(job, timeout=30).json()
    assert done["status"] == "completed", str(done)[:500]
    assert base64.b64decode(done["result"]["audio"]) == audio
    assert cb.call("GET", f"{SPEECH}/{job}/content").body == audio
    parts = [k for k in keys_under(etcd, r.prefix) if "/audio/" in k]
    assert len(parts) >= 2, parts


def test_an_unreachable_etcd_is_a_503_and_service_resumes_by_itself(replicas, mock):
    own = Etcd().start()
    try:
        r = Replicas(own, mock)
        try:
            envoy, client = r.start()
            mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
            job = submit(client)
            client.wait(job)
            for stop, go in ((own.pause, own.resume), (own.kill, own.start)):
                stop()
                started = time.monotonic()
                for answer in (client.submit(BASIC), client.poll(job)):
                    assert answer.status == 503, answer
                    assert answer.headers.get("retry-after") and answer.json()["error"]["message"] == "job store unavailable"
                assert time.monotonic() - started < 5, "within the store's timeout_ms, twice"
                assert client.call("GET", "/elsewhere").status != 503, "other routes are unaffected"
                go()
                again = eventually(lambda: (x := client.submit(BASIC)).status == 202 and x, 20, what="service to resume")
                assert client.wait(again.json()["id"], timeout=20).json()["status"] == "completed"
        finally:
            r.stop()
    finally:
        own.stop()


def test_webhooks_are_delivered_from_etcd_by_any_replica(replicas, mock, etcd):
    receiver = Receiver([WEBHOOK_SECRET])
    try:
        hooks = {"billing": webhook_endpoint(retry_backoff_initial_seconds=2, retry_backoff_max_seconds=2)}
        r = replicas(webhooks=hooks)
        r.clusters.append(cluster("hooks", receiver.port))
        (_, ca), (_, cb) = r.start(), r.start()
        mock.add_rule(path_prefix="/v1/audio/speech", body=b"AUDIO")
        receiver.script = [500, 200]
        job = submit(ca, headers={"x-bf-async-webhook": "billing"})
        first, second = eventually(lambda: len(got := receiver.got()) >= 2 and got, 20, what="two attempts")
        assert first["verified"][0] and second["verified"][0]
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
        assert first["body"] == second["body"], "the body is made once, when the job ends"
        assert json.loads(first["body"])["data"]["job_id"] == job
        webhook = eventually(lambda: (w := cb.poll(job).json().get("webhook", {})).get("status") == "delivered" and w,
                             10, what="the delivery's state in etcd")
        assert (webhook["attempts"], webhook["last_status_code"]) == (2, 200)
        assert base64.b64decode(cb.poll(job).json()["result"]["audio"]) == b"AUDIO"

        # Expired before its retry: the expired form, then every key goes.
        receiver.script = [500, 200]
        short = submit(cb, headers={"x-bf-async-webhook": "billing", "x-bf-async-job-result-ttl": "1"})
        third, fourth = eventually(lambda: len(got := receiver.got()) >= 4 and got[2:], 20, what="two more attempts")
        assert json.loads(fourth["body"])["data"] == {"job_id": short, "status": "completed", "result_expired": True}
        assert ca.poll(short).status == 404
        eventually(lambda: not any(short in k for k in keys_under(etcd, r.prefix)), 10, what="the expired job's keys gone")
    finally:
        receiver.stop()


def test_a_long_input_is_joined_into_one_file_over_etcd(replicas, mock):
    providers = {"openai": {"type": "openai", "cluster": "mock", "base_path": "/v1", "timeout_ms": 5000,
                            "max_input_chars": 100, "max_parallel_chunks": 2}}
    r = replicas(providers=providers)
    (_, ca), (_, cb) = r.start(), r.start()

    def echo(record):
        data = record["json"]["input"].encode()
        return 200, {"content-type": "audio/pcm"}, data + b" " * (len(data) % 2)

    mock.add_rule(path_prefix="/v1/audio/speech", body=echo, delay=0.1)
    text = " ".join(f"{i} The quick brown fox jumps over the lazy dog." for i in range(20))
    job = submit(ca, {"model": "openai/tts-1", "input": text, "voice": "a", "response_format": "pcm"})
    running = eventually(lambda: (j := cb.poll(job).json()).get("progress") and j, 10, what="progress from etcd")
    assert running["status"] == "processing" and running["progress"]["chunks_total"] > 5, running
    done = cb.wait(job, timeout=30).json()
    assert done["status"] == "completed", done
    inputs = sorted((s["json"]["input"] for s in mock.recorded()), key=text.index)
    assert len(inputs) > 5 and all(len(i) <= 100 for i in inputs)
    audio = cb.call("GET", f"{SPEECH}/{job}/content").body
    assert audio.replace(b" ", b"") == "".join(inputs).replace(" ", "").encode(), "the parts, in order, as one file"


def test_a_job_that_outlives_its_deadline_fails_over_etcd(replicas, mock):
    r = replicas(job_deadline_s=2)
    (_, ca), (_, cb) = r.start(), r.start()
    mock.add_rule(path_prefix="/v1/audio/speech", hang=True)
    job = submit(ca)
    done = cb.wait(job, timeout=15).json()
    assert (done["status"], done["status_code"]) == ("failed", 504), done
    assert "deadline of 2 s" in done["error"]["error"]["message"]
    assert done["error"]["extra_fields"]["provider"] == "openai"
