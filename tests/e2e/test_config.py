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
])
def test_a_bad_plugin_config_is_refused_when_envoy_loads_it(change, message, tmp_path):
    config = plugin_config(**change)
    path = tmp_path / "bad.json"
    # Validation binds nothing: port 0 is as good as any.
    path.write_text(json.dumps(bootstrap(config, [cluster("mock", 1), cluster("down", 2), cluster("app", 3)], 0, 0)))
    code, out = validate(path)
    assert code != 0, out
    assert "configuration rejected" in out and message in out, out[-2000:]
