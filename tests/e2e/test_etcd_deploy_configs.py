"""The etcd deployment example (envoy/etcd-compose.yaml): the front Envoy
validates with Envoy 1.40, and so does the replica config with its etcd `store`
(until the filter accepts it), and the compose file, the front and the
replicas agree on service names, ports and files. Docker itself is not run."""


import yaml

from envoy_harness import ROOT, validate
from test_deploy_configs import plugin_configs

ENVOY_DIR = ROOT / "envoy"


def load(name):
    return yaml.safe_load((ENVOY_DIR / name).read_text())


def clusters(doc):
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def endpoints(cluster):
    return [(e["endpoint"]["address"]["socket_address"]["address"],
             e["endpoint"]["address"]["socket_address"]["port_value"])
            for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]


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


def test_replica_runs_the_filter_over_etcd_and_validates():
    doc = load("replica.yaml")
    [config] = plugin_configs(doc)
    store = config["store"]
    assert store["type"] == "etcd"
    by_name = clusters(doc)
    assert endpoints(by_name[store["cluster"]]) == [("etcd", 2379)]
    assert store["prefix"].startswith("/") and store["prefix"].endswith("/")
    for p in config["providers"].values():
        assert p["cluster"] in by_name

    code, out = validate(ENVOY_DIR / "replica.yaml")
    assert code == 0, out[-3000:]
    assert "async-speech: configured" in out


def test_compose_wires_etcd_two_replicas_a_front_and_the_speech_server():
    compose = yaml.safe_load((ENVOY_DIR / "etcd-compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"etcd", "local-tts", "replica-a", "replica-b", "front"}
    assert services["etcd"]["image"] in ("quay.io/coreos/etcd:v3.4.34", "gcr.io/etcd-development/etcd:v3.4.34")
    etcd_args = " ".join(services["etcd"]["command"])
    assert "--listen-client-urls=http://0.0.0.0:2379" in etcd_args
    assert "--advertise-client-urls=http://etcd:2379" in etcd_args

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
    front = services["front"]
    assert "/etc/envoy/front.yaml" in front["command"]
    assert front["ports"] == [f"127.0.0.1:10000:{listener_port(load('front.yaml'))}"]
    # Every file the services mount exists (the plugin once built).
    for s in services.values():
        for volume in s.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("../") and not source.endswith(".wasm"):
                assert (ENVOY_DIR / source).resolve().is_file(), volume
