"""The shipped deployment examples: every Envoy config and plugin config in them
is accepted by Envoy 1.40 with the built filter (`envoy --mode validate`)."""

import json
import os
import shutil
import subprocess
import tempfile

import pytest
import yaml

from envoy_harness import ROOT, bootstrap, cluster, validate

ENVOY_DIR = ROOT / "envoy"


def plugin_configs(envoy_config):
    """Every async speech plugin configuration found in an Envoy bootstrap."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == "envoy.filters.http.wasm":
                cfg = node["typed_config"]["config"]
                assert cfg["allow_on_headers_stop_iteration"] is True
                assert cfg["failure_policy"] == "FAIL_RELOAD"
                found.append(json.loads(cfg["configuration"]["value"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(envoy_config)
    return found


def validate_plugin_config(config):
    """Loads a plugin config into Envoy beside clusters of the names it uses."""
    names = {p["cluster"] for p in config["providers"].values()} | {"app"}
    with tempfile.TemporaryDirectory(prefix="validate-") as d:
        path = os.path.join(d, "envoy.json")
        with open(path, "w") as f:
            # Validation binds nothing: port 0 is as good as any.
            json.dump(bootstrap(config, [cluster(n, 1) for n in sorted(names)], 0, 0), f)
        return validate(path)


@pytest.mark.parametrize("name", ["envoy.yaml", "sidecar.yaml"])
def test_shipped_envoy_configs_validate(name):
    code, out = validate(ENVOY_DIR / name)
    assert code == 0, out[-3000:]
    assert "async-speech: configured" in out
    assert "configuration rejected" not in out
    doc = yaml.safe_load((ENVOY_DIR / name).read_text())
    [config] = plugin_configs(doc)
    assert config["providers"]


def test_sidecar_has_every_provider_type_over_tls_with_keys_from_the_environment():
    doc = yaml.safe_load((ENVOY_DIR / "sidecar.yaml").read_text())
    [config] = plugin_configs(doc)
    types = {p["type"] for p in config["providers"].values()}
    assert types == {"openai", "azure", "elevenlabs", "gemini"}
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    env_keys = set()

    def find_env(node):
        if isinstance(node, dict):
            env_keys.update(node.get("host_env_keys", []))
            for v in node.values():
                find_env(v)
        elif isinstance(node, list):
            for v in node:
                find_env(v)

    find_env(doc)
    for p in config["providers"].values():
        c = clusters[p["cluster"]]
        assert c["transport_socket"]["name"] == "envoy.transport_sockets.tls"
        assert c["transport_socket"]["typed_config"]["sni"] == p["authority"]
        assert p["api_key_env"] in env_keys
        assert "api_key" not in p


def test_compose_runs_the_official_image_with_the_shipped_config_and_plugin():
    compose = yaml.safe_load((ENVOY_DIR / "docker-compose.yaml").read_text())
    envoy = compose["services"]["envoy"]
    assert envoy["image"] == "envoyproxy/envoy:v1.40.0"
    mounts = {v.split(":")[0]: v.split(":")[1] for v in envoy["volumes"]}
    assert mounts["../envoy/envoy.yaml"] == "/repo/envoy/envoy.yaml"
    assert mounts["../target/wasm32-wasip1/release/async_speech.wasm"] == \
        "/repo/target/wasm32-wasip1/release/async_speech.wasm"
    assert envoy["working_dir"] == "/repo"
    assert envoy["command"][:3] == ["envoy", "-c", "/repo/envoy/envoy.yaml"]
    tts = compose["services"]["local-tts"]
    assert (ROOT / "envoy" / tts["build"]["dockerfile"].split("/")[-1]).exists()
    # The local speech server listens where envoy.yaml's local_tts cluster points.
    assert "127.0.0.1:8090" in tts["command"]
    assert "port_value: 8090" in (ENVOY_DIR / "envoy.yaml").read_text()
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        r = subprocess.run(["docker", "compose", "-f", str(ENVOY_DIR / "docker-compose.yaml"), "config", "-q"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_istio_plugin_configs_are_accepted_by_the_filter():
    docs = [d for d in yaml.safe_load_all((ENVOY_DIR / "istio-wasmplugin.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceEntry", "DestinationRule", "EnvoyFilter", "WasmPlugin"}
    wasm_plugin = kinds["WasmPlugin"]["spec"]
    assert wasm_plugin["failStrategy"] == "FAIL_CLOSE"
    [from_envoy_filter] = plugin_configs(kinds["EnvoyFilter"]["spec"])
    assert from_envoy_filter == wasm_plugin["pluginConfig"], "both documents carry the same plugin config"
    for config in (from_envoy_filter, wasm_plugin["pluginConfig"]):
        code, out = validate_plugin_config(config)
        assert code == 0, out[-3000:]
        assert "async-speech: configured" in out
    cluster_name = from_envoy_filter["providers"]["openai"]["cluster"]
    assert cluster_name == "outbound|443||%s" % kinds["ServiceEntry"]["spec"]["hosts"][0]
