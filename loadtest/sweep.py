#!/usr/bin/env python3
"""Find the server configuration and concurrency with the most throughput under a latency budget.

The sweep varies what decides throughput on the server: each step's max batch size and preferred batch
sizes, both steps' instance counts and resnet50's max queue delay, and the client's concurrency (Locust
users, each with one request in flight). It starts the real tritonserver once, in explicit model-control
mode, and applies each configuration by loading the steps again with a config override (no restart);
only a change of max batch size, which the ensemble's own config depends on, restarts the server. Each
row says which of the two it took.

A neighbour's load on a shared machine moves every figure, so the sweep never measures one configuration
after another: it runs ``--rounds`` rounds (3 by default), each visiting every configuration in a rotated
order, and reports per point the median across rounds, the spread (max - min over median) and a flag where
the rounds disagree by more than ``--tolerance``. Latencies are the project's own unrounded recording
(``--latency-file`` of the locustfile), not Locust's two-significant-digit percentiles.

The answer: with ``--budget-ms 250 --percentile p99`` it names the point with the highest median
throughput whose percentile stayed within the budget in every round (and nothing failed), and, per
configuration, the knee: the fewest users reaching ``--knee-fraction`` of that configuration's peak
throughput (past it, users add queueing, not throughput).

    python loadtest/sweep.py --users 1,2,4,8 --queue-delay-us 0,20000 --budget-ms 400
    python loadtest/sweep.py --variant light --users 1,8,32 --instances 1,2 --max-batch 8,32

Writes, point by point (a failure late in a sweep keeps what was measured), ``results/loadtest_sweep``
``.jsonl`` (every round of every point), ``.json`` and ``.csv`` (the aggregated rows, the recommendation,
the knees) and, with matplotlib, ``.png``. ``--perf-analyzer`` also measures each point with perf_analyzer
(the tritonclient 2.51.0 wheel's binary) at the same concurrency and shows both in the table.
``--from-points results/loadtest_sweep.jsonl --budget-ms 100`` answers again from measured points.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm
from tritonvision import spec

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
# perf_analyzer.py (the binary from the tritonclient wheel) and machine.py (the hardware record) are the
# benchmarks' helpers.
sys.path.insert(0, str(ROOT / "benchmarks"))
log = logging.getLogger("loadtest.sweep")
KINDS = {"UnaryUser": "unary", "ShmUser": "shm", "StreamUser": "stream"}
PERCENTILES = ("p50", "p95", "p99")
URL_WAIT_S = 15.0  # how long --url may take to be ready at the start
MAX_FAILED_IN_A_ROW = 3  # then the server is not coming back, or every point is misconfigured: stop


# -- configurations ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """One point of the server grid. ``preferred`` applies to both steps (sizes above max_batch dropped)."""

    queue_delay_us: int
    instances: int  # resnet50
    pre_instances: int  # preprocess
    max_batch: int
    preferred: tuple[int, ...]

    def label(self, varying: set[str]) -> str:
        parts = {
            "queue_delay_us": f"delay {self.queue_delay_us} us",
            "instances": f"resnet50 x{self.instances}",
            "pre_instances": f"preprocess x{self.pre_instances}",
            "max_batch": f"max batch {self.max_batch}",
            "preferred": f"preferred {'/'.join(map(str, self.preferred)) or 'none'}",
        }
        return ", ".join(v for k, v in parts.items() if k in varying) or "spec defaults"

    def fields(self) -> dict:
        return {"queue_delay_us": self.queue_delay_us, "instances": self.instances, "pre_instances": self.pre_instances,
                "max_batch": self.max_batch, "preferred": "/".join(map(str, self.preferred)) or "none"}


def profile_for(config: ServerConfig):
    """The cpu profile with this configuration's batching and instance counts."""
    from tritonvision import spec

    def step(serving, instances: int, delay: int | None):
        preferred = tuple(b for b in config.preferred if b <= config.max_batch)
        batching = dataclasses.replace(
            serving.batching, max_batch_size=config.max_batch, preferred_batch_sizes=preferred,
            max_queue_delay_us=serving.batching.max_queue_delay_us if delay is None else delay)
        return dataclasses.replace(serving, instances=instances, batching=batching)

    return dataclasses.replace(spec.CPU, max_batch_size=config.max_batch,
                               preprocess=step(spec.CPU.preprocess, config.pre_instances, None),
                               resnet50=step(spec.CPU.resnet50, config.instances, config.queue_delay_us))


def grid(args) -> list[ServerConfig]:
    return [ServerConfig(d, i, p, m, pref) for m in args.max_batch for pref in args.preferred
            for p in args.pre_instances for i in args.instances for d in args.queue_delay_us]


def round_order(configs: list, n: int) -> list:
    """Round ``n`` visits every configuration, starting one further along each round: no configuration is
    always measured first (after a restart) or last, and a slow spell on the machine hits several."""
    k = n % len(configs)
    return configs[k:] + configs[:k]


class Servers:
    """The server the sweep loads: started once per max batch size, reconfigured in place otherwise."""

    def __init__(self, variant: str, work: Path):
        self.variant, self.work = variant, work
        self.server = None
        self.current: ServerConfig | None = None
        self.onnx = None

    def apply(self, config: ServerConfig) -> str:
        """Make the server serve ``config``; returns how: "start", "restart", "reload" or "as is". A server
        that died is started again."""
        if self.server is not None and self.dead():
            log.warning("the server died (%s); starting it again", self.dead())
            self.stop()
            self.server = self._start(config)
            self.current = config
            return "restart"
        if self.server is not None and self.current == config:
            return "as is"
        if self.server is None or self.current.max_batch != config.max_batch:
            how = "start" if self.server is None else "restart"
            self.stop()
            self.server = self._start(config)
        else:
            how = "reload"
            self._reload(config)
        self.current = config
        return how

    def dead(self) -> str | None:
        """How the started server ended, or None while it runs. (Not the launcher's stub check: a reload
        replaces the stubs it knows of.)"""
        if self.server is None or self.server.running:
            return None
        return self.server.exit_reason()

    def _start(self, config: ServerConfig):
        from tritonvision_server import configs
        from tritonvision_server.launcher import TritonServer

        repo = self.work / f"repository_mb{config.max_batch}"
        profile = profile_for(config)
        if self.variant == "light":
            configs.write_light_repository(repo, profile, min_instances=1)  # the instance count is swept
        else:
            if self.onnx is None:
                from tritonvision_server.build_engines import DEFAULT_ONNX
                from tritonvision_server.onnx_export import export_onnx

                self.onnx = export_onnx(DEFAULT_ONNX, "random:0")  # speed does not depend on the weights
            configs.write_repository(profile, repo, onnx_path=self.onnx)
        # Explicit model control, every model loaded at start: the steps can then be loaded again with
        # another config without a restart.
        server = TritonServer(repo, log_file=self.work / f"tritonserver_mb{config.max_batch}.log",
                              extra_args=["--model-control-mode=explicit", "--load-model=*"])
        return server.start()

    def _reload(self, config: ServerConfig) -> None:
        import tritonclient.grpc as grpcclient
        from google.protobuf import json_format
        from tritonvision import spec
        from tritonvision_server import configs

        new, old = configs.configs(profile_for(config)), configs.configs(profile_for(self.current))
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        try:
            for step in (spec.PREPROCESS, spec.RESNET50):
                if new[step] != old[step]:
                    # Triton reloads the ensemble that depends on the step by itself.
                    client.load_model(step, config=json_format.MessageToJson(new[step]))
                    served = client.get_model_config(step).config
                    # Triton normalises no preferred sizes to the max batch size.
                    want = (new[step].instance_group[0].count, new[step].dynamic_batching.max_queue_delay_microseconds,
                            list(new[step].dynamic_batching.preferred_batch_size) or [new[step].max_batch_size])
                    got = (served.instance_group[0].count, served.dynamic_batching.max_queue_delay_microseconds,
                           list(served.dynamic_batching.preferred_batch_size))
                    if got != want:
                        raise RuntimeError(f"{step} serves (instances, delay, preferred) {got} after loading {want}")
            deadline = time.monotonic() + 120
            while not client.is_model_ready(spec.ENSEMBLE):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the ensemble is not ready after reloading for {config}")
                time.sleep(0.2)
        finally:
            client.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# -- one measurement --------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of unrounded latencies: the smallest value with at least ``q`` percent of the
    values at or below it (p50 of 10 values is the 5th, p99 of 100 the 99th)."""
    ordered = sorted(values)
    rank = math.ceil(round(q / 100.0 * len(ordered), 9))  # round: 0.95 * 20 is 19.000000000000004
    return ordered[max(0, min(len(ordered), rank) - 1)]


def latency_figures(records: dict, kind: str, warmup: float) -> dict:
    """Throughput and percentiles of the good requests from the locustfile's latency recording, after the
    first ``warmup`` seconds (connections, first batches) are dropped."""
    good = [(t, ms) for t, ms, ok in records.get(f"{kind} classify", []) if ok]
    failures = sum(1 for name, rs in records.items() for _t, _ms, ok in rs if not ok)
    refused = len(records.get(f"{kind} bad image refused", []))
    if not good:
        raise RuntimeError(f"no successful '{kind} classify' request was recorded ({failures} failures)")
    first = min(t - ms / 1000.0 for t, ms in good)  # when the first request was sent
    end = max(t for t, _ in good)
    window = [(t, ms) for t, ms in good if t >= first + warmup]
    if len(window) < 2:
        # Never the warm-up's figures in place of the run's: nothing was measured.
        raise RuntimeError(f"{len(window)} '{kind} classify' answers came after the {warmup:g} s warm-up "
                           f"({len(good)} in all): measure for longer or warm up for less")
    span = end - min(t for t, _ in window)
    lat = [ms for _, ms in window]
    return {
        "requests": len(good),
        "failures": failures,
        "bad_images_refused": refused,
        # The requests completed over the measured span, counted from the first in the window.
        "throughput": (len(window) - 1) / span if span > 0 else 0.0,
        **{f"{p}_ms": percentile(lat, float(p[1:])) for p in PERCENTILES},
    }


def run_locust(url: str, users: int, args, out: Path) -> dict:
    """One headless Locust run; its figures from the unrounded latency recording."""
    prefix = out / f"locust_{users}"
    latency_file = out / f"latency_{users}.json"
    latency_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "-u", str(users), "-r", str(users), "-t", f"{math.ceil(args.seconds + args.warmup)}s", "--csv", str(prefix),
           "--only-summary", "--loglevel", "WARNING", "--latency-file", str(latency_file),
           "--stream-in-flight", str(args.stream_in_flight), "--bad-image-every", str(args.bad_image_every),
           "--images", str(args.images), args.user_class]
    log.debug("%s", " ".join(cmd))
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=args.seconds + args.warmup + 120)
        except BaseException:
            # A timeout, or the sweep was stopped: SIGTERM lets Locust stop its users, which free what they
            # hold (ShmUser's regions); only one that does not end is killed.
            proc.terminate()
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if not latency_file.exists():
        raise RuntimeError(f"locust recorded nothing (exit {proc.returncode}):\n{stderr[-2000:]}")
    records = json.loads(latency_file.read_text())["requests"]
    figures = latency_figures(records, KINDS[args.user_class], args.warmup)
    # Locust's own throughput over the whole run (ramp included), for comparison with the recording's.
    stats = prefix.with_name(prefix.name + "_stats.csv")
    rows = {row["Name"]: row for row in csv.DictReader(stats.open())} if stats.exists() else {}
    row = rows.get(f"{KINDS[args.user_class]} classify")
    figures["locust_rps"] = float(row["Requests/s"]) if row else None
    return figures


def measure_point(url: str, users: int, args, out: Path) -> dict:
    from tritonvision import Classifier, spec

    with Classifier(url, timeout=30) as clf:
        clf.wait_until_ready(timeout=60)
        with clf.measure() as m:
            figures = run_locust(url, users, args, out)
    steps = m.breakdown
    figures.update({
        f"{step}_{key}": round(getattr(steps[step], attr), 3)
        for step in (spec.PREPROCESS, spec.RESNET50)
        for key, attr in (("avg_batch", "avg_batch"), ("queue_ms", "queue_ms"))
    })
    if args.perf_analyzer is not None:
        try:
            figures.update(perf_analyzer_point(url, users, args, out))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            # The cross-check failed, not the point: keep Locust's figures, and say so in the table.
            log.warning("perf_analyzer failed at %d users: %s", users, exc)
            figures["pa_error"] = f"{type(exc).__name__}: {exc}"[-1000:]
    return figures


def perf_analyzer_binary(given: str) -> tuple[Path, dict]:
    """The perf_analyzer to run and its environment: ``given``, or the tritonclient 2.51.0 wheel's."""
    import perf_analyzer

    root = ROOT / "build" / "bench" / "perf_analyzer"
    if not given:
        return perf_analyzer.ensure(root, ROOT / ".whl")
    binary = Path(given)
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"{binary} is not an executable file")
    return binary, perf_analyzer.environment(root)


def perf_analyzer_point(url: str, users: int, args, out: Path) -> dict:
    import perf_analyzer
    from tritonvision._images import image_files

    binary, env = args.pa
    # The images the Locust users send, in the same order (perf_analyzer takes them in turn, request by request).
    data = perf_analyzer.input_data([p.read_bytes() for p in image_files(args.images)], out / "input_data.json")
    csv_path = out / f"pa_{users}.csv"
    csv_path.unlink(missing_ok=True)
    r = perf_analyzer.run(binary, env, url=url, model=spec.ENSEMBLE, data=data, concurrency=users,
                          interval_ms=int(args.seconds * 1000 / 3), csv_path=csv_path)  # 3+ windows ~ one point
    return {"pa_throughput": r["throughput"], "pa_p50_ms": r["p50_ms"], "pa_p99_ms": r["p99_ms"]}


def _samples() -> str:
    from tritonvision import sample_images

    return str(sample_images()[0].parent)


# -- aggregation and the answer ---------------------------------------------------------------------------
def spread(values: list[float]) -> float:
    """(max - min) / median: how far the rounds disagree, as a fraction."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 else 0.0


def aggregate(samples: list[dict], args) -> list[dict]:
    """One row per (configuration, users): medians across rounds, min/max, spread, instability flag. A round
    that could not be measured (its sample has an ``error``) counts in ``failed_rounds``; the figures are
    those of the other rounds, and a point with no measured round has none."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["config"], s["users"]), []).append(s)
    rows = []
    budget_key = f"{args.percentile}_ms"
    for (config, users), every in groups.items():
        runs = [r for r in every if not r.get("error")]
        row = {"config": config, **every[0]["config_fields"], "users": users, "rounds": len(every),
               "failed_rounds": len(every) - len(runs), "applied": sorted({r["applied"] for r in every})}
        if row["failed_rounds"]:
            row["errors"] = [f"round {r['round']}: {r['error']}" for r in every if r.get("error")]
        pa_errors = [r for r in runs if r.get("pa_error")]
        if pa_errors:
            row["pa_failed_rounds"] = len(pa_errors)
            row["pa_errors"] = [f"round {r['round']}: {r['pa_error']}" for r in pa_errors]
        row["failures"] = sum(r.get("failures", 0) for r in every)
        if not runs:
            row["unstable"] = False
            rows.append(row)
            continue
        for key in ("throughput", "p50_ms", "p95_ms", "p99_ms", "locust_rps", "pa_throughput", "pa_p99_ms",
                    "preprocess_avg_batch", "resnet50_avg_batch", "resnet50_queue_ms"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                row[key] = round(statistics.median(values), 3)
                row[f"{key}_min"], row[f"{key}_max"] = round(min(values), 3), round(max(values), 3)
        row["throughput_spread"] = round(spread([r["throughput"] for r in runs]), 3)
        row[f"{args.percentile}_spread"] = round(spread([r[budget_key] for r in runs]), 3)
        worst = max(row["throughput_spread"], row[f"{args.percentile}_spread"])
        row["unstable"] = len(runs) > 1 and worst > args.tolerance
        if row.get("pa_throughput"):
            row["locust_vs_pa"] = round(row["throughput"] / row["pa_throughput"], 3)
        rows.append(row)
    rows.sort(key=lambda r: (r["config"], r["users"]))
    return rows


def knees(rows: list[dict], fraction: float) -> dict[str, int]:
    """Per configuration, the fewest users whose throughput reaches ``fraction`` of its peak."""
    out: dict[str, int | None] = {}
    for config in sorted({r["config"] for r in rows}):
        points = sorted((r for r in rows if r["config"] == config and "throughput" in r), key=lambda r: r["users"])
        peak = max((r["throughput"] for r in points), default=None)
        out[config] = None if peak is None else next(r["users"] for r in points if r["throughput"] >= fraction * peak)
    return out


def recommend(rows: list[dict], budget_ms: float | None, pct: str) -> dict | None:
    """The point with the highest median throughput whose ``pct`` latency held the budget in every round
    (its worst round, not its median), with no failed request and every round measured. Of equal
    throughputs, the lower latency, then the fewer users."""
    if budget_ms is None:
        return None
    key = f"{pct}_ms_max"
    fits = [r for r in rows if "throughput" in r and r.get(key, r[f"{pct}_ms"]) <= budget_ms
            and r["failures"] == 0 and not r.get("failed_rounds")]
    if not fits:
        return {"config": None, "users": None,
                "reason": f"no point kept {pct} within {budget_ms:g} ms in every round without a failure"}
    best = max(fits, key=lambda r: (r["throughput"], -r[f"{pct}_ms"], -r["users"]))
    return {"config": best["config"], "users": best["users"], "throughput": best["throughput"],
            f"{pct}_ms": best[f"{pct}_ms"], f"{pct}_ms_worst_round": best.get(key), "unstable": best["unstable"]}


def mark(rows: list[dict], knee: dict[str, int], rec: dict | None) -> None:
    for r in rows:
        r["knee"] = knee.get(r["config"]) == r["users"]
        r["recommended"] = bool(rec and rec.get("config") == r["config"] and rec.get("users") == r["users"])


def title(result: dict) -> str:
    hw = result["hardware"]
    where = hw.get("gpu") or (f"{hw['cores']}-core {hw.get('cpu', 'CPU')}" if hw.get("cores") else "unknown hardware")
    variant = result["variant"]
    what = {"real": "real model (cpu profile, ResNet-50 on ONNX Runtime)",
            "light": "LIGHT VARIANT (trivial compute, not the model)",
            None: f"server at {result['url']}"}.get(variant, "unknown server (the sweep's .json is missing)")
    return f"classifier, {what}, on {where}"


def table(result: dict) -> str:
    rows, pct = result["rows"], result["percentile"]
    has_pa = any(r.get("pa_throughput") for r in rows)
    w = max([13, *(len(r["config"]) for r in rows)])
    head = (f"{'configuration':<{w}} {'users':>5} {'img/s':>8} {'±%':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
            f"{'±%':>4} {'fail':>4} {'net batch':>9} {'applied':>8}")
    if has_pa:
        head += f" {'pa img/s':>9} {'loc/pa':>6}"
    head += "  notes"
    lines = [title(result), head, "-" * len(head)]
    for r in rows:
        notes = [n for n, on in (("RECOMMENDED", r["recommended"]), ("knee", r["knee"]),
                                 (f"UNSTABLE >{result['tolerance']:.0%}", r["unstable"]),
                                 (f"FAILED {r.get('failed_rounds')}/{r['rounds']} rounds", r.get("failed_rounds")),
                                 (f"perf_analyzer failed {r.get('pa_failed_rounds')}/{r['rounds']} rounds",
                                  r.get("pa_failed_rounds"))) if on]
        if "throughput" not in r:  # no round measured
            lines.append(f"{r['config']:<{w}} {r['users']:>5} {'-':>8} {'':>4} {'-':>8} {'-':>8} {'-':>8} {'':>4} "
                         f"{r['failures']:>4} {'-':>9} {'/'.join(r['applied']):>8}"
                         + (f" {'-':>9} {'-':>6}" if has_pa else "")
                         + "  " + ", ".join(notes))
            continue
        line = (f"{r['config']:<{w}} {r['users']:>5} {r['throughput']:>8.1f} {r['throughput_spread'] * 100:>4.0f} "
                f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r[f'{pct}_spread'] * 100:>4.0f} "
                f"{r['failures']:>4} {r.get('resnet50_avg_batch', 0):>9.2f} {'/'.join(r['applied']):>8}")
        if has_pa:
            pa = r.get("pa_throughput")
            line += f" {pa:>9.1f} {r['locust_vs_pa']:>6.2f}" if pa else f" {'-':>9} {'-':>6}"
        lines.append(line + "  " + ", ".join(notes))
    rec = result.get("recommendation")
    if rec is None:
        lines.append("no --budget-ms given: no recommendation")
    elif rec["config"] is None:
        lines.append(rec["reason"])
    else:
        lines.append(f"budget {pct} <= {result['budget_ms']:g} ms in every round: {rec['config']} at {rec['users']} "
                     f"users, {rec['throughput']:.1f} img/s ({pct} {rec[f'{pct}_ms']:.1f} ms median, "
                     f"{rec[f'{pct}_ms_worst_round']:.1f} ms worst round){'  (UNSTABLE)' if rec['unstable'] else ''}")
    lines.append(f"±%: (max - min) / median over {result['rounds']} interleaved rounds; "
                 "img/s and latencies are medians; "
                 f"knee: fewest users reaching {result['knee_fraction']:.0%} of the configuration's peak")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install 'tritonvision[loadtest]'); no plot")
        return False
    rows, pct = result["rows"], result["percentile"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for config in sorted({r["config"] for r in rows}):
        pts = sorted((r for r in rows if r["config"] == config and "throughput" in r), key=lambda r: r["users"])
        if not pts:
            continue
        x = [r[f"{pct}_ms"] for r in pts]
        y = [r["throughput"] for r in pts]
        xerr = [[r[f"{pct}_ms"] - r.get(f"{pct}_ms_min", r[f"{pct}_ms"]) for r in pts],
                [r.get(f"{pct}_ms_max", r[f"{pct}_ms"]) - r[f"{pct}_ms"] for r in pts]]
        yerr = [[r["throughput"] - r.get("throughput_min", r["throughput"]) for r in pts],
                [r.get("throughput_max", r["throughput"]) - r["throughput"] for r in pts]]
        line = ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=config)
        for r in pts:
            ax.annotate(str(r["users"]), (r[f"{pct}_ms"], r["throughput"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
            if r["knee"]:
                ax.plot(r[f"{pct}_ms"], r["throughput"], marker="s", markersize=12, markerfacecolor="none",
                        markeredgecolor=line[0].get_color())
    if result.get("budget_ms") is not None:
        ax.axvline(result["budget_ms"], color="red", linestyle="--", label=f"budget: {pct} {result['budget_ms']:g} ms")
    rec = result.get("recommendation") or {}
    for r in rows:
        if r["recommended"]:
            ax.plot(r[f"{pct}_ms"], r["throughput"], marker="*", markersize=20, color="gold", markeredgecolor="black",
                    linestyle="none", label=f"recommended: {rec['config']}, {rec['users']} users")
    ax.plot([], [], marker="s", markerfacecolor="none", markeredgecolor="grey", linestyle="none",
            label=f"knee ({result['knee_fraction']:.0%} of peak)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"{pct} latency (ms), median of {result['rounds']} rounds; bars: min-max")
    ax.set_ylabel("throughput (img/s)")
    unstable = sum(r["unstable"] for r in rows)
    note = f"; {unstable} of {len(rows)} points UNSTABLE (rounds > {result['tolerance']:.0%} apart)" if unstable else ""
    ax.set_title(f"{title(result)}\nlabels: concurrent users{note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a sweep stopped while writing leaves the previous version."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def write(result: dict, out: Path) -> None:
    _replace(out, json.dumps(result, indent=2))
    rows = result["rows"]
    if rows:
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["variant", *fields])
        writer.writeheader()
        for r in rows:
            writer.writerow({"variant": result["variant"] or "external", **r, "applied": "/".join(r["applied"])})
        _replace(out.with_suffix(".csv"), text.getvalue())


def summarise(samples: list[dict], meta: dict, args) -> dict:
    rows = aggregate(samples, args)
    knee = knees(rows, args.knee_fraction) if rows else {}
    rec = recommend(rows, args.budget_ms, args.percentile) if rows else None
    mark(rows, knee, rec)
    return {**meta, "rows": rows, "knees": knee, "recommendation": rec}


def read_points(path: Path, error) -> list[dict]:
    """The samples of a sweep's .jsonl. A sweep stopped while appending leaves its last line cut off: that
    point is left out, with a warning; any other damaged line is an error (``error(message)``)."""
    try:
        text = path.read_text()
    except OSError as exc:
        error(f"--from-points: {exc}")
    lines = text.splitlines()
    samples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n == len(lines) and not text.endswith("\n"):  # each point is written with its newline
                log.warning("%s: line %d is cut off (the sweep stopped while writing it); left out", path, n)
                continue
            error(f"--from-points: {path} line {n} is not a point ({exc})")
    if not samples:
        error(f"--from-points: no points in {path}")
    return samples


def reanalyse(args, error) -> int:
    """The table, JSON/CSV and plot of measured points (``--from-points``) under this run's budget."""
    samples = read_points(args.from_points, error)
    try:
        measured = json.loads(args.from_points.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s is missing or damaged (%s): hardware and variant unknown",
                    args.from_points.with_suffix(".json"), exc)
        measured = {"hardware": {}, "variant": "unknown", "url": None,
                    "rounds": max(s.get("round", 1) for s in samples)}
    meta = {k: v for k, v in measured.items() if k not in ("rows", "knees", "recommendation")}
    meta.update(tolerance=args.tolerance, budget_ms=args.budget_ms, percentile=args.percentile,
                knee_fraction=args.knee_fraction, reanalysed_from=args.from_points.name)
    result = summarise(samples, meta, args)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.with_suffix(".jsonl").resolve() != args.from_points.resolve():
        args.out.with_suffix(".jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    write(result, args.out)
    plot(result, args.out.with_suffix(".png"))
    return 0


# -- command line -----------------------------------------------------------------------------------------
class Stopped(BaseException):
    """The sweep got SIGTERM: raised where it is (not an Exception, so that no point catches it as its own
    failure), so that the sweep stops its Locust and server as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, _frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: a second one must not cut the clean-up short
    raise Stopped(signum)


def _ints(least: int):
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
        bad = [v for v in values if v < least]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]} is below {least}")
        twice = [v for v in values if values.count(v) > 1]
        if twice:
            raise argparse.ArgumentTypeError(f"{twice[0]} is given twice")
        return values
    return parse


def _sizes(text: str) -> list[tuple[int, ...]]:
    try:
        values = [tuple(int(b) for b in p.split("/")) if p != "none" else () for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 8/16,none") from None
    if any(b < 1 for v in values for b in v):
        raise argparse.ArgumentTypeError("batch sizes are at least 1")
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError("a list of sizes is given twice")
    return values


def _number(least: float, *, above: bool = False, most: float | None = None, kind=float):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_big = most is not None and value > most
        if not math.isfinite(value) or value < least or (above and value == least) or too_big:
            bounds = f"{'above' if above else 'at least'} {least:g}"
            bounds += f" and at most {most:g}" if most is not None else ""
            raise argparse.ArgumentTypeError(f"{text} is not {bounds}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    """The sweep's command line (main() checks what needs more than argparse: a server at --url, images)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--url", help="load this running server (gRPC host:port) instead of starting one")
    ap.add_argument("--variant", choices=("real", "light"), default="real",
                    help="the server the sweep starts: the real cpu profile (default) or the light variant "
                         "(trivial compute: where the client and transport saturate, not the model)")
    ap.add_argument("--users", type=_ints(1), default=[1, 2, 4, 8],
                    help="concurrent Locust users (each one request in flight)")
    ap.add_argument("--queue-delay-us", type=_ints(0), default=[spec.CPU.resnet50.batching.max_queue_delay_us],
                    help="resnet50 max queue delays")
    ap.add_argument("--instances", type=_ints(1), default=[spec.CPU.resnet50.instances],
                    help="resnet50 instance counts")
    ap.add_argument("--pre-instances", type=_ints(1), default=[spec.CPU.preprocess.instances],
                    help="preprocess instance counts")
    ap.add_argument("--max-batch", type=_ints(1), default=[spec.CPU.max_batch_size],
                    help="max batch size of both steps and the ensemble (each value restarts the server)")
    ap.add_argument("--preferred", type=_sizes, default=[spec.CPU.resnet50.batching.preferred_batch_sizes],
                    help="preferred batch sizes of both steps: 8/16,none compares (8, 16) with none (Triton then "
                         "prefers the max batch size)")
    ap.add_argument("--rounds", type=_number(1, kind=int), default=3,
                    help="interleaved rounds; each point is measured once per round")
    ap.add_argument("--tolerance", type=_number(0), default=0.10,
                    help="flag a point UNSTABLE when its rounds' throughput or budget percentile differ by more "
                         "than this fraction of the median")
    ap.add_argument("--budget-ms", type=_number(0, above=True),
                    help="latency budget: recommend the best point within it")
    ap.add_argument("--percentile", choices=PERCENTILES, default="p99", help="the percentile the budget applies to")
    ap.add_argument("--knee-fraction", type=_number(0, above=True, most=1), default=0.9,
                    help="the knee: the fewest users reaching this fraction of the configuration's peak throughput")
    ap.add_argument("--user-class", default="UnaryUser", choices=tuple(KINDS))
    ap.add_argument("--stream-in-flight", type=_number(1, kind=int), default=4)
    ap.add_argument("--images", type=Path, default=Path(os.environ.get("TRITONVISION_IMAGES") or _samples()),
                    help="image file or folder the users send, round-robin, and perf_analyzer too (default: the "
                         "SDK's sample photos; env TRITONVISION_IMAGES)")
    ap.add_argument("--bad-image-every", type=_number(0, kind=int), default=0,
                    help="a corrupt image every N requests (0: none; 1 would leave nothing to measure)")
    ap.add_argument("--seconds", type=_number(0, above=True), default=15.0, help="measured seconds per point and round")
    ap.add_argument("--warmup", type=_number(0), default=2.0, help="seconds of each run left out of the figures")
    ap.add_argument("--perf-analyzer", nargs="?", const="", metavar="BINARY",
                    help="also measure each point with perf_analyzer (default: the tritonclient 2.51.0 wheel's, "
                         "extracted under build/bench)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "loadtest_sweep.json")
    ap.add_argument("--from-points", type=Path, metavar="JSONL",
                    help="measure nothing: answer again from a sweep's .jsonl (another budget, percentile, "
                         "tolerance or knee fraction) and write --out")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.from_points:
        return reanalyse(args, ap.error)
    configs = grid(args)
    if args.url and len(configs) > 1:
        ap.error("--queue-delay-us, --instances, --pre-instances, --max-batch and --preferred configure a server "
                 "the sweep starts; drop --url")
    if args.url:
        # A wrong address is a usage error now, not three points that each wait a minute for it.
        from tritonvision import Classifier, TritonVisionError

        try:
            with Classifier(args.url, timeout=URL_WAIT_S) as clf:
                clf.wait_until_ready(timeout=URL_WAIT_S)
        except (TritonVisionError, ValueError) as exc:
            ap.error(f"argument --url: no classifier ready at {args.url} ({exc})")
    from tritonvision._images import image_files

    if not image_files(args.images) or not args.images.exists():
        ap.error(f"argument --images: no images at {args.images}")
    if args.bad_image_every == 1:
        ap.error("argument --bad-image-every: 1 makes every image corrupt, which leaves nothing to measure")
    if args.perf_analyzer is not None:
        # Before anything is measured: a missing perf_analyzer is a usage error, not a failure at the first point.
        try:
            args.pa = perf_analyzer_binary(args.perf_analyzer)
        except (OSError, RuntimeError, subprocess.SubprocessError, StopIteration) as exc:
            ap.error(f"argument --perf-analyzer: no perf_analyzer to run ({type(exc).__name__}: {exc})")
    # Labels name what differs from the spec: what varies, or was set to something else.
    defaults = ServerConfig(*(ap.get_default(k)[0] for k in ("queue_delay_us", "instances", "pre_instances",
                                                            "max_batch", "preferred")))
    varying = {f.name for f in dataclasses.fields(ServerConfig)
               if len({getattr(c, f.name) for c in configs}) > 1
               or getattr(configs[0], f.name) != getattr(defaults, f.name)}

    from machine import hardware

    args.out.parent.mkdir(parents=True, exist_ok=True)
    points_path = args.out.with_suffix(".jsonl")
    points_path.write_text("")
    meta = {"hardware": hardware(), "variant": None if args.url else args.variant, "url": args.url,
            "user_class": args.user_class, "seconds_per_point": args.seconds, "warmup_seconds": args.warmup,
            "images": [str(p) for p in image_files(args.images)],
            "rounds": args.rounds, "tolerance": args.tolerance, "budget_ms": args.budget_ms,
            "percentile": args.percentile, "knee_fraction": args.knee_fraction,
            "grid": [dict(c.fields(), label=c.label(varying)) for c in configs], "users": args.users,
            # Other processes' load moves every figure on a shared machine: 1, 5, 15-minute averages.
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    samples: list[dict] = []
    signal.signal(signal.SIGTERM, _stop)
    try:
        return sweep(args, configs, varying, meta, points_path, samples)
    except (KeyboardInterrupt, Stopped) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        log.error("stopped by %s after %d points; what was measured is in %s (complete: false)",
                  signal.Signals(signum).name, len(samples), args.out)
        return 128 + signum


def sweep(args, configs: list[ServerConfig], varying: set[str], meta: dict, points_path: Path,
          samples: list[dict]) -> int:
    """Measure every point ``--rounds`` times, writing as it goes; the exit status."""
    failed_in_a_row = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tritonvision-sweep-") as tmp:
        work = Path(tmp)
        servers = None if args.url else Servers(args.variant, work)
        bar = tqdm(total=args.rounds * len(configs) * len(args.users), unit="point", disable=args.no_progress)
        try:
            for n in range(args.rounds):
                for config in round_order(configs, n):
                    label = config.label(varying) if servers else f"server at {args.url}"
                    applied = servers.apply(config) if servers else "external"
                    url = servers.server.grpc_url if servers else args.url
                    for users in args.users:
                        bar.set_description(f"round {n + 1}, {label}, {users} users")
                        if servers and servers.dead():  # it died during the previous point
                            applied = servers.apply(config)
                        try:
                            figures = measure_point(url, users, args, work)
                            failed_in_a_row = 0
                        except Exception as exc:  # noqa: BLE001 - any failure of a point fails that point only
                            # The point is marked failed (never recommended) and the sweep goes on: a server
                            # that died is started again before the next point.
                            failed_in_a_row += 1
                            log.error("round %d, %s, %d users failed: %s: %s", n + 1, label, users,
                                      type(exc).__name__, exc)
                            figures = {"error": f"{type(exc).__name__}: {exc}"[-1000:]}
                        sample = {"round": n + 1, "config": label, "config_fields": config.fields(), "users": users,
                                  "applied": applied, **figures}
                        samples.append(sample)
                        with points_path.open("a") as fh:  # point by point: a late failure keeps these
                            fh.write(json.dumps(sample) + "\n")
                        write(summarise(samples, {**meta, "complete": False}, args), args.out)
                        bar.update(1)
                        if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                            log.error("%d points in a row failed: the sweep stops (what it measured is in %s)",
                                      failed_in_a_row, args.out)
                            return 1
        finally:
            bar.close()
            if servers:
                servers.stop()

    result = summarise(samples, {**meta, "complete": True, "wall_seconds": round(time.perf_counter() - started, 1),
                                 "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}, args)
    print(table(result))
    write(result, args.out)
    plotted = plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s, .csv, .jsonl%s", args.out, " and .png" if plotted else "")
    failed = [r for r in result["rows"] if r.get("failed_rounds") or r.get("pa_failed_rounds")]
    if failed:
        log.error("%d of %d points failed in a round or their perf_analyzer cross-check did (see the table)",
                  len(failed), len(result["rows"]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
