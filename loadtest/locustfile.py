"""Locust users for the ``classifier`` ensemble, through the tritonvision SDK over gRPC.

    locust -f loadtest/locustfile.py --host 127.0.0.1:8001 --headless -u 16 -r 16 -t 60s UnaryUser

Each user keeps one request in flight (no wait between tasks), so the number of users is the concurrency.
``UnaryUser`` sends one request per image, ``ShmUser`` the same through system shared memory (the server
must be on this host), ``StreamUser`` holds one gRPC stream with ``--stream-in-flight`` images outstanding.
Options also come from environment variables (``TRITONVISION_IMAGES`` and so on), for ``locust.conf``-less
runs in containers. A request fails in Locust's statistics when the SDK raises; with
``--bad-image-every N`` every Nth image is corrupt and is reported under its own name ("bad image"), so
that the failure path is exercised under load without mixing into the good requests' figures. Requests
the server sheds (``OverloadedError``: a full queue or a queue timeout) are reported as "overloaded", so
that goodput and the latency of accepted requests stay apart from fast refusals.
"""

from __future__ import annotations

# gRPC's I/O must cooperate with gevent's event loop, which Locust runs every user on; this has to happen
# before any channel exists (without it a probe ran 167 instead of 566 requests/s).
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import itertools  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from locust import User, constant, events, task  # noqa: E402

import tritonvision as tv  # noqa: E402
from tritonvision._images import sample_paths  # noqa: E402

CORRUPT = b"\xff\xd8\xff\xe0 this is not the rest of a JPEG"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TRITONVISION_{name}", default)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    # Locust's default stop kills each user's greenlet at once, in the middle of a gRPC call; let the call
    # in flight finish instead (and a stream drain), so that stopping never leaves the client half-closed.
    parser.set_defaults(stop_timeout="30")
    group = parser.add_argument_group("tritonvision")
    group.add_argument("--images", default=_env("IMAGES", str(sample_paths()[0].parent)),
                       help="image file or folder to send, round-robin (default: the SDK's sample photos; "
                            "env TRITONVISION_IMAGES)")
    group.add_argument("--top-k", type=int, default=int(_env("TOP_K", "5")), help="classes per answer (env TRITONVISION_TOP_K)")
    group.add_argument("--request-timeout", type=float, default=float(_env("REQUEST_TIMEOUT", "60")),
                       help="seconds before a request fails (env TRITONVISION_REQUEST_TIMEOUT)")
    group.add_argument("--stream-in-flight", type=int, default=int(_env("STREAM_IN_FLIGHT", "4")),
                       help="StreamUser: images outstanding on each user's stream (env TRITONVISION_STREAM_IN_FLIGHT)")
    group.add_argument("--bad-image-every", type=int, default=int(_env("BAD_IMAGE_EVERY", "0")),
                       help="send a corrupt image every N requests, 0 for never (env TRITONVISION_BAD_IMAGE_EVERY)")
    # Connection options of tritonvision.Classifier; the address is Locust's --host. (Locust's own
    # --tls-cert/--tls-key are its web UI's, hence these names.)
    group.add_argument("--root-certificates", default=_env("ROOT_CERTIFICATES", ""),
                       help="PEM file of the roots that signed the server's certificate: TLS (env TRITONVISION_ROOT_CERTIFICATES)")
    group.add_argument("--client-cert", default=_env("CLIENT_CERT", ""),
                       help="PEM client certificate chain for mutual TLS (env TRITONVISION_CLIENT_CERT)")
    group.add_argument("--client-key", default=_env("CLIENT_KEY", ""),
                       help="PEM client private key for mutual TLS (env TRITONVISION_CLIENT_KEY)")
    group.add_argument("--tls-server-name", default=_env("TLS_SERVER_NAME", ""),
                       help="name the server's certificate carries, if not the host's (env TRITONVISION_TLS_SERVER_NAME)")
    group.add_argument("--grpc-headers", default=_env("HEADERS", ""),
                       help="gRPC metadata on every call, KEY=VALUE[,KEY=VALUE...] (env TRITONVISION_HEADERS)")
    group.add_argument("--access-key", default=_env("ACCESS_KEY", ""), metavar="NAME=VALUE",
                       help="the server's access key (serve --access-key), needed by ShmUser's registrations "
                            "(env TRITONVISION_ACCESS_KEY)")
    group.add_argument("--load-balancing", default=_env("LOAD_BALANCING", ""), choices=("", "pick_first", "round_robin"),
                       help="round_robin: spread each user's calls over every address the host resolves to "
                            "(env TRITONVISION_LOAD_BALANCING)")


def connection_options(opts) -> dict:
    """Classifier keyword arguments from the command line's connection options."""
    headers = dict(pair.split("=", 1) for pair in opts.grpc_headers.split(",") if pair.strip())
    return {
        "root_certificates": opts.root_certificates or None,
        "certificate_chain": opts.client_cert or None,
        "private_key": opts.client_key or None,
        "headers": {k.strip(): v.strip() for k, v in headers.items()} or None,
        "load_balancing": opts.load_balancing or None,
        "tls_server_name": opts.tls_server_name or None,
        "access_key": tuple(opts.access_key.split("=", 1)) if "=" in opts.access_key else None,
    }


def load_images(source: str) -> list[bytes]:
    path = Path(source)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"no images under {path}")
    return [p.read_bytes() for p in files]


class TritonUser(User):
    """One SDK client per user; subclasses say how an image is sent."""

    abstract = True
    wait_time = constant(0)
    shm: str | None = None

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.top_k = opts.top_k
        images = load_images(opts.images)
        every = opts.bad_image_every
        # (name the request is reported under, bytes), round-robin, a corrupt one every `every` requests
        self.images = (
            ("bad image", CORRUPT) if every and n % every == every - 1 else ("classify", images[n % len(images)])
            for n in itertools.count()
        )
        # No retries: a failure under load is the figure a load test is for.
        self.clf = tv.Classifier(self.host, timeout=opts.request_timeout, shm=self.shm,
                                 retry=tv.RetryPolicy(attempts=1), **connection_options(opts))

    def on_stop(self) -> None:
        self.clf.close()

    def report(self, name: str, started: float, error: BaseException | None) -> None:
        """The one place requests reach Locust's statistics."""
        if isinstance(error, tv.OverloadedError):
            name = "overloaded"
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=0,
            exception=error,
            context={"user": type(self).__name__},
        )


class UnaryUser(TritonUser):
    @task
    def classify(self) -> None:
        name, data = next(self.images)
        started = time.perf_counter()
        try:
            self.clf.classify(data, self.top_k)
        except tv.TritonVisionError as exc:
            self.report(name, started, exc)
        else:
            self.report(name, started, None)


class ShmUser(UnaryUser):
    shm = "system"


class StreamUser(TritonUser):
    def on_start(self) -> None:
        super().on_start()
        self.sent: dict[int, tuple[str, float]] = {}

        def frames():
            # Pulled by the stream only as results come back, so the time of the pull is when it was sent.
            for i, (name, data) in enumerate(self.images):
                self.sent[i] = (name, time.perf_counter())
                yield data

        opts = self.environment.parsed_options
        self.results = self.clf.classify_stream(frames(), self.top_k, max_in_flight=opts.stream_in_flight)

    @task
    def next_result(self) -> None:
        result = next(self.results)
        name, started = self.sent.pop(result.index)
        self.report(name, started, result.error)

    def on_stop(self) -> None:
        self.results.close()  # drains what is in flight, then ends the stream
        super().on_stop()
