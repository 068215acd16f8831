"""The submit / poll API on a real Envoy, OpenAI-type providers."""

import datetime
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import KEY_A, KEY_B, PROVIDER_KEY, SPEECH, audio_of, eventually, stays
from helpers import NOT_FOUND, speech
from mock_provider import fake_audio

# Where a test shows that nothing was sent upstream, it watches the mock for a
# stated 0.1 to 0.2 s (`stays`): a job goes upstream as soon as it is queued,
# and a rejected request never is.

def ts(text):
    assert text.endswith("Z"), text
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_happy_path_returns_the_providers_exact_audio(client, mock):
    audio = fake_audio(4096, seed=7)
    mock.add_rule(path_prefix="/v1/audio/speech", status=200, body=audio, headers={"content-type": "audio/mpeg"})
    r = client.submit(speech())
    assert r.status == 202, r
    job = r.json()
    assert set(job) == {"id", "status", "created_at"}
    assert job["status"] == "pending"
    assert r.headers["location"] == f"{SPEECH}/{job['id']}"
    assert r.headers["retry-after"] == "1"
    assert len(job["id"]) == 36 and job["id"][14] == "4"
    ts(job["created_at"])

    done = client.wait(job["id"])
    assert done.status == 200, done
    body = done.json()
    assert body["status"] == "completed"
    assert body["status_code"] == 200
    assert body["error"] is None
    assert audio_of(body) == audio
    assert body["result"]["response_format"] == "mp3"
    assert body["result"]["content_type"] == "audio/mpeg"
    extra = body["result"]["extra_fields"]
    assert (extra["provider"], extra["model_requested"], extra["request_type"]) == ("openai", "gpt-4o-mini-tts", "speech")
    assert isinstance(extra["latency"], int)
    assert ts(body["expires_at"]) - ts(body["completed_at"]) == datetime.timedelta(seconds=3600)
    assert ts(body["completed_at"]) >= ts(body["created_at"])

    content = client.call("GET", f"{SPEECH}/{job['id']}/content")
    assert content.status == 200
    assert content.body == audio
    assert content.headers["content-type"] == "audio/mpeg"
    assert content.headers["content-length"] == str(len(audio))


def test_upstream_request_has_the_openai_path_headers_and_body(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"RIFF")
    r = client.submit(speech(input="Exactly this text", voice="nova", response_format="wav",
                             speed=1.5, instructions="Speak slowly", language_code="en",
                             fallbacks=[], unknown_field=True))
    assert r.status == 202, r
    assert client.wait(r.json()["id"]).json()["status"] == "completed"
    [req] = mock.wait_for_requests(1)
    assert req["method"] == "POST"
    assert req["path"] == "/v1/audio/speech"
    assert req["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert req["headers"]["content-type"] == "application/json"
    assert req["headers"]["host"] == "api.openai.test"
    # The client's virtual key never reaches the provider.
    assert KEY_A not in json.dumps(req["headers"])
    assert req["json"] == {"model": "gpt-4o-mini-tts", "input": "Exactly this text", "voice": "nova",
                           "response_format": "wav", "speed": 1.5, "instructions": "Speak slowly"}


def test_poll_shows_pending_or_processing_then_completed(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"late audio", delay=1.5)
    job_id = client.submit(speech()).json()["id"]
    seen = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = client.poll(job_id)
        body = r.json()
        seen.add(body["status"])
        if r.status == 200:
            break
        assert r.status == 202
        assert body["status"] in ("pending", "processing")
        assert r.headers["retry-after"] == "1"
        assert "result" not in body and "completed_at" not in body
        # The audio endpoint says "not yet" too (or, if the job ended since the poll, gives the audio).
        content = client.call("GET", f"{SPEECH}/{job_id}/content")
        assert content.status == 202 or (content.status, content.body) == (200, b"late audio"), content
        time.sleep(0.1)
    assert "processing" in seen
    assert body["status"] == "completed"
    assert audio_of(body) == b"late audio"


def test_result_expires_after_its_ttl(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"short-lived")
    r = client.submit(speech(), headers={"x-bf-async-job-result-ttl": "1"})
    body = client.wait(r.json()["id"]).json()
    assert body["status"] == "completed"
    assert ts(body["expires_at"]) - ts(body["completed_at"]) == datetime.timedelta(seconds=1)
    gone = eventually(lambda: (r := client.poll(body["id"])).status == 404 and r, timeout=10, interval=0.1,
                      what="the job to expire after its 1 s TTL")
    assert gone.status == 404
    assert gone.json() == NOT_FOUND
    assert client.call("GET", f"{SPEECH}/{body['id']}/content").status == 404


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "86401", "", "99999999999999999999999"])
def test_ttl_header_is_validated(client, mock, value):
    r = client.submit(speech(), headers={"x-bf-async-job-result-ttl": value})
    assert r.status == 400, r
    err = r.json()
    assert err["error"]["param"] == "x-bf-async-job-result-ttl"
    assert "x-bf-async-job-result-ttl" in err["error"]["message"]
    stays(lambda: mock.recorded() == [], 0.2, "nothing sent upstream")


def test_ttl_zero_means_the_default(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    r = client.submit(speech(), headers={"x-bf-async-job-result-ttl": "0"})
    body = client.wait(r.json()["id"]).json()
    assert ts(body["expires_at"]) - ts(body["completed_at"]) == datetime.timedelta(seconds=3600)


def test_missing_and_unknown_keys_are_401(client, mock):
    for key in (None, "sk-bf-not-a-key", "sk-proj-provider-style"):
        r = client.submit(speech(), key=key)
        assert r.status == 401, (key, r)
        err = r.json()
        assert err["status_code"] == 401 and err["error"]["message"]
    r = client.poll("0b9c7c4e-8a47-4a39-9d1c-2f0f2a3b8e51", key=None)
    assert r.status == 401
    stays(lambda: mock.recorded() == [], 0.2, "nothing sent upstream")


def test_every_key_header_and_sha256_keys_work(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    for name in ("x-bf-vk", "x-api-key", "api-key"):
        r = client.submit(speech(), key=None, headers={name: KEY_B})
        assert r.status == 202, (name, r)
        assert client.wait(r.json()["id"], key=KEY_B).json()["status"] == "completed"


def test_another_keys_job_is_404_like_an_unknown_one(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"private audio")
    job_id = client.submit(speech()).json()["id"]
    assert client.wait(job_id).status == 200
    for path in (f"{SPEECH}/{job_id}", f"{SPEECH}/{job_id}/content"):
        r = client.call("GET", path, key=KEY_B)
        assert r.status == 404
        assert r.json() == NOT_FOUND
        assert b"private" not in r.body
    assert client.call("DELETE", f"{SPEECH}/{job_id}", key=KEY_B).status == 404
    # Unknown and malformed ids get the very same answer.
    for other in ("0b9c7c4e-8a47-4a39-9d1c-2f0f2a3b8e51", "nope", job_id.upper()):
        r = client.poll(other)
        assert (r.status, r.json()) == (404, NOT_FOUND)
    assert client.poll(job_id).status == 200


BAD_REQUESTS = [
    ("not json", None),
    ('["an array"]', None),
    (speech(model=None), "model"),
    (speech(model="gpt-4o-mini-tts"), "model"),
    (speech(model="nosuch/tts-1"), "model"),
    (speech(model=3), "model"),
    (speech(input=None), "input"),
    (speech(input=""), "input"),
    (speech(input="x" * 1001), "input"),
    (speech(input=7), "input"),
    (speech(voice=None), "voice"),
    (speech(voice=""), "voice"),
    (speech(voice=5), "voice"),
    (speech(voice=[{"speaker": "A", "voice": "Kore"}]), "voice"),
    (speech(fallbacks="backup/x"), "fallbacks"),
    (speech(fallbacks=["nosuch/x"]), "fallbacks[0]"),
    (speech(fallbacks=["backup/x", 3]), "fallbacks[1]"),
    (speech(stream_format="sse"), "stream_format"),
    (speech(response_format="ogg"), "response_format"),
    (speech(speed=0.24), "speed"),
    (speech(speed=4.5), "speed"),
    (speech(speed="fast"), "speed"),
    (speech(instructions=["x"]), "instructions"),
    (speech(with_timestamps="yes"), "with_timestamps"),
    (speech(enable_logging=1), "enable_logging"),
    (speech(pronunciation_dictionary_locators=["x"]), "pronunciation_dictionary_locators"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS)
def test_every_400_rule_names_its_param_and_sends_nothing_upstream(client, mock, body, param):
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None}
        r = client.submit(body)
    else:
        r = client.submit(body, headers={"content-type": "application/json"})
    assert r.status == 400, r
    err = r.json()
    assert err["status_code"] == 400
    assert err["is_bifrost_error"] is True
    assert err["error"]["message"]
    assert err["error"].get("param") == param
    if param == "stream_format":
        assert err["error"]["message"] == "stream is not supported for async speech"
    stays(lambda: mock.recorded() == [], 0.1, "nothing sent upstream")


def test_wrong_method_content_type_and_size(client, mock):
    r = client.call("GET", SPEECH)
    assert r.status == 405 and r.headers["allow"] == "POST"
    r = client.call("PUT", f"{SPEECH}/0b9c7c4e-8a47-4a39-9d1c-2f0f2a3b8e51")
    assert r.status == 405 and r.headers["allow"] == "GET, DELETE"
    r = client.submit(json.dumps(speech()), headers={"content-type": "text/plain"})
    assert r.status == 415, r
    r = client.submit(json.dumps(speech(input="x" * 200_000)), headers={"content-type": "application/json"})
    assert r.status == 413, r
    assert r.json()["status_code"] == 413
    stays(lambda: mock.recorded() == [], 0.1, "nothing sent upstream")


@pytest.mark.parametrize("status,body,message", [
    (500, {"error": {"message": "The server had an error", "type": "server_error"}}, "The server had an error"),
    (429, {"error": {"message": "Rate limit reached for tts-1", "type": "requests", "code": "rate_limit_exceeded"}},
     "Rate limit reached for tts-1"),
])
def test_provider_errors_fail_the_job_with_their_status_and_message(client, mock, status, body, message):
    mock.add_rule(path_prefix="/v1/audio/speech", status=status, body=body)
    job_id = client.submit(speech()).json()["id"]
    r = client.wait(job_id)
    assert r.status == 200
    job = r.json()
    assert job["status"] == "failed"
    assert job["status_code"] == status
    assert job["result"] is None
    err = job["error"]
    assert err["status_code"] == status
    assert err["error"]["message"] == message
    assert err["error"]["type"] == body["error"]["type"]
    assert err["extra_fields"]["provider"] == "openai"
    assert err["extra_fields"]["model_requested"] == "gpt-4o-mini-tts"
    assert err["extra_fields"]["attempts"] == [{"provider": "openai", "model": "gpt-4o-mini-tts", "status_code": status}]
    assert PROVIDER_KEY not in r.body.decode()
    content = client.call("GET", f"{SPEECH}/{job_id}/content")
    assert content.status == status
    assert content.json()["error"]["message"] == message


def test_a_provider_that_does_not_answer_in_time_is_504(client, mock):
    mock.add_rule(path_prefix="/slow/v1/audio/speech", body=b"too late", delay=3)
    job_id = client.submit(speech(model="slow/tts-1")).json()["id"]
    job = client.wait(job_id).json()
    assert job["status"] == "failed"
    assert job["status_code"] == 504
    assert "700 ms" in job["error"]["error"]["message"]
    assert job["error"]["extra_fields"]["provider"] == "slow"


def test_an_unreachable_provider_is_502(client, mock):
    job_id = client.submit(speech(model="down/tts-1")).json()["id"]
    job = client.wait(job_id).json()
    assert job["status"] == "failed"
    assert job["status_code"] == 502, job
    assert "unreachable" in job["error"]["error"]["message"]


def test_fallbacks_are_tried_in_order(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", status=503, body={"error": {"message": "overloaded"}})
    mock.add_rule(path_prefix="/backup/v1/audio/speech", body=b"from the fallback")
    job_id = client.submit(speech(fallbacks=["down/tts-1", "backup/tts-1-hd"])).json()["id"]
    job = client.wait(job_id).json()
    assert job["status"] == "completed", job
    assert audio_of(job) == b"from the fallback"
    assert job["result"]["extra_fields"]["provider"] == "backup"
    assert job["result"]["extra_fields"]["model_requested"] == "tts-1-hd"
    paths = [r["path"] for r in mock.recorded()]
    assert paths == ["/v1/audio/speech", "/backup/v1/audio/speech"]
    assert mock.recorded()[1]["json"]["model"] == "tts-1-hd"
    assert "authorization" not in mock.recorded()[1]["headers"]


def test_when_every_fallback_fails_the_last_error_is_reported(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", status=500, body={"error": {"message": "first"}})
    mock.add_rule(path_prefix="/backup/v1/audio/speech", status=400, body={"error": {"message": "second"}})
    job = client.wait(client.submit(speech(fallbacks=["backup/m2"])).json()["id"]).json()
    assert job["status"] == "failed"
    assert job["status_code"] == 400
    assert job["error"]["error"]["message"] == "second"
    assert job["error"]["extra_fields"]["provider"] == "backup"
    assert [a["status_code"] for a in job["error"]["extra_fields"]["attempts"]] == [500, 400]


def test_200_parallel_submits_all_complete_once(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech",
                  body=lambda req: (200, {"content-type": "audio/mpeg"}, ("audio:" + req["json"]["input"]).encode()))
    inputs = [f"parallel job {i}" for i in range(200)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        submits = list(pool.map(lambda text: client.submit(speech(input=text)), inputs))
    assert all(r.status == 202 for r in submits), [r for r in submits if r.status != 202][:3]
    ids = [r.json()["id"] for r in submits]
    assert len(set(ids)) == 200
    with ThreadPoolExecutor(max_workers=16) as pool:
        finals = list(pool.map(lambda i: client.wait(i, timeout=60).json(), ids))
    for text, job in zip(inputs, finals):
        assert job["status"] == "completed", job
        assert audio_of(job) == ("audio:" + text).encode()
    seen = sorted(r["json"]["input"] for r in mock.recorded())
    assert seen == sorted(inputs), "each job is sent upstream exactly once"


def test_a_client_that_hangs_up_after_its_202_still_gets_its_job_done(client, envoy, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"done without you", delay=1.0)
    body = json.dumps(speech()).encode()
    with socket.create_connection(("127.0.0.1", envoy.port)) as s:
        s.sendall(b"POST " + SPEECH.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY_A.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            assert chunk, f"the connection closed before the whole 202: {answer!r}"
            answer += chunk
    hung_up_at = time.monotonic()
    assert answer.startswith(b"HTTP/1.1 202")
    job_id = json.loads(answer.split(b"\r\n\r\n", 1)[1])["id"]
    job = client.wait(job_id).json()
    assert job["status"] == "completed"
    assert audio_of(job) == b"done without you"
    # The connection was closed before the provider had answered.
    [sent] = mock.recorded()
    assert sent["answered_at"] is not None and sent["answered_at"] > hung_up_at, (sent["answered_at"], hung_up_at)


def test_other_paths_pass_through_untouched(client, mock):
    mock.add_rule(path_prefix="/", body=b"the app answered")
    for path in ("/", "/v1/audio/speech", "/v1/async/audio/speechless", "/v1/async/other"):
        r = client.call("POST", path, body=b"not json", key=None, headers={"x-custom": "1"})
        assert (r.status, r.body) == (200, b"the app answered"), path
    reqs = mock.recorded()
    assert [r["path"] for r in reqs] == ["/", "/v1/audio/speech", "/v1/async/audio/speechless", "/v1/async/other"]
    assert all(r["body"] == b"not json" and r["headers"]["x-custom"] == "1" for r in reqs)


def test_delete_forgets_the_job(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    job_id = client.submit(speech()).json()["id"]
    assert client.wait(job_id).status == 200
    r = client.call("DELETE", f"{SPEECH}/{job_id}")
    assert r.status == 204 and r.body == b""
    assert client.poll(job_id).json() == NOT_FOUND
    assert client.call("DELETE", f"{SPEECH}/{job_id}").status == 404


def test_non_utf8_headers_do_not_break_the_filter(client, envoy, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
    with socket.create_connection(("127.0.0.1", envoy.port)) as s:
        s.sendall(b"GET " + SPEECH.encode() + b"/abc HTTP/1.1\r\nHost: x\r\nx-bf-vk: sk-bf-\xff\xfe\r\n"
                  b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    r = client.submit(speech())
    assert r.status == 202
    assert client.wait(r.json()["id"]).json()["status"] == "completed"
