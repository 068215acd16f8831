#!/usr/bin/env python3
"""Checks the filter's webhook signatures with the reference `standardwebhooks` package.

Runs the Rust test `webhooks::sign::tests::print_vectors`, which prints `VECTOR {json}` lines
(secrets, msg_id, timestamp, body, signature header), and verifies each with
`standardwebhooks.Webhook(secret).verify(...)`: every secret of a vector must verify the header
on its own, and a wrong secret or an altered body must not.

    pip install standardwebhooks
    python3 tests/webhooks/verify_vectors.py            # runs cargo itself
    python3 tests/webhooks/verify_vectors.py < lines    # or reads VECTOR lines from stdin

The vectors carry fixed timestamps, so the library's five-minute freshness check is bypassed;
everything else is the library's own verification path.
"""

import base64
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

try:
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError
except ImportError:
    sys.exit("verify_vectors.py needs the standardwebhooks package: pip install standardwebhooks")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timestamp_without_tolerance(self, header):
    return datetime.fromtimestamp(float(header), tz=timezone.utc)


# Name-mangled private method: fixed-timestamp vectors would otherwise be "too old".
Webhook._Webhook__verify_timestamp = _timestamp_without_tolerance


def vector_lines():
    if not sys.stdin.isatty() and not sys.argv[1:2] == ["--cargo"]:
        text = sys.stdin.read()
        if "VECTOR " in text:
            return text.splitlines()
    out = subprocess.run(
        ["cargo", "test", "-q", "-p", "async-speech", "--lib",
         "webhooks::sign::tests::print_vectors", "--", "--nocapture", "--exact"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    return out.stdout.splitlines()


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


def main():
    vectors = [json.loads(l.split("VECTOR ", 1)[1]) for l in vector_lines() if "VECTOR " in l]
    if not vectors:
        sys.exit("no VECTOR lines found")
    wrong = "whsec_" + base64.b64encode(b"\x42" * 32).decode()
    failures = 0
    for v in vectors:
        if len(v["signature"].split(" ")) != len(v["secrets"]):
            print(f"FAIL {v['msg_id']}: one signature per secret expected: {v['signature']}")
            failures += 1
        for s in v["secrets"]:
            if not verifies(s, v):
                print(f"FAIL {v['msg_id']}: not verified with one of its secrets")
                failures += 1
            if verifies(s, v, body=v["body"] + " "):
                print(f"FAIL {v['msg_id']}: an altered body verified")
                failures += 1
        if verifies(wrong, v):
            print(f"FAIL {v['msg_id']}: a wrong secret verified")
            failures += 1
    if failures:
        sys.exit(f"{failures} failure(s) in {len(vectors)} vectors")
    print(f"ok: {len(vectors)} vectors verified by standardwebhooks")


if __name__ == "__main__":
    main()
