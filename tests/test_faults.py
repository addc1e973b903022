"""Faults of the server's processes, each on its own real server: a dead python-backend stub heals, nothing
outlives the server or the wrapper, ports in use are refused, and a stop is bounded."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import tritonvision as tv
from tritonvision_server.launcher import ServerStartError, TritonServer, free_port, process_group

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(predicate, timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _stub_of(server: TritonServer, model: str) -> int:
    for pid, cmdline in server.stub_processes().items():
        if model in cmdline:
            return pid
    raise AssertionError(f"no stub of {model} among {server.stub_processes()}")


def _classifies(url: str, photo: bytes) -> bool:
    try:
        with tv.Classifier(url, timeout=5, retry=tv.RetryPolicy(attempts=1)) as clf:
            return bool(clf.classify(photo))
    except tv.TritonVisionError:
        return False


def test_killed_stub_is_detected_and_the_service_heals_within_15_s(cpu_repository, photos):
    with TritonServer(cpu_repository) as server:
        assert server.unhealthy() is None
        os.kill(_stub_of(server, "resnet50"), signal.SIGKILL)
        killed = time.monotonic()
        assert _wait(lambda: server.unhealthy() is not None, 5), "the dead stub went unnoticed"

        def healed() -> bool:
            server.heal()  # what `tritonvision serve` does every second
            return _classifies(server.grpc_url, photos["chelsea"])

        assert _wait(healed, 20, interval=0.5), f"not serving again:\n{server.log_tail()}"
        assert time.monotonic() - killed < 15
        assert server.unhealthy() is None


def _tritonserver_of(wrapper_pid: int) -> int | None:
    """The tritonserver that ``wrapper_pid`` started (its child)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            if comm == "tritonserver" and int(stat.rsplit(")", 1)[1].split()[1]) == wrapper_pid:
                return int(entry)
    return None


def _said(log_path, text: str) -> int:
    """How many times ``serve`` has logged ``text``."""
    return log_path.read_text(errors="replace").count(text)


@contextlib.contextmanager
def _serve(repository, photo: bytes | None, log_path, *args: str, up_within: float = 120):
    """``tritonvision serve`` of ``repository`` on free loopback ports, once its watchdog runs and it classifies
    ``photo`` (None: a stand-in server, not asked): yields (the serve process, its gRPC address, its ports);
    killed at the end if it still runs."""
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "tritonvision._cli", "serve", "--model-repository", str(repository),
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), *args]
    with open(log_path, "w") as log_fh:
        wrapper = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{ports[1]}"
    try:
        # A classify can go through before serve's own readiness check has seen the server: a fault injected
        # then is a fault during start-up (bounded by --startup-timeout), not one the watchdog handles.
        assert _wait(lambda: _said(log_path, "Ctrl-C to stop") and (photo is None or _classifies(url, photo)),
                     up_within, interval=1), f"serve did not come up:\n{log_path.read_text()[-3000:]}"
        yield wrapper, url, ports
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()


def test_serve_heals_a_killed_stub_and_its_server_dies_with_it(cpu_repository, photos, tmp_path):
    with _serve(cpu_repository, photos["chelsea"], tmp_path / "serve.log") as (wrapper, url, ports):
        stubs = [pid for pid, comm in process_group(_tritonserver_of(wrapper.pid)).items() if pid != _tritonserver_of(wrapper.pid)]
        assert stubs
        os.kill(stubs[-1], signal.SIGKILL)
        killed = time.monotonic()
        assert _wait(lambda: _classifies(url, photos["chelsea"]), 20, interval=0.5), "serve did not heal the stub"
        assert time.monotonic() - killed < 15
        # SIGKILL of the wrapper: the server and its stubs follow it, and the ports come free.
        server_pid = _tritonserver_of(wrapper.pid)
        everything = {server_pid, *process_group(server_pid)}
        wrapper.kill()
        wrapper.wait()
        assert _wait(lambda: not any(_alive(p) for p in everything), 20), "processes outlived `tritonvision serve`"
        for port in ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))


def test_serve_restarts_a_crashed_or_wedged_tritonserver_and_gives_up_on_a_crash_loop(cpu_repository, photos, tmp_path):
    """Triton 2.51 aborts in its gRPC handler when clients cancel calls as they complete, and after corrupting
    its heap it can hang in its own crash handler: running, answering nothing. ``serve`` restarts it in both
    cases; past --max-restarts it stops, exit code 1, for the supervisor above."""
    log_path = tmp_path / "serve.log"
    with _serve(cpu_repository, photos["chelsea"], log_path, "--max-restarts", "2") as (wrapper, url, _):
        crashed = _tritonserver_of(wrapper.pid)
        os.kill(crashed, signal.SIGSEGV)
        assert _wait(lambda: not _alive(crashed), 20), "SIGSEGV did not end tritonserver"
        # Generous bounds: a start with the full-batch warm-up takes ~10 s on two idle cores, far more on busy ones.
        assert _wait(lambda: _said(log_path, "restarted and ready") == 1 and _classifies(url, photos["chelsea"]),
                     120, interval=0.5), f"serve did not restart a crashed server:\n{log_path.read_text()[-3000:]}"
        assert wrapper.poll() is None

        wedged = _tritonserver_of(wrapper.pid)
        assert wedged not in (None, crashed)
        os.kill(wedged, signal.SIGSTOP)  # alive, answering nothing
        assert _wait(lambda: _said(log_path, "restarted and ready") == 2 and _classifies(url, photos["chelsea"]),
                     120, interval=0.5), f"serve did not restart a wedged server:\n{log_path.read_text()[-3000:]}"
        assert not _alive(wedged), "the wedged server was left running"

        last = _tritonserver_of(wrapper.pid)
        group = {last, *process_group(last)}
        os.kill(last, signal.SIGKILL)  # a third fault within the window: a crash loop
        assert wrapper.wait(timeout=30) == 1
        assert _wait(lambda: not any(_alive(p) for p in group), 10), "the server's processes outlived serve"
        text = log_path.read_text()
        assert "died from signal 11 (SIGSEGV); restarting it" in text
        assert "left /v2/health/live unanswered 3 times in a row; restarting it" in text
        assert "died from signal 9 (SIGKILL), after 2 restart(s) in the last 600 s: giving up" in text


def test_serve_restarts_a_server_whose_inference_hangs_while_its_health_endpoints_answer(cpu_repository, photos,
                                                                                          tmp_path):
    """After the gRPC race above, Triton 2.51's inference can hang (threads blocked on a malloc arena its
    crash handler holds) while /v2/health/live still answers; a stopped stub hangs inference the same way.
    The watchdog's inference probe restarts the server."""
    log_path = tmp_path / "serve.log"
    args = ("--probe-interval", "1", "--probe-timeout", "3")
    with _serve(cpu_repository, photos["chelsea"], log_path, *args) as (wrapper, url, ports):
        server = _tritonserver_of(wrapper.pid)
        stub = next(pid for pid in process_group(server) if pid != server)
        os.kill(stub, signal.SIGSTOP)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/live", timeout=5) as resp:
            assert resp.status == 200  # what the liveness check alone sees
        assert _wait(lambda: _tritonserver_of(wrapper.pid) not in (None, server), 60), \
            f"serve did not restart a server whose inference hangs:\n{log_path.read_text()[-3000:]}"
        assert _wait(lambda: _classifies(url, photos["chelsea"]), 120, interval=0.5), "not serving after the restart"
        assert not _alive(stub), "the stopped stub was left behind"
        assert "the inference probe failed 3 times in a row" in log_path.read_text()


def test_sigkill_of_tritonserver_leaves_no_stub_behind(cpu_repository):
    with TritonServer(cpu_repository) as server:
        stubs = list(server.stub_processes())
        assert stubs
        os.kill(server.pid, signal.SIGKILL)
        assert _wait(lambda: not any(_alive(p) for p in stubs), 10), "stubs outlived a killed tritonserver"


def test_refuses_to_start_on_a_port_in_use_even_if_something_answers_ready(cpu_repository):
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - an orphaned server answering the readiness probe
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    orphan = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=orphan.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(ServerStartError, match="in use"):
            TritonServer(cpu_repository, http_port=orphan.server_address[1]).start()
        assert time.monotonic() - started < 5
    finally:
        orphan.shutdown()


def test_stop_after_a_stub_died_is_bounded_and_complete(cpu_repository, photos, tmp_path):
    from tritonvision._cli import EXIT_OK, main

    server = TritonServer(cpu_repository).start()
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    probe = ["probe", "--url", server.grpc_url, "--image", str(tmp_path / "cat.jpg"), "--timeout", "5"]
    assert main(probe) == EXIT_OK
    group = dict(server.stub_processes())
    os.kill(_stub_of(server, "resnet50"), signal.SIGKILL)
    # Triton still says ready; the chart's liveness probe (an inference) does not.
    assert server.is_ready()
    assert main(probe) != EXIT_OK
    pid = server.pid
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 15
    assert not any(_alive(p) for p in [pid, *group])
    assert not server.leftover_shm()


FAKE_SERVER = """#!{python}
# A stand-in for tritonserver: counts its starts, then aborts, exits 1, hangs, or answers readiness until SIGTERM.
import http.server, os, sys
counter = os.environ["FAKE_TRITON_COUNTER"]
n = int(open(counter).read() or 0) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(n))
mode = os.environ["FAKE_TRITON_MODE"]
if mode == "abort-once" and n == 1:
    os.abort()
if mode == "exit" or (mode == "exit-after-first" and n > 1):
    print("error: creating server: Invalid argument - unknown option", flush=True)
    sys.exit(1)
if mode == "hang-second" and n == 2:
    import time
    time.sleep(3600)  # running, never ready
import socket
def port(name):
    return int(next(a for a in sys.argv if a.startswith("--" + name + "-port=")).split("=")[1])
held = []
for name in ("grpc", "metrics"):  # held like Triton's: the launcher checks that its server listens on them
    held.append(socket.socket())
    held[-1].bind(("127.0.0.1", port(name)))
    held[-1].listen()
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port("http")), Ready).serve_forever()
"""


def _fake_tritonserver(tmp_path, monkeypatch, mode: str):
    """FAKE_SERVER in ``mode``, written to ``tmp_path``: (its path, the file that counts its starts)."""
    fake = tmp_path / "tritonserver"
    fake.write_text(FAKE_SERVER.format(python=sys.executable))
    fake.chmod(0o755)
    counter = tmp_path / "starts"
    monkeypatch.setenv("FAKE_TRITON_COUNTER", str(counter))
    monkeypatch.setenv("FAKE_TRITON_MODE", mode)
    return fake, counter


@pytest.mark.parametrize("mode, starts, started", [("abort-once", 2, True), ("exit", 1, False)])
def test_a_server_killed_by_a_signal_during_start_up_is_started_once_more_and_a_refusal_is_not(
        cpu_repository, tmp_path, monkeypatch, mode, starts, started):
    fake, counter = _fake_tritonserver(tmp_path, monkeypatch, mode)
    server = TritonServer(cpu_repository, tritonserver=fake, startup_timeout=20)
    if started:
        with server:
            assert server.is_ready()
    else:
        with pytest.raises(ServerStartError, match="exited with code 1"):
            server.start()
    assert int(counter.read_text()) == starts


def test_serve_tries_again_when_a_restarted_server_does_not_come_up(cpu_repository, tmp_path, monkeypatch):
    """A restart whose server hangs in start-up ends in the start-up timeout; serve counts it as a restart and
    starts the server once more, rather than exiting with a server that may come back."""
    fake, counter = _fake_tritonserver(tmp_path, monkeypatch, "hang-second")
    log_path = tmp_path / "serve.log"
    args = ("--tritonserver", str(fake), "--startup-timeout", "4", "--probe-interval", "0", "--max-restarts", "3")
    with _serve(cpu_repository, None, log_path, *args, up_within=60) as (wrapper, _, _):
        os.kill(_tritonserver_of(wrapper.pid), signal.SIGKILL)
        assert _wait(lambda: _said(log_path, "restarted and ready") == 1, 60), log_path.read_text()
        assert int(counter.read_text()) == 3
        assert wrapper.poll() is None
        text = log_path.read_text()
        assert "died from signal 9 (SIGKILL); restarting it" in text
        assert "was not ready after 4 s" in text
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 0


def test_a_restart_that_fails_is_not_taken_for_a_dead_stub(cpu_repository):
    """The stubs of the server before a failed restart are all dead; the watchdog must see the new server's
    own state (running, not yet ready), not "stub died"."""
    with TritonServer(cpu_repository) as server:
        assert server.stub_processes()
        server.startup_timeout = 0.1  # far shorter than the model loads: the restart fails
        with pytest.raises(ServerStartError, match="not ready after"):
            server.restart()
        assert server.running and server.unhealthy() is None


@pytest.mark.parametrize("when", ["before the start", "while the models load"])
def test_a_chosen_port_that_another_process_takes_is_exchanged_for_a_free_one(cpu_repository, photos, when):
    """Ports left to the launcher are free when chosen; Triton binds them only once its models are loaded,
    and another process (a client's outgoing connection, another test's server) may take one meanwhile.
    Such a start goes on with other ports, where ports given explicitly fail as before."""
    server = TritonServer(cpu_repository)
    taken = server.grpc_port
    squatter = socket.socket()

    def squat():
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()

    if when == "before the start":
        squat()
    else:
        def when_spawned():
            assert _wait(lambda: server.pid is not None, 60, interval=0.005)
            squat()

        thread = threading.Thread(target=when_spawned, daemon=True)
        thread.start()
    try:
        with server:
            assert server.grpc_port != taken and server.running
            with tv.Classifier(server.grpc_url, timeout=60) as clf:
                assert clf.classify(photos["chelsea"], top_k=1)
    finally:
        squatter.close()


def test_a_server_that_died_is_restarted_on_the_same_ports(cpu_repository, photos):
    with TritonServer(cpu_repository) as server:
        port = server.grpc_port
        os.kill(server.pid, signal.SIGKILL)
        assert _wait(lambda: not server.running, 10)
        server.restart()
        assert server.running and server.grpc_port == port and server.restarts == 1
        with tv.Classifier(server.grpc_url, timeout=60) as clf:
            assert clf.classify(photos["chelsea"], top_k=1)


def _files(prefix: str) -> list:
    """/dev/shm files named ``prefix*``: python-backend regions and launchers' lock files."""
    from tritonvision_server.launcher import SHM_DIR

    return sorted(SHM_DIR.glob(prefix + "*"))


def _regions(prefix: str) -> list:
    return [p for p in _files(prefix) if not p.name.endswith(".lock")]


def test_regions_of_a_sigkilled_serve_are_removed_by_the_next_start_and_a_live_serve_s_are_not(
        cpu_repository, photos, tmp_path):
    """SIGKILL of ``serve`` while its models load: tritonserver ends (parent-death signal) but its stubs live on,
    orphaned, with the regions. The next start kills those stubs and removes the regions, logging the bytes;
    the regions of a live serve on the same host, under the same namespace, stay."""
    namespace = f"tvtest-{uuid.uuid4().hex[:8]}"  # this test's alone: no other launcher's regions are touched
    try:
        _sigkilled_serve_is_swept(namespace, cpu_repository, photos, tmp_path)
    finally:
        for path in _files(f"{namespace}_"):  # whatever a failure left: this test's files only
            path.unlink(missing_ok=True)


def _sigkilled_serve_is_swept(namespace, cpu_repository, photos, tmp_path):
    with _serve(cpu_repository, photos["chelsea"], tmp_path / "live.log", "--shm-prefix", namespace) as (live, url, _):
        live_prefix = f"{namespace}_{live.pid}_"
        live_regions = _regions(live_prefix)
        assert live_regions
        ports = [free_port() for _ in range(3)]
        victim = subprocess.Popen(
            [sys.executable, "-m", "tritonvision._cli", "serve", "--model-repository", str(cpu_repository),
             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
             "--shm-prefix", namespace], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            victim_prefix = f"{namespace}_{victim.pid}_"
            assert _wait(lambda: _regions(victim_prefix), 120, interval=0.05), "no region appeared"
            server = _tritonserver_of(victim.pid)
            assert server is not None
        finally:
            victim.kill()
            victim.wait()
        assert _wait(lambda: not _alive(server), 30), "tritonserver outlived the serve that was killed"
        left = _regions(victim_prefix)
        assert left, "nothing was left behind: the kill came after the models loaded"
        orphans = list(process_group(server))
        held = sum(p.stat().st_blocks * 512 for p in left)

        with _serve(cpu_repository, photos["chelsea"], tmp_path / "next.log", "--shm-prefix", namespace) as (nxt, _, _):
            assert not _files(victim_prefix), "the dead serve's regions are still there"
            assert not any(_alive(p) for p in orphans), "the dead serve's orphaned stubs still run"
            assert all(p.exists() for p in live_regions), "a live serve's regions were removed"
            assert _classifies(url, photos["chelsea"]), "the live serve stopped serving"
            text = (tmp_path / "next.log").read_text()
            assert f"removed {len(left)} shared-memory file(s), {held} bytes" in text, text[-3000:]
            assert victim_prefix in text and (not orphans or "killed its orphaned python-backend stub(s)" in text)
            nxt.send_signal(signal.SIGTERM)
            assert nxt.wait(timeout=60) == 0
        live.send_signal(signal.SIGTERM)
        assert live.wait(timeout=60) == 0
    assert not _files(f"{namespace}_"), "a serve that stopped left files behind"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_models_load_stops_serve_in_order(cpu_repository, tmp_path, signum):
    """Kubernetes or systemd stopping a slow start, a terminal hanging up: serve stops the server, removes its
    regions and lock, and exits with 128 + the signal, nothing left running."""
    namespace = f"tvtest-{uuid.uuid4().hex[:8]}"
    ports = [free_port() for _ in range(3)]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_fh:
        wrapper = subprocess.Popen(
            [sys.executable, "-m", "tritonvision._cli", "serve", "--model-repository", str(cpu_repository),
             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
             "--shm-prefix", namespace], stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        assert _wait(lambda: _regions(f"{namespace}_"), 120, interval=0.05), "no region appeared"
        group = {server := _tritonserver_of(wrapper.pid), *process_group(server)}
        wrapper.send_signal(signum)
        code = wrapper.wait(timeout=30)
        text = log_path.read_text()
        assert "Triton is ready" not in text, "the signal came after the start: nothing tested"
        assert code == 128 + signum, text[-3000:]
        assert f"stopped by {signum.name} before serving" in text
        assert not any(_alive(p) for p in group), "the server's processes outlived serve"
        assert not _files(f"{namespace}_"), "serve left shared memory or its lock behind"
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
        for path in _files(f"{namespace}_"):
            path.unlink(missing_ok=True)


def test_sighup_stops_a_serving_serve_in_order(cpu_repository, photos, tmp_path):
    namespace = f"tvtest-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "serve.log"
    try:
        with _serve(cpu_repository, photos["chelsea"], log_path, "--shm-prefix", namespace) as (wrapper, _, _):
            group = {server := _tritonserver_of(wrapper.pid), *process_group(server)}
            wrapper.send_signal(signal.SIGHUP)
            assert wrapper.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        assert "shutting down" in log_path.read_text()
        assert not any(_alive(p) for p in group)
        assert not _files(f"{namespace}_"), "serve left shared memory or its lock behind"
    finally:
        for path in _files(f"{namespace}_"):
            path.unlink(missing_ok=True)


def test_two_serves_started_at_once_on_the_same_ports_one_serves_and_the_other_exits_with_the_cause(
        cpu_repository, photos, tmp_path):
    """Both find the ports free (Triton binds them only after its models load). The one whose server cannot bind
    must not take the other's readiness answer for its own server's: it exits 1 naming the port, its server
    and regions gone, and the other keeps serving."""
    namespace = f"tvtest-{uuid.uuid4().hex[:8]}"
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "tritonvision._cli", "serve", "--model-repository", str(cpu_repository),
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--shm-prefix", namespace, "--probe-interval", "0"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    serves = []
    try:
        for log_path in logs:
            with open(log_path, "w") as log_fh:
                serves.append(subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT))
        assert _wait(lambda: any(s.poll() is not None for s in serves), 120), "neither serve gave up"
        loser = next(i for i, s in enumerate(serves) if s.poll() is not None)
        winner = serves[1 - loser]
        text = logs[loser].read_text()
        assert serves[loser].returncode == 1, text[-3000:]
        assert "already in use" in text and "Triton is ready" not in text and "restart" not in text, text[-3000:]
        assert "build_engines.py check" not in text, "a port clash is not the repository's fault"
        assert not _files(f"{namespace}_{serves[loser].pid}_"), "the serve that gave up left files behind"
        assert not [pid for pid in _pids_with_arg(f"{namespace}_{serves[loser].pid}_")], "its server outlived it"
        assert _wait(lambda: _said(logs[1 - loser], "Ctrl-C to stop"), 60), logs[1 - loser].read_text()[-3000:]
        assert winner.poll() is None and _classifies(f"127.0.0.1:{ports[1]}", photos["chelsea"])
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=60) == 0
    finally:
        for s in serves:
            if s.poll() is None:
                s.kill()
                s.wait()
        for path in _files(f"{namespace}_"):
            path.unlink(missing_ok=True)


def _pids_with_arg(prefix: str) -> list[int]:
    """Processes whose command line has an argument containing ``prefix`` (a server's or stub's region prefix)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            try:
                if prefix.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_restarts_that_fail_back_off_and_a_stop_during_the_wait_is_prompt(cpu_repository, tmp_path, monkeypatch):
    """A server that cannot come back (its repository broke, the host is out of memory) is not restarted in a
    tight loop: each failed restart doubles the wait before the next, and SIGTERM ends that wait at once."""
    import datetime

    fake, counter = _fake_tritonserver(tmp_path, monkeypatch, "exit-after-first")
    log_path = tmp_path / "serve.log"
    args = ("--tritonserver", str(fake), "--startup-timeout", "10", "--probe-interval", "0", "--max-restarts", "9")
    with _serve(cpu_repository, None, log_path, *args, up_within=60) as (wrapper, _, _):
        os.kill(_tritonserver_of(wrapper.pid), signal.SIGKILL)
        assert _wait(lambda: int(counter.read_text()) >= 4, 60), log_path.read_text()[-3000:]
        starts = [datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                  for line in log_path.read_text().splitlines() if "restarting it" in line]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
        assert len(gaps) >= 2 and gaps[0] >= 1.0 and gaps[1] >= 2.0, (gaps, log_path.read_text()[-3000:])
        assert "next restart in 4 s" in log_path.read_text() or _wait(
            lambda: "next restart in 4 s" in log_path.read_text(), 10), log_path.read_text()[-3000:]
        stopped = time.monotonic()
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 3, "the stop waited out the backoff"


def test_chosen_ports_differ_even_when_the_kernel_hands_out_one_twice(cpu_repository, monkeypatch):
    """bind(port 0) may return a port it just gave back (Triton then refused to start: "cannot listen to GRPC
    requests and metrics requests at the same address and port"). The launcher's choices differ from each
    other and from the ports given to it, whatever the kernel repeats."""
    from tritonvision_server import launcher

    handed = iter([41000, 41000, 41000, 41001, 8001, 41002, 41002, 41003])

    class Socket:
        def __init__(self):
            self.port = None

        def bind(self, address):
            self.port = next(handed)

        def getsockname(self):
            return ("127.0.0.1", self.port)

        def close(self):
            pass

    monkeypatch.setattr(launcher.socket, "socket", Socket)
    assert launcher.free_ports("127.0.0.1", 3) == [41000, 41001, 8001]
    server = TritonServer(cpu_repository, grpc_port=8001)  # given; http and metrics chosen
    assert server.grpc_port == 8001 and {server.http_port, server.metrics_port} == {41002, 41003}
    # Exchanging one chosen port keeps it apart from the others too.
    handed = iter([41002, 8001, 41003, 41004])
    server._choose_ports(["http_port"])
    assert server.http_port == 41004 and server.metrics_port in (41002, 41003)
