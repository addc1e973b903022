"""``tritonvision serve``: what it says when the server does not start, its TLS flags and its log format."""

from __future__ import annotations

import logging

import pytest

from tritonvision._cli import main


@pytest.fixture()
def light_repo(tmp_path):
    from tritonvision_server.configs import write_light_repository

    return write_light_repository(tmp_path / "repo")


def _serve(repo, *extra: str) -> int:
    from tritonvision_server.launcher import free_port

    return main(["serve", "--model-repository", str(repo), "--http-port", str(free_port()), "--grpc-port",
                 str(free_port()), "--metrics-port", str(free_port()), "--startup-timeout", "60", *extra])


def test_a_refused_server_option_is_shown_instead_of_the_options_table(light_repo, caplog):
    caplog.set_level(logging.INFO)
    assert _serve(light_repo, "--server-arg=--grpc-restricted-protocol=inference") == 1
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "Bad option" in errors and "--grpc-restricted-protocol" in errors
    assert "--trace-log-frequency" not in errors, "the options table is not the cause"
    assert "build_engines.py check --profile cpu" in errors


def test_a_model_that_fails_to_load_is_named_with_triton_s_error(light_repo, caplog):
    caplog.set_level(logging.INFO)
    config = light_repo / "resnet50" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_sizes", 1))
    assert _serve(light_repo) == 1
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "Poll failed for model directory 'resnet50'" in errors and "config.pbtxt" in errors
    assert "failed to load all models" in errors


def test_tls_options_become_triton_s_grpc_ssl_flags(tmp_path):
    from tritonvision_server.serve import server_tls

    flags = server_tls("s.crt", "s.key").args()
    assert flags[0] == "--grpc-use-ssl=true" and flags[1].endswith("/s.crt") and flags[2].endswith("/s.key")
    assert not any("mutual" in f for f in flags)
    assert "--grpc-use-ssl-mutual=true" in server_tls("s.crt", "s.key", "ca.crt").args()
    assert server_tls(None, None, None) is None
    with pytest.raises(ValueError):
        server_tls("s.crt", None)
    with pytest.raises(ValueError):  # a client CA without the server's own certificate
        server_tls(None, None, "ca.crt")


def test_serve_is_the_server_package_s_command_and_the_sdk_cli_does_not_import_it():
    import subprocess
    import sys

    code = ("import sys, tritonvision._cli as cli; cli.parser().parse_args(['classify', 'x.jpg']); "
            "print(sorted(m for m in sys.modules if m.startswith('tritonvision_server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    helped = subprocess.run([sys.executable, "-m", "tritonvision._cli", "serve", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: tritonvision serve" in helped.stdout and "--grpc-tls-cert" in helped.stdout


def test_client_shared_memory_flag_goes_only_to_a_server_that_knows_it(caplog):
    from tritonvision_server.serve import client_shm_args

    assert client_shm_args(False, None) == [] and client_shm_args(False, "/opt/tritonserver/bin/tritonserver") == []
    assert client_shm_args(True, "/opt/tritonserver/bin/tritonserver") == ["--allow-client-shm=true"]
    with pytest.raises(ValueError, match="bundled Triton 2.51 does not know the flag"):
        client_shm_args(True, None)
    # On the command line: a usage error before anything starts.
    assert main(["serve", "--allow-client-shm", "--model-repository", "/nonexistent"]) == 2
    assert "Triton 2.68+" in caplog.text


@pytest.mark.parametrize("profile", ["cpu", "gpu-torch"])
def test_a_missing_model_repository_is_built_where_it_was_asked_for(tmp_path, monkeypatch, profile):
    from tritonvision_server import build_engines, serve

    built = []
    monkeypatch.setattr(build_engines, "build_cpu_repository", lambda dest, **kw: built.append(("cpu", dest, kw)) or dest)
    monkeypatch.setattr(build_engines, "build_gpu_torch_repository",
                        lambda dest=None, **kw: built.append(("gpu-torch", dest, kw)) or dest)
    missing = tmp_path / "repo"
    assert serve._repository(str(missing), profile, "random:3", "cpu") == missing
    assert [(b[0], b[1], b[2]["weights"]) for b in built] == [(profile, missing, "random:3")]
    # One that exists is served as it is.
    missing.mkdir()
    assert serve._repository(str(missing), profile, "random:3", "cpu") == missing and len(built) == 1


def test_a_missing_gpu_repository_is_named_with_how_to_build_it(tmp_path, caplog):
    missing = tmp_path / "repo"
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--profile", "gpu", "--model-repository", str(missing)]) == 1
    assert f"no model repository at {missing}" in caplog.text and "build_engines.py gpu" in caplog.text


def test_a_sweep_removes_only_what_owners_that_are_gone_left(tmp_path):
    """Owners are told apart by their lock: held by a live process (here another one), or free. Files
    without a lock file (the Helm chart's fixed prefix, another namespace) are never touched."""
    import subprocess
    import sys

    from tritonvision_server.launcher import hold_owner_lock, release_owner_lock, sweep_dead_owners

    live, dead = "tv_1_0000aaaa_", "tv_2_0000bbbb_"
    for name in (f"{live}r1", f"{dead}r1", f"{dead}r2", "tv_server_r1", "tv2_3_0000cccc_r1", "tv_client_4_x_0"):
        (tmp_path / name).write_bytes(b"x" * 8192)
    # Each launcher's folder of python-backend links, named after its prefix, in the temporary directory.
    temp = tmp_path / "tmp"
    for owner in (live, dead):
        (temp / f"tritonvision-backends-{owner}x1y2").mkdir(parents=True)
        (temp / f"tritonvision-backends-{owner}x1y2" / "python").symlink_to(tmp_path)
    release_owner_lock(hold_owner_lock(dead, tmp_path), dead, tmp_path)  # an owner that stopped cleanly: no lock file
    (tmp_path / f"{dead.rstrip('_')}.lock").touch()  # one that was killed: its lock file, nobody holding it
    (tmp_path / "tv2_3_0000cccc.lock").touch()
    # The live owner's lock is held by another process (flock state is the kernel's, per open file).
    code = ("import sys; from pathlib import Path; from tritonvision_server.launcher import hold_owner_lock; "
            f"hold_owner_lock({live!r}, Path({str(tmp_path)!r})); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        swept = sweep_dead_owners("tv", tmp_path, temp)
        assert [(s.prefix, [p.name for p in s.files], s.stubs) for s in swept] == [(dead, [f"{dead}r1", f"{dead}r2"], ())]
        assert swept[0].bytes >= 2 * 8192
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f"{live}r1", "tv_1_0000aaaa.lock", "tv_server_r1", "tv2_3_0000cccc_r1", "tv2_3_0000cccc.lock",
             "tv_client_4_x_0", "tmp"])
        assert [p.name for p in temp.iterdir()] == [f"tritonvision-backends-{live}x1y2"]
        assert tmp_path.exists() and (tmp_path / f"{live}r1").exists()  # links removed, not followed
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # Its holder gone, however it ended, the live owner's files go at the next sweep.
    assert [s.prefix for s in sweep_dead_owners("tv", tmp_path, temp)] == [live]
    assert not (tmp_path / f"{live}r1").exists() and not list(temp.iterdir())


def test_shm_prefix_is_a_plain_name():
    from tritonvision_server.launcher import TritonServer

    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        main(["serve", "--shm-prefix", "a_b", "--model-repository", "/nonexistent"])
    assert exited.value.code == 2
    with pytest.raises(ValueError, match="letters, digits"):
        TritonServer("/nonexistent", shm_namespace="x/y")


def test_a_port_in_use_is_named_without_sending_the_operator_to_the_repository(light_repo, caplog):
    import socket

    from tritonvision_server.launcher import SHM_DIR, free_port

    namespace = "tvtest-portinuse"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.INFO):
            code = main(["serve", "--model-repository", str(light_repo), "--http-port", str(free_port()),
                         "--grpc-port", str(port), "--metrics-port", str(free_port()), "--shm-prefix", namespace])
    assert code == 1
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert f"port(s) {port} on 127.0.0.1 already in use" in errors
    assert "build_engines.py check" not in errors, "a port clash is not the repository's fault"
    assert not list(SHM_DIR.glob(f"{namespace}_*"))


def test_a_server_with_its_metrics_port_turned_off_is_still_found_ready(light_repo):
    from tritonvision_server.launcher import TritonServer, listening_ports

    with TritonServer(light_repo, extra_args=["--allow-metrics=false"], startup_timeout=60) as server:
        assert server.metrics_port not in listening_ports(server.pid)
        assert {server.http_port, server.grpc_port} <= listening_ports(server.pid)
