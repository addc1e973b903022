"""Locust users for the ``classifier`` ensemble, through the tritonvision SDK over gRPC.

    locust -f loadtest/locustfile.py --host 127.0.0.1:8001 --headless -u 16 -r 16 -t 60s UnaryUser

Each user keeps one request in flight (no wait between tasks), so the number of users is the concurrency;
with ``--arrival-rate R`` the users instead pace themselves to R requests/s in all (an SLO check at a
fixed load). ``UnaryUser`` sends one request per image, ``ShmUser`` the same through system shared memory
(the server must be on this host), ``StreamUser`` holds one gRPC stream with ``--stream-in-flight`` images
outstanding. Request names start with the user kind ("unary classify", "shm classify", "stream
classify"), so that their latencies are never mixed in one row.

``--bad-image-every N`` makes every Nth image corrupt. Refusing it is the right answer, so a refused bad
image counts as a success under "<kind> bad image refused"; one the server accepts is a failure under
"<kind> bad image accepted". A clean run then exits 0 and the failure ratio counts only real failures.

An unreachable server (wrong host or port, the HTTP port 8000 instead of gRPC 8001, a server restarting)
makes each user back off, up to ``--unavailable-backoff`` seconds between tries, instead of failing
thousands of requests a second; the first such failure logs what is wrong. An ``http://`` URL as host is
refused at start with the fix.

Options appear in ``--help``, in the web UI's form, and as ``TRITONVISION_*`` environment variables for
containers. ``--latency-file PATH`` records every request's latency unrounded (Locust's own percentiles
keep two significant digits); ``loadtest/sweep.py`` reads it. Load shapes live in ``loadtest/shapes/``.
Requests the server sheds (``OverloadedError``: a full queue or a queue timeout) are reported as
"<kind> overloaded", so that goodput and the latency of accepted requests stay apart from fast refusals;
a shed request does not make the user back off (the server is up, only busy).
"""

from __future__ import annotations

# gRPC's I/O must cooperate with gevent's event loop, which Locust runs every user on; this has to happen
# before any channel exists (without it a probe ran 167 instead of 566 requests/s).
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

import tritonvision as tv  # noqa: E402
from tritonvision import spec  # noqa: E402
from tritonvision import sample_images  # noqa: E402
from tritonvision._images import image_files  # noqa: E402

CORRUPT = b"\xff\xd8\xff\xe0 this is not the rest of a JPEG"
IMAGE_SUFFIXES = spec.image_suffixes()
log = logging.getLogger("tritonvision.locust")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TRITONVISION_{name}", default)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    # Locust's default stop kills each user's greenlet at once, in the middle of a gRPC call; let the call
    # in flight finish instead (and a stream drain), so that stopping never leaves the client half-closed.
    parser.set_defaults(stop_timeout="30")
    group = parser.add_argument_group("tritonvision",
                                      "The classifier's load test (each also a TRITONVISION_* variable)")

    def option(*names, **kwargs) -> None:
        # An argument group's add_argument is argparse's own, which does not take Locust's web-UI flags:
        # set them on the action as LocustArgumentParser.add_argument does, so the option shows in the UI.
        action = group.add_argument(*names, **kwargs)
        action.include_in_web_ui = True
        action.is_secret = action.is_required = action.is_multiple = False

    option("--images", default=_env("IMAGES", str(sample_images()[0].parent)),
           help="image file or folder to send, round-robin (default: the SDK's sample photos; env TRITONVISION_IMAGES)")
    option("--top-k", type=int, default=int(_env("TOP_K", "5")), help="classes per answer (env TRITONVISION_TOP_K)")
    option("--request-timeout", type=float, default=float(_env("REQUEST_TIMEOUT", "60")),
           help="seconds before a request fails (env TRITONVISION_REQUEST_TIMEOUT)")
    option("--stream-in-flight", type=int, default=int(_env("STREAM_IN_FLIGHT", "4")),
           help="StreamUser: images outstanding on each user's stream (env TRITONVISION_STREAM_IN_FLIGHT)")
    option("--bad-image-every", type=int, default=int(_env("BAD_IMAGE_EVERY", "0")),
           help="send a corrupt image every N requests, 0 for never; refusing it counts as a success "
                "(env TRITONVISION_BAD_IMAGE_EVERY)")
    option("--arrival-rate", type=float, default=float(_env("ARRIVAL_RATE", "0")),
           help="UnaryUser/ShmUser: requests per second across all users (constant arrival rate; 0: each user "
                "sends as soon as its previous answer came; env TRITONVISION_ARRIVAL_RATE)")
    option("--unavailable-backoff", type=float, default=float(_env("UNAVAILABLE_BACKOFF", "5")),
           help="most seconds a user waits between tries while the server is unreachable "
                "(env TRITONVISION_UNAVAILABLE_BACKOFF)")
    option("--latency-file", default=_env("LATENCY_FILE", ""),
           help="write every request's latency (ms, unrounded) as JSON here at exit; a worker adds its pid "
                "(env TRITONVISION_LATENCY_FILE)")
    # Load shapes (loadtest/shapes/*.py) read these.
    option("--step-users", type=int, default=int(_env("STEP_USERS", "4")), help="step ramp: users added per step")
    option("--step-seconds", type=float, default=float(_env("STEP_SECONDS", "30")), help="step ramp: seconds per step")
    option("--max-users", type=int, default=int(_env("MAX_USERS", "64")), help="step ramp: users of the last step")
    option("--spike-users", type=int, default=int(_env("SPIKE_USERS", "32")), help="spike: users during the spike")
    option("--spike-at", type=float, default=float(_env("SPIKE_AT", "30")), help="spike: seconds before it starts")
    option("--spike-seconds", type=float, default=float(_env("SPIKE_SECONDS", "10")), help="spike: how long it lasts")
    # Connection options of tritonvision.Classifier; the address is Locust's --host. (Locust's own
    # --tls-cert/--tls-key are its web UI's, hence these names.)
    option("--root-certificates", default=_env("ROOT_CERTIFICATES", ""),
           help="PEM file of the roots that signed the server's certificate: TLS (env TRITONVISION_ROOT_CERTIFICATES)")
    option("--client-cert", default=_env("CLIENT_CERT", ""),
           help="PEM client certificate chain for mutual TLS (env TRITONVISION_CLIENT_CERT)")
    option("--client-key", default=_env("CLIENT_KEY", ""),
           help="PEM client private key for mutual TLS (env TRITONVISION_CLIENT_KEY)")
    option("--tls-server-name", default=_env("TLS_SERVER_NAME", ""),
           help="name the server's certificate carries, if not the host's (env TRITONVISION_TLS_SERVER_NAME)")
    option("--grpc-headers", default=_env("HEADERS", ""),
           help="gRPC metadata on every call, KEY=VALUE[,KEY=VALUE...] (env TRITONVISION_HEADERS)")
    option("--access-key", default=_env("ACCESS_KEY", ""), metavar="NAME=VALUE",
           help="the server's access key (serve --access-key), needed by ShmUser's registrations "
                "(env TRITONVISION_ACCESS_KEY)")
    option("--load-balancing", default=_env("LOAD_BALANCING", ""), choices=("", "pick_first", "round_robin"),
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
    files = image_files(source)
    if not files:
        raise SystemExit(f"no images under {source}")
    return [p.read_bytes() for p in files]


def option_problem(opts, images: bool = True) -> str | None:
    """What is wrong with the project's options (from the command line, the environment or the web UI's
    form), before any user starts; None if nothing. ``images``: check the --images path too (not where
    the users run elsewhere: a master's workers read it on their own machines)."""
    checks = (
        # (option, value, fine, what it must be)
        ("--top-k", opts.top_k, 1 <= opts.top_k <= spec.NUM_CLASSES, f"from 1 to {spec.NUM_CLASSES}"),
        ("--request-timeout", opts.request_timeout, opts.request_timeout > 0, "seconds above 0"),
        ("--stream-in-flight", opts.stream_in_flight, opts.stream_in_flight >= 1, "at least 1"),
        ("--bad-image-every", opts.bad_image_every, opts.bad_image_every >= 0, "0 (never) or more"),
        ("--arrival-rate", opts.arrival_rate, opts.arrival_rate >= 0, "requests/s, 0 (unpaced) or more"),
        ("--unavailable-backoff", opts.unavailable_backoff, opts.unavailable_backoff > 0, "seconds above 0"),
        ("--step-users", opts.step_users, opts.step_users >= 1, "at least 1"),
        ("--step-seconds", opts.step_seconds, opts.step_seconds > 0, "seconds above 0"),
        ("--max-users", opts.max_users, opts.max_users >= 1, "at least 1"),
        ("--spike-users", opts.spike_users, opts.spike_users >= 1, "at least 1"),
        ("--spike-at", opts.spike_at, opts.spike_at >= 0, "seconds, 0 or more"),
        ("--spike-seconds", opts.spike_seconds, opts.spike_seconds > 0, "seconds above 0"),
    )
    for name, value, fine, want in checks:
        if not fine or not math.isfinite(value):  # NaN compares False both ways; inf is no timeout
            return f"{name} {value:g}: must be {want}"
    path = Path(opts.images)
    if not images:
        return None
    if not path.exists():
        return f"--images {opts.images}: no such file or folder"
    if not image_files(path):
        return f"--images {opts.images}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in that folder"
    return None


def latency_file_problem(opts) -> str | None:
    """Why --latency-file could not be written at the end of the run (checked at its start), or None."""
    if not opts.latency_file:
        return None
    folder = Path(opts.latency_file).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return f"--latency-file {opts.latency_file}: {folder} is not a folder this process can write in"
    return None


def host_problem(host: str | None) -> str | None:
    """What is wrong with ``host`` as the address of Triton's gRPC endpoint, before any request."""
    if not host:
        return "no host: give the gRPC endpoint with --host HOST:PORT (Triton's default gRPC port is 8001)"
    if "://" in host:
        bare = host.split("://", 1)[1].rstrip("/")
        hint = bare.rsplit(":", 1)[0] + ":8001" if bare.endswith(":8000") else bare
        return (f"--host {host!r} is a URL, but these users speak gRPC: give host:port, e.g. --host {hint} "
                "(Triton serves gRPC on 8001 and HTTP on 8000 by default)")
    return None


def diagnose_unreachable(host: str, timeout: float = 2.0) -> str:
    """Why a gRPC call to ``host`` found no server: nothing listening, or an HTTP server on that port."""
    addr, _, port = host.rpartition(":")
    try:
        with socket.create_connection((addr.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"GET /v2/health/ready HTTP/1.0\r\n\r\n")
            answer = sock.recv(16)
    except (OSError, ValueError) as exc:
        return f"cannot connect to {host} ({exc}): is the server up, and is this its gRPC port (8001 by default)?"
    if answer.startswith(b"HTTP/"):
        return (f"{host} answers HTTP/1: that is Triton's HTTP port; these users need its gRPC port "
                "(8001 by default, --grpc-port of tritonserver)")
    return f"{host} accepts connections but does not answer gRPC: is this Triton's gRPC port?"


@events.test_start.add_listener
def _check_host(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master checked it
    opts = environment.parsed_options
    local = not isinstance(environment.runner, MasterRunner)
    problem = host_problem(environment.host) or (option_problem(opts, images=local) if opts is not None else None)
    if problem is None:
        return
    log.error("%s", problem)
    environment.process_exit_code = 2
    # Stopping from inside test_start: let the start finish first. Headless, the run ends (exit 2); in the
    # web UI only this run stops, so that the host or the option can be corrected in the form.
    headless = opts is None or opts.headless or getattr(opts, "autostart", False)
    gevent.spawn_later(0.1, environment.runner.quit if headless else environment.runner.stop)


@events.test_stop.add_listener
def _check_arrival_rate(environment, **_kw) -> None:
    rate = environment.parsed_options.arrival_rate if environment.parsed_options else 0
    if rate <= 0 or isinstance(environment.runner, WorkerRunner):
        return
    achieved = environment.stats.total.total_rps
    if achieved < 0.9 * rate:
        # Closed-loop users cannot send faster than their answers come: the offered load fell short.
        log.warning("achieved %.1f of the %.1f requests/s asked for: use more users (at least the rate times the "
                    "latency in seconds)", achieved, rate)


class LatencyRecorder:
    """Every request's end time and unrounded latency, per name, written as JSON at exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, list[tuple[float, float, bool]]] = {}

    def on_request(self, name, response_time, exception=None, **_kw) -> None:
        self.records.setdefault(name, []).append((round(time.time(), 4), round(response_time, 4), exception is None))

    def write(self, environment, **_kw) -> None:
        if isinstance(environment.runner, MasterRunner):
            return  # requests run on the workers, which write their own files
        path = self.path
        if isinstance(environment.runner, WorkerRunner):
            path = path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}")
        path.write_text(json.dumps({"pid": os.getpid(), "requests": self.records}))


@events.init.add_listener
def _init(environment, **_kw) -> None:
    opts = environment.parsed_options
    runner = environment.runner
    if opts is None:
        problem = None
    elif isinstance(runner, WorkerRunner):  # the master checks the rest; the recording is the worker's own
        problem = latency_file_problem(opts)
    elif isinstance(runner, MasterRunner):  # the workers run the users and write the recordings
        problem = option_problem(opts, images=False)
    else:
        problem = option_problem(opts) or latency_file_problem(opts)
    if problem is not None:
        # Before any user starts (a load shape's first tick comes before test_start): exit 2, as argparse would.
        log.error("%s", problem)
        sys.exit(2)

    def users_in_all(user_count, **_kw) -> None:
        # On a worker, the runner counts only its own users; the master tells every worker the total when
        # spawning completes (after each step of a load shape too), and the users pace to their share of it.
        environment.tritonvision_users_in_all = user_count

    environment.events.spawning_complete.add_listener(users_in_all)
    if opts is not None and opts.latency_file:
        recorder = LatencyRecorder(Path(opts.latency_file))
        environment.events.request.add_listener(recorder.on_request)
        environment.events.quitting.add_listener(recorder.write)


class TritonUser(User):
    """One SDK client per user; subclasses say how an image is sent and under which ``kind`` it is reported."""

    abstract = True
    kind = "grpc"
    shm: str | None = None
    _diagnosed = False  # one diagnosis of an unreachable server per process, not one per user

    def wait_time(self) -> float:
        # Closed loop by default: the next request leaves when the previous answer came. With an arrival
        # rate each user paces itself to rate / users requests per second (Locust's constant_throughput,
        # with the share recomputed as the user count changes), users counted over all workers.
        rate = self.environment.parsed_options.arrival_rate
        if rate <= 0:
            return 0.0
        runner = self.environment.runner
        users = runner.user_count if runner else 1
        if isinstance(runner, WorkerRunner):
            # Until the master's first total arrives, this worker's own count (the first requests go early).
            users = max(users, getattr(self.environment, "tritonvision_users_in_all", 0))
        users = max(1, users)
        interval = users / rate
        return max(0.0, interval - (time.perf_counter() - self._task_started))

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.top_k = opts.top_k
        on_worker = isinstance(self.environment.runner, WorkerRunner)
        if host_problem(self.host) or option_problem(opts, images=not on_worker):
            raise StopUser()  # said once, at test start (a worker's --images path: load_images says)
        self._task_started = time.perf_counter()
        self._backoff = getattr(self, "_backoff", 0.0)  # kept when a StreamUser reopens its stream
        images = load_images(opts.images)
        every = opts.bad_image_every
        # (what is sent, bytes), round-robin, a corrupt image every `every` requests
        self.images = (
            ("bad image", CORRUPT) if every and n % every == every - 1 else ("classify", images[n % len(images)])
            for n in itertools.count()
        )
        # No retries: a failure under load is the figure a load test is for.
        self.clf = tv.Classifier(self.host, timeout=opts.request_timeout, shm=self.shm,
                                 retry=tv.RetryPolicy(attempts=1), **connection_options(opts))

    def on_stop(self) -> None:
        if hasattr(self, "clf"):  # not when on_start refused the host
            self.clf.close()

    def report(self, what: str, started: float, error: BaseException | None) -> None:
        """Report one request (:meth:`record`), then back off if the server was unreachable."""
        self.record(what, started, error)
        self.back_off(error)

    def record(self, what: str, started: float, error: BaseException | None) -> None:
        """The one place requests reach Locust's statistics: named by user kind and outcome."""
        if isinstance(error, tv.OverloadedError):
            what = "overloaded"
        name = f"{self.kind} {what}"
        if what == "bad image":
            # The right answer to a corrupt image is a refusal for that request alone.
            if isinstance(error, tv.InvalidImageError):
                name, error = f"{name} refused", None
            elif error is None:
                name, error = f"{name} accepted", AssertionError("a corrupt image was accepted")
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=0,
            exception=error,
            context={"user": type(self).__name__},
        )

    def back_off(self, error: BaseException | None) -> None:
        """After an unreachable server, wait (doubling, up to --unavailable-backoff) before the next try."""
        if not isinstance(error, tv.ServerUnavailableError):
            self._backoff = 0.0
            return
        if not TritonUser._diagnosed:
            TritonUser._diagnosed = True
            log.error("%s: %s", type(error).__name__, diagnose_unreachable(self.host))
        limit = self.environment.parsed_options.unavailable_backoff
        self._backoff = min(limit, max(0.05, self._backoff * 2))
        gevent.sleep(self._backoff)


class UnaryUser(TritonUser):
    kind = "unary"

    @task
    def classify(self) -> None:
        what, data = next(self.images)
        self._task_started = started = time.perf_counter()
        try:
            self.clf.classify(data, self.top_k)
        except tv.TritonVisionError as exc:
            self.report(what, started, exc)
        else:
            self.report(what, started, None)


class ShmUser(UnaryUser):
    kind = "shm"
    shm = "system"


class StreamUser(TritonUser):
    kind = "stream"

    def wait_time(self) -> float:
        return 0.0  # the stream keeps --stream-in-flight requests outstanding; no pacing

    def on_start(self) -> None:
        super().on_start()
        self.sent: dict[int, tuple[str, float]] = {}

        def frames():
            # Pulled by the stream only as results come back, so the time of the pull is when it was sent.
            for i, (what, data) in enumerate(self.images):
                self.sent[i] = (what, time.perf_counter())
                yield data

        opts = self.environment.parsed_options
        self.results = self.clf.classify_stream(frames(), self.top_k, max_in_flight=opts.stream_in_flight)

    @task
    def next_result(self) -> None:
        try:
            result = next(self.results)
        except tv.TritonVisionError as exc:
            # The stream itself failed (server gone, wrong port): every image it had in flight failed with it,
            # each under its own name and with the time it waited; with none in flight, the connection did.
            # Then back off once and open a new stream.
            lost = sorted(self.sent.values(), key=lambda sent: sent[1])
            for what, started in lost:
                self.record(what, started, exc)
            self.sent.clear()
            if not lost:
                self.record("connection", time.perf_counter(), exc)
            self.back_off(exc)
            try:
                self.results.close()
            finally:
                self.clf.close()
            self.on_start()
            return
        what, started = self.sent.pop(result.index)
        self.report(what, started, result.error)

    def on_stop(self) -> None:
        if hasattr(self, "results"):
            self.results.close()  # drains what is in flight, then ends the stream
        super().on_stop()


if __name__ == "__main__":
    # `locust --help` prints before it imports a locustfile, so it cannot list these options; this does.
    from locust.argument_parser import get_parser

    get_parser().parse_args(["--help"])
