"""What tracing costs the server: the light variant served with tracing off, at Triton's default rate (one
request in 1000) and with every request traced, loaded by perf_analyzer, the variants taking turns.

The light variant (:mod:`tritonvision_server.backends.light`: the cpu profile's configs and interface,
trivial compute) answers about as fast as a GPU would make the model look, so the server's own per-request
cost is what is measured, and tracing's share of it shows; with the real ResNet-50 on the CPU (~40 ms an
image) it would vanish. Spans go to a collector on loopback (the tests' OTLP/HTTP receiver), which counts
them. Reported per variant: throughput and latency from perf_analyzer, and requests per CPU-second of the
server and its stubs (what a noisy shared machine disturbs least), as the median over the rounds, with the
ratio to tracing off. A round whose server crashed or stopped answering is recorded as failed (Triton 2.51,
the bundled server, crashes when it traces many requests a second: fixed upstream in r25.04, server PR
#8144). Writes ``results/trace_cost.json``.

    .venv/bin/python benchmarks/trace_cost.py [--concurrency 16] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # the loopback OTLP receiver the tracing tests use

import perf_analyzer  # noqa: E402
from bench_client import photo  # noqa: E402
from machine import hardware  # noqa: E402
from validate_ceiling import _cpu_seconds, _success_count  # noqa: E402

log = logging.getLogger("trace_cost")

BUILD = ROOT / "build" / "bench" / "trace_cost"
# name: the server's trace export (None: off), as (rate,)
VARIANTS = {"off": None, "rate1000": 1000, "every": 1}


def measure(variant: str, repository: Path, data: Path, *, concurrency: int, seconds: float, binary: Path,
            env: dict, round_no: int) -> dict:
    from otlp_collector import OtlpCollector

    from tritonvision import spec
    from tritonvision_server.launcher import TraceExport, TritonServer

    collector = OtlpCollector()
    rate = VARIANTS[variant]
    trace = TraceExport(collector.url, rate=rate) if rate is not None else None
    csv_path = BUILD / f"pa_{variant}_{round_no}.csv"
    csv_path.unlink(missing_ok=True)
    failed = None
    try:
        with TritonServer(repository, trace=trace, log_file=BUILD / f"server_{variant}.log") as server:
            pid = server._proc.pid
            cpu_before = _cpu_seconds(pid)
            try:
                result = perf_analyzer.run(binary, env, url=server.grpc_url, model=spec.ENSEMBLE, data=data,
                                           concurrency=concurrency, interval_ms=int(seconds * 1000),
                                           csv_path=csv_path, shm="none", timeout=max(120.0, 20 * seconds))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # Triton 2.51 crashes when it traces many requests a second (fixed in r25.04, server #8144).
                failed = server.exit_reason() if not server.running else f"perf_analyzer: {str(exc)[:200]}"
                log.warning("%s: %s", variant, failed)
                return {"variant": variant, "round": round_no, "failed": failed}
            cpu = _cpu_seconds(pid) - cpu_before
            requests, _ = _success_count(server.grpc_url, spec.ENSEMBLE)
        spans = len(collector.wait_for(lambda s: False, timeout=1.0)) if rate is not None else 0
    finally:
        collector.close()
    return {"variant": variant, "round": round_no, "throughput": result["throughput"], "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"], "requests": requests, "server_cpu_s": round(cpu, 2),
            "requests_per_cpu_s": round(requests / cpu, 1) if cpu > 0 else None, "spans": spans,
            "collector_errors": collector.errors[:5]}


def summary(rows: list[dict]) -> list[dict]:
    """The median of each variant's rounds, and its ratio to tracing off."""
    out = []
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant and not r.get("failed")]
        failed = sum(1 for r in rows if r["variant"] == variant and r.get("failed"))
        if not mine:
            if failed:
                out.append({"variant": variant, "rounds": 0, "failed": failed})
            continue
        med = {k: statistics.median(r[k] for r in mine if r[k] is not None)
               for k in ("throughput", "p50_ms", "p99_ms", "requests_per_cpu_s", "spans")}
        out.append({"variant": variant, "rounds": len(mine), "failed": failed, **med})
    base = next((s for s in out if s["variant"] == "off"), None)
    for s in out:
        for k in ("throughput", "requests_per_cpu_s"):
            s[f"{k}_vs_off"] = round(s[k] / base[k], 3) if base and base.get(k) and s.get(k) else None
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="perf_analyzer measurement window")
    ap.add_argument("--rounds", type=int, default=3, help="times each variant runs, taking turns")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "trace_cost.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser().error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    from tritonvision_server.configs import write_light_repository

    BUILD.mkdir(parents=True, exist_ok=True)
    repository = write_light_repository(BUILD / "repository")
    binary, env = perf_analyzer.ensure(ROOT / "build" / "bench" / "perf_analyzer", ROOT / ".whl")
    data = perf_analyzer.input_data(photo(), BUILD / "input.json")
    rows = []
    for round_no in range(args.rounds):
        for variant in variants[round_no % len(variants):] + variants[:round_no % len(variants)]:  # rotating order
            log.info("round %d: %s", round_no + 1, variant)
            rows.append(measure(variant, repository, data, concurrency=args.concurrency, seconds=args.seconds,
                                binary=binary, env=env, round_no=round_no))
    table = summary(rows)
    print(f"\ntrace cost: {hardware()['cpu']} x{os.cpu_count()}, Triton 2.51 (bundled), light variant, "
          f"perf_analyzer concurrency {args.concurrency}, medians of {args.rounds} round(s)")
    print(f"{'variant':9} {'req/s':>8} {'vs off':>7} {'req/CPU-s':>10} {'vs off':>7} {'p50 ms':>7} {'p99 ms':>7} {'spans':>7}")
    for s in table:
        if not s["rounds"]:
            print(f"{s['variant']:9} every round failed (the server crashed or stopped answering; see the JSON)")
            continue
        print(f"{s['variant']:9} {s['throughput']:8.0f} {s['throughput_vs_off'] or 0:7.3f} {s['requests_per_cpu_s']:10.0f} "
              f"{s['requests_per_cpu_s_vs_off'] or 0:7.3f} {s['p50_ms']:7.2f} {s['p99_ms']:7.2f} {s['spans']:7.0f}"
              + (f"  ({s['failed']} round(s) failed)" if s["failed"] else ""))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"hardware": hardware(), "python": platform.python_version(),
                                       "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                       "summary": table}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
