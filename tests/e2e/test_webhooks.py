"""Webhooks: signed deliveries, verified with the standardwebhooks package."""

import base64
import json
import os

import pytest

from conftest import KEY_A, KEY_B, SPEECH, eventually, stats, stays
from envoy_harness import cluster
from helpers import WEBHOOK_SECRET as SECRET, webhook_endpoint as endpoint
from webhook_receiver import Receiver

SECRET2 = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BASIC = {"model": "openai/tts-1", "input": "hello", "voice": "alloy"}


@pytest.fixture
def receiver():
    r = Receiver([SECRET, SECRET2])
    yield r
    r.stop()


def start(make_envoy, receiver, **endpoints):
    return make_envoy(extra_clusters=[cluster("hooks", receiver.port)], webhooks=endpoints)


def submit(client, name="billing", key=KEY_A, body=None, ttl=None):
    headers = {"x-bf-async-webhook": f"  {name} "}
    if ttl:
        headers["x-bf-async-job-result-ttl"] = str(ttl)
    r = client.submit(body or BASIC, headers=headers, key=key)
    assert r.status == 202, r
    return r.json()["id"]


def deliveries(receiver, n, timeout=15):
    return eventually(lambda: len(got := receiver.got()) >= n and got, timeout,
                      what=lambda: f"{n} deliveries; got {len(receiver.got())}")


def test_a_completed_job_is_delivered_signed_in_bifrosts_envelope(make_envoy, mock, receiver):
    envoy, client = start(make_envoy, receiver, billing=endpoint())
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"AUDIO")
    job = submit(client)
    [d] = deliveries(receiver, 1)
    assert d["verified"][0], "standardwebhooks verifies the signature"
    h = d["headers"]
    assert h["content-type"] == "application/json" and h["x-team"] == "platform"
    assert h["webhook-id"].startswith("msg_") and h["webhook-timestamp"].isdigit()
    assert h["webhook-signature"].startswith("v1,")
    assert h["host"] == "hooks.internal"
    body = json.loads(d["body"])
    done = client.wait(job).json()
    assert body["event"] == "async_job.completed"
    assert body["data"] == {"job_id": job, "request_type": "speech", "status": "completed", "status_code": 200,
                            "created_at": done["created_at"], "completed_at": done["completed_at"],
                            "result_url": f"{SPEECH}/{job}", "result_expires_at": done["expires_at"]}
    final = eventually(lambda: (j := client.poll(job).json()).get("webhook", {}).get("status") == "delivered" and j,
                       5, what="the job to show the delivery")
    assert final["webhook"] == {"endpoint": "billing", "status": "delivered", "attempts": 1, "last_status_code": 200}
    assert final["result"]["audio"] == base64.b64encode(b"AUDIO").decode(), "the audio is still there"
    assert eventually(lambda: stats(envoy).get("webhooks_delivered") == 1, 5, what="the delivered counter")


def test_failed_jobs_send_the_failed_event_with_the_error_when_asked(make_envoy, mock, receiver):
    envoy, client = start(make_envoy, receiver, billing=endpoint(include_response=True))
    mock.add_rule(path_prefix="/v1/audio/speech", status=500, body={"error": {"message": "boom"}})
    job = submit(client)
    [d] = deliveries(receiver, 1)
    body = json.loads(d["body"])
    assert (body["event"], body["data"]["status"], body["data"]["status_code"]) == ("async_job.failed", "failed", 500)
    assert body["data"]["error"]["error"]["message"] == "boom"
    assert client.wait(job).json()["status"] == "failed"


def test_retries_back_off_with_one_id_and_one_body_then_deliver(make_envoy, mock, receiver):
    envoy, client = start(make_envoy, receiver, billing=endpoint(retry_backoff_max_seconds=4))
    receiver.script = [500, 503, 200]
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    job = submit(client)
    got = deliveries(receiver, 3)
    assert [d["answered"] for d in got] == [500, 503, 200]
    assert len({d["headers"]["webhook-id"] for d in got}) == 1
    assert len({d["body"] for d in got}) == 1, "every attempt sends the same body bytes"
    assert all(d["verified"][0] for d in got)
    gaps = [b["time"] - a["time"] for a, b in zip(got, got[1:])]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
    webhook = eventually(lambda: client.poll(job).json()["webhook"]["status"] == "delivered" and client.poll(job).json()["webhook"], 5,
                         what="delivered")
    assert (webhook["attempts"], webhook["last_status_code"]) == (3, 200)
    assert eventually(lambda: stats(envoy).get("webhooks_retried") == 2, 5, what="two retries counted")


def test_delivery_gives_up_after_max_retries_and_stops_at_once_on_410(make_envoy, mock, receiver):
    envoy, client = start(make_envoy, receiver, billing=endpoint(max_retries=1), gone=endpoint())
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    receiver.script = [500, 500, 500, 500]
    job = submit(client)
    deliveries(receiver, 2)
    webhook = eventually(lambda: client.poll(job).json()["webhook"]["status"] == "failed" and client.poll(job).json()["webhook"],
                         8, what="given up")
    assert (webhook["attempts"], webhook["last_status_code"]) == (2, 500)
    stays(lambda: len(receiver.got()) == 2, 2.5, what="no third attempt")
    receiver.script = [410]
    other = submit(client, name="gone")
    deliveries(receiver, 3)
    webhook = eventually(lambda: client.poll(other).json()["webhook"]["status"] == "failed" and client.poll(other).json()["webhook"],
                         5, what="410 ends it")
    assert (webhook["attempts"], webhook["last_status_code"]) == (1, 410)
    stays(lambda: len(receiver.got()) == 3, 2.5, what="no retry after 410")
    assert eventually(lambda: stats(envoy).get("webhooks_failed") == 2, 5, what="two failures counted")


def test_a_hanging_or_unreachable_endpoint_is_retried(make_envoy, mock, receiver, tmp_path):
    envoy, client = start(make_envoy, receiver, billing=endpoint(attempt_timeout_seconds=1),
                          nowhere=endpoint(cluster="down", max_retries=1))
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    receiver.script = ["hang", 200]
    job = submit(client)
    got = deliveries(receiver, 2)
    assert got[0]["headers"]["webhook-id"] == got[1]["headers"]["webhook-id"]
    webhook = eventually(lambda: client.poll(job).json()["webhook"]["status"] == "delivered" and client.poll(job).json()["webhook"],
                         8, what="delivered after the timeout")
    assert webhook["attempts"] == 2
    lost = submit(client, name="nowhere")
    webhook = eventually(lambda: client.poll(lost).json()["webhook"]["status"] == "failed" and client.poll(lost).json()["webhook"],
                         10, what="given up on an unreachable endpoint")
    assert webhook["attempts"] == 2 and "last_status_code" not in webhook


def test_the_response_is_included_only_within_the_payload_cap(make_envoy, mock, receiver):
    envoy, client = start(make_envoy, receiver, small=endpoint(include_response=True, max_response_payload_kbs=1),
                          large=endpoint(include_response=True, max_response_payload_kbs=64))
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"A" * 3000)
    submit(client, name="small")
    [d] = deliveries(receiver, 1)
    data = json.loads(d["body"])["data"]
    assert data.get("response_omitted") is True and "response" not in data
    submit(client, name="large")
    d = deliveries(receiver, 2)[1]
    data = json.loads(d["body"])["data"]
    assert base64.b64decode(data["response"]["audio"]) == b"A" * 3000
    assert data["response"]["content_type"] == "audio/mpeg"


def test_rotation_signs_with_every_secret(make_envoy, mock, receiver):
    envoy, client = start(make_envoy, receiver, billing=endpoint(secret=None, secrets=[SECRET, SECRET2]))
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    submit(client)
    [d] = deliveries(receiver, 1)
    assert d["headers"]["webhook-signature"].count("v1,") == 2
    assert d["verified"] == [True, True], "each secret alone verifies"


def test_the_events_filter_and_the_expired_form(make_envoy, mock, receiver):
    envoy, client = start(make_envoy, receiver, failures=endpoint(events=["async_job.failed"]),
                          billing=endpoint(retry_backoff_initial_seconds=2, retry_backoff_max_seconds=2))
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    quiet = submit(client, name="failures")
    assert "webhook" not in client.wait(quiet).json()
    stays(lambda: receiver.got() == [], 1.0, what="no delivery for an unwanted event")
    # TTL 1 s; the first attempt fails, the retry (2 s later) comes after expiry.
    receiver.script = [500, 200]
    job = submit(client, ttl=1)
    first, second = deliveries(receiver, 2)
    one, two = json.loads(first["body"]), json.loads(second["body"])
    assert one["data"]["status"] == "completed" and "result_url" in one["data"]
    assert two == {"event": one["event"], "created_at": one["created_at"],
                   "data": {"job_id": job, "status": "completed", "result_expired": True}}
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
    assert second["verified"][0]
    assert client.poll(job).status == 404
    # Once the delivery ended, the slot is freed.
    eventually(lambda: stats(envoy).get("jobs_held") == 1, 5, what="only the quiet job held")


def test_unknown_disabled_and_foreign_endpoints_are_400(make_envoy, mock, receiver):
    envoy, client = start(make_envoy, receiver, billing=endpoint(virtual_keys=["team-b"]),
                          off=endpoint(disabled=True))
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    for name, key in (("nope", KEY_A), ("off", KEY_A), ("billing", KEY_A)):
        r = client.submit(BASIC, headers={"x-bf-async-webhook": name}, key=key)
        assert r.status == 400 and r.json()["error"]["param"] == "x-bf-async-webhook", (name, r)
    submit(client, key=KEY_B)
    deliveries(receiver, 1)
