"""Envoy stats after known traffic, and the log story of a job."""

import re

from conftest import KEY_A, PROVIDER_KEY, eventually, stats
from helpers import speech

SECRET_TEXT = "The secret launch code is 4242"


def test_stats_count_known_traffic(make_envoy, mock):
    envoy, client = make_envoy()
    before = stats(envoy)
    assert before["jobs_submitted"] == 0 and before["jobs_pending"] == 0
    mock.add_rule(path_prefix="/v1/audio/speech", status=500, body={"error": {"message": "boom"}}, times=1)
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
    mock.add_rule(path_prefix="/slow/v1/audio/speech", hang=True)
    failed = client.submit(speech()).json()["id"]
    assert client.wait(failed).json()["status"] == "failed"
    done = [client.submit(speech()).json()["id"] for _ in range(2)]
    for job_id in done:
        assert client.wait(job_id).json()["status"] == "completed"
    unreachable = client.submit(speech(model="down/tts-1")).json()["id"]
    assert client.wait(unreachable).json()["status_code"] == 502
    timed_out = client.submit(speech(model="slow/tts-1")).json()["id"]
    assert client.wait(timed_out).json()["status_code"] == 504
    assert client.submit(speech(), key=None).status == 401
    assert client.submit(speech(), key="sk-bf-wrong").status == 401
    assert client.submit(speech(input="")).status == 400
    assert client.submit(speech(speed=9)).status == 400
    assert client.call("DELETE", f"/v1/async/audio/speech/{done[0]}").status == 204

    # The gauges move as jobs are submitted, sent and answered: wait for them to show
    # what is held now, after the DELETE (5 were held before it).
    gauges = ("jobs_held", "jobs_pending", "jobs_in_flight")
    eventually(lambda: [stats(envoy).get(g) for g in gauges] == [4, 0, 0], timeout=10, interval=0.1,
               what=lambda: f"the gauges {gauges} to be 4, 0, 0; they are {[stats(envoy).get(g) for g in gauges]}")
    s = stats(envoy)
    assert s["jobs_submitted"] == 5
    assert s["jobs_completed"] == 2
    assert s["jobs_failed.provider_error"] == 1
    assert s["jobs_failed.unreachable"] == 1
    assert s["jobs_failed.timeout"] == 1
    assert s["jobs_failed.deadline"] == 0
    assert s["jobs_rejected.auth"] == 2
    assert s["jobs_rejected.validation"] == 2
    assert s["jobs_rejected.store_full"] == 0
    assert s["jobs_deleted"] == 1
    assert s["jobs_pending"] == 0 and s["jobs_in_flight"] == 0
    assert s["jobs_held"] == 4
    assert s["provider.openai.attempts.error"] == 1
    assert s["provider.openai.attempts.success"] == 2
    assert s["provider.down.attempts.unreachable"] == 1
    assert s["provider.slow.attempts.timeout"] == 1
    prom = envoy.admin("/stats/prometheus")
    assert re.search(r"^async_speech_jobs_completed\{\} 2$", prom, re.M), prom[-2000:]
    assert re.search(r"^async_speech_jobs_failed_provider_error\{\} 1$", prom, re.M)
    # Histograms reach the admin at Envoy's next stats flush; the series exists at once.
    assert re.search(r"^async_speech_provider_openai_latency_ms_count\{\} \d+$", prom, re.M)


def test_a_jobs_story_is_in_the_log_without_its_text_or_keys(make_envoy, mock):
    envoy, client = make_envoy()
    mock.add_rule(path_prefix="/v1/audio/speech", status=503, body={"error": {"message": "busy"}})
    mock.add_rule(path_prefix="/backup/v1/audio/speech", body=b"ok")
    job_id = client.submit(speech(input=SECRET_TEXT, fallbacks=["backup/tts-1"])).json()["id"]
    assert client.wait(job_id).json()["status"] == "completed"
    eventually(lambda: f"job {job_id} completed" in envoy.log(), timeout=10,
               what="Envoy to write the job's last log line")
    lines = [l for l in envoy.log().splitlines() if job_id in l]
    story = "\n".join(lines)
    assert re.search(r"\[info\].*job %s submitted" % job_id, story), story
    assert re.search(r"\[info\].*job %s attempt 0 sent to provider openai" % job_id, story), story
    assert re.search(r"\[warning\].*job %s provider openai answered 503" % job_id, story), story
    assert re.search(r"\[info\].*job %s attempt 1 sent to provider backup" % job_id, story), story
    assert re.search(r"\[info\].*job %s completed" % job_id, story), story
    log = envoy.log()
    for secret in (SECRET_TEXT, KEY_A, PROVIDER_KEY):
        assert secret not in log
