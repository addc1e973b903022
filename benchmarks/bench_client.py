"""SDK versus perf_analyzer on the same server, model and image, in one run; shm versus plain gRPC.

Two servers, one after the other: the real cpu-profile ensemble (ResNet-50 in ONNX Runtime, ~40 ms an
image on two cores, which hides any client cost) and its light variant (same configs and interface,
trivial compute: :mod:`tritonvision_server.backends.light`), where client and transport overhead show.
At each concurrency: the SDK's closed loop (``tritonvision bench``'s engine) over plain gRPC and over
system shared memory, and perf_analyzer 2.51 over both. As a reference for what any Python client can reach
here, also a bare grpcio closed loop over plain gRPC (one prebuilt request, no response parsing: the floor of
the SDK's per-request client cost). Writes ``results/bench_client.json`` and prints a table with the
hardware, the versions and the SDK/perf_analyzer ratio (target >= 0.95).

What differs from perf_analyzer even at equal transport: the SDK asks for the top-k labels (Triton's
classification extension, ``class_count``), perf_analyzer for the raw 1000 scores (it has no option to ask
for classification); with ``--shared-memory system`` perf_analyzer also receives its outputs through shared
memory, while the SDK sends only the image through it (the top-k strings come back in the response).

    .venv/bin/python benchmarks/bench_client.py [--concurrency 1,4,16] [--seconds 6] [--variants real,light]

``--interleave N`` measures only the client's own cost, on the light variant: at each concurrency, N rounds
of the SDK and the bare grpcio loop one after the other (in rotating order, each in a fresh process, so
that a noisy machine weighs on both alike), and, with ``--baseline-sdk DIR`` (the ``client/`` directory of
another checkout, e.g. ``git archive <rev> client | tar -x -C /tmp/before``), that SDK in the same rounds.
It reports the median of each, the median of the per-round ratios SDK / bare, and each client's CPU time
per answered request (what a noisy machine disturbs least):

    .venv/bin/python benchmarks/bench_client.py --interleave 5 --baseline-sdk /tmp/before/client
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_analyzer  # noqa: E402
from machine import hardware  # noqa: E402
from tritonvision import spec  # noqa: E402

log = logging.getLogger("bench_client")

BUILD = ROOT / "build" / "bench"
SERVER_VERSION = "2.51.0"


def photo() -> bytes:
    """The image every request sends: the repository's sample photo (no image libraries needed on a GPU host)."""
    from tritonvision import sample_images

    return next(p for p in sample_images() if p.name == "chelsea.jpg").read_bytes()


def repositories(variants: list[str]) -> dict[str, Path]:
    from tritonvision import spec
    from tritonvision_server.configs import write_light_repository, write_repository

    repos = {}
    if "real" in variants:
        onnx = ROOT / "build" / "test" / "resnet50.onnx"
        if not onnx.exists():
            from tritonvision_server.onnx_export import export_onnx

            onnx = export_onnx(onnx, "random:0")
        repos["real"] = write_repository(spec.CPU, BUILD / "model_repository_cpu", onnx_path=onnx)
    if "light" in variants:
        repos["light"] = write_light_repository(BUILD / "model_repository_light")
    return repos


def versions() -> dict:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "tritonclient": version("tritonclient"),
        "grpcio": version("grpcio"),
        "tritonserver": SERVER_VERSION,
        "perf_analyzer": "2.51.0",
    }


def measure_variant(name: str, repo: Path, args, image: bytes, pa_binary: Path, pa_env: dict, bar) -> list[dict]:
    from tritonvision import Classifier
    from tritonvision._bench import run as sdk_run
    from tritonvision_server.launcher import TritonServer

    rows = []
    data = perf_analyzer.input_data(image, BUILD / "input_data.json")
    with TritonServer(repo, log_file=BUILD / f"tritonserver_{name}.log") as server:
        with Classifier(server.grpc_url, timeout=60) as clf:
            clf.classify(image)  # load every model's first-call paths
        for c in args.concurrency:
            for shm in ("none", "system"):
                with Classifier(server.grpc_url, shm=None if shm == "none" else shm) as clf:
                    r = sdk_run(clf, [image], concurrency=c, seconds=args.seconds, warmup=args.warmup).to_dict()
                rows.append({"variant": name, "client": "sdk", "shm": shm, **r})
                log.info("%s sdk shm=%s c=%d: %.1f img/s p50 %.2f ms", name, shm, c, r["throughput"], r["p50_ms"])
                bar.update(1)
                csv_path = BUILD / f"pa_{name}_{shm}_{c}.csv"
                csv_path.unlink(missing_ok=True)
                r = perf_analyzer.run(pa_binary, pa_env, url=server.grpc_url, model=spec.ENSEMBLE, data=data,
                                      concurrency=c, interval_ms=int(args.seconds * 1000), csv_path=csv_path, shm=shm)
                rows.append({"variant": name, "client": "perf_analyzer", "shm": shm, **r})
                log.info("%s perf_analyzer shm=%s c=%d: %.1f img/s p50 %.2f ms", name, shm, c, r["throughput"], r["p50_ms"])
                bar.update(1)
            r = grpcio_floor(server.grpc_url, image, concurrency=c, seconds=args.seconds, warmup=args.warmup)
            rows.append({"variant": name, "client": "grpcio", "shm": "none", **r})
            log.info("%s bare grpcio c=%d: %.1f img/s p50 %.2f ms", name, c, r["throughput"], r["p50_ms"])
            bar.update(1)
    return rows


def grpcio_floor(url: str, image: bytes, *, concurrency: int, seconds: float, warmup: float, top_k: int = 5) -> dict:
    """A bare grpcio closed loop with one request built once and responses left unparsed: the client cost no
    Python SDK on grpcio goes under. Like the SDK's bench: blocking calls at concurrency 1, otherwise
    ``ModelInfer.future`` with a done callback that resubmits."""
    import threading

    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2_grpc
    from tritonvision._transport._grpc import CHANNEL_ARGS, infer_request

    request = infer_request(spec.ENSEMBLE, image, top_k)
    latencies: list[float] = []
    lock = threading.Lock()
    finished = threading.Event()
    active = [concurrency]
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + seconds
    with grpc.insecure_channel(url, options=CHANNEL_ARGS) as channel:
        model_infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        model_infer(request)
        if concurrency == 1:
            now = time.perf_counter()
            while now < window_end:
                sent = now
                model_infer(request)
                now = time.perf_counter()
                if window_start <= now <= window_end:
                    latencies.append(now - sent)
            finished.set()

        def send() -> None:
            sent = time.perf_counter()

            def done(call) -> None:
                now = time.perf_counter()
                ok = call.exception() is None
                with lock:
                    if ok and window_start <= now <= window_end:
                        latencies.append(now - sent)
                    again = now < window_end
                    if not again:
                        active[0] -= 1
                        if active[0] == 0:
                            finished.set()
                if again:
                    send()

            model_infer.future(request).add_done_callback(done)

        for _ in range(concurrency if concurrency > 1 else 0):
            send()
        finished.wait()
    lat = np.array(latencies or [0.0]) * 1e3
    pct = np.percentile(lat, [50, 90, 95, 99])
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": seconds,
            "throughput": len(latencies) / seconds, "p50_ms": float(pct[0]), "p90_ms": float(pct[1]),
            "p95_ms": float(pct[2]), "p99_ms": float(pct[3]), "mean_ms": float(lat.mean()),
            "over_400ms": int((lat >= 400).sum())}


def worker(args) -> int:
    """One closed-loop run in this process (``--worker sdk|grpcio``); prints its result as JSON, with the
    process's CPU time per answered request (user + system: the client's own cost, which on a shared host
    is taken from the server, and which a noisy machine disturbs much less than throughput)."""
    import resource

    image = photo()
    c = args.concurrency[0]

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    if args.worker == "grpcio":
        def loop(seconds, warmup):
            return grpcio_floor(args.url, image, concurrency=c, seconds=seconds, warmup=warmup)
    else:
        import tritonvision
        from tritonvision import Classifier
        from tritonvision._bench import run as sdk_run

        clf = Classifier(args.url, timeout=60)

        def loop(seconds, warmup):
            return sdk_run(clf, [image], concurrency=c, seconds=seconds, warmup=warmup).to_dict()

    loop(args.warmup, 0.0)  # connection, first calls, caches: not measured
    before = cpu()
    r = loop(args.seconds, 0.0)
    r["client_cpu_us_per_request"] = (cpu() - before) / max(r["requests"], 1) * 1e6
    if args.worker == "sdk":
        clf.close()
        r["sdk"] = str(Path(tritonvision.__file__).parents[1])
    print(json.dumps(r))
    return 0


def _spawn_worker(kind: str, url: str, concurrency: int, args, sdk_path: Path | None = None) -> dict:
    env = dict(os.environ)
    if sdk_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(sdk_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, __file__, "--worker", kind, "--url", url, "--concurrency", str(concurrency),
           "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(args) -> int:
    """SDK vs the bare grpcio loop (and a baseline SDK) in alternating rounds on the light variant."""
    from tqdm import tqdm
    from tritonvision_server.launcher import TritonServer

    clients = [("grpcio", None), ("sdk", None)] + ([("baseline", args.baseline_sdk)] if args.baseline_sdk else [])
    repo = repositories(["light"])["light"]
    rows: list[dict] = []
    started = time.time()
    with TritonServer(repo, log_file=BUILD / "tritonserver_interleave.log") as server:
        total = len(args.concurrency) * args.interleave * len(clients)
        with tqdm(total=total, desc="runs", unit="run", file=sys.stderr) as bar:
            for c in args.concurrency:
                for rnd in range(args.interleave):
                    shift = rnd % len(clients)
                    for name, path in clients[shift:] + clients[:shift]:
                        r = _spawn_worker("grpcio" if name == "grpcio" else "sdk", server.grpc_url, c, args, path)
                        rows.append({"client": name, "round": rnd, **r})
                        bar.update(1)
    summary = []
    for c in args.concurrency:
        line = {"concurrency": c}
        for name, _ in clients:
            mine = {r["round"]: r for r in rows if r["client"] == name and r["concurrency"] == c}
            bare = {r["round"]: r for r in rows if r["client"] == "grpcio" and r["concurrency"] == c}
            line[name] = statistics.median(r["throughput"] for r in mine.values())
            line[f"{name}_cpu_us"] = statistics.median(r["client_cpu_us_per_request"] for r in mine.values())
            if name != "grpcio":
                line[f"{name}/grpcio"] = statistics.median(mine[k]["throughput"] / bare[k]["throughput"] for k in mine)
        summary.append(line)
    result = {"hardware": hardware(), "versions": versions(), "mode": "interleaved", "rounds": args.interleave,
              "seconds_per_run": args.seconds, "baseline_sdk": str(args.baseline_sdk) if args.baseline_sdk else None,
              "wall_seconds": time.time() - started, "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    hw = result["hardware"]
    print(f"\n{hw['cpu']} ({hw['cores']} cores); light variant, plain gRPC, {args.interleave} interleaved rounds of "
          f"{args.seconds:g} s; medians (img/s) and the median of per-round ratios\n")
    names = [name for name, _ in clients]
    head = (f"{'conc':>4}  " + "  ".join(f"{n:>9}" for n in names) + "  "
            + "  ".join(f"{n + '/grpcio':>16}" for n in names if n != "grpcio") + "  "
            + "  ".join(f"{n + ' CPU us':>15}" for n in names))
    print(head + "\n" + "-" * len(head))
    for line in summary:
        print(f"{line['concurrency']:>4}  " + "  ".join(f"{line[n]:>9.1f}" for n in names) + "  "
              + "  ".join(f"{line[n + '/grpcio']:>16.3f}" for n in names if n != "grpcio") + "  "
              + "  ".join(f"{line[n + '_cpu_us']:>15.0f}" for n in names))
    print(f"\nwritten to {args.out}")
    return 0


def table(rows: list[dict]) -> str:
    index = {(r["variant"], r["client"], r["shm"], r["concurrency"]): r for r in rows}
    head = (f"{'variant':<7} {'shm':<7} {'conc':>4}  {'SDK img/s':>9} {'PA img/s':>9} {'SDK/PA':>6}  "
            f"{'SDK p50':>8} {'PA p50':>8} {'SDK p99':>8} {'PA p99':>8}  {'grpcio/PA':>9}")
    lines = [head, "-" * len(head)]
    for (variant, client, shm, c), sdk in index.items():
        if client != "sdk":
            continue
        pa = index.get((variant, "perf_analyzer", shm, c))
        ratio = sdk["throughput"] / pa["throughput"] if pa and pa["throughput"] else float("nan")
        floor = index.get((variant, "grpcio", shm, c))
        floor_ratio = f"{floor['throughput'] / pa['throughput']:>9.2f}" if floor and pa and pa["throughput"] else f"{'-':>9}"
        lines.append(
            f"{variant:<7} {shm:<7} {c:>4}  {sdk['throughput']:>9.1f} {pa['throughput']:>9.1f} {ratio:>6.2f}  "
            f"{sdk['p50_ms']:>8.2f} {pa['p50_ms']:>8.2f} {sdk['p99_ms']:>8.2f} {pa['p99_ms']:>8.2f}  {floor_ratio}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run (perf_analyzer window too)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--variants", default="real,light", type=lambda s: s.split(","))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_client.json")
    ap.add_argument("--interleave", type=int, metavar="ROUNDS", help="SDK vs bare grpcio only, in alternating rounds")
    ap.add_argument("--baseline-sdk", type=Path, metavar="DIR", help="with --interleave: another SDK's client/ directory")
    ap.add_argument("--worker", choices=("sdk", "grpcio"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        return worker(args)
    if args.interleave:
        BUILD.mkdir(parents=True, exist_ok=True)
        return interleaved(args)
    from tqdm import tqdm

    BUILD.mkdir(parents=True, exist_ok=True)
    pa_binary, pa_env = perf_analyzer.ensure(BUILD / "perf_analyzer", ROOT / ".whl")
    image = photo()
    repos = repositories(args.variants)
    rows: list[dict] = []
    started = time.time()
    with tqdm(total=len(repos) * len(args.concurrency) * 5, desc="runs", unit="run", file=sys.stderr) as bar:
        for name, repo in repos.items():
            rows += measure_variant(name, repo, args, image, pa_binary, pa_env, bar)
    result = {
        "hardware": hardware(),
        "versions": versions(),
        "image_bytes": len(image),
        "seconds_per_run": args.seconds,
        "baseline": "perf_analyzer 2.51.0 (gRPC, -b 1, time windows), same server/model/image in the same run",
        "notes": ("SDK asks for top-5 labels (classification extension); perf_analyzer for the raw 1000 scores "
                  "(it cannot ask for classification) and, with shm, gets them through output shared memory; "
                  "grpcio: a bare grpcio closed loop (prebuilt request, unparsed responses), plain gRPC only"),
        "wall_seconds": time.time() - started,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    hw, v = result["hardware"], result["versions"]
    print(f"\n{hw['cpu']} ({hw['cores']} cores, {hw['gpu'] or 'no GPU'}); tritonserver {v['tritonserver']}, tritonclient {v['tritonclient']}, "
          f"grpcio {v['grpcio']}, Python {v['python']}; baseline: perf_analyzer {v['perf_analyzer']}\n")
    print(table(rows))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
