"""Job owners from JWTs verified by Envoy's own jwt_authn filter."""

import base64
import json
import os
import subprocess
import time

import pytest

from conftest import Client, clusters_for, plugin_config
from envoy_harness import Envoy
from helpers import NOT_FOUND, speech

ISSUER = "https://issuer.test"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class KeyPair:
    """An RSA key made locally with openssl, its JWKS, and RS256 tokens signed by it."""

    def __init__(self, kid, directory):
        self.kid = kid
        self.key = os.path.join(directory, "key.pem")
        subprocess.run(["openssl", "genrsa", "-out", self.key, "2048"], check=True, capture_output=True)
        text = subprocess.run(["openssl", "rsa", "-in", self.key, "-noout", "-modulus"],
                              check=True, capture_output=True, text=True).stdout
        modulus = bytes.fromhex(text.strip().split("=", 1)[1])
        self.jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                    "n": b64url(modulus), "e": b64url((65537).to_bytes(3, "big"))}

    def token(self, sub, exp_in=3600, **claims):
        header = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": self.kid}).encode())
        payload = b64url(json.dumps({"iss": ISSUER, "sub": sub, "exp": int(time.time()) + exp_in, **claims}).encode())
        signing_input = f"{header}.{payload}".encode()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key], input=signing_input,
                             check=True, capture_output=True).stdout
        return f"{header}.{payload}.{b64url(sig)}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    # The forger uses the same kid: only the signature can give it away.
    return KeyPair("good", tmp_path_factory.mktemp("jwt")), KeyPair("good", tmp_path_factory.mktemp("jwt"))


def jwt_filter_for(good):
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"local": {
                "issuer": ISSUER,
                "local_jwks": {"inline_string": json.dumps({"keys": [good.jwk]})},
                "payload_in_metadata": "jwt_payload",
            }},
            "rules": [{"match": {"prefix": "/v1/async/"}, "requires": {"provider_name": "local"}}],
        },
    }


def test_an_owner_is_the_claims_exact_json_value(mock, keys):
    """uid 512, 768 and "512" are three owners (a lossy reading once made 512 and 768 one)."""
    good, _ = keys
    config = plugin_config(virtual_keys=[], jwt_owner={"payload_key": "jwt_payload", "claim": "uid"})
    e = Envoy(config, clusters_for(mock), pre_filters=[jwt_filter_for(good)]).start()
    try:
        client = Client(e.url)
        mock.add_rule(path_prefix="/v1/audio/speech", body=b"x")
        tokens = {name: good.token("s", uid=uid) for name, uid in (("512", 512), ("768", 768), ("'512'", "512"))}
        jobs = {}
        for name, token in tokens.items():
            r = client.submit(speech(), key=token)
            assert r.status == 202, (name, r)
            jobs[name] = r.json()["id"]
        for owner, job in jobs.items():
            for name, token in tokens.items():
                status = client.poll(job, key=token).status
                assert (status != 404) == (name == owner), (owner, name, status)
        # 512.0 is the same JSON number as 512.
        assert client.poll(jobs["512"], key=good.token("s", uid=512.0)).status != 404
    finally:
        e.stop()


@pytest.fixture
def jwt_envoy(mock, keys):
    good, _ = keys
    jwt_filter = jwt_filter_for(good)
    config = plugin_config(virtual_keys=[], jwt_owner={"payload_key": "jwt_payload", "claim": "sub"})
    e = Envoy(config, clusters_for(mock), pre_filters=[jwt_filter]).start()
    yield e, Client(e.url)
    e.stop()


def test_a_verified_subject_owns_its_jobs(jwt_envoy, mock, keys):
    envoy, client = jwt_envoy
    good, forged = keys
    mock.add_rule(path_prefix="/v1/audio/speech", body=b"alice's audio")
    alice, bob = good.token("alice"), good.token("bob")

    r = client.submit(speech(), key=alice)
    assert r.status == 202, r
    job_id = r.json()["id"]
    job = client.wait(job_id, key=alice).json()
    assert job["status"] == "completed"

    # Another subject gets the same 404 as for an unknown job.
    other = client.poll(job_id, key=bob)
    assert (other.status, other.json()) == (404, NOT_FOUND)
    # A header that claims to be alice is no identity at all.
    posing = client.poll(job_id, key=bob, headers={"x-jwt-sub": "alice", "x-bf-vk": "jwt:alice"})
    assert posing.status == 404

    # A token signed by another key is refused by jwt_authn itself.
    bad = client.poll(job_id, key=forged.token("alice"))
    assert bad.status == 401
    assert "Jwt verification fails" in bad.body.decode()
    # So is no token at all.
    assert client.submit(speech(), key=None).status == 401
    assert client.wait(job_id, key=alice).status == 200
