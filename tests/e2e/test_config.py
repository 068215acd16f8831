"""A bad plugin config is refused when Envoy loads it (the shipped configs: test_deploy_configs)."""

import json

import pytest

from conftest import plugin_config
from envoy_harness import bootstrap, cluster, validate


@pytest.mark.parametrize("change,message", [
    ({"virtual_keys": []}, "no keys configured"),
    ({"providers": {}}, "at least one provider"),
    ({"max_jobs": 0}, "max_jobs must be between"),
    ({"virtual_keys": [{"name": "x", "value": "no-prefix"}]}, "virtual keys start with sk-bf-"),
    ({"providers": {"p": {"type": "nope", "cluster": "c"}}}, "unknown provider type"),
    ({"providers": {"openai": {"cluster": "mock", "timeout_ms": 2 ** 31}}}, "timeout_ms must be between"),
    ({"providers": {"openai": {"cluster": "mock", "timeout_ms": 2 ** 32}}}, "timeout_ms must be between"),
    ({"max_jobs": 2_000_000}, "max_jobs must be between"),
    ({"max_fallbacks": 51}, "max_fallbacks must be between"),
    ({"max_audio_bytes": 10}, "max_audio_bytes must be between"),
    ({"webhooks": {"h": {"cluster": "c", "secret": "whsec_" + "QUJD" * 8, "headers": {"Content-Type": "x"}}}},
     "webhooks.h.headers"),
    ({"webhooks": {"h": {"cluster": "c", "secret": "not-a-secret"}}}, "webhooks.h"),
    ({"webhooks": {"h": {"cluster": "c", "secret": "whsec_" + "QUJD" * 8, "max_retries": 21}}},
     "max_retries must be between"),
    ({"webhooks": {"h": {"cluster": "c", "secret": "whsec_" + "QUJD" * 8, "virtual_keys": ["ghost"]}}}, "ghost"),
])
def test_a_bad_plugin_config_is_refused_when_envoy_loads_it(change, message, tmp_path):
    config = plugin_config(**change)
    path = tmp_path / "bad.json"
    # Validation binds nothing: port 0 is as good as any.
    path.write_text(json.dumps(bootstrap(config, [cluster("mock", 1), cluster("down", 2), cluster("app", 3)], 0, 0)))
    code, out = validate(path)
    assert code != 0, out
    assert "configuration rejected" in out and message in out, out[-2000:]
