"""Goodput and memory under overload: the cpu profile at three times its capacity, with and without load shedding.

Each variant starts its own server and measures, in this order: the latency of a lone request (the service
time), memory idle, capacity (closed loop, below the queue bounds) with memory sampled every second during it
(its median is the steady state serving at capacity), then ``--seconds`` of open-loop traffic at ``--factor`` x
that capacity with ``--deadline`` second client deadlines (memory sampled every second), memory 5 s after the
last request ended, and capacity again. Variants (``--rounds`` rounds, the order reversed every other round, so
that a neighbour's load does not always land on the same variant):

* ``shed``: the configs generated from the spec (preprocess's bounded queue and timeout, admission ahead of
  preprocessing bounding resnet50's queue, the SDK's remaining deadline as each request's server-side timeout)
  and the launcher's memory settings (python-backend regions sized for a full batch, glibc malloc tuning);
* ``shed-glibc``: the same, with Triton's default python-backend regions and glibc's default malloc;
* ``no-admission``: both steps bounded by their own queue policy (resnet50's as preprocess's) and no admission,
  so overload is refused at resnet50's queue after preprocessing (the cpu profile before admission);
* ``unbounded``: the same repository without queue policies or admission (the launcher's settings).

Goodput (successful images per second, over the whole window and its last third) is compared with the capacity
measured before and after the overload phase, and, since the client and the neighbours take CPU time from the
server, also per CPU-second of the server and its stubs (``/CPU``: images per CPU-second under overload over
images per CPU-second at capacity). Memory is reported twice: tritonserver's RSS (the issue's measure; it counts
a python-backend region once per mapping of it) and the memory the service holds (anonymous memory of
tritonserver and its stubs plus the /dev/shm regions they allocated; shared libraries left out). Also: refusals
at a full queue and their latency, requests rejected after waiting out a queue timeout (``expired``), p50/p99 of
accepted requests, client deadline failures, images resnet50 computed for callers that had given up, and the
share of the service's CPU time spent preprocessing images that resnet50's queue then refused (``late %``;
admission's refusals, which are never decoded, are read from ``tritonvision_admission_refused_total``).
Prints a table with the median and range over rounds and writes ``results/overload.json``.

    .venv/bin/python benchmarks/overload.py [--seconds 60] [--factor 3] [--rounds 3] [--variants shed,no-admission]

On a shared machine the figures move with the neighbours' load; compare variants of the same run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import hardware, proc_status  # noqa: E402

log = logging.getLogger("overload")
BUILD = ROOT / "build" / "overload"


VARIANTS = ("shed", "shed-glibc", "no-admission", "unbounded")


def profile(variant: str):
    from tritonvision import spec

    if variant in ("shed", "shed-glibc"):
        return spec.CPU

    def bounded(step, like):
        return dataclasses.replace(step, batching=dataclasses.replace(
            step.batching, max_queue_size=like.max_queue_size, queue_timeout_us=like.queue_timeout_us))

    if variant == "no-admission":
        # Every step bounded by its own queue, as preprocess is, and no admission: overload is refused at
        # resnet50's queue after preprocessing (the cpu profile before admission).
        return dataclasses.replace(spec.CPU, resnet50=bounded(spec.CPU.resnet50, spec.CPU.preprocess.batching),
                                   admission_pending=0)
    no_policy = dataclasses.replace(spec.CPU.preprocess.batching, max_queue_size=0, queue_timeout_us=0)
    return dataclasses.replace(spec.CPU, preprocess=bounded(spec.CPU.preprocess, no_policy),
                               resnet50=bounded(spec.CPU.resnet50, no_policy), admission_pending=0)


def repository(variant: str) -> Path:
    from tritonvision_server.configs import write_repository

    variant = "shed" if variant == "shed-glibc" else variant

    onnx = ROOT / "build" / "test" / "resnet50.onnx"
    if not onnx.exists():
        from tritonvision_server.onnx_export import export_onnx

        onnx = export_onnx(onnx, "random:0")
    return write_repository(profile(variant), BUILD / f"model_repository_{variant}", onnx_path=onnx)


def admission_refused(server) -> float:
    """Requests preprocess refused undecoded so far (tritonvision_admission_refused_total, every reason)."""
    import urllib.request

    from tritonvision_server.admission import ADMISSION_METRIC, metric_total

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return metric_total(text, ADMISSION_METRIC) or 0.0


class MemorySampler:
    """Samples :func:`memory` once a second in a thread."""

    def __init__(self, server):
        self.server = server
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append(memory(self.server))
            except (OSError, KeyError):  # the process ended
                return

    def peak(self, key: str) -> float:
        return max((m[key] for m in self.samples), default=float("nan"))

    def median(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {key: float(np.median([m[key] for m in self.samples])) for key in self.samples[0]}

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def server_options(variant: str) -> dict:
    """TritonServer keyword arguments of a variant: ``shed-glibc`` turns the launcher's memory settings off."""
    if variant == "shed-glibc":
        return {"python_shm_bytes": None, "python_shm_growth_bytes": None, "malloc_env": {}}
    return {}


def memory(server) -> dict:
    """tritonserver's RSS and anonymous memory, its stubs' anonymous memory and the /dev/shm its python backend
    allocated (tmpfs blocks, whether touched or not), in MiB."""

    def status(pid: int) -> dict[str, int]:
        return proc_status(pid, "VmRSS", "RssAnon", "RssShmem")

    server_status = status(server.pid)
    stubs_anon = 0
    for pid in server.stub_processes():
        try:
            stubs_anon += status(pid)["RssAnon"]
        except OSError:
            continue
    shm = sum(p.stat().st_blocks * 512 for p in server.leftover_shm())
    mib = 2**20
    return {
        "server_rss": server_status["VmRSS"] / mib,
        "server_anon": server_status["RssAnon"] / mib,
        "server_shmem": server_status["RssShmem"] / mib,
        "stubs_anon": stubs_anon / mib,
        "shm": shm / mib,
        "held": (server_status["RssAnon"] + stubs_anon + shm) / mib,
    }


def cpu_seconds(server) -> dict[str, float]:
    """CPU time (user + system) used so far by tritonserver and by each step's stub processes, by step name."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: int) -> float:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    seconds = {"tritonserver": used(server.pid)}
    for pid, cmdline in server.stub_processes().items():
        step = next((name for name in ("preprocess", "resnet50") if f" {name}_" in cmdline), "other")
        seconds[step] = seconds.get(step, 0.0) + used(pid)
    return seconds


class ServiceWork:
    """Images resnet50 computed and CPU-seconds the server and its stubs used inside a ``with`` block."""

    def __init__(self, server, clf):
        self.server, self.clf = server, clf

    def __enter__(self) -> "ServiceWork":
        self._stats, self._cpu = self.clf.statistics(), sum(cpu_seconds(self.server).values())
        return self

    def __exit__(self, *exc) -> None:
        stats = self.clf.settled_statistics()
        self.cpu = sum(cpu_seconds(self.server).values()) - self._cpu
        self.images = (stats.models["resnet50"] - self._stats.models["resnet50"]).inference_count


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
                # Refused on arrival at a full queue, or rejected after waiting out a queue timeout: only the
                # scheduler's message tells them apart (the SDK maps both to OverloadedError).
                outcome = "expired" if "timeout expired" in str(error) else "overloaded"
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
    expired = by.get("expired", [])
    lat_expired = np.array([(f - s) * 1e3 for s, f in expired]) if expired else np.zeros(1)
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
        "expired_p50_ms": float(np.percentile(lat_expired, 50)),
    }


def run_variant(variant: str, args, image: bytes) -> dict:
    import tritonvision as tv
    from tritonvision_server.launcher import TritonServer

    prof = profile(variant)
    with TritonServer(repository(variant), log_file=BUILD / f"tritonserver_{variant}.log",
                      **server_options(variant)) as server:
        with tv.Classifier(server.grpc_url, timeout=args.deadline) as clf:
            clf.wait_until_ready(60)
            service = service_time_ms(clf, image)
            mem_idle = memory(server)
            # Steady state serving at capacity: the median of the samples taken during the closed loop (what a
            # full batch needs in regions and arenas is in use by then, and a batch's worth of requests waits).
            with MemorySampler(server) as serving, ServiceWork(server, clf) as work_before:
                capacity_before = closed_loop(clf, image, args.capacity_concurrency, args.capacity_seconds)
            mem_capacity = serving.median()
            log.info("%s: capacity %.1f img/s, service time %.0f ms", variant, capacity_before, service)
            before, cpu_before, undecoded_before = clf.statistics(), cpu_seconds(server), admission_refused(server)
            bar = None
            if not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=int(args.factor * capacity_before * args.seconds), desc=f"{variant} x{args.factor:g}",
                           unit="req", leave=False)
            with MemorySampler(server) as sampler:
                records = open_loop(clf, image, args.factor * capacity_before, args.seconds, args.deadline,
                                    bar.update if bar is not None else None)
                mem_end = memory(server)
            if bar is not None:
                bar.close()
            after, cpu_after = clf.settled_statistics(), cpu_seconds(server)
            undecoded = admission_refused(server) - undecoded_before
            time.sleep(5)
            mem_settled = memory(server)
            with ServiceWork(server, clf) as work_after:
                capacity_after = closed_loop(clf, image, args.capacity_concurrency, args.capacity_seconds)
            mem_after = memory(server)
            log.info("%s: capacity after the overload %.1f img/s", variant, capacity_after)
    capacity = (capacity_before + capacity_after) / 2
    result = summarise(records, args.seconds, capacity)
    net = {name: after.models[name] - before.models[name] for name in ("preprocess", "resnet50")}
    cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    # Images per CPU-second of the server and its stubs: at capacity (both closed loops) and for the requests
    # that succeeded under overload. Their ratio is the goodput share with the machine's other load divided
    # out (the client and the neighbours take CPU time from the server, not work per CPU-second from it).
    per_cpu_capacity = (work_before.images + work_after.images) / (work_before.cpu + work_after.cpu)
    per_cpu_overload = result["outcomes"].get("ok", 0) / sum(cpu.values())
    # Triton counts preprocess's error responses (admission's refusals, undecoded) among its inferences.
    preprocessed = net["preprocess"].inference_count - int(undecoded)
    classified = net["resnet50"].inference_count
    # Images that went through preprocess but not through resnet50 (refused at its queue, or timed out there):
    # the preprocess stub's CPU time they took, as a share of the CPU time of the server and all its stubs.
    refused_late = max(0, preprocessed - classified)
    late_cpu = cpu.get("preprocess", 0.0) * refused_late / preprocessed if preprocessed else 0.0
    result.update(
        variant=variant,
        capacity=capacity,
        capacity_before=capacity_before,
        capacity_after=capacity_after,
        goodput_share_before=result["goodput"] / capacity_before,
        goodput_share_after=result["goodput"] / capacity_after if capacity_after else float("inf"),
        offered=args.factor * capacity_before,
        service_ms=service,
        queue_timeout_ms={step: getattr(prof, step).batching.queue_timeout_us / 1e3 for step in ("preprocess", "resnet50")},
        max_queue_size={step: getattr(prof, step).batching.max_queue_size for step in ("preprocess", "resnet50")},
        admission_pending=prof.admission_pending,
        refused_by_admission=int(undecoded),
        computed=classified,
        # Images resnet50 computed whose caller did not get a result (gave up or was refused later).
        computed_for_nobody=max(0, classified - result["outcomes"].get("ok", 0)),
        preprocessed_then_refused=refused_late,
        preprocessed_then_refused_cpu_share=late_cpu / sum(cpu.values()) if sum(cpu.values()) else 0.0,
        cpu_seconds_overload=cpu,
        images_per_cpu_s_capacity=per_cpu_capacity,
        images_per_cpu_s_overload=per_cpu_overload,
        goodput_per_cpu_share=per_cpu_overload / per_cpu_capacity,
        memory={"idle": mem_idle, "capacity": mem_capacity, "overload_peak": {k: sampler.peak(k) for k in mem_idle},
                "overload_end": mem_end, "settled": mem_settled, "capacity_after": mem_after},
    )
    m = result["memory"]
    # Against the steady state serving at capacity (the regions and arenas a full batch needs are in use by
    # then); idle is before any batch and reported alongside.
    result["rss_peak_vs_capacity"] = m["overload_peak"]["server_rss"] / m["capacity"]["server_rss"] - 1
    result["rss_settled_vs_capacity"] = m["settled"]["server_rss"] / m["capacity"]["server_rss"] - 1
    result["held_peak_vs_capacity"] = m["overload_peak"]["held"] / m["capacity"]["held"] - 1
    return result


def _spread(values) -> str:
    values = sorted(values)
    median = float(np.median(values))
    return f"{median:.0f}" if len(values) == 1 else f"{median:.0f} [{values[0]:.0f}-{values[-1]:.0f}]"


def table(results: list[dict]) -> str:
    """One line per run, then per variant the median [min-max] over rounds of the figures the targets name."""
    head = (f"{'round':>5}  {'variant':>12}  {'cap/s b/a':>11}  {'offer/s':>7}  {'good/s':>6}  {'good %':>6}  "
            f"{'last3 %':>7}  {'/CPU %':>6}  {'shed':>5}  {'expir.':>6}  {'deadl.':>6}  {'refuse p50/p99':>15}  "
            f"{'ok p50/p99 ms':>15}  "
            f"{'wasted':>6}  {'late %':>6}  {'RSS idle/cap/peak/settled':>26}  {'held cap/peak/settled':>22}")
    lines = [head]
    for r in results:
        o, m = r["outcomes"], r["memory"]
        lines.append(
            f"{r['round']:>5}  {r['variant']:>12}  {r['capacity_before']:>5.1f}/{r['capacity_after']:<5.1f}  "
            f"{r['offered']:>7.1f}  {r['goodput']:>6.1f}  {100 * r['goodput_share']:>5.0f}%  "
            f"{100 * r['goodput_last_third_share']:>6.0f}%  {100 * r['goodput_per_cpu_share']:>5.0f}%  "
            f"{o.get('overloaded', 0):>5}  {o.get('expired', 0):>6}  {o.get('DeadlineExceededError', 0):>6}  "
            f"{r['refusal_p50_ms']:>7.0f}/{r['refusal_p99_ms']:<7.0f}  "
            f"{r['accepted_p50_ms']:>7.0f}/{r['accepted_p99_ms']:<7.0f}  {r['computed_for_nobody']:>6}  "
            f"{100 * r['preprocessed_then_refused_cpu_share']:>5.1f}%  "
            f"{m['idle']['server_rss']:>5.0f}/{m['capacity']['server_rss']:.0f}/{m['overload_peak']['server_rss']:.0f}/"
            f"{m['settled']['server_rss']:<6.0f}  "
            f"{m['capacity']['held']:>8.0f}/{m['overload_peak']['held']:.0f}/{m['settled']['held']:.0f}"
        )
    lines.append("")
    lines.append(f"{'variant':>12}  {'goodput % of capacity (mean b/a)':>32}  {'last third %':>12}  "
                 f"{'per CPU-s %':>11}  {'refusal p99 ms':>14}  {'accepted p99 ms':>15}  "
                 f"{'RSS peak vs capacity %':>22}  {'held peak vs capacity %':>23}")
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == variant]
        lines.append(
            f"{variant:>12}  {_spread([100 * r['goodput_share'] for r in rs]):>32}  "
            f"{_spread([100 * r['goodput_last_third_share'] for r in rs]):>12}  "
            f"{_spread([100 * r['goodput_per_cpu_share'] for r in rs]):>11}  "
            f"{_spread([r['refusal_p99_ms'] for r in rs]):>14}  {_spread([r['accepted_p99_ms'] for r in rs]):>15}  "
            f"{_spread([100 * r['rss_peak_vs_capacity'] for r in rs]):>22}  "
            f"{_spread([100 * r['held_peak_vs_capacity'] for r in rs]):>23}"
        )
    return "\n".join(lines)


def _variants(text: str) -> str:
    unknown = set(text.split(",")) - set(VARIANTS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    return text


def parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="shed,no-admission", type=_variants,
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every variant, in alternating order")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the overload phase")
    ap.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of the measured capacity")
    ap.add_argument("--deadline", type=float, default=10.0, help="each request's client deadline, seconds")
    ap.add_argument("--capacity-concurrency", type=int, default=24,
                    help="closed-loop concurrency of the capacity runs (below the queue bounds)")
    ap.add_argument("--capacity-seconds", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "overload.json")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    from tritonvision import sample_images

    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    variants = args.variants.split(",")
    image = next(p for p in sample_images() if p.name == "chelsea.jpg").read_bytes()
    results = []
    for round_ in range(1, args.rounds + 1):
        for variant in (variants if round_ % 2 else variants[::-1]):
            result = run_variant(variant, args, image)
            result["round"] = round_
            results.append(result)
    machine = hardware()
    print(f"\n{machine['cpu']}, {machine['cores']} cores, Triton 2.51 (nvidia-pytriton), Python "
          f"{platform.python_version()}; {args.seconds:g} s at {args.factor:g}x capacity, {args.deadline:g} s "
          f"deadlines, {args.rounds} round(s); load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": machine, "seconds": args.seconds, "factor": args.factor,
                                    "deadline_s": args.deadline, "rounds": args.rounds,
                                    "load_average": os.getloadavg(), "results": results}, indent=2))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
