"""Goodput under overload: the cpu profile at three times its capacity, with and without load shedding.

For each variant the script starts the server, measures its capacity (closed loop, below the queue bounds),
its steady-state memory, the latency of a lone request (the service time), then sends open-loop traffic at
``--factor`` x capacity for ``--seconds`` with ``--deadline`` second client deadlines, through the SDK with
its default retry policy, and measures the capacity again (goodput is compared with the mean of the two). Variants:

* ``shed``: the configs generated from the spec (bounded queues, queue timeouts, the SDK's remaining
  deadline as each request's server-side timeout);
* ``unbounded`` (the baseline, same run): the same repository without queue policies, as before.

Reported per variant: goodput (successful images per second, over the whole window and its last third) as
a share of capacity, the latency of refusals (OverloadedError), p50/p99 of accepted requests against the
queue timeout + service time, client-side deadline failures, images the server computed for callers that had
given up, and tritonserver's RSS (server process and its stubs) at the end and at most, against its steady
state. Prints a table and writes ``results/overload.json``.

    .venv/bin/python benchmarks/overload.py [--seconds 60] [--factor 3] [--variants shed,unbounded]

On a shared machine the figures move with the neighbours' load; compare variants of the same run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import hardware  # noqa: E402

log = logging.getLogger("overload")
BUILD = ROOT / "build" / "overload"


def profile(variant: str):
    from tritonvision import spec

    if variant == "shed":
        return spec.CPU

    def unbounded(step):
        return dataclasses.replace(step, batching=dataclasses.replace(step.batching, max_queue_size=0, queue_timeout_us=0))

    return dataclasses.replace(spec.CPU, preprocess=unbounded(spec.CPU.preprocess), resnet50=unbounded(spec.CPU.resnet50))


def repository(variant: str) -> Path:
    from tritonvision_server.configs import write_repository

    onnx = ROOT / "build" / "test" / "resnet50.onnx"
    if not onnx.exists():
        from tritonvision_server.onnx_export import export_onnx

        onnx = export_onnx(onnx, "random:0")
    return write_repository(profile(variant), BUILD / f"model_repository_{variant}", onnx_path=onnx)


class Rss:
    """Samples the RSS of tritonserver and of its children (the python-backend stubs) once a second."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float, float]] = []  # (t, server MiB, server + stubs MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> tuple[float, float]:
        server = self.proc.memory_info().rss
        total = server + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
        return server / 2**20, total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append((time.monotonic(), *self.now()))
            except Exception:  # noqa: BLE001 - the process ended
                return

    def __enter__(self) -> "Rss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def closed_loop(clf, image: bytes, concurrency: int, seconds: float) -> float:
    from tritonvision import _bench

    return _bench.run(clf, [image], concurrency=concurrency, seconds=seconds, warmup=5.0).throughput


def service_time_ms(clf, image: bytes, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        clf.classify(image)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def open_loop(clf, image: bytes, rate: float, seconds: float, deadline: float, progress=None) -> list[tuple]:
    """Send at ``rate`` per second for ``seconds``; returns (sent, finished, outcome) of every request."""
    from tritonvision import OverloadedError

    records: list[tuple] = []
    lock = threading.Lock()
    outstanding = threading.Semaphore(4000)  # a guard against an unbounded client, never reached at 3x
    start = time.monotonic()
    n = 0
    while True:
        due = start + n / rate
        if due - start >= seconds:
            break
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        outstanding.acquire()
        sent = time.monotonic()

        def done(future, sent=sent):
            finished = time.monotonic()
            error = future.exception()
            if error is None:
                outcome = "ok"
            elif isinstance(error, OverloadedError):
                outcome = "overloaded"
            else:
                outcome = type(error).__name__
            with lock:
                records.append((sent - start, finished - start, outcome))
            outstanding.release()

        clf.submit(image, 5, timeout=deadline).add_done_callback(done)
        n += 1
        if progress is not None:
            progress(1)
    # Let every request end (each has a client deadline).
    end = time.monotonic() + deadline + 5
    while time.monotonic() < end:
        with lock:
            if len(records) == n:
                break
        time.sleep(0.1)
    return records


def summarise(records, seconds: float, capacity: float) -> dict:
    by = {}
    for sent, finished, outcome in records:
        by.setdefault(outcome, []).append((sent, finished))
    ok = by.get("ok", [])
    in_window = [f for _, f in ok if f <= seconds]
    last_third = [f for _, f in ok if seconds * 2 / 3 <= f <= seconds]
    lat_ok = np.array([(f - s) * 1e3 for s, f in ok]) if ok else np.zeros(1)
    shed = by.get("overloaded", [])
    lat_shed = np.array([(f - s) * 1e3 for s, f in shed]) if shed else np.zeros(1)
    goodput = len(in_window) / seconds
    goodput_last = len(last_third) / (seconds / 3)
    return {
        "requests": len(records),
        "outcomes": {k: len(v) for k, v in sorted(by.items())},
        "goodput": goodput,
        "goodput_share": goodput / capacity,
        "goodput_last_third": goodput_last,
        "goodput_last_third_share": goodput_last / capacity,
        "accepted_p50_ms": float(np.percentile(lat_ok, 50)),
        "accepted_p99_ms": float(np.percentile(lat_ok, 99)),
        "refusal_p50_ms": float(np.percentile(lat_shed, 50)),
        "refusal_p99_ms": float(np.percentile(lat_shed, 99)),
    }


def run_variant(variant: str, args, image: bytes) -> dict:
    import tritonvision as tv
    from tritonvision_server.launcher import TritonServer

    prof = profile(variant)
    with TritonServer(repository(variant), log_file=BUILD / f"tritonserver_{variant}.log") as server:
        with tv.Classifier(server.grpc_url, timeout=args.deadline) as clf:
            clf.wait_until_ready(60)
            service = service_time_ms(clf, image)
            capacity = closed_loop(clf, image, args.capacity_concurrency, args.capacity_seconds)
            log.info("%s: capacity %.1f img/s, service time %.0f ms", variant, capacity, service)
            rss = Rss(server._proc.pid)
            steady = rss.now()
            before = clf.statistics()
            bar = None
            if not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=int(args.factor * capacity * args.seconds), desc=f"{variant} x{args.factor:g}",
                           unit="req", leave=False)
            with rss:
                records = open_loop(clf, image, args.factor * capacity, args.seconds, args.deadline,
                                    bar.update if bar is not None else None)
                end_rss = rss.now()
            if bar is not None:
                bar.close()
            after = clf.settled_statistics()
            # Capacity again, after the overload: on a shared machine it drifts; the table uses the mean.
            capacity_after = closed_loop(clf, image, args.capacity_concurrency, args.capacity_seconds)
            log.info("%s: capacity after the overload %.1f img/s", variant, capacity_after)
    capacity_before, capacity = capacity, (capacity + capacity_after) / 2
    result = summarise(records, args.seconds, capacity)
    net = after.models["resnet50"] - before.models["resnet50"]
    result.update(
        variant=variant,
        capacity=capacity,
        capacity_before=capacity_before,
        capacity_after=capacity_after,
        offered=args.factor * capacity_before,
        service_ms=service,
        queue_timeout_ms=prof.resnet50.batching.queue_timeout_us / 1e3,
        max_queue_size=prof.resnet50.batching.max_queue_size,
        computed=net.inference_count,
        # Images resnet50 computed whose caller did not get a result (gave up or was refused later).
        computed_for_nobody=max(0, net.inference_count - result["outcomes"].get("ok", 0)),
        rss_steady_mib=steady[0],
        rss_steady_total_mib=steady[1],
        rss_max_mib=max((s[1] for s in rss.samples), default=end_rss[0]),
        rss_max_total_mib=max((s[2] for s in rss.samples), default=end_rss[1]),
        rss_end_mib=end_rss[0],
        rss_end_total_mib=end_rss[1],
    )
    return result


def table(results: list[dict]) -> str:
    head = (f"{'variant':>9}  {'cap/s':>6}  {'offer/s':>7}  {'good/s':>6}  {'good %':>6}  {'last3 %':>7}  "
            f"{'shed':>5}  {'deadl.':>6}  {'refuse p50/p99 ms':>17}  {'ok p50/p99 ms':>15}  {'wasted':>6}  "
            f"{'RSS MiB steady/max/end':>22}")
    lines = [head]
    for r in results:
        o = r["outcomes"]
        lines.append(
            f"{r['variant']:>9}  {r['capacity']:>6.1f}  {r['offered']:>7.1f}  {r['goodput']:>6.1f}  "
            f"{100 * r['goodput_share']:>5.0f}%  {100 * r['goodput_last_third_share']:>6.0f}%  "
            f"{o.get('overloaded', 0):>5}  {o.get('DeadlineExceededError', 0):>6}  "
            f"{r['refusal_p50_ms']:>8.0f}/{r['refusal_p99_ms']:<8.0f}  {r['accepted_p50_ms']:>7.0f}/{r['accepted_p99_ms']:<7.0f}  "
            f"{r['computed_for_nobody']:>6}  {r['rss_steady_mib']:>6.0f}/{r['rss_max_mib']:.0f}/{r['rss_end_mib']:.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="shed,unbounded", help="comma-separated: shed, unbounded")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the overload phase")
    ap.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of the measured capacity")
    ap.add_argument("--deadline", type=float, default=10.0, help="each request's client deadline, seconds")
    ap.add_argument("--capacity-concurrency", type=int, default=24,
                    help="closed-loop concurrency of the capacity runs (below the queue bounds)")
    ap.add_argument("--capacity-seconds", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "overload.json")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    image = (ROOT / "samples" / "chelsea.jpg").read_bytes()
    results = [run_variant(v, args, image) for v in args.variants.split(",")]
    print(f"\n{hardware()['cpu']}, {hardware()['cores']} cores, Triton 2.51 (nvidia-pytriton), Python "
          f"{platform.python_version()}; {args.seconds:g} s at {args.factor:g}x capacity, {args.deadline:g} s deadlines\n")
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": hardware(), "seconds": args.seconds, "factor": args.factor,
                                    "deadline_s": args.deadline, "results": results}, indent=2))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
