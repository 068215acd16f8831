"""Hostile clients and hostile upstreams: each rule, on the real Envoy."""

import json
import socket
import time

import pytest

from conftest import KEY_A, PROVIDER_KEY, SPEECH, eventually, stats
from mock_provider import fake_audio

BASIC = {"model": "openai/tts-1", "input": "hello", "voice": "alloy"}


def submit_ok(client, body=None, **kw):
    r = client.submit(body or BASIC, **kw)
    assert r.status == 202, r
    return r.json()["id"]


def assert_400(r, param):
    assert r.status == 400, r
    assert r.json()["error"]["param"] == param, r


def nothing_sent_upstream(mock):
    assert [r["path"] for r in mock.recorded()] == []


# --- Bad input: bounded fields, bounded work --------------------------------------

def test_a_huge_fallbacks_array_is_refused_at_once_and_envoy_keeps_serving(make_envoy, mock):
    # As the shipped config: 100,000 input characters let a 600 KB body in.
    envoy, client = make_envoy(max_input_chars=100_000)
    body = dict(BASIC, model="openai/x", fallbacks=["openai/x"] * 50_000)
    assert len(json.dumps(body)) > 500_000
    started = time.monotonic()
    r = client.submit(body)
    assert_400(r, "fallbacks")
    assert "5" in r.json()["error"]["message"], r
    assert time.monotonic() - started < 5
    nothing_sent_upstream(mock)
    # Six is one too many by default; five is fine.
    assert_400(client.submit(dict(BASIC, fallbacks=["backup/x"] * 6)), "fallbacks")
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
    job = submit_ok(client, dict(BASIC, fallbacks=["backup/x"] * 5))
    assert client.wait(job).json()["status"] == "completed"


@pytest.mark.parametrize("change,param", [
    ({"model": "openai/" + "m" * 250}, "model"),
    ({"voice": "v" * 257}, "voice"),
    ({"instructions": "i" * 4097}, "instructions"),
    ({"model": "elevenlabs/m", "pronunciation_dictionary_locators": [{"pronunciation_dictionary_id": "d"}] * 4},
     "pronunciation_dictionary_locators"),
    ({"model": "elevenlabs/m", "voice": ".."}, "voice"),
    ({"model": "elevenlabs/m", "voice": "."}, "voice"),
    ({"model": "gemini/..", "voice": "Kore"}, "model"),
    ({"model": "azure/.", "voice": "alloy"}, "model"),
])
def test_oversized_fields_and_dot_segments_are_400_naming_the_param(client, mock, change, param):
    assert_400(client.submit(dict(BASIC, **change)), param)
    nothing_sent_upstream(mock)


def test_limits_just_inside_are_accepted(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
    body = dict(BASIC, model="openai/" + "m" * (256 - len("openai/")), voice="v" * 256, instructions="i" * 4096)
    job = submit_ok(client, body)
    assert client.wait(job).json()["status"] == "completed"
    sent = mock.wait_for_requests(1)[0]["json"]
    assert (len(sent["model"]), len(sent["voice"]), len(sent["instructions"])) == (249, 256, 4096)


def test_a_voice_id_is_one_percent_encoded_path_segment(client, mock):
    mock.add_rule(path_prefix="/el/", body=b"ID3audio")
    job = submit_ok(client, dict(BASIC, model="elevenlabs/m", voice="a/b?x=1#y z"))
    assert client.wait(job).json()["status"] == "completed"
    assert mock.wait_for_requests(1)[0]["path_only"] == "/el/v1/text-to-speech/a%2Fb%3Fx%3D1%23y%20z"


# --- Hostile upstreams ------------------------------------------------------------

def test_audio_above_max_audio_bytes_fails_the_job_and_nothing_else(make_envoy, mock):
    envoy, client = make_envoy(max_audio_bytes=65_536)
    mock.add_rule(path_prefix="/v1/audio/speech", body=fake_audio(200_000), times=1)
    mock.add_rule(path_prefix="/v1/audio/speech", body=fake_audio(60_000))
    big = submit_ok(client)
    job = client.wait(big).json()
    assert (job["status"], job["status_code"]) == ("failed", 502), job
    assert "max_audio_bytes" in job["error"]["error"]["message"] and "65536" in job["error"]["error"]["message"], job
    fits = client.wait(submit_ok(client)).json()
    assert fits["status"] == "completed"


def test_deeply_nested_provider_json_fails_the_job_with_a_message(client, mock):
    deep = b'{"audio_base64":"AAEC","alignment":' + b"[" * 200 + b"]" * 200 + b"}"
    mock.add_rule(path_prefix="/el/", body=deep, headers={"content-type": "application/json"})
    job = submit_ok(client, dict(BASIC, model="elevenlabs/m", voice="v", with_timestamps=True))
    done = client.wait(job).json()
    assert (done["status"], done["status_code"]) == ("failed", 502), done
    assert "nest" in done["error"]["error"]["message"], done
    # The record stays readable and other jobs go on.
    assert client.poll(job).status == 200


def test_a_provider_error_repeating_the_key_is_redacted(client, mock, envoy):
    mock.add_rule(path_prefix="/v1/audio/speech", status=401,
                  body={"error": {"message": f"Incorrect API key provided: {PROVIDER_KEY}.", "code": PROVIDER_KEY}})
    done = client.wait(submit_ok(client)).json()
    assert done["status"] == "failed"
    text = json.dumps(done)
    assert PROVIDER_KEY not in text, text
    assert "[redacted]" in done["error"]["error"]["message"], done
    assert PROVIDER_KEY not in envoy.log()


@pytest.mark.parametrize("rule,provider", [
    ({"status": 200, "body": b""}, "openai"),
    ({"status": 204, "body": b""}, "openai"),
    ({"status": 200, "body": b"<<<garbage>>>\xff\x00"}, "gemini"),
    ({"status": 200, "body": b"{\"candidates\": [{}]}"}, "gemini"),
    ({"status": 200, "body": b"not json", "headers": {"content-type": "application/json"}}, "elevenlabs-ts"),
    ({"status": 200, "body": b"x", "truncate": 5000}, "openai"),
])
def test_garbage_answers_end_every_job(client, mock, rule, provider):
    body = {"openai": BASIC, "gemini": dict(BASIC, model="gemini/m", voice="Kore"),
            "elevenlabs-ts": dict(BASIC, model="elevenlabs/m", voice="v", with_timestamps=True)}[provider]
    mock.add_rule(path_prefix="/", **rule)
    done = client.wait(submit_ok(client, body), timeout=20).json()
    assert done["status"] == "failed", done
    assert done["status_code"] in (502, 504), done
    assert done["error"]["error"]["message"], done


def test_stalled_clients_do_not_stop_other_requests(client, envoy, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
    stalled = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", envoy.port))
            body = json.dumps(BASIC).encode()
            s.sendall(f"POST {SPEECH} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n"
                      f"content-type: application/json\r\ncontent-length: {len(body) * 2}\r\n\r\n".encode() + body)
            stalled.append(s)
        # Were the worker stuck behind them, these would time out.
        job = submit_ok(client)
        assert client.wait(job).json()["status"] == "completed"
        assert client.call("GET", "/elsewhere").status in (200, 404)
    finally:
        for s in stalled:
            s.close()


# --- Trailers never bypass the filter ----------------------------------------------

def h2_request(port, method, path, headers, body=b"", trailers=None):
    """One HTTP/2 (prior knowledge) request with optional trailers; returns (status, body)."""
    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", method), (":path", path), (":scheme", "http"),
                               (":authority", "x")] + list(headers.items()), end_stream=not body and not trailers)
    if body:
        conn.send_data(stream, body, end_stream=not trailers)
    if trailers:
        conn.send_headers(stream, list(trailers.items()), end_stream=True)
    sock.sendall(conn.data_to_send())
    status, data = None, b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, data
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return status, data


def test_a_submit_with_trailers_is_handled_and_nothing_goes_upstream(client, envoy, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
    body = json.dumps(BASIC).encode()
    status, data = h2_request(envoy.port, "POST", SPEECH,
                              {"authorization": f"Bearer {KEY_A}", "content-type": "application/json"},
                              body, trailers={"x-checksum": "abc"})
    assert status == 202, data
    job = json.loads(data)["id"]
    assert client.wait(job).json()["status"] == "completed"
    paths = [r["path"] for r in mock.recorded()]
    assert paths == ["/v1/audio/speech"], paths  # the provider call only: nothing reached the app route
    assert KEY_A not in json.dumps([r["headers"] for r in mock.recorded()])
    # A bad submit with trailers is refused, and still nothing goes upstream.
    mock.clear()
    status, data = h2_request(envoy.port, "POST", SPEECH, {"authorization": f"Bearer {KEY_A}"},
                              b'{"model":"openai/x"}', trailers={"x-t": "1"})
    assert status == 400, data
    nothing_sent_upstream(mock)


# --- The store under pressure ---------------------------------------------------------

def test_503_exactly_at_max_jobs_then_room_again_after_expiry(make_envoy, mock):
    envoy, client = make_envoy(max_jobs=5)
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
    jobs = [submit_ok(client, headers={"x-bf-async-job-result-ttl": "1"}) for _ in range(5)]
    full = client.submit(BASIC)
    assert full.status == 503 and full.headers.get("retry-after"), full
    for j in jobs:
        client.wait(j)
    # Every one expired and its slot freed by its timer (nobody polls): five places again, exactly.
    eventually(lambda: stats(envoy).get("jobs_held") == 0, timeout=10, what="every job expired and freed")
    more = [client.submit(BASIC) for _ in range(6)]
    assert [r.status for r in more] == [202] * 5 + [503]
    assert eventually(lambda: stats(envoy).get("jobs_held") == 5, timeout=5, what="the held gauge to be exact")


def test_delete_racing_an_answer_frees_the_job_once(make_envoy, mock):
    envoy, client = make_envoy(max_jobs=1)
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"late", delay=0.8)
    job = submit_ok(client)
    mock.wait_for_requests(1)
    assert client.call("DELETE", f"{SPEECH}/{job}").status == 204
    assert client.call("DELETE", f"{SPEECH}/{job}").status == 404, "a failed DELETE is an error answer"
    # The slot is free at once (max_jobs 1), and the late answer does not bring the job back.
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
    other = submit_ok(client)
    assert client.wait(other).json()["status"] == "completed"
    assert client.poll(job).status == 404


def test_a_deadline_failure_names_the_last_attempt_made(make_envoy, mock):
    envoy, client = make_envoy(job_deadline_s=2)
    mock.add_rule(path_prefix="/slow/", hang=True)
    mock.add_rule(path_prefix="/backup/", hang=True)
    job = submit_ok(client, dict(BASIC, model="slow/s", fallbacks=["backup/b", "openai/never"]))
    done = client.wait(job, timeout=10).json()
    assert (done["status"], done["status_code"]) == ("failed", 504), done
    assert "deadline" in done["error"]["error"]["message"]
    assert done["error"]["extra_fields"]["provider"] == "backup", done


# --- Logs ------------------------------------------------------------------------------

def test_client_text_is_escaped_in_logs_and_no_key_is_logged(client, envoy, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"ok")
    job = submit_ok(client, dict(BASIC, model="openai/x\n[critical] forged line"))
    client.wait(job)
    refused = client.submit(dict(BASIC, model="nope\r\n[critical] forged too"))
    assert refused.status == 400
    log = eventually(lambda: "forged too" in envoy.log() and envoy.log(), timeout=5, what="the refusal in the log")
    for line in log.splitlines():
        assert not line.startswith("[critical] forged"), line
    assert "x\\n[critical] forged line" in log
    for secret in (KEY_A, PROVIDER_KEY):
        assert secret not in log
