"""The etcd deployment example (envoy/etcd-compose.yaml, envoy/front.yaml,
envoy/replica.yaml): the compose file, the front and the replicas agree on
service names, ports and files; the replica names every member of the
three-member etcd cluster with health checks and outlier detection, and those
settings do their job against three real etcd members (Debian's etcd-server):
a member that dies is taken out and the filter goes on serving from the other
two. (tests/e2e/test_compose.py runs the compose file itself.)"""

import json

import pytest

from conftest import Client, eventually
from envoy_harness import ROOT, EnvoyProcess, cluster, validate
from etcd_harness import EtcdCluster
from helpers import ENVOY_DIR, enables_filter, load, plugin_configs, routes, wasm_filters
from mock_provider import MockProvider

MEMBERS = ["etcd-1", "etcd-2", "etcd-3"]


def clusters(doc):
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def endpoints(c):
    return [(e["endpoint"]["address"]["socket_address"]["address"],
             e["endpoint"]["address"]["socket_address"]["port_value"])
            for group in c["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]


def listener_port(doc):
    [listener] = doc["static_resources"]["listeners"]
    return listener["address"]["socket_address"]["port_value"]


def test_front_validates_and_balances_round_robin_over_both_replicas():
    code, out = validate(ENVOY_DIR / "front.yaml")
    assert code == 0, out[-3000:]
    doc = load("front.yaml")
    replicas = clusters(doc)["replicas"]
    assert replicas["lb_policy"] == "ROUND_ROBIN"
    replica_port = listener_port(load("replica.yaml"))
    assert endpoints(replicas) == [("replica-a", replica_port), ("replica-b", replica_port)]
    assert plugin_configs(doc) == []


def test_the_fronts_health_check_is_answered_by_the_replica_outside_the_filter():
    [check] = clusters(load("front.yaml"))["replicas"]["health_checks"]
    path = check["http_health_check"]["path"]
    replica = load("replica.yaml")
    [wasm] = wasm_filters(replica)
    [route] = [r for r in routes(replica) if r["match"] == {"path": path}]
    assert route["direct_response"]["status"] == 200
    assert not enables_filter(route, wasm["name"])
    # It comes before any route that could take it.
    assert routes(replica).index(route) == 0


def test_replica_runs_the_filter_over_every_etcd_member_and_validates():
    doc = load("replica.yaml")
    [config] = plugin_configs(doc)
    store = config["store"]
    assert store["type"] == "etcd"
    by_name = clusters(doc)
    etcd = by_name[store["cluster"]]
    assert endpoints(etcd) == [(m, 2379) for m in MEMBERS]
    assert store["prefix"].startswith("/") and store["prefix"].endswith("/")
    for p in config["providers"].values():
        assert p["cluster"] in by_name

    code, out = validate(ENVOY_DIR / "replica.yaml")
    assert code == 0, out[-3000:]
    assert "async-speech: configured" in out


def test_the_etcd_cluster_is_health_checked_and_ejects_at_most_one_member():
    etcd = clusters(load("replica.yaml"))[load_store()["cluster"]]
    [check] = etcd["health_checks"]
    assert check["http_health_check"]["path"] == "/health"
    outlier = etcd["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["enforcing_consecutive_local_origin_failure"] == 100
    # Envoy ejects while (ejected + 1) / hosts stays within the percentage: one of three, never two.
    assert 100 / len(MEMBERS) <= outlier["max_ejection_percent"] < 200 / len(MEMBERS)


def load_store():
    [config] = plugin_configs(load("replica.yaml"))
    return config["store"]


def test_compose_wires_three_etcd_members_two_replicas_a_front_and_the_speech_server():
    compose = load("etcd-compose.yaml")
    services = compose["services"]
    assert set(services) == {*MEMBERS, "local-tts", "replica-a", "replica-b", "front"}

    peers = {}
    for member in MEMBERS:
        s = services[member]
        assert s["image"] == "quay.io/coreos/etcd:v3.4.34"
        env = s["environment"]
        assert env["ETCD_NAME"] == member
        assert env["ETCD_LISTEN_CLIENT_URLS"] == "http://0.0.0.0:2379"
        assert env["ETCD_ADVERTISE_CLIENT_URLS"] == f"http://{member}:2379"
        assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"
        peers[member] = env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]
        # Exec form: the official image has no shell.
        assert s["healthcheck"]["test"][0] == "CMD"
        [volume] = s["volumes"]
        assert volume.split(":")[1] == env["ETCD_DATA_DIR"]
    # Every member names the same three peers, each where that peer says it is.
    for member in MEMBERS:
        initial = dict(entry.split("=", 1) for entry in services[member]["environment"]["ETCD_INITIAL_CLUSTER"].split(","))
        assert initial == peers
    assert len({services[m]["volumes"][0].split(":")[0] for m in MEMBERS}) == 3, "a volume each"

    replica = load("replica.yaml")
    tts = clusters(replica)["local_tts"]
    [(host, port)] = endpoints(tts)
    assert host == "local-tts" and services["local-tts"]["command"][-1] == f"0.0.0.0:{port}"

    for name in ("replica-a", "replica-b", "front"):
        s = services[name]
        assert s["image"] == "envoyproxy/envoy:v1.40.0"
        for volume in s["volumes"]:
            source = volume.split(":")[0]
            assert (ENVOY_DIR / source).resolve().relative_to(ROOT), volume
    for name in ("replica-a", "replica-b"):
        s = services[name]
        assert "/repo/envoy/replica.yaml" in s["command"]
        assert any(v.startswith("../envoy/replica.yaml:/repo/envoy/replica.yaml") for v in s["volumes"])
        assert any("async_speech.wasm" in v for v in s["volumes"])
        assert "ports" not in s
        # Started once the etcd cluster has a leader.
        assert {m: s["depends_on"][m]["condition"] for m in MEMBERS} == {m: "service_healthy" for m in MEMBERS}
    front = services["front"]
    assert "/etc/envoy/front.yaml" in front["command"]
    # Published on the host's loopback only, on 10000 unless ASYNC_SPEECH_PORT says otherwise.
    [published] = front["ports"]
    assert published == "127.0.0.1:${ASYNC_SPEECH_PORT:-10000}:%d" % listener_port(load("front.yaml"))
    # Every file the services mount exists (the plugin once built).
    for s in services.values():
        for volume in s.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("../") and not source.endswith(".wasm"):
                assert (ENVOY_DIR / source).resolve().is_file(), volume


# --- The replica's etcd cluster settings against three real members ----------

def replica_on(etcd_cluster, provider_port):
    """replica.yaml as shipped, but for loopback: the etcd cluster (its health
    checks and outlier detection untouched) on the three members, every other
    cluster on the mock provider, the listener and admin on port 0."""
    doc = load("replica.yaml")
    doc["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    doc["static_resources"]["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    store = load_store()["cluster"]
    new = []
    for c in doc["static_resources"]["clusters"]:
        if c["name"] == store:
            c["type"] = "STATIC"
            c.pop("dns_lookup_family", None)
            c["load_assignment"]["endpoints"] = [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                for port in etcd_cluster.client_ports]}]
            new.append(c)
        else:
            new.append(cluster(c["name"], provider_port))
    doc["static_resources"]["clusters"] = new
    return doc


def health_flags(envoy, port):
    for line in envoy.admin("/clusters").splitlines():
        if line.startswith(f"etcd::127.0.0.1:{port}::health_flags::"):
            return line.rsplit("::", 1)[1]
    return None


def test_a_dead_etcd_member_is_taken_out_and_jobs_go_on():
    members = EtcdCluster(size=len(MEMBERS)).start()
    provider = MockProvider()
    provider.start()
    provider.add_rule(path_prefix="/v1/audio/speech", body=b"spoken")
    envoy = None
    try:
        envoy = EnvoyProcess(json.dumps(replica_on(members, provider.port)), "envoy.json", concurrency=2, cwd=ROOT,
                             args=["--log-level", "warn", "--component-log-level", "wasm:info"]).start()
        eventually(lambda: all(health_flags(envoy, port) == "healthy" for port in members.client_ports), 15,
                   what=lambda: "Envoy to find all three members healthy: " + envoy.admin("/clusters"))
        client = Client(envoy.url)
        body = {"model": "local/tts-1", "input": "hello", "voice": "alloy"}
        first = client.submit(body, key="sk-bf-demo-key")
        assert first.status == 202, first

        dead = members.leader()
        dead.kill()
        survivors = [m for m in members if m is not dead]
        # The other two elect a leader, and Envoy takes the dead member out
        # while it finds the two others healthy.
        assert members.leader() in survivors
        eventually(lambda: "failed" in (health_flags(envoy, dead.client_port) or "") and all(
            health_flags(envoy, m.client_port) == "healthy" for m in survivors), 15,
            what=lambda: f"Envoy to take {dead.name} (the old leader) out: " + envoy.admin("/clusters"))

        # Right after an election a member may still refuse a call or two (the
        # filter answers 503 then); once calls go through, they keep going
        # through on the two members left.
        def round_trip():
            r = client.submit(body, key="sk-bf-demo-key")
            return r.status == 202 and client.poll(r.json()["id"], key="sk-bf-demo-key").status in (200, 202)

        eventually(lambda: all(round_trip() for _ in range(3)), 20, what="submits and polls to go through again")
        jobs = [first.json()["id"]]
        for _ in range(10):
            r = client.submit(body, key="sk-bf-demo-key")
            assert r.status == 202, r
            jobs.append(r.json()["id"])
            assert client.poll(jobs[0], key="sk-bf-demo-key").status in (200, 202)
        for job_id in jobs:
            done = client.wait(job_id, key="sk-bf-demo-key", timeout=30).json()
            assert done.get("status") == "completed", done
    finally:
        if envoy:
            envoy.stop()
        provider.stop()
        members.stop()
