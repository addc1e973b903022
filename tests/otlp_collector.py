"""A minimal OpenTelemetry collector for tests: an OTLP/HTTP (JSON) receiver on 127.0.0.1 that keeps the spans
it is sent, as Triton's OpenTelemetry exporter sends them."""

from __future__ import annotations

import http.server
import json
import threading
import time


class OtlpCollector:
    """Receives ``POST /v1/traces`` (OTLP JSON); :meth:`spans` returns the spans received so far, each a dict
    with the OTLP fields plus ``resource`` (its resource attributes) and ``attributes`` as a plain dict."""

    def __init__(self):
        self._spans: list[dict] = []
        #: What could not be read of what was sent (each post is answered all the same).
        self.errors: list[str] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    collector._receive(self.path, self.headers.get("Content-Type", ""), body)
                except Exception as exc:  # noqa: BLE001 - kept for the caller; the exporter still gets its answer
                    collector.errors.append(f"{type(exc).__name__}: {exc}")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _receive(self, path: str, content_type: str, body: bytes) -> None:
        assert path == "/v1/traces" and "json" in content_type, (path, content_type)
        spans = []
        for rs in json.loads(body)["resourceSpans"]:
            resource = _attributes(rs.get("resource", {}).get("attributes", []))
            for ss in rs.get("scopeSpans", []):
                for span in ss.get("spans", []):
                    spans.append({**span, "resource": resource, "attributes": _attributes(span.get("attributes", []))})
        with self._lock:
            self._spans += spans

    def spans(self, trace_id: str | None = None) -> list[dict]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s["traceId"] == trace_id]

    def wait_for(self, predicate, timeout: float = 30.0) -> list[dict]:
        """The spans once ``predicate(spans)`` holds (spans leave Triton in batches, every few seconds)."""
        end = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans) or time.monotonic() > end:
                return spans
            time.sleep(0.1)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _attributes(items: list[dict]) -> dict:
    # An attribute's value is an AnyValue: one typed field ({"stringValue": ...}), or empty/null for no value.
    return {a["key"]: next(iter((a.get("value") or {}).values()), None) for a in items}
