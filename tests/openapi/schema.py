"""docs/openapi.yaml as data, and the same document made exact for one deployment.

The document describes the API for any configuration, so two of its values can only say what
form they take: `model` (any `provider/model`; a deployment takes only its configured
providers) and `x-bf-async-webhook` (any name; a deployment takes only its endpoints). To hold a
live filter to the document, those two are narrowed to the deployment's own names, and nothing
else is changed.
"""

import copy

import yaml

from deployment import DOC, plugin_config


def load(path=DOC):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def for_deployment(doc, config=None):
    config = config or plugin_config()
    doc = copy.deepcopy(doc)
    providers = "|".join(sorted(config["providers"]))
    schemas = doc["components"]["schemas"]
    schemas["ProviderModel"]["pattern"] = f"^({providers})/[\\s\\S]+$"
    webhook = doc["components"]["parameters"]["Webhook"]
    webhook["schema"] = {"type": "string", "enum": sorted(config.get("webhooks", {}))}
    return doc
