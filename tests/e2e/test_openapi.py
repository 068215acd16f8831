"""docs/openapi.yaml against the filter: a valid OpenAPI 3.1 document, whose examples are what the
filter answers, and which schemathesis holds a live Envoy with the filter to."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "openapi"))

import deployment  # noqa: E402
import examples  # noqa: E402
import schema  # noqa: E402

ST = ROOT / ".venv" / "bin" / "st"
ST_CONFIG = ROOT / "tests" / "openapi" / "schemathesis.toml"
SEED = 20261206
# Test cases per operation and phase: about a minute in all on two cores.
MAX_EXAMPLES = 200
# Operations the document describes that this build does not serve yet. When the filter answers
# GET /v1/async/usage, delete its line and schemathesis tests it with the rest.
NOT_SERVED_YET = [
    "/v1/async/usage",
]


@pytest.fixture(scope="module")
def doc():
    return schema.load()


def test_the_document_is_valid_openapi_3_1(doc):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []
    assert doc["openapi"].startswith("3.1.")


def media_examples(doc):
    """(where, schema, example name, value) of every example given for a body or a parameter."""
    def resolve(ref):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def parameters_of(item):
        return [resolve(p["$ref"]) if "$ref" in p else p for p in item.get("parameters", [])]

    for section in ("paths", "webhooks"):
        for path, item in doc[section].items():
            for p in parameters_of(item):
                yield from named(f"{path} {p['name']}", p["schema"], p.get("examples", {}), resolve)
            for method, op in item.items():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                for p in parameters_of(op):
                    yield from named(f"{method} {path} {p['name']}", p["schema"], p.get("examples", {}), resolve)
                bodies = [("request", op.get("requestBody", {}))]
                bodies += [(status, resolve(r["$ref"]) if "$ref" in r else r) for status, r in op["responses"].items()]
                for status, body in bodies:
                    for media, content in body.get("content", {}).items():
                        yield from named(f"{method} {path} {status} {media}", content.get("schema", {}),
                                         content.get("examples", {}), resolve)
    # Answers described once for every path (405 comes from a method no operation has).
    for name, response in doc["components"]["responses"].items():
        for media, content in response.get("content", {}).items():
            yield from named(f"responses {name} {media}", content.get("schema", {}), content.get("examples", {}), resolve)


def named(where, schema_, given, resolve):
    for name, example in given.items():
        if "$ref" in example:
            name, example = example["$ref"].rsplit("/", 1)[1], resolve(example["$ref"])
        yield where, schema_, name, example["value"]


def test_every_example_fits_the_schema_it_is_given_for(doc):
    # The document's own references ("#/components/…") made absolute, so that they resolve
    # from any schema taken out of it.
    def absolute(node):
        return json.loads(json.dumps(node).replace('"#/components/', '"urn:openapi#/components/'))

    registry = Registry().with_resource("urn:openapi", Resource(contents=absolute(doc), specification=DRAFT202012))
    seen, wrong = set(), []
    for where, schema_, name, value in media_examples(doc):
        seen.add(name)
        validator = jsonschema.Draft202012Validator(absolute(schema_), registry=registry,
                                                    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        wrong += [f"{where}: example {name}: {e.message}" for e in validator.iter_errors(value)]
    assert wrong == []
    assert seen == set(doc["components"]["examples"]), "every captured example is shown somewhere, and only those"


def test_the_documents_examples_are_what_the_filter_answers(doc):
    diff = examples.differences(examples.capture(), doc["components"]["examples"])
    assert diff == [], "docs/openapi.yaml no longer shows what the filter answers; if the change is meant, " \
                       "rewrite the examples with `.venv/bin/python tests/openapi/examples.py`:\n" + "\n".join(diff)


def test_schemathesis_finds_nothing_against_the_live_filter(doc, tmp_path):
    """Every phase (examples, coverage, fuzzing, stateful sequences through the document's links
    from a submit's id to poll, content and delete) and every check schemathesis has."""
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(schema.for_deployment(doc)))
    excluded = [arg for p in NOT_SERVED_YET for arg in ("--exclude-path", p)]
    with deployment.running(provider_rules=deployment.add_failing_provider_rules) as live:
        started = time.monotonic()
        run = subprocess.run(
            [str(ST), "--config-file", str(ST_CONFIG), "run", str(path), "--url", live.url,
             "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES), *excluded,
             "--header", f"Authorization: Bearer {deployment.KEY}",
             "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"), "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env=dict(os.environ, SCHEMATHESIS_HOOKS=""))
        took = time.monotonic() - started
        # The run reached every provider type, and some of their calls failed on purpose.
        paths = [r["path_only"] for r in live.mock.recorded()]
    # Generated bodies can be megabytes long: every line is cut short.
    report = "\n".join(line[:500] for line in (run.stdout + run.stderr).splitlines())[-30_000:]
    assert run.returncode == 0, report
    assert "No issues found" in run.stdout, report
    for prefix in ("/v1/audio/speech", "/azure/", "/el/", "/gem/"):
        assert any(p.startswith(prefix) for p in paths), f"no call reached {prefix}"
    print(f"schemathesis: {took:.0f} s\n" + run.stdout[-3000:])
