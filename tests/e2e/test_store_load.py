"""The job store under pressure: admission, expiry by timer, deadlines, bursts."""

import time
from concurrent.futures import ThreadPoolExecutor

from conftest import SPEECH, audio_of, eventually, stats, stays
from helpers import NOT_FOUND, speech


def test_503_at_max_jobs_and_delete_frees_a_place(make_envoy, mock):
    envoy, client = make_envoy(max_jobs=3)
    mock.add_rule(path_prefix="/v1/audio/speech", hang=True)
    ids = []
    for _ in range(3):
        r = client.submit(speech())
        assert r.status == 202, r
        ids.append(r.json()["id"])
    full = client.submit(speech())
    assert full.status == 503, full
    assert full.headers["retry-after"] == "1"
    err = full.json()
    assert err["status_code"] == 503 and "full" in err["error"]["message"]
    mock.wait_for_requests(3)
    stays(lambda: len(mock.recorded()) == 3, 0.3, "nothing sent for the refused job")
    assert client.call("DELETE", f"{SPEECH}/{ids[0]}").status == 204
    assert client.poll(ids[0]).json() == NOT_FOUND
    assert client.submit(speech()).status == 202
    again = client.submit(speech())
    assert again.status == 503, again
    s = stats(envoy)
    assert s["jobs_rejected.store_full"] == 2, (again, {k: v for k, v in s.items() if "refus" in k})


def test_expired_jobs_are_swept_without_anyone_polling(make_envoy, mock):
    envoy, client = make_envoy(max_jobs=3)
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    ids = [client.submit(speech(), headers={"x-bf-async-job-result-ttl": "1"}).json()["id"] for _ in range(3)]
    for job_id in ids:
        assert client.wait(job_id).json()["status"] == "completed"
    assert client.submit(speech()).status == 503
    # No polls from here on: only the expiry timers can free the three slots.
    eventually(lambda: stats(envoy).get("jobs_expired", 0) >= 3, timeout=10, interval=0.2,
               what="the expiry timers to free the three jobs")
    assert stats(envoy)["jobs_expired"] == 3
    for _ in range(3):
        assert client.submit(speech()).status == 202
    assert client.poll(ids[0]).json() == NOT_FOUND


def test_a_provider_that_never_answers_fails_by_the_job_deadline(make_envoy, mock):
    config = {"openai": {"type": "openai", "cluster": "mock", "base_path": "/v1", "timeout_ms": 60000}}
    envoy, client = make_envoy(providers=config, job_deadline_s=2)
    mock.add_rule(path_prefix="/v1/audio/speech", hang=True)
    started = time.monotonic()
    job_id = client.submit(speech()).json()["id"]
    job = client.wait(job_id, timeout=20).json()
    assert job["status"] == "failed", job
    assert job["status_code"] == 504
    assert "deadline of 2 s" in job["error"]["error"]["message"]
    assert job["error"]["extra_fields"]["attempts"] == [{"provider": "openai", "model": "gpt-4o-mini-tts", "status_code": 504}]
    assert time.monotonic() - started < 10
    assert stats(envoy)["jobs_failed.deadline"] == 1


def test_a_burst_of_5000_submits_all_complete(make_envoy, mock):
    envoy, client = make_envoy(max_jobs=6000, max_in_flight=32)
    mock.add_rule(path_prefix="/v1/audio/speech",
                  body=lambda req: (200, {"content-type": "audio/mpeg"}, req["json"]["input"].encode()))
    inputs = [f"burst {i}" for i in range(5000)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        submits = list(pool.map(lambda t: client.submit(speech(input=t)), inputs))
    assert [r.status for r in submits].count(202) == 5000
    ids = [r.json()["id"] for r in submits]
    assert len(set(ids)) == 5000
    with ThreadPoolExecutor(max_workers=24) as pool:
        finals = list(pool.map(lambda i: client.wait(i, timeout=120).json(), ids))
    assert [j["status"] for j in finals].count("completed") == 5000
    assert all(audio_of(j) == t.encode() for t, j in zip(inputs, finals))
    sent = sorted(r["json"]["input"] for r in mock.recorded())
    assert sent == sorted(inputs), "every job went upstream exactly once"
    s = stats(envoy)
    assert s["jobs_submitted"] == 5000 and s["jobs_completed"] == 5000
