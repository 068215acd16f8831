"""A programmable mock speech provider that records every request it gets.

Rules are matched in the order added (first match wins) on method, path prefix
and an optional body predicate. A rule answers with fixed bytes / JSON, or with
a callable; it may wait (`delay`) or never answer (`hang`) until `stop()`.
Each record notes when the request came (`time`) and when the answer began
(`answered_at`, None until then), both `time.monotonic()`.

It binds port 0 (unless told otherwise), so its port is never raced for.
"""

import argparse
import http.server
import json
import random
import socket
import threading
import time
import urllib.parse

from waiting import eventually


def fake_audio(n=2048, seed=1):
    """Deterministic bytes with every byte value and invalid UTF-8 in them."""
    rng = random.Random(seed)
    head = bytes(range(256)) + b"\xff\xfe\xc3\x28"
    return (head + bytes(rng.randrange(256) for _ in range(max(0, n - len(head)))))[:n]


class Rule:
    def __init__(self, path_prefix, status, body, headers, delay, times, method, match_body, hang, truncate=None):
        self.truncate = truncate
        self.path_prefix, self.status, self.body, self.headers = path_prefix, status, body, headers or {}
        self.delay, self.times, self.method, self.match_body, self.hang = delay, times, method, match_body, hang

    def matches(self, record):
        if self.method and self.method != record["method"]:
            return False
        path = record["path"] if "?" in self.path_prefix else record["path_only"]
        if not path.startswith(self.path_prefix):
            return False
        return self.match_body is None or bool(self.match_body(record["json"], record["body"]))

    def answer(self, record):
        if callable(self.body):
            return self.body(record)
        headers = dict(self.headers)
        body = self.body
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
        headers.setdefault("content-type", "application/octet-stream")
        return self.status, headers, body or b""


class MockProvider:
    def __init__(self, host="127.0.0.1", port=0):
        self._lock = threading.Lock()
        self._rules = []
        self._requests = []
        self._stopping = threading.Event()
        mock = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self):
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _handle(self):
                body = self._body()
                parsed = urllib.parse.urlsplit(self.path)
                headers = {}
                for k, v in self.headers.items():
                    k = k.lower()
                    headers[k] = f"{headers[k]}, {v}" if k in headers else v
                try:
                    parsed_json = json.loads(body) if body else None
                except ValueError:
                    parsed_json = None
                record = {
                    "method": self.command, "path": self.path, "path_only": parsed.path,
                    "query": urllib.parse.parse_qs(parsed.query, keep_blank_values=True),
                    "headers": headers, "body": body, "json": parsed_json, "time": time.monotonic(),
                    "answered_at": None,
                }
                rule = mock._take_rule(record)
                if rule is None:
                    status, out_headers, out = 404, {"content-type": "application/json"}, json.dumps(
                        {"error": {"message": f"mock: no rule for {self.command} {self.path}"}}).encode()
                else:
                    if rule.hang:
                        mock._stopping.wait()
                        return
                    if rule.delay:
                        mock._stopping.wait(rule.delay)
                    status, out_headers, out = rule.answer(record)
                truncate = rule.truncate if rule else None
                with mock._lock:
                    record["answered_at"] = time.monotonic()
                try:
                    self.send_response(status)
                    for k, v in out_headers.items():
                        self.send_header(k, v)
                    # `truncate`: promise that many bytes, send fewer, and hang up mid-body.
                    self.send_header("content-length", str(truncate or len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    if truncate:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        class Server(http.server.ThreadingHTTPServer):
            # Envoy opens many upstream connections at once under load.
            request_queue_size = 1024

        self._server = Server((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = None

    def _take_rule(self, record):
        with self._lock:
            self._requests.append(record)
            for rule in self._rules:
                if rule.matches(record):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times <= 0:
                            self._rules.remove(rule)
                    return rule
        return None

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def add_rule(self, path_prefix="/", status=200, body=b"", headers=None, delay=0.0, times=None,
                 method=None, match_body=None, hang=False, truncate=None):
        with self._lock:
            self._rules.append(Rule(path_prefix, status, body, headers, delay, times, method, match_body, hang, truncate))

    def recorded(self):
        with self._lock:
            return list(self._requests)

    @property
    def requests(self):
        return self.recorded()

    def wait_for_requests(self, n, timeout=10):
        """Waits until at least `n` requests came; returns them all."""
        if n <= 0:
            return self.recorded()
        return eventually(lambda: len(seen := self.recorded()) >= n and seen, timeout, interval=0.02,
                          what=lambda: f"{n} requests; saw {[r['path'] for r in self.recorded()]}")

    def clear(self):
        with self._lock:
            self._rules.clear()
            self._requests.clear()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve a fixed audio answer to any POST.")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--audio-file")
    args = parser.parse_args()
    audio = open(args.audio_file, "rb").read() if args.audio_file else fake_audio()
    m = MockProvider(port=args.port)
    m.add_rule("/", body=audio, headers={"content-type": "audio/mpeg"}, method="POST")
    print(f"mock provider on {m.url}")
    m._server.serve_forever()
