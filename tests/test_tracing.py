"""Distributed tracing: a server started with ``TraceExport`` (``tritonvision serve --trace-url``) exports
OpenTelemetry spans of each traced request to a collector, and the SDK with ``trace=True`` sends the caller's
trace context, so those spans hang under the caller's span. Real server, real OTLP/HTTP export to a
collector on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest
import tritonvision as tv
from otlp_collector import OtlpCollector
from sdk_helpers import top
from tritonvision import spec
from tritonvision._transport._channel import Connection
from tritonvision_server.launcher import TraceExport, TritonServer

trace_api = pytest.importorskip("opentelemetry.trace", reason="the [trace] extra (opentelemetry-api) is not installed")

# Spans leave Triton in batches; the default wait between batches is 5 s.
FAST_EXPORT = ["--trace-config=opentelemetry,bsp_schedule_delay=100"]


@pytest.fixture(scope="module")
def collector():
    c = OtlpCollector()
    yield c
    c.close()


@pytest.fixture(scope="module")
def traced_server(cpu_repository, collector):
    # rate 1: every request is traced, so a request whose context Triton lost (see _sent) still shows up.
    export = TraceExport(collector.url, rate=1, resources=(("deployment.environment", "test"),))
    with TritonServer(cpu_repository, trace=export, extra_args=FAST_EXPORT) as server:
        yield server


class _Span:
    """A sampled (or not) span of the caller's, with ids of our choosing, made current by ``with``."""

    _next = 0x1000

    def __init__(self, sampled: bool = True):
        _Span._next += 1
        self.trace_id = 0xA1B2C3D4E5F60718293A4B5C6D7E0000 + _Span._next
        self.span_id = 0x0F1E2D3C4B5A0000 + _Span._next
        flags = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED if sampled else trace_api.TraceFlags.DEFAULT)
        context = trace_api.SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=flags)
        self._span = trace_api.NonRecordingSpan(context)

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_hex(self) -> str:
        return f"{self.span_id:016x}"

    def __enter__(self):
        self._cm = trace_api.use_span(self._span)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _sent(collector, span: _Span, count: int) -> tuple[list[dict], list[dict]]:
    """The gRPC request spans of ``count`` requests sent since the collector was cleared, once all are in:
    (those under ``span``, those Triton started a trace of its own for). Triton loses the client's context
    of a few gRPC requests (measured: 11 of 232; over HTTP 0 of 40: its gRPC handler reads the metadata value
    as a C string, README, Tracing) and traces those as roots, at its rate."""

    def requests(spans):
        return [s for s in spans if s["name"] == "InferRequest"]

    collector.wait_for(lambda spans: len(requests(spans)) >= count)
    time_left = collector.wait_for(lambda spans: False, timeout=0.5)  # anything late or extra shows up too
    assert not collector.errors, collector.errors
    got = requests(time_left)
    under = [s for s in got if s["traceId"] == span.trace_hex]
    assert len(got) == count, f"{len(got)} requests traced, {count} sent"
    assert all(s["parentSpanId"] == span.span_hex for s in under)
    roots = [s for s in got if s["traceId"] != span.trace_hex]
    assert all(not s.get("parentSpanId") for s in roots), "a request traced under a span it was not sent in"
    return under, roots


def test_a_traced_call_puts_the_request_and_every_step_under_the_callers_span(traced_server, collector, photos):
    collector.clear()
    with tv.Classifier(traced_server.grpc_url, timeout=60, trace=True) as clf, _Span() as span:
        for _ in range(3):  # three requests: the chance that Triton loses the context of each is negligible
            assert top(clf.classify(photos["chelsea"]))
    under, _ = _sent(collector, span, 3)
    assert under
    # The whole tree of one request (spans of one trace arrive in several export batches).
    request = under[0]
    collector.wait_for(lambda spans: sum(s["name"] == "compute" for s in spans if s["traceId"] == span.trace_hex)
                       >= 2 * len(under))
    spans = collector.spans(span.trace_hex)
    (ensemble,) = [s for s in spans if s.get("parentSpanId") == request["spanId"]]
    assert ensemble["name"] == spec.ENSEMBLE
    steps = {s["name"]: s for s in spans if s.get("parentSpanId") == ensemble["spanId"]}
    assert set(steps) == {spec.PREPROCESS, spec.RESNET50}
    computes = {}
    for name, step in steps.items():
        assert step["attributes"]["triton.model_name"] == name
        (computes[name],) = [s for s in spans if s.get("parentSpanId") == step["spanId"]]
        assert computes[name]["name"] == "compute"
        assert {"COMPUTE_START", "COMPUTE_END"} <= {e["name"] for e in computes[name]["events"]}
        # Each step runs inside the ensemble.
        assert int(ensemble["startTimeUnixNano"]) <= int(step["startTimeUnixNano"])
        assert int(step["endTimeUnixNano"]) <= int(ensemble["endTimeUnixNano"])
    # resnet50's request starts once preprocess has computed (the spans end after the hand-over, so overlap).
    assert int(computes[spec.PREPROCESS]["startTimeUnixNano"]) <= int(steps[spec.RESNET50]["startTimeUnixNano"])
    assert request["resource"]["service.name"] == "tritonvision"
    assert request["resource"]["deployment.environment"] == "test"


def test_every_sdk_path_sends_the_context_of_the_span_it_was_called_in(traced_server, collector, photos):
    images = [photos["chelsea"], photos["coffee"], photos["astronaut"]] * 2

    def batch(clf):
        assert len(clf.classify_batch(images)) == len(images)  # submit(): futures completed on gRPC threads

    def stream(clf):
        assert all(c.ok for c in clf.classify_stream(images))  # one stream: the context where it opens

    def in_asyncio(clf):
        async def run():
            async with tv.AsyncClassifier(traced_server.grpc_url, timeout=60, trace=True) as aclf:
                with _Span() as span:
                    await asyncio.gather(*(aclf.classify(image) for image in images))
                return span

        return asyncio.run(run())

    with tv.Classifier(traced_server.grpc_url, timeout=60, trace=True) as clf:
        for path in (batch, stream, in_asyncio):
            collector.clear()
            with _Span() as span:
                span = path(clf) or span
            under, _ = _sent(collector, span, len(images))
            assert under, f"{path.__name__}: no request carried the caller's context"


def test_without_a_sampled_span_no_context_is_sent(traced_server, collector, photos):
    conn = Connection.make(traced_server.grpc_url, trace=True, headers={"x-api-key": "k"})
    assert conn.metadata() == (("x-api-key", "k"),)  # no span
    with _Span(sampled=False):
        assert conn.metadata() == (("x-api-key", "k"),)  # the caller chose not to trace this one
    with _Span() as span:
        sent = dict(conn.metadata())
    assert sent["traceparent"] == f"00-{span.trace_hex}-{span.span_hex}-01" and sent["x-api-key"] == "k"
    assert Connection.make(traced_server.grpc_url).metadata() == ()
    # Served: Triton traces these at its own rate, as roots, not under the unsampled span.
    collector.clear()
    with tv.Classifier(traced_server.grpc_url, timeout=60, trace=True) as clf, _Span(sampled=False) as unsampled:
        for _ in range(2):
            clf.classify(photos["chelsea"])
    under, roots = _sent(collector, unsampled, 2)
    assert not under and len(roots) == 2


def test_an_unreachable_collector_costs_no_request(cpu_repository, photos):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    export = TraceExport(f"http://127.0.0.1:{port}/v1/traces", rate=1)
    with TritonServer(cpu_repository, trace=export, extra_args=FAST_EXPORT) as server:
        with tv.Classifier(server.grpc_url, timeout=60, trace=True) as clf, _Span():
            results = clf.classify_batch([photos["chelsea"], photos["coffee"]] * 4, return_exceptions=True)
        assert all(isinstance(r, list) and r for r in results), results
        assert server.running and server.is_live(5.0)


def test_trace_export_refuses_settings_triton_would_misread():
    assert "--trace-config=opentelemetry,resource=service.name=tritonvision" in TraceExport("http://c:4318/v1/traces").args()
    own = TraceExport("https://c/v1/traces", rate=7, resources=(("service.name", "cls"),)).args()
    assert "--trace-config=rate=7" in own and "--trace-config=opentelemetry,resource=service.name=cls" in own
    assert not any("TENSORS" in a for a in own)  # tensors would carry the users' images into the traces
    for bad in ({"url": "collector:4318"}, {"url": "http://c", "rate": 0}, {"url": "http://c", "rate": True},
                {"url": "http://c", "resources": (("a", "b,c=d"),)}, {"url": "http://c", "resources": (("", "x"),)}):
        with pytest.raises(ValueError):
            TraceExport(**bad)


def test_serve_turns_its_flags_into_the_export_and_refuses_them_without_a_url(caplog):
    from tritonvision_server.serve import main, parser, trace_export

    args = parser("serve").parse_args(["--trace-url", "http://c:4318/v1/traces", "--trace-rate", "10",
                                       "--trace-resource", "deployment.environment=prod"])
    export = trace_export(args.trace_url, args.trace_rate, args.trace_resource)
    assert export == TraceExport("http://c:4318/v1/traces", 10, (("deployment.environment", "prod"),))
    assert trace_export(None, parser("serve").parse_args([]).trace_rate, []) is None
    # Usage errors end serve with 2 before anything starts.
    assert main(["--trace-rate", "10"]) == 2 and "--trace-url" in caplog.text
    assert main(["--trace-url", "otel:4318"]) == 2 and "OTLP/HTTP" in caplog.text


def test_trace_without_opentelemetry_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", None)  # as if not installed
    with pytest.raises(tv.MissingExtraError, match=r"tritonvision\[trace\]"):
        tv.Classifier("127.0.0.1:1", trace=True)


def test_a_retry_sent_from_a_timer_thread_carries_its_first_attempts_context(photos):
    import threading

    class Transport:
        """Records each attempt's trace context; the first attempt finds the server unreachable."""

        pool = None

        def __init__(self, conn):
            self.conn, self.sent = conn, []

        def async_infer(self, data, top_k, callback, timeout=None):
            self.sent.append(dict(self.conn.metadata()).get("traceparent"))
            outcome = (None, tv.ServerUnavailableError("down")) if len(self.sent) == 1 else ([], None)
            threading.Thread(target=callback, args=outcome).start()  # as gRPC does: from its own thread

        def close(self):
            pass

    with tv.Classifier("127.0.0.1:1", trace=True) as clf:
        clf._transport = transport = Transport(clf.connection)
        with _Span() as span:
            future = clf.submit(photos["chelsea"], retry=tv.RetryPolicy(attempts=2, initial=0.01))
        assert future.result(timeout=10) == []
    assert transport.sent == [f"00-{span.trace_hex}-{span.span_hex}-01"] * 2


def test_serve_warns_that_the_bundled_triton_crashes_when_it_traces_many_requests(tmp_path, caplog):
    from tritonvision_server.serve import serve

    missing = tmp_path / "no-repository"  # serve stops right after its checks: nothing is started
    assert serve(model_repository=missing, profile="gpu", trace=TraceExport("http://c:4318/v1/traces")) == 1
    assert "crashes (SIGSEGV) when it traces many requests" in caplog.text
    caplog.clear()
    assert serve(model_repository=missing, profile="gpu") == 1
    assert "SIGSEGV" not in caplog.text
