"""Triton's dynamic batcher with a queue policy and one instance: the 500 ms stalls, measured.

With a queue policy (``max_queue_size`` or a queue timeout, which every step of this project has for load
shedding) Triton's dynamic batcher does not prefetch: before it forms the next batch it waits for a free
instance on a condition variable, under a mutex of its own that the completing instance does not take
(``DynamicBatchScheduler::WaitForPayloadSlotAvailable``, core r24.10 and still on main). A wake-up sent
between its check and its wait is lost, and it then sleeps its default 500 ms, unless another completion
or a new request wakes it. Closed-loop clients all wait for that very batch, so nothing does.

Same server binary, same light-variant models (trivial compute, where the stall is all there is to see),
three configurations in one run: no queue policy (one instance a step), the queue policy with one instance,
and the queue policy with two (what the gpu profiles and the light variant use). At each concurrency the bare
grpcio closed loop of ``bench_client.py`` counts answered requests and those that took 400 ms or more.
Writes ``results/queue_stall.json`` and prints a table.

    .venv/bin/python benchmarks/queue_stall.py [--concurrency 1,4,16] [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_client import grpcio_floor  # noqa: E402
from machine import hardware  # noqa: E402

BUILD = ROOT / "build" / "queue_stall"
STALL_S = 0.4  # as grpcio_floor's over_400ms


def repositories() -> dict[str, Path]:
    from tritonvision import spec
    from tritonvision_server.configs import write_light_repository

    def policy(max_queue_size: int, queue_timeout_us: int):
        # Both steps with the same queue policy (or none), and no admission (the light steps have none).
        return replace(spec.CPU, admission_pending=0, **{s: replace(getattr(spec.CPU, s), batching=replace(
            getattr(spec.CPU, s).batching, max_queue_size=max_queue_size, queue_timeout_us=queue_timeout_us))
            for s in ("preprocess", "resnet50")})

    bounded = policy(spec.CPU.preprocess.batching.max_queue_size, spec.CPU.preprocess.batching.queue_timeout_us)
    return {
        "no queue policy, 1 instance": write_light_repository(BUILD / "unbounded_1", policy(0, 0), min_instances=1),
        "queue policy, 1 instance": write_light_repository(BUILD / "bounded_1", bounded, min_instances=1),
        "queue policy, 2 instances": write_light_repository(BUILD / "bounded_2", bounded, min_instances=2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2, help="each configuration this many times, interleaved")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "queue_stall.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from tritonvision import sample_images
    from tritonvision_server.launcher import TritonServer

    image = next(p for p in sample_images() if p.name == "chelsea.jpg").read_bytes()
    repos = repositories()
    rows = []
    started = time.time()
    for rnd in range(args.rounds):
        for name, repo in repos.items():
            with TritonServer(repo, log_file=BUILD / "tritonserver.log") as server:
                for c in args.concurrency:
                    r = grpcio_floor(server.grpc_url, image, concurrency=c, seconds=args.seconds, warmup=0.5)
                    r["stalled"] = r.pop("over_400ms")
                    rows.append({"config": name, "round": rnd, **r})
                    print(f"round {rnd} {name:<28} c={c:<3} {r['throughput']:8.1f} img/s  p99 {r['p99_ms']:7.1f} ms  "
                          f"stalled {r['stalled']}", file=sys.stderr, flush=True)
    summary = []
    for name in repos:
        for c in args.concurrency:
            mine = [r for r in rows if r["config"] == name and r["concurrency"] == c]
            summary.append({"config": name, "concurrency": c,
                            "throughput": statistics.median(r["throughput"] for r in mine),
                            "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                            "stalled_per_s": statistics.median(r["stalled"] / args.seconds for r in mine)})
    result = {"hardware": hardware(), "seconds_per_run": args.seconds, "rounds": args.rounds,
              "stall_threshold_ms": STALL_S * 1e3, "wall_seconds": time.time() - started,
              "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    hw = result["hardware"]
    print(f"\n{hw['cpu']} ({hw['cores']} cores); light variant (trivial compute), bare grpcio closed loop, "
          f"medians of {args.rounds} rounds of {args.seconds:g} s; stalled = answers taking >= {STALL_S * 1e3:.0f} ms\n")
    head = f"{'configuration':<28} {'conc':>4}  {'img/s':>8}  {'p99 ms':>8}  {'stalled/s':>9}"
    print(head + "\n" + "-" * len(head))
    for s in summary:
        print(f"{s['config']:<28} {s['concurrency']:>4}  {s['throughput']:>8.1f}  {s['p99_ms']:>8.1f}  {s['stalled_per_s']:>9.2f}")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
