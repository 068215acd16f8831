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
MAX_EXAMPLES = 300


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


def validators(doc):
    """A function from a schema taken out of `doc` to its JSON Schema 2020-12 validator."""
    # The document's own references ("#/components/…") made absolute, so that they resolve
    # from any schema taken out of it.
    def absolute(node):
        return json.loads(json.dumps(node).replace('"#/components/', '"urn:openapi#/components/'))

    registry = Registry().with_resource("urn:openapi", Resource(contents=absolute(doc), specification=DRAFT202012))
    return lambda schema_: jsonschema.Draft202012Validator(
        absolute(schema_), registry=registry, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_every_example_fits_the_schema_it_is_given_for(doc):
    validator = validators(doc)
    seen, wrong = set(), []
    for where, schema_, name, value in media_examples(doc):
        seen.add(name)
        wrong += [f"{where}: example {name}: {e.message}" for e in validator(schema_).iter_errors(value)]
    assert wrong == []
    assert seen == set(doc["components"]["examples"]), "every captured example is shown somewhere, and only those"


def answers_with_headers(doc):
    """(where, response, example name, example) of every answer's example that shows its headers."""
    def resolve(node):
        while "$ref" in node:
            target = doc
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    responses = [(f"{method} {path} {status}", response)
                 for path, item in doc["paths"].items() for method, op in item.items()
                 if isinstance(op, dict) and "responses" in op for status, response in op["responses"].items()]
    responses += [(f"responses {name}", response) for name, response in doc["components"]["responses"].items()]
    for where, response in responses:
        response = resolve(response)
        response = dict(response, headers={n: resolve(h) for n, h in response.get("headers", {}).items()})
        for content in response.get("content", {}).values():
            for example in content.get("examples", {}).values():
                name = example.get("$ref", "").rsplit("/", 1)[-1]
                example = resolve(example)
                if "x-headers" in example:
                    yield where, response, name, example


def test_each_answer_came_with_the_headers_the_document_gives_it(doc):
    """Every header an example shows is declared for its answer and fits its schema, and every
    header declared required is there: the live answers' headers, held to the document."""
    validator = validators(doc)
    wrong, seen = [], set()
    for where, response, name, example in answers_with_headers(doc):
        seen.add(name)
        declared = {header.lower(): h for header, h in response["headers"].items()}
        sent = example["x-headers"]
        wrong += [f"{where}: {name}: {header} is required, not sent"
                  for header, h in declared.items() if h.get("required") and header not in sent]
        for header, value in sent.items():
            if header not in declared:
                wrong.append(f"{where}: {name}: {header} is sent, not declared")
                continue
            schema_ = declared[header]["schema"]
            typed = int(value) if value.isdigit() and "integer" in str(schema_.get("type")) else value
            wrong += [f"{where}: {name}: {header}: {e.message}" for e in validator(schema_).iter_errors(typed)]
    assert wrong == []
    # Among them, the answers that carry the RateLimit fields: a 202 and every refusal by a limit.
    assert {"submit-accepted", "error-429-held", "error-429-requests", "error-429-characters",
            "error-402-budget", "error-503-full"} <= seen, seen


def test_the_documents_examples_are_what_the_filter_answers(doc):
    diff = examples.differences(examples.capture(), doc["components"]["examples"])
    assert diff == [], "docs/openapi.yaml no longer shows what the filter answers; if the change is meant, " \
                       "rewrite the examples with `.venv/bin/python tests/openapi/examples.py`:\n" + "\n".join(diff)


def test_schemathesis_finds_nothing_against_the_live_filter(doc, tmp_path):
    """Every operation, every phase (examples, coverage, fuzzing, stateful sequences through the
    document's links from a submit's id to poll, content and delete) and every check schemathesis
    has, as team-a: a key with every limit, whose windows of seconds let submits through and
    refuse them in turn."""
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(schema.for_deployment(doc)))
    with deployment.running(provider_rules=deployment.add_failing_provider_rules) as live:
        started = time.monotonic()
        run = subprocess.run(
            [str(ST), "--config-file", str(ST_CONFIG), "run", str(path), "--url", live.url,
             "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES),
             "--header", f"Authorization: Bearer {deployment.KEY}",
             "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"), "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env=dict(os.environ, SCHEMATHESIS_HOOKS=""))
        took = time.monotonic() - started
        calls = live.mock.recorded()
        submitted = live.envoy.counter("wasmcustom.async_speech.jobs_submitted")
        limited = live.envoy.counter("wasmcustom.async_speech.jobs_rejected.limit")
    # Generated bodies can be megabytes long: every line is cut short.
    report = "\n".join(line[:500] for line in (run.stdout + run.stderr).splitlines())[-30_000:]
    assert run.returncode == 0, report
    assert "No issues found" in run.stdout, report
    # The run reached every provider type, and some of their calls were refused on purpose.
    for prefix in ("/v1/audio/speech", "/azure/", "/el/", "/gem/"):
        assert any(c["path_only"].startswith(prefix) for c in calls), f"no call reached {prefix}"
    assert any(deployment.is_refused(c["json"]) for c in calls), "no job failed"
    # team-a's submits were accepted, and refused by its limits (with RateLimit fields), both.
    assert submitted > 100 and limited > 0, (submitted, limited)
    print(f"schemathesis: {took:.0f} s, {submitted} submits accepted, {limited} refused by a limit\n"
          + run.stdout[-3000:])


BASE = {"model": "openai/tts-1", "input": "Hello.", "voice": "alloy"}
GEMINI = {"model": "gemini/gemini-2.5-flash-preview-tts", "input": "Joe: Hi.\nJane: Hey.", "voice": "Kore"}
ELEVEN = {"model": "elevenlabs/eleven_multilingual_v2", "input": "Hello.", "voice": "JBFqnCBsd6RMkjVDRZzb"}
SPEAKERS = [{"speaker": "Joe", "voice": "Kore"}, {"speaker": "Jane", "voice": "Puck"}]

# Bodies on either side of every rule the document states, each a submit of its own.
BODIES = [
    BASE, {**BASE, "unknown_field": {"any": [1]}}, {**BASE, "model": "openai//x"},
    {**BASE, "model": None}, {**BASE, "voice": None}, {**BASE, "input": None}, [BASE], "hello",
    # model
    {**BASE, "model": "openai/" + "m" * 249}, {**BASE, "model": "openai/" + "m" * 250},
    {**BASE, "model": "openai/"}, {**BASE, "model": "/tts-1"}, {**BASE, "model": "tts-1"},
    {**BASE, "model": "nope/tts-1"}, {**BASE, "model": "openai/.."},
    {**BASE, "model": "azure/.."}, {**BASE, "model": "azure/a/./b"}, {**BASE, "model": "azure/a..b"},
    {**GEMINI, "model": "gemini/.."}, {**GEMINI, "model": "gemini/x/.."}, {**GEMINI, "model": "gemini/.x"},
    # input
    {**BASE, "input": ""}, {**BASE, "input": " "}, {**BASE, "input": "é" * 100_000},
    {**BASE, "input": "é" * 100_001}, {**BASE, "input": 5},
    # voice
    {**BASE, "voice": ""}, {**BASE, "voice": "v" * 256}, {**BASE, "voice": "v" * 257}, {**BASE, "voice": []},
    {**BASE, "voice": 3}, {**BASE, "voice": SPEAKERS}, {**GEMINI, "voice": SPEAKERS},
    {**GEMINI, "voice": SPEAKERS, "fallbacks": ["gemini/other"]},
    {**GEMINI, "voice": SPEAKERS, "fallbacks": ["openai/tts-1"]},
    {**GEMINI, "voice": [{"speaker": "Joe", "voice": "Kore", "style": "calm"}]},
    {**GEMINI, "voice": [{"speaker": "Joe"}]}, {**GEMINI, "voice": [{"speaker": "", "voice": "Kore"}]},
    {**GEMINI, "voice": [{"speaker": "Joe", "voice": "v" * 257}]}, {**GEMINI, "voice": ["Kore"]},
    {**ELEVEN, "voice": ".."}, {**ELEVEN, "voice": "a/../b"}, {**ELEVEN, "voice": "./x"},
    {**ELEVEN, "voice": "..a"}, {**ELEVEN, "voice": "a/.b"}, {**BASE, "voice": "..", "fallbacks": ["elevenlabs/m"]},
    {**BASE, "voice": ".."},
    # fallbacks
    {**BASE, "fallbacks": None}, {**BASE, "fallbacks": []}, {**BASE, "fallbacks": ["azure/d"] * 5},
    {**BASE, "fallbacks": ["azure/d"] * 6}, {**BASE, "fallbacks": "azure/d"}, {**BASE, "fallbacks": [None]},
    {**BASE, "fallbacks": ["nope/x"]}, {**BASE, "fallbacks": ["azure/.."]},
    # response_format, per provider
    *[{**body, "response_format": fmt} for body in (BASE, GEMINI, ELEVEN)
      for fmt in ("mp3", "opus", "aac", "flac", "wav", "pcm", None, "ogg", "MP3", 1)],
    {**BASE, "fallbacks": ["gemini/g"]}, {**BASE, "fallbacks": ["gemini/g"], "response_format": "mp3"},
    {**BASE, "fallbacks": ["gemini/g"], "response_format": "wav"},
    {**BASE, "fallbacks": ["elevenlabs/e"], "response_format": "aac"},
    {**BASE, "response_format": "flac", "input": "a" * 4096}, {**BASE, "response_format": "flac", "input": "a" * 4097},
    {**BASE, "response_format": "wav", "input": "a. " * 2000},
    # the other fields
    {**BASE, "stream_format": "sse"}, {**BASE, "stream_format": "audio"}, {**BASE, "stream_format": None},
    {**BASE, "stream_format": 1},
    {**BASE, "speed": 0.25}, {**BASE, "speed": 4}, {**BASE, "speed": 0.2499}, {**BASE, "speed": 4.0001},
    {**BASE, "speed": "1"}, {**BASE, "speed": True}, {**BASE, "speed": None},
    {**BASE, "instructions": "i" * 4096}, {**BASE, "instructions": "i" * 4097}, {**BASE, "instructions": 1},
    {**ELEVEN, "pronunciation_dictionary_locators": [{}] * 3},
    {**ELEVEN, "pronunciation_dictionary_locators": [{}] * 4},
    {**ELEVEN, "pronunciation_dictionary_locators": [{"pronunciation_dictionary_id": "d", "version_id": None}]},
    {**ELEVEN, "pronunciation_dictionary_locators": [{"pronunciation_dictionary_id": 1}]},
    {**ELEVEN, "pronunciation_dictionary_locators": [None]}, {**ELEVEN, "pronunciation_dictionary_locators": {}},
    {**ELEVEN, "language_code": "es"}, {**ELEVEN, "language_code": 5},
    *[{**ELEVEN, field: value} for field in ("enable_logging", "optimize_streaming_latency", "with_timestamps")
      for value in (True, False, None, "yes", 1)],
]

# Header values on either side of the header's rules.
TTLS = ["0", "1", "86400", "86401", "-1", "1.5", "abc", "99999999999999999999999"]
WEBHOOKS = ["billing", "billing-full", "nope", ""]


def test_the_document_and_the_filter_agree_on_every_rule(doc):
    """Each body and header value above is valid by the document exactly when the filter takes it."""
    specific = schema.for_deployment(doc)
    validator = validators(specific)

    def valid(pointer, value):
        return validator({"$ref": f"#{pointer}"}).is_valid(value)

    disagree, statuses = [], []
    with deployment.running() as live:
        client = examples.Client(live.url, deployment.OTHER_KEY)
        for body in BODIES:
            status, _, answer = client.call("POST", deployment.SPEECH, json.dumps(body),
                                            headers={"content-type": "application/json"})
            statuses.append(status)
            if (status == 202) != valid("/components/schemas/SpeechRequest", body):
                disagree.append(f"{status} {answer[:200]!r} for {json.dumps(body)[:200]}")
        for header, values, pointer in [
                ("x-bf-async-job-result-ttl", TTLS, "/components/parameters/ResultTtl/schema"),
                ("x-bf-async-webhook", WEBHOOKS, "/components/parameters/Webhook/schema")]:
            for value in values:
                status, _, answer = client.call("POST", deployment.SPEECH, BASE, headers={header: value})
                # A header is text: one that reads as a whole number is one, for an integer header.
                typed = int(value) if value.lstrip("-").isdigit() and "integer" in str(
                    jsonschema_type(specific, pointer)) else value
                if (status == 202) != valid(pointer, typed):
                    disagree.append(f"{status} {answer[:200]!r} for {header}: {value!r}")
    assert disagree == []
    assert statuses.count(202) > 40 and statuses.count(400) > 40, statuses


def jsonschema_type(doc, pointer):
    node = doc
    for part in pointer.strip("/").split("/"):
        node = node[part]
    return node.get("type")
