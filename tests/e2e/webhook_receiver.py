"""A webhook receiver that verifies every delivery with the `standardwebhooks`
package and answers by script: a status per attempt, or "hang"."""

import http.server
import threading
import time

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Receiver:
    def __init__(self, secrets):
        self.secrets = list(secrets)
        self.script = []
        self.deliveries = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = []
                for secret in receiver.secrets:
                    try:
                        Webhook(secret).verify(body, headers)
                        verified.append(True)
                    except WebhookVerificationError:
                        verified.append(False)
                with receiver._lock:
                    action = receiver.script.pop(0) if receiver.script else 200
                    receiver.deliveries.append({"time": time.monotonic(), "headers": headers, "body": body,
                                                "verified": verified, "answered": action})
                if action == "hang":
                    receiver._stop.wait(30)
                    return
                self.send_response(action)
                self.send_header("content-length", "0")
                self.end_headers()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def got(self):
        with self._lock:
            return list(self.deliveries)

    def stop(self):
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
