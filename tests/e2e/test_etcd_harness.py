"""A real etcd 3.4 (tests/e2e/etcd_harness.py) and its HTTP/JSON gateway: the
harness itself (start, pause, kill, restart on the same data), and the very
request bodies the Rust builders make (tests/fixtures/etcd/requests.json,
checked against the builders by a unit test in crates/core/src/store/etcd/fixtures.rs)
sent to it, with the fields the Rust parsers read found in its answers."""

import json
import os
import socket
import urllib.error

import pytest

from etcd_harness import Etcd, b64, unb64
from envoy_harness import ROOT
from waiting import eventually

FIXTURES = json.loads((ROOT / "tests" / "fixtures" / "etcd" / "requests.json").read_text())


@pytest.fixture
def etcd():
    e = Etcd().start()
    yield e
    e.stop()


def test_put_and_range_through_the_json_gateway(etcd):
    status, answer = etcd.call("/v3/kv/put", {"key": b64("/async-speech/jobs/x"), "value": b64(b"\x00\xffrec")})
    assert status == 200, answer
    revision = answer["header"]["revision"]
    assert isinstance(revision, str) and int(revision) >= 2  # int64 as a JSON string
    status, answer = etcd.call("/v3/kv/range", {"key": b64("/async-speech/jobs/x")})
    assert status == 200, answer
    [kv] = answer["kvs"]
    assert kv["key"] == "L2FzeW5jLXNwZWVjaC9qb2JzL3g="
    assert unb64(kv["value"]) == b"\x00\xffrec"
    assert kv["mod_revision"] == kv["create_revision"] == revision
    assert answer["count"] == "1"
    assert "lease" not in kv  # zero values are left out
    status, answer = etcd.call("/v3/kv/range", {"key": b64("/async-speech/jobs/none")})
    assert status == 200 and "kvs" not in answer and "count" not in answer, answer


def lookup(node, path):
    """The value at a dotted path (list items by index), or KeyError."""
    for part in path.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node[part]
        else:
            raise KeyError(path)
    return node


def assert_subset(expected, actual, at="answer"):
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{at}: {actual!r} is not an object"
        for k, v in expected.items():
            assert k in actual, f"{at}.{k} is missing from {actual!r}"
            assert_subset(v, actual[k], f"{at}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{at}: {actual!r} vs {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_subset(e, a, f"{at}.{i}")
    else:
        assert actual == expected, f"{at}: {actual!r} != {expected!r}"


def test_the_rust_builders_bodies_against_real_etcd(etcd):
    status, answer = etcd.call("/v3/lease/grant", FIXTURES["preset_lease"])
    assert status == 200 and answer["ID"] == FIXTURES["preset_lease"]["ID"], answer
    for step in FIXTURES["steps"]:
        name = step["name"]
        status, answer = etcd.call(step["path"], step["body"])
        assert status == step["status"], f"{name}: HTTP {status} {answer!r}"
        assert_subset(step["expect"], answer, name)
        for path in step["absent"]:
            with pytest.raises((KeyError, IndexError)):
                lookup(answer, path)
                pytest.fail(f"{name}: {path} is in {answer!r}")
        for path in step.get("present", []):
            lookup(answer, path)


def test_the_largest_audio_part_fits_one_request_and_a_full_value_does_not(etcd):
    limits = FIXTURES["limits"]
    prefix = "/" + "p" * (limits["prefix_max_bytes"] - 2) + "/"
    key = f"{prefix}audio/0b6ad0c8-5e4e-4a43-9c1e-3f1f0d6e9a01/999999"
    status, answer = etcd.call("/v3/lease/grant", {"TTL": "60"})
    assert status == 200, answer
    lease = answer["ID"]
    part = os.urandom(limits["part_bytes"])
    record = f"{prefix}jobs/0b6ad0c8-5e4e-4a43-9c1e-3f1f0d6e9a01"
    record_revision = etcd.put(record, "rec")["header"]["revision"]
    # Alone, and as a write conditional on the record, which it reads back when the
    # condition fails: three keys of the longest kind in one request.
    status, answer = etcd.call("/v3/kv/put", {"key": b64(key), "value": b64(part), "lease": lease})
    assert status == 200, answer
    for revision, succeeded in [(record_revision, True), ("1", None)]:
        txn = {"compare": [{"result": "EQUAL", "target": "MOD", "key": b64(record), "mod_revision": revision}],
               "success": [{"request_put": {"key": b64(key), "value": b64(part), "lease": lease}}],
               "failure": [{"request_range": {"key": b64(record)}}]}
        status, answer = etcd.call("/v3/kv/txn", txn)
        assert status == 200 and answer.get("succeeded") is succeeded, answer
    assert etcd.get(key) == part
    # A value of the full request size is refused: hence the headroom.
    status, answer = etcd.call("/v3/kv/put", {"key": b64(key), "value": b64(os.urandom(limits["max_value_bytes"]))})
    assert status == 400, answer
    assert answer["code"] == 3 and "too large" in answer["message"], answer


def test_a_claim_lapses_with_its_lease(etcd):
    status, answer = etcd.call("/v3/lease/grant", {"TTL": "2"})
    assert status == 200, answer
    lease = answer["ID"]
    claim = {"compare": [{"result": "EQUAL", "target": "CREATE", "key": b64("/t/claims/j"), "create_revision": "0"}],
             "success": [{"request_put": {"key": b64("/t/claims/j"), "value": b64("w1"), "lease": lease}}],
             "failure": [{"request_range": {"key": b64("/t/claims/j")}}]}
    status, answer = etcd.call("/v3/kv/txn", claim)
    assert answer.get("succeeded") is True, answer
    status, answer = etcd.call("/v3/kv/txn", claim)
    assert "succeeded" not in answer, answer
    eventually(lambda: etcd.get("/t/claims/j") is None, timeout=10, what="the claim to go with its lease")
    status, answer = etcd.call("/v3/kv/txn", claim)
    assert status == 404 and answer["code"] == 5, answer  # the lease is gone too


def test_pause_resume_kill_and_restart_on_the_same_data():
    e = Etcd().start()
    try:
        e.put("/t/jobs/kept", "rec")
        pid, ports, data_dir = e.pid, (e.client_port, e.peer_port), e.data_dir

        e.pause()
        with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
            e.call("/v3/kv/range", {"key": b64("/t/jobs/kept")}, timeout=0.5)
        e.resume()
        assert e.get("/t/jobs/kept") == b"rec"

        e.kill()
        assert not e.running()
        with pytest.raises(OSError):
            e.call("/v3/kv/range", {"key": b64("/t/jobs/kept")}, timeout=1)
        assert os.path.isdir(data_dir)

        e.start()
        assert e.pid != pid and (e.client_port, e.peer_port) == ports
        assert e.get("/t/jobs/kept") == b"rec"

        e.pause()  # stop() must end a paused etcd too
    finally:
        e.stop()
    assert not e.running()
    assert not os.path.exists(e.dir)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
