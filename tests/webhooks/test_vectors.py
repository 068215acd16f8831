"""The webhook signature vectors in tests/fixtures/webhooks/vectors.json, checked with the
reference `standardwebhooks` package (the Rust side, in crates/core/src/webhooks/sign.rs,
asserts that the filter's `sign` makes exactly these signatures).

Every secret of a vector must verify the `webhook-signature` header on its own (the rotation
vector carries one signature per secret); a wrong secret or an altered body must not.

To make the fixture again after editing its inputs (secrets, msg_id, timestamp, body):
    .venv/bin/python tests/webhooks/test_vectors.py --write
which recomputes every signature with standardwebhooks' own `sign`.
"""

import base64
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks" / "vectors.json"
WRONG_SECRET = "whsec_" + base64.b64encode(b"\x42" * 32).decode()


def load_vectors():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))["vectors"]


VECTORS = load_vectors()


@pytest.fixture(autouse=True)
def no_freshness_check(monkeypatch):
    """The vectors carry fixed timestamps, which the library's five-minute window would call
    too old; only that check is replaced, the rest is the library's own verification path.
    (setattr fails if the library renames the method, so this cannot silently do nothing.)"""

    def parse_only(self, header):
        return datetime.fromtimestamp(float(header), tz=timezone.utc)

    monkeypatch.setattr(Webhook, "_Webhook__verify_timestamp", parse_only)


def verifies(secret, vector, body=None):
    headers = {
        "webhook-id": vector["msg_id"],
        "webhook-timestamp": str(vector["timestamp"]),
        "webhook-signature": vector["signature"],
    }
    try:
        Webhook(secret).verify(vector["body"] if body is None else body, headers, json_parse=False)
        return True
    except WebhookVerificationError:
        return False


def test_fixture_has_single_secret_and_rotation_vectors():
    assert any(len(v["secrets"]) == 1 for v in VECTORS)
    assert any(len(v["secrets"]) > 1 for v in VECTORS), "the rotation vector is missing"


@pytest.mark.parametrize("vector", VECTORS, ids=[v["msg_id"] for v in VECTORS])
def test_every_secret_verifies_on_its_own(vector):
    assert len(vector["signature"].split(" ")) == len(vector["secrets"]), "one signature per secret"
    for secret in vector["secrets"]:
        assert verifies(secret, vector), f"not verified with {secret}"


@pytest.mark.parametrize("vector", VECTORS, ids=[v["msg_id"] for v in VECTORS])
def test_wrong_secret_or_altered_body_does_not_verify(vector):
    assert not verifies(WRONG_SECRET, vector)
    for secret in vector["secrets"]:
        assert not verifies(secret, vector, body=vector["body"] + " ")


def write_fixture():
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    for v in data["vectors"]:
        ts = datetime.fromtimestamp(v["timestamp"], tz=timezone.utc)
        v["signature"] = " ".join(Webhook(s).sign(v["msg_id"], ts, v["body"]) for s in v["secrets"])
    FIXTURE.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(data['vectors'])} vectors to {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (to check the vectors, run it with pytest)")
    write_fixture()
