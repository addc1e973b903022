"""``tritonvision classify | stats | bench`` against the real server, exit codes included."""

from __future__ import annotations

import json

import pytest

from tritonvision._cli import EXIT_OK, EXIT_SOME_FAILED, expand, main


def test_classify_takes_folders_and_globs_and_exits_1_when_an_image_is_refused(grpc_url, photos, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    (tmp_path / "sub" / "coffee.jpg").write_bytes(photos["coffee"])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    files = expand([str(tmp_path), str(tmp_path / "*.jpg")])
    assert len(files) == 3  # the glob repeats two files of the folder
    code = main(["classify", "--url", grpc_url, "--json", "--shm", "auto", "--top-k", "2", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert code == EXIT_SOME_FAILED
    by_name = {o["image"].rsplit("/", 1)[-1]: o for o in out}
    assert "error" in by_name["broken.jpg"]
    assert len(by_name["cat.jpg"]["predictions"]) == 2


def test_classify_exits_0_when_all_images_pass(grpc_url, photos, tmp_path, capsys):
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    assert main(["classify", "--url", grpc_url, str(tmp_path / "cat.jpg")]) == EXIT_OK
    assert "cat.jpg" in capsys.readouterr().out


def test_stats_prints_the_stage_table(grpc_url, capsys):
    assert main(["stats", "--url", grpc_url]) == EXIT_OK
    out = capsys.readouterr().out
    assert "queue ms" in out and "resnet50" in out and "preprocess" in out


def test_bench_reports_throughput_and_percentiles(grpc_url, photos, tmp_path, capsys):
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    code = main(["bench", "--url", grpc_url, "--concurrency", "2", "--seconds", "1", "--warmup", "0.5",
                 "--no-progress", "--json", str(tmp_path / "cat.jpg")])
    assert code == EXIT_OK
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert r["concurrency"] == 2 and r["requests"] > 0 and r["p50_ms"] <= r["p99_ms"]


@pytest.mark.parametrize("concurrency", [1, 3])  # 1: blocking calls on one thread; more: callbacks
def test_bench_counts_failed_requests_apart(grpc_url, photos, tmp_path, capsys, concurrency):
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    code = main(["bench", "--url", grpc_url, "--concurrency", str(concurrency), "--seconds", "1.5", "--warmup", "0.3",
                 "--no-progress", "--json", str(tmp_path / "cat.jpg"), str(tmp_path / "bad.jpg")])
    assert code == EXIT_SOME_FAILED
    (r,) = json.loads(capsys.readouterr().out)["results"]
    # The two files alternate, so about as many requests fail as succeed.
    assert r["concurrency"] == concurrency and r["requests"] > 0 and r["errors"] > 0
    assert abs(r["requests"] - r["errors"]) <= concurrency


def test_unreachable_server_exits_2(tmp_path, photos):
    from tritonvision_server.launcher import free_port

    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    assert main(["classify", "--url", f"127.0.0.1:{free_port()}", "--timeout", "1", str(tmp_path / "cat.jpg")]) == 2


def test_probe_exits_0_when_the_ensemble_answers_and_1_when_nothing_does(grpc_url, photos, tmp_path):
    from tritonvision_server.launcher import free_port

    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    assert main(["probe", "--url", grpc_url, "--image", str(tmp_path / "cat.jpg")]) == EXIT_OK
    unreachable = f"127.0.0.1:{free_port()}"
    assert main(["probe", "--url", unreachable, "--image", str(tmp_path / "cat.jpg"), "--timeout", "2"]) == EXIT_SOME_FAILED


def test_json_output_is_a_list_even_for_one_image(grpc_url, photos, tmp_path, capsys):
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    assert main(["classify", "--url", grpc_url, "--json", "--top-k", "1", str(tmp_path / "cat.jpg")]) == EXIT_OK
    (only,) = json.loads(capsys.readouterr().out)
    assert len(only["predictions"]) == 1


@pytest.mark.parametrize("top_k", ["0", "1001", "five"])
def test_top_k_out_of_range_is_a_usage_error(top_k, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["classify", "--top-k", top_k, str(tmp_path / "cat.jpg")])
    assert info.value.code == 2 and "--top-k" in capsys.readouterr().err


def test_an_http_url_is_a_usage_error_naming_the_grpc_port(capsys):
    with pytest.raises(SystemExit) as info:
        main(["stats", "--url", "http://triton.example.com:8000"])
    assert info.value.code == 2 and "triton.example.com:8001" in capsys.readouterr().err


def test_an_image_past_its_timeout_fails_alone_and_the_run_goes_on(grpc_url, photos, tmp_path, capsys):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jpg").write_bytes(photos["chelsea"])
    # No image can be classified within 1 ms: each one is reported as failed, none ends the run.
    code = main(["classify", "--url", grpc_url, "--json", "--timeout", "0.001", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert code == EXIT_SOME_FAILED
    assert [o["image"].rsplit("/", 1)[-1] for o in out] == ["a.jpg", "b.jpg", "c.jpg"]
    assert {o["type"] for o in out} == {"DeadlineExceededError"}


def test_the_address_defaults_to_the_environment(grpc_url, photos, tmp_path, monkeypatch):
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    monkeypatch.setenv("TRITONVISION_URL", grpc_url)
    assert main(["classify", str(tmp_path / "cat.jpg")]) == EXIT_OK


def test_bench_fails_fast_when_no_server_answers(tmp_path, photos):
    import time

    from tritonvision_server.launcher import free_port

    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    started = time.monotonic()
    code = main(["bench", "--url", f"127.0.0.1:{free_port()}", "--ready-timeout", "1", "--concurrency", "1,4",
                 "--seconds", "5", "--no-progress", str(tmp_path / "cat.jpg")])
    assert code == 2 and time.monotonic() - started < 5, "no level is run against a server that is not there"


def test_bench_timeout_bounds_each_request(cpu_repository, photos, tmp_path, capsys):
    from sdk_helpers import own_server

    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    # A server of its own: a second of calls cancelled at their deadline can abort Triton 2.51 (its gRPC
    # cancellation races, README "Faults"), which must not take the session's server down with this test.
    with own_server(cpu_repository) as server:
        code = main(["bench", "--url", server.grpc_url, "--concurrency", "2", "--seconds", "1", "--warmup", "0",
                     "--timeout", "0.001", "--no-progress", "--json", str(tmp_path / "cat.jpg")])
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert code == EXIT_SOME_FAILED and r["errors"] > 0 and r["requests"] == 0


def test_exit_codes_2_usage_and_3_overloaded_are_told_apart_and_documented(monkeypatch, capsys, caplog):
    import tritonvision as tv
    from tritonvision import _cli

    help_text = " ".join(_cli.parser().format_help().split())
    assert "2 usage error" in help_text and "3 the server is overloaded" in help_text
    with pytest.raises(SystemExit) as info:  # a bad option: usage error
        main(["stats", "--access-key", "no-equals-sign"])
    assert info.value.code == _cli.EXIT_ERROR == 2
    assert "--access-key: expected NAME=VALUE" in capsys.readouterr().err

    def shed(args):
        raise tv.OverloadedError("queue full", status="UNAVAILABLE")

    monkeypatch.setattr(_cli, "_stats", shed)
    assert main(["stats", "--url", "127.0.0.1:1"]) == _cli.EXIT_OVERLOADED == 3
    assert "overloaded" in caplog.text


@pytest.mark.parametrize("command", ["classify", "stats", "bench", "probe"])
@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1", "soon"])
def test_a_timeout_that_is_not_a_finite_positive_number_is_a_usage_error(command, timeout, tmp_path, capsys):
    image = str(tmp_path / "cat.jpg")
    args = {"classify": [image], "stats": [], "bench": [image], "probe": ["--image", image]}[command]
    with pytest.raises(SystemExit) as info:
        main([command, "--url", "127.0.0.1:1", "--timeout", timeout, *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --timeout" in err and "Traceback" not in err, err


def _usage_error(argv: list[str], option: str, capsys) -> None:
    """``main(argv)`` stops with exit 2 and one argparse error line naming ``option``, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {option}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("levels", ["0", "-2", "x", "1,0", "1,,4", "2.5", ""])
def test_bench_concurrency_levels_that_are_not_integers_of_at_least_1_are_a_usage_error(levels, tmp_path, capsys):
    _usage_error(["bench", "--url", "127.0.0.1:1", "--concurrency", levels, str(tmp_path / "cat.jpg")],
                 "--concurrency", capsys)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
@pytest.mark.parametrize("option", ["--seconds", "--ready-timeout"])
def test_bench_seconds_and_ready_timeout_must_be_finite_and_positive(option, value, tmp_path, capsys):
    _usage_error(["bench", "--url", "127.0.0.1:1", option, value, str(tmp_path / "cat.jpg")], option, capsys)


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "soon"])
def test_bench_warmup_must_be_finite_and_not_negative(value, tmp_path, capsys):
    _usage_error(["bench", "--url", "127.0.0.1:1", "--warmup", value, str(tmp_path / "cat.jpg")], "--warmup", capsys)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_stats_interval_must_be_finite_and_positive(value, capsys):
    _usage_error(["stats", "--url", "127.0.0.1:1", "--interval", value], "--interval", capsys)


def test_bench_accepts_zero_warmup_and_levels_with_spaces():
    from tritonvision._cli import parser

    args = parser().parse_args(["bench", "--warmup", "0", "--concurrency", "1, 4,16", "cat.jpg"])
    assert args.warmup == 0 and args.concurrency == [1, 4, 16]
    assert parser().parse_args(["bench", "cat.jpg"]).concurrency == [1, 4, 16]
    assert parser().parse_args(["stats"]).interval is None  # no --interval: everything since start-up


@pytest.mark.parametrize("kind", ["missing", "dangling symlink"])
def test_bench_on_an_unreadable_file_exits_2_naming_it(kind, tmp_path, capsys, caplog):
    image = tmp_path / "cat.jpg"
    if kind == "dangling symlink":
        image.symlink_to(tmp_path / "gone.jpg")
    # Nothing listens on port 1: the file is checked before anything connects.
    assert main(["bench", "--url", "127.0.0.1:1", "--ready-timeout", "1", "--no-progress", str(image)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert str(image) in line and "No such file" in line


def test_classify_json_with_no_images_exits_2_and_prints_nothing_on_stdout(tmp_path, capsys, caplog):
    # Like every exit 2 (a usage or server error), no JSON: stdout holds a list only when images were classified.
    assert main(["classify", "--url", "127.0.0.1:1", "--json", str(tmp_path / "nomatch" / "*.jpg")]) == 2
    assert capsys.readouterr().out == "" and "no images to classify" in caplog.text


@pytest.mark.parametrize("kwargs", [{"concurrency": 0}, {"concurrency": -2}, {"concurrency": 2.0},
                                    {"concurrency": 2, "seconds": 0}, {"concurrency": 2, "seconds": float("nan")},
                                    {"concurrency": 2, "warmup": -5}])
def test_bench_run_refuses_settings_that_would_hang_or_measure_nothing(kwargs):
    from tritonvision import _bench

    with pytest.raises(ValueError):
        _bench.run(None, [b"jpeg"], **kwargs)  # refused before the client is used


def test_classify_dash_reads_one_image_from_standard_input(grpc_url, photos, tmp_path):
    # curl -s https://... | tritonvision classify - : the entry point as installed, bytes through a pipe.
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("tritonvision")
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    piped = subprocess.run([str(cli), "classify", "--url", grpc_url, "--json", "-", str(tmp_path / "cat.jpg")],
                           input=photos["chelsea"], capture_output=True, timeout=120)
    assert piped.returncode == EXIT_OK, piped.stderr.decode()[-2000:]
    stdin_result, file_result = json.loads(piped.stdout)
    assert stdin_result["image"] == "-" and stdin_result["predictions"] == file_result["predictions"]
    # Refused bytes are that image's failure; standard input named twice is a usage error (it can be read once).
    bad = subprocess.run([str(cli), "classify", "--url", grpc_url, "-"], input=b"not an image", capture_output=True,
                         timeout=120)
    assert bad.returncode == EXIT_SOME_FAILED and b"-: error:" in bad.stderr, bad.stderr[-2000:]
    twice = subprocess.run([str(cli), "classify", "--url", grpc_url, "-", "-"], input=b"", capture_output=True,
                           timeout=60)
    assert twice.returncode == 2 and b"standard input" in twice.stderr and b"Traceback" not in twice.stderr
