"""The shipped deployment examples (envoy/), checked with the real Envoy 1.40:

- every Envoy config in them, the Istio EnvoyFilter's included, is accepted by
  `envoy --mode validate` with the built filter;
- the filter runs on the API's routes only: started on a real Envoy, a request
  to another path never enters the VM (Envoy's wasm trace log shows no context
  created for it), while an API request is answered by the filter;
- every provider cluster speaks TLS that checks the host's name: against a real
  TLS server whose certificate a trusted CA signed for another name, Envoy
  refuses the handshake and sends nothing;
- the Istio example pins the module with a well-formed sha256 and originates
  TLS, with the name checked, to every host it names.
"""

import copy
import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import threading

import pytest
import yaml

from conftest import Client
from envoy_harness import ROOT, WASM, EnvoyProcess, bootstrap, cluster, runnable, validate
from helpers import ENVOY_DIR, enables_filter, load, nodes, plugin_configs, routes, wasm_filters
from mock_provider import MockProvider

TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
API_PREFIX = "/v1/async/"

# Every file in envoy/ is one of these, and each kind is checked below.
BOOTSTRAPS = ["envoy.yaml", "sidecar.yaml", "replica.yaml", "front.yaml"]
WITH_FILTER = ["envoy.yaml", "sidecar.yaml", "replica.yaml"]
COMPOSE_FILES = ["docker-compose.yaml", "etcd-compose.yaml"]
ISTIO = "istio-wasmplugin.yaml"


def validate_plugin_config(config):
    """Loads a plugin config into Envoy beside clusters of the names it uses."""
    names = {p["cluster"] for p in config["providers"].values()} | {"app"}
    # Validation binds nothing: port 0 is as good as any.
    return validate_doc(bootstrap(config, [cluster(n, 1) for n in sorted(names)], 0, 0))


def test_every_shipped_file_is_one_the_tests_check():
    shipped = {p.name for p in ENVOY_DIR.glob("*.yaml")}
    assert shipped == {*BOOTSTRAPS, *COMPOSE_FILES, ISTIO}


# --- The Istio example, as the Envoy config it patches into a sidecar ---------

def istio_docs():
    return [d for d in yaml.safe_load_all((ENVOY_DIR / ISTIO).read_text()) if d]


def of_kind(kind):
    return [d for d in istio_docs() if d["kind"] == kind]


def istio_patches():
    [envoy_filter] = of_kind("EnvoyFilter")
    by_target = {}
    for p in envoy_filter["spec"]["configPatches"]:
        by_target.setdefault(p["applyTo"], []).append(p)
    [filter_patch] = by_target.pop("HTTP_FILTER")
    [route_patch] = by_target.pop("HTTP_ROUTE")
    assert not by_target, by_target
    return filter_patch, route_patch


def istio_sidecar(local_code):
    """The inbound side of an Istio sidecar for the EnvoyFilter's port, as Istio
    lays it out (virtual host inbound|http|PORT, catch-all route "default" to
    cluster inbound|PORT||), with both patches applied the way Istio applies
    them, and every cluster the patches name. With `local_code` the module is
    the local build rather than the remote URL."""
    filter_patch, route_patch = istio_patches()
    port = filter_patch["match"]["listener"]["portNumber"]
    assert route_patch["match"]["routeConfiguration"]["portNumber"] == port
    vhost_name = route_patch["match"]["routeConfiguration"]["vhost"]["name"]
    assert vhost_name == f"inbound|http|{port}"
    assert filter_patch["patch"]["operation"] == "INSERT_BEFORE"
    assert filter_patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == \
        "envoy.filters.http.router"
    assert route_patch["patch"]["operation"] == "INSERT_FIRST"

    wasm = copy.deepcopy(filter_patch["patch"]["value"])
    if local_code:
        wasm["typed_config"]["config"]["vm_config"]["code"] = {"local": {"filename": str(WASM)}}
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    routes = [copy.deepcopy(route_patch["patch"]["value"]),
              {"name": "default", "match": {"prefix": "/"},
               "route": {"cluster": f"inbound|{port}||", "timeout": "0s"}}]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound_0.0.0.0_%d" % port,
        "route_config": {"name": f"inbound|{port}||",
                         "virtual_hosts": [{"name": vhost_name, "domains": ["*"], "routes": routes}]},
        "http_filters": [wasm, router],
    }
    hosts = [h for se in of_kind("ServiceEntry") for h in se["spec"]["hosts"]]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{"name": "api", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [cluster(f"inbound|{port}||", 1)] + [cluster(f"outbound|443||{h}", 1) for h in hosts],
        },
    }


def validate_doc(doc):
    """`envoy --mode validate` of a document (run from the repository root)."""
    with tempfile.TemporaryDirectory(prefix="validate-") as d:
        path = os.path.join(d, "envoy.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        return validate(path)


# --- envoy --mode validate, for every Envoy config shipped ------------------

@pytest.mark.parametrize("name", BOOTSTRAPS)
def test_shipped_envoy_configs_validate(name):
    code, out = validate(ENVOY_DIR / name)
    assert code == 0, out[-3000:]
    assert "configuration rejected" not in out
    if name in WITH_FILTER:
        assert "async-speech: configured" in out
        [config] = plugin_configs(load(name))
        assert config["providers"]
    else:
        assert plugin_configs(load(name)) == []


def test_the_istio_sidecar_config_validates_with_the_remote_module():
    code, out = validate_doc(istio_sidecar(local_code=False))
    assert code == 0, out[-3000:]
    assert "configuration rejected" not in out


def test_istio_plugin_configs_are_accepted_by_the_filter():
    [wasm_plugin] = of_kind("WasmPlugin")
    wasm_plugin = wasm_plugin["spec"]
    assert wasm_plugin["failStrategy"] == "FAIL_CLOSE"
    [envoy_filter] = of_kind("EnvoyFilter")
    [from_envoy_filter] = plugin_configs(envoy_filter)
    assert from_envoy_filter == wasm_plugin["pluginConfig"], "both documents carry the same plugin config"
    for config in (from_envoy_filter, wasm_plugin["pluginConfig"]):
        code, out = validate_plugin_config(config)
        assert code == 0, out[-3000:]
        assert "async-speech: configured" in out


# --- The filter runs on the API's routes only --------------------------------

@pytest.mark.parametrize("name", [*WITH_FILTER, ISTIO])
def test_the_filter_is_off_except_on_the_api_routes(name):
    doc = istio_sidecar(local_code=True) if name == ISTIO else load(name)
    [wasm] = wasm_filters(doc)
    assert wasm.get("disabled") is True, "off by default"
    on = [r for r in routes(doc) if enables_filter(r, wasm["name"])]
    assert on, "some route turns it on"
    for r in on:
        assert r["match"] == {"prefix": API_PREFIX}, r["match"]
    # Nothing else mentions it, so nothing else turns it on.
    for r in routes(doc):
        if r not in on:
            assert wasm["name"] not in r.get("typed_per_filter_config", {}), r


STREAM_CONTEXT = re.compile(r"proxy_on_context_create\(\d+, [1-9]\d*\)")


def stream_contexts(envoy):
    """How many HTTP contexts the VMs were asked to create (root contexts have parent 0)."""
    return len(STREAM_CONTEXT.findall(envoy.log()))


@pytest.fixture(scope="module")
def app():
    """Stands for the app (and every other upstream) behind the shipped configs."""
    m = MockProvider()
    m.start()
    m.add_rule(path_prefix="/", body=b"the app")
    yield m
    m.stop()


OTHER_PATHS = {
    "envoy.yaml": ["/", "/anything", "/v1/audio/speech", "/v1/asyncx"],
    "sidecar.yaml": ["/", "/anything", "/v1/audio/speech"],
    # The front's health check path first.
    "replica.yaml": ["/healthz", "/anything"],
    ISTIO: ["/", "/anything", "/v1/audio/speech"],
}


@pytest.mark.parametrize("name", [*WITH_FILTER, ISTIO])
def test_only_api_requests_enter_the_vm(name, app):
    doc = istio_sidecar(local_code=True) if name == ISTIO else load(name)
    envoy = EnvoyProcess(json.dumps(runnable(doc, app.port)), "envoy.json", concurrency=1, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
                         args=["--log-level", "warn", "--component-log-level", "wasm:trace"]).start()
    try:
        client = Client(envoy.url)
        for path in OTHER_PATHS[name]:
            for method, body in (("GET", None), ("POST", {"model": "local/tts-1", "input": "x", "voice": "alloy"})):
                r = client.call(method, path, body, key=None)
                assert r.status < 500, (method, path, r)
        # Each request was answered before this count: a context made for one is in the log by now.
        assert stream_contexts(envoy) == 0, f"a request outside {API_PREFIX} entered the VM"
        if name == "replica.yaml":
            assert client.call("GET", "/healthz", key=None).body == b"ok\n"
        r = client.call("GET", f"{API_PREFIX}audio/speech/00000000-0000-4000-8000-000000000000", key=None)
        assert r.status == 401 and r.json()["error"]["type"] == "authentication_error", r
        assert stream_contexts(envoy) >= 1, "the API request entered the VM"
    finally:
        envoy.stop()


# --- Routes that go upstream say how long they wait -------------------------

@pytest.mark.parametrize("name", [*BOOTSTRAPS, ISTIO])
def test_every_route_to_an_upstream_sets_its_timeout(name):
    doc = istio_sidecar(local_code=True) if name == ISTIO else load(name)
    for r in routes(doc):
        if "route" in r:
            assert "timeout" in r["route"], f"{name}: {r['match']} keeps Envoy's 15 s default"


# --- Provider TLS checks the host's name -------------------------------------

def tls_clusters(doc):
    return [c for c in doc["static_resources"]["clusters"]
            if c.get("transport_socket", {}).get("typed_config", {}).get("@type") == TLS_TYPE]


def checked_names(c):
    validation = c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    return [(m["san_type"], m["matcher"]) for m in validation.get("match_typed_subject_alt_names", [])]


PROVIDER_TLS = [(name, c["name"]) for name in WITH_FILTER for c in tls_clusters(load(name))]


@pytest.mark.parametrize("name", WITH_FILTER)
def test_every_provider_cluster_checks_the_name_of_its_host(name):
    doc = load(name)
    [config] = plugin_configs(doc)
    by_name = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    for c in tls_clusters(doc):
        tls = c["transport_socket"]["typed_config"]
        assert tls["common_tls_context"]["validation_context"]["trusted_ca"]
        assert checked_names(c) == [("DNS", {"exact": tls["sni"]})], c["name"]
    for provider in config["providers"].values():
        c = by_name[provider["cluster"]]
        [endpoint] = [e for g in c["load_assignment"]["endpoints"] for e in g["lb_endpoints"]]
        if endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 443:
            assert c in tls_clusters(doc), f"{c['name']} reaches port 443 without TLS"
            assert c["transport_socket"]["typed_config"]["sni"] == provider["authority"]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    """A CA Envoy is told to trust, and a function that issues a server
    certificate for a DNS name: (ca path, issue(name) -> (cert, key))."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=async-speech test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=d)

    def issue(dns_name):
        stem = dns_name.replace(".", "_")
        (d / f"{stem}.ext").write_text(f"subjectAltName=DNS:{dns_name}\nbasicConstraints=CA:FALSE\n"
                                       "extendedKeyUsage=serverAuth\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={dns_name}", cwd=d)
        openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{stem}.pem", "-days", "2", "-extfile", f"{stem}.ext", cwd=d)
        return str(d / f"{stem}.pem"), str(d / f"{stem}.key")

    return str(d / "ca.pem"), issue


class TlsServer:
    """An HTTPS server on 127.0.0.1:0 that records the requests it gets."""

    def __init__(self, cert, key):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("authorization")))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a refused handshake is what some tests expect

        self.server = Server(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def envoy_before(tls_cluster, server_port, ca_path):
    """An Envoy whose every request goes to the shipped TLS cluster, pointed at
    the test server and told to trust the test CA (nothing else changed)."""
    c = copy.deepcopy(tls_cluster)
    c["type"] = "STATIC"
    c.pop("dns_lookup_family", None)
    c["load_assignment"] = cluster(c["name"], server_port)["load_assignment"]
    c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]["trusted_ca"] = \
        {"filename": ca_path}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "tls_check",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": c["name"], "timeout": "10s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    doc = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
           "static_resources": {"listeners": [{"name": "api", "address": {"socket_address": {
               "address": "127.0.0.1", "port_value": 0}}, "filter_chains": [{"filters": [{
                   "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
               "clusters": [c]}}
    return EnvoyProcess(json.dumps(doc), "envoy.json", concurrency=1, args=["--log-level", "warn"]).start()


@pytest.mark.parametrize("name,cluster_name", PROVIDER_TLS)
def test_a_certificate_for_another_name_gets_no_request(name, cluster_name, test_ca):
    [tls_cluster] = [c for c in load(name)["static_resources"]["clusters"] if c["name"] == cluster_name]
    host = tls_cluster["transport_socket"]["typed_config"]["sni"]
    ca_path, issue = test_ca
    right, wrong = TlsServer(*issue(host)), TlsServer(*issue("another-host.example"))
    envoys = []
    try:
        # The same CA signed both: only the name tells them apart.
        envoys = [envoy_before(tls_cluster, right.port, ca_path), envoy_before(tls_cluster, wrong.port, ca_path)]
        headers = {"authorization": "Bearer provider-key"}
        ok = Client(envoys[0].url).call("GET", "/v1/models", headers=headers, key=None)
        assert ok.status == 200 and right.requests == [("/v1/models", "Bearer provider-key")], ok
        refused = Client(envoys[1].url).call("GET", "/v1/models", headers=headers, key=None)
        assert refused.status == 503, refused
        assert wrong.requests == [], "nothing was sent to the host with the wrong name"
        stats = envoys[1].admin(f"/stats?filter=cluster.{cluster_name}.ssl.fail_verify_san")
        assert re.search(r"fail_verify_san: [1-9]", stats), stats
    finally:
        for e in envoys:
            e.stop()
        right.stop()
        wrong.stop()


# --- The Istio example: pinned module, TLS with the name checked -------------

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def test_istio_pins_the_module_with_a_well_formed_sha256():
    filter_patch, _ = istio_patches()
    code = filter_patch["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"]["remote"]
    [wasm_plugin] = of_kind("WasmPlugin")
    for value in (code["sha256"], wasm_plugin["spec"]["sha256"]):
        # A string (unquoted, 64 zeros would be read as the number 0).
        assert isinstance(value, str) and SHA256.match(value), value
    # Both fetch the same module, so one hash pins both.
    assert wasm_plugin["spec"]["url"] == code["http_uri"]["uri"]
    assert code["sha256"] == wasm_plugin["spec"]["sha256"]


def test_make_wasm_sha256_prints_the_hash_of_the_built_module():
    import hashlib
    out = subprocess.run(["make", "-s", "wasm-sha256"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout.strip()
    assert SHA256.match(out) and out == hashlib.sha256(WASM.read_bytes()).hexdigest()


def test_istio_originates_tls_with_the_name_checked_to_every_host_it_names():
    filter_patch, _ = istio_patches()
    [config] = plugin_configs(of_kind("EnvoyFilter")[0])
    remote = filter_patch["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"]["remote"]["http_uri"]
    used = [p["cluster"] for p in config["providers"].values()] + [remote["cluster"]]
    assert remote["uri"].startswith("https://" + remote["cluster"].split("||")[1] + "/")
    entries = {h: se["spec"] for se in of_kind("ServiceEntry") for h in se["spec"]["hosts"]}
    rules = {dr["spec"]["host"]: dr["spec"] for dr in of_kind("DestinationRule")}
    for name in used:
        direction, port, _, host = name.split("|")
        assert direction == "outbound"
        assert [p["number"] for p in entries[host]["ports"]] == [int(port)]
        [setting] = [s for s in rules[host]["trafficPolicy"]["portLevelSettings"] if s["port"]["number"] == int(port)]
        assert setting["tls"] == {"mode": "SIMPLE", "sni": host, "subjectAltNames": [host]}, host
    assert set(entries) == set(rules) == {n.split("|")[3] for n in used}


# --- The sidecar and the compose files ---------------------------------------

def test_sidecar_has_every_provider_type_over_tls_with_keys_from_the_environment():
    doc = load("sidecar.yaml")
    [config] = plugin_configs(doc)
    types = {p["type"] for p in config["providers"].values()}
    assert types == {"openai", "azure", "elevenlabs", "gemini"}
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    env_keys = {k for n in nodes(doc) for k in n.get("host_env_keys", [])}
    for p in config["providers"].values():
        c = clusters[p["cluster"]]
        assert c["transport_socket"]["name"] == "envoy.transport_sockets.tls"
        assert c["transport_socket"]["typed_config"]["sni"] == p["authority"]
        assert p["api_key_env"] in env_keys
        assert "api_key" not in p


def compose_tool():
    """`docker compose` where the plugin is installed, else `docker-compose`, else None."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_parse(name):
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    r = subprocess.run([*tool, "-f", str(ENVOY_DIR / name), "config", "-q"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_compose_runs_the_official_image_with_the_shipped_config_and_plugin():
    compose = load("docker-compose.yaml")
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
