#!/usr/bin/env python3
"""Availability of ``tritonvision serve`` under a storm of gRPC calls cancelled as they complete.

Triton 2.51 (the bundled server of the cpu and gpu-torch profiles) has races between a client's cancellation
and the end of a call in its gRPC handler, fixed in later releases: the server aborts ("ASSERTION FAILED:
prior > 0" in gRPC's refcount, heap corruption) or hangs in its own crash handler, running and answering
nothing. Any client can trigger it with deadlines close to the service time.

Per variant, one ``tritonvision serve`` of the light variant (trivial compute, so a call lasts ~1-2 ms and
deadlines can land on its end) on free loopback ports:

* ``watchdog``: as shipped; a crashed or wedged server is restarted (``--health-interval 1``);
* ``none``: ``--health-interval 0``, the behaviour before the watchdog for these faults: ``serve`` exits when
  the server dies, and nothing notices a wedged one.

``--threads`` storm threads send unary calls whose deadlines are drawn around the measured service time,
while a prober sends one request every 100 ms with a 1 s deadline. Reported: faults (the restarts ``serve``
logged, and whether it ended), the share of probes answered (availability), the outages (runs of failed
probes) and the calls the storm completed. Prints a table, writes ``results/cancel_storm.json``.

    .venv/bin/python benchmarks/cancel_storm.py [--seconds 90] [--threads 16] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2_grpc

from tritonvision import sample_images
from tritonvision._transport._grpc import infer_request
from tritonvision_server.configs import write_light_repository
from tritonvision_server.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import hardware  # noqa: E402

log = logging.getLogger("cancel_storm")
VARIANTS = {"watchdog": ["--health-interval", "1"], "none": ["--health-interval", "0"]}
PROBE_EVERY_S = 0.1


def _call(stub, request, timeout: float) -> bool:
    try:
        stub.ModelInfer(request, timeout=timeout)
        return True
    except grpc.RpcError:
        return False


def outages(probes: list[tuple[float, bool]]) -> list[float]:
    """Durations (s) of the runs of failed probes."""
    runs, start = [], None
    for t, ok in probes:
        if not ok and start is None:
            start = t
        elif ok and start is not None:
            runs.append(t - start)
            start = None
    if start is not None:
        runs.append(probes[-1][0] - start + PROBE_EVERY_S)
    return runs


def run_variant(name: str, repo: Path, image: bytes, seconds: float, threads: int, work: Path) -> dict:
    ports = [free_port() for _ in range(3)]
    log_path = work / f"serve_{name}.log"
    cmd = [sys.executable, "-m", "tritonvision._cli", "serve", "--model-repository", str(repo),
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--max-restarts", "1000", *VARIANTS[name]]
    url = f"127.0.0.1:{ports[1]}"
    request = infer_request("classifier", image, 5)
    with open(log_path, "w") as fh:
        serve = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        end = time.monotonic() + 120
        while not _call(stub, request, 2.0):
            if time.monotonic() > end or serve.poll() is not None:
                raise RuntimeError(f"serve did not come up:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        lat = []
        for _ in range(200):
            t0 = time.perf_counter()
            stub.ModelInfer(request)
            lat.append(time.perf_counter() - t0)
        service = sorted(lat)[len(lat) // 2]
        # With `threads` calls in flight a call lasts about threads/2 service times on two cores.
        lo, hi = 0.5 * service * threads / 2, 3.0 * service * threads / 2
        stop = threading.Event()
        storm = {"ok": 0, "failed": 0}
        probes: list[tuple[float, bool]] = []
        start = time.monotonic()

        def storm_loop():
            ch = grpc.insecure_channel(url)
            s = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            while not stop.is_set():
                storm["ok" if _call(s, request, random.uniform(lo, hi)) else "failed"] += 1
            ch.close()

        def probe_loop():
            ch = grpc.insecure_channel(url)
            s = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            while not stop.is_set():
                t = time.monotonic()
                probes.append((t - start, _call(s, request, 1.0)))
                stop.wait(max(0.0, PROBE_EVERY_S - (time.monotonic() - t)))
            ch.close()

        workers = [threading.Thread(target=storm_loop, daemon=True) for _ in range(threads)]
        workers.append(threading.Thread(target=probe_loop, daemon=True))
        for w in workers:
            w.start()
        stop.wait(seconds)
        stop.set()
        for w in workers:
            w.join(5)
        ended = serve.poll()
    finally:
        if serve.poll() is None:
            serve.terminate()
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
    text = log_path.read_text()
    restarts = re.findall(r"ERROR .*?: (tritonserver .*?); restarting it", text)
    gaps = outages(probes)
    row = {"variant": name, "service_ms": service * 1e3, "deadline_ms": [lo * 1e3, hi * 1e3],
           "faults_restarted": len(restarts), "reasons": restarts, "serve_ended": ended is not None,
           "serve_exit_code": ended, "probes": len(probes),
           "availability": sum(ok for _, ok in probes) / max(1, len(probes)),
           "outages": len(gaps), "longest_outage_s": max(gaps, default=0.0),
           "down_at_end": bool(probes) and not probes[-1][1], "storm_ok": storm["ok"],
           "storm_failed": storm["failed"], "seconds": seconds, "log_tail": text.splitlines()[-15:]}
    log.info("%s: %s", name, {k: v for k, v in row.items() if k not in ("log_tail", "reasons")})
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", default="watchdog,none")
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "cancel_storm.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="cancel_storm_"))
    repo = write_light_repository(work / "repo")
    image = sample_images()[0].read_bytes()
    variants = args.variants.split(",")
    rows = []
    for r in range(args.rounds):
        for name in variants if r % 2 == 0 else variants[::-1]:
            rows.append({"round": r, **run_variant(name, repo, image, args.seconds, args.threads, work)})
    hw = hardware()
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "hardware": hw, "threads": args.threads,
              "triton": "2.51.0 (bundled in nvidia-pytriton 0.7.0)", "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"\n{hw['cpu']} ({hw['cores']} cores); light variant; {args.threads} storm threads, deadlines "
          f"0.5-3x the call time; a probe every {PROBE_EVERY_S * 1000:.0f} ms; {args.seconds:.0f} s per run")
    print(f"{'variant':<9} {'round':>5} {'restarts':>8} {'serve ended':>11} {'available':>9} {'outages':>7} "
          f"{'longest s':>9} {'down at end':>11} {'storm calls ok':>14}")
    for row in rows:
        print(f"{row['variant']:<9} {row['round']:>5} {row['faults_restarted']:>8} "
              f"{('yes, ' + str(row['serve_exit_code'])) if row['serve_ended'] else 'no':>11} "
              f"{row['availability'] * 100:>8.1f}% {row['outages']:>7} {row['longest_outage_s']:>9.1f} "
              f"{'yes' if row['down_at_end'] else 'no':>11} {row['storm_ok']:>14}")
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        print(f"{name}: {sum(r['faults_restarted'] for r in mine)} restarts, down at the end of "
              f"{sum(r['down_at_end'] for r in mine)} of {len(mine)} runs, availability "
              f"{sum(r['availability'] for r in mine) / len(mine) * 100:.1f}% on average")
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
