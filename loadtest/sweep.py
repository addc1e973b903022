#!/usr/bin/env python3
"""Map the latency/throughput trade-off with Locust: concurrency x queue delay x instance count.

For each server configuration (the resnet50 step's max queue delay and instance count, from the spec with
those two values replaced) the sweep starts the real tritonserver on that repository, then runs Locust
headless (``loadtest/locustfile.py``) at each number of users. Per point it records Locust's throughput and
latency percentiles and, from Triton's statistics over the same interval, the average batch each step ran
and its queue time: how the dynamic batcher turned concurrency into batch size. With ``--url`` it loads a
server you started instead (server knobs then cannot vary).

    python loadtest/sweep.py --variant light --users 1,4,16,32 --queue-delay-us 0,2000 --instances 1,2

Prints a table and writes ``results/loadtest_sweep.json``, ``.csv`` and, with matplotlib installed, a
``.png`` of throughput against p95 latency, one curve per server configuration. ``--perf-analyzer`` also
measures each point with perf_analyzer (the tritonclient 2.51.0 wheel's binary) as a cross-check.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
# perf_analyzer.py (the binary from the tritonclient wheel) and machine.py (the hardware record) are the
# benchmarks' helpers.
sys.path.insert(0, str(ROOT / "benchmarks"))
log = logging.getLogger("loadtest.sweep")


def server_profile(queue_delay_us: int, instances: int):
    """The cpu profile with the resnet50 step's queue delay and instance count replaced."""
    from tritonvision import spec

    step = spec.CPU.resnet50
    step = dataclasses.replace(step, instances=instances,
                               batching=dataclasses.replace(step.batching, max_queue_delay_us=queue_delay_us))
    return dataclasses.replace(spec.CPU, resnet50=step)


def write_variant(dest: Path, variant: str, queue_delay_us: int, instances: int) -> Path:
    from tritonvision_server import configs
    from tritonvision_server.build import DEFAULT_ONNX
    from tritonvision_server.onnx_export import export_onnx

    profile = server_profile(queue_delay_us, instances)
    if variant == "light":
        return configs.write_light_repository(dest, profile)
    onnx = export_onnx(DEFAULT_ONNX, "random:0")  # speed does not depend on the weights
    return configs.write_repository(profile, dest, onnx_path=onnx)


def run_locust(url: str, users: int, seconds: float, user_class: str, out: Path, extra: list[str]) -> dict:
    """One headless Locust run; the figures of the requests named "classify" (bad images apart)."""
    prefix = out / f"locust_{users}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--csv", str(prefix), "--only-summary",
           "--loglevel", "WARNING", *extra, user_class]
    log.debug("%s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    stats = prefix.with_name(prefix.name + "_stats.csv")
    if not stats.exists():
        raise RuntimeError(f"locust wrote no statistics (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    rows = {row["Name"]: row for row in csv.DictReader(stats.open())}
    if "classify" not in rows:
        raise RuntimeError(f"locust recorded no successful request:\n{proc.stderr[-2000:]}")
    row = rows["classify"]
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "bad_image_failures": int(rows["bad image"]["Failure Count"]) if "bad image" in rows else 0,
        "throughput": float(row["Requests/s"]),
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
    }


def measure_point(url: str, users: int, args, out: Path) -> dict:
    from tritonvision import Classifier, spec

    extra = ["--stream-in-flight", str(args.stream_in_flight), "--bad-image-every", str(args.bad_image_every)]
    with Classifier(url, timeout=30) as clf:
        clf.wait_until_ready(timeout=60)
        with clf.measure() as m:
            figures = run_locust(url, users, args.seconds, args.user_class, out, extra)
    steps = m.breakdown
    figures.update({
        f"{step}_{key}": round(getattr(steps[step], attr), 3)
        for step in (spec.PREPROCESS, spec.RESNET50)
        for key, attr in (("avg_batch", "avg_batch"), ("queue_ms", "queue_ms"), ("infer_ms_per_image", "infer_ms_per_image"))
    })
    if args.perf_analyzer:
        figures.update(perf_analyzer_point(url, users, args, out))
    return figures


def perf_analyzer_point(url: str, users: int, args, out: Path) -> dict:
    import perf_analyzer

    binary, env = perf_analyzer.ensure(ROOT / "build" / "bench" / "perf_analyzer", ROOT / ".whl")
    from tritonvision._images import sample_paths

    image = sample_paths()[0].read_bytes()
    data = perf_analyzer.input_data(image, out / "input_data.json")
    csv_path = out / f"pa_{users}.csv"
    csv_path.unlink(missing_ok=True)
    r = perf_analyzer.run(binary, env, url=url, model="classifier", data=data, concurrency=users,
                          interval_ms=int(args.seconds * 1000), csv_path=csv_path)
    return {"perf_analyzer_throughput": r["throughput"], "perf_analyzer_p50_ms": r["p50_ms"]}


def table(rows: list[dict]) -> str:
    head = (f"{'delay us':>8} {'inst':>4} {'users':>5} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
            f"{'fail':>5} {'pre batch':>9} {'net batch':>9} {'net queue ms':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['queue_delay_us']:>8} {r['instances']:>4} {r['users']:>5} {r['throughput']:>8.1f} {r['p50_ms']:>8.1f} "
                     f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['failures']:>5} {r['preprocess_avg_batch']:>9.2f} "
                     f"{r['resnet50_avg_batch']:>9.2f} {r['resnet50_queue_ms']:>12.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install 'tritonvision[loadtest]'); no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["queue_delay_us"], r["instances"]) for r in rows}):
        points = sorted((r for r in rows if (r["queue_delay_us"], r["instances"]) == key), key=lambda r: r["users"])
        ax.plot([r["p95_ms"] for r in points], [r["throughput"] for r in points], marker="o",
                label=f"queue delay {key[0]} us, {key[1]} instance(s)")
        for r in points:
            ax.annotate(str(r["users"]), (r["p95_ms"], r["throughput"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("p95 latency (ms)")
    ax.set_ylabel("throughput (img/s)")
    ax.set_title("classifier: throughput vs latency (labels: concurrent users)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--url", help="load this running server (gRPC host:port) instead of starting one")
    ap.add_argument("--variant", choices=("real", "light"), default="light",
                    help="the server the sweep starts: the real cpu profile or the light variant (trivial compute)")
    ap.add_argument("--users", type=ints, default=[1, 4, 16], help="concurrent Locust users (each one request in flight)")
    ap.add_argument("--queue-delay-us", type=ints, default=[0], help="resnet50 max queue delays to compare")
    ap.add_argument("--instances", type=ints, default=[1], help="resnet50 instance counts to compare")
    ap.add_argument("--user-class", default="UnaryUser", choices=("UnaryUser", "ShmUser", "StreamUser"))
    ap.add_argument("--stream-in-flight", type=int, default=4)
    ap.add_argument("--bad-image-every", type=int, default=0, help="a corrupt image every N requests (0: none)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per point")
    ap.add_argument("--perf-analyzer", action="store_true", help="also measure each point with perf_analyzer")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "loadtest_sweep.json")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.url and (args.queue_delay_us != [0] or args.instances != [1]):
        ap.error("--queue-delay-us and --instances configure a server the sweep starts; drop --url")

    from tritonvision_server.launcher import TritonServer

    servers = [(None, None)] if args.url else [(d, i) for d in args.queue_delay_us for i in args.instances]
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tritonvision-sweep-") as tmp, \
            tqdm(total=len(servers) * len(args.users), unit="point", disable=args.no_progress) as bar:
        for n, (delay, instances) in enumerate(servers):
            work = Path(tmp) / f"server_{n}"
            work.mkdir()
            if args.url:
                server, url = None, args.url
            else:
                repo = write_variant(work / "repository", args.variant, delay, instances)
                server = TritonServer(repo, log_file=work / "tritonserver.log").start()
                url = server.grpc_url
            try:
                for users in args.users:
                    bar.set_description(f"delay {delay} us, {instances} inst, {users} users" if server else f"{users} users")
                    point = measure_point(url, users, args, work)
                    rows.append({"queue_delay_us": delay if server else "-", "instances": instances if server else "-",
                                 "users": users, **point})
                    bar.update(1)
            finally:
                if server is not None:
                    server.stop()

    print(table(rows))
    from machine import hardware

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"hardware": hardware(), "variant": None if args.url else args.variant, "url": args.url,
              "user_class": args.user_class, "seconds_per_point": args.seconds,
              "wall_seconds": round(time.perf_counter() - started, 1), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    with args.out.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plotted = plot(rows, args.out.with_suffix(".png"))
    log.info("wrote %s and .csv%s", args.out, " and .png" if plotted else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
