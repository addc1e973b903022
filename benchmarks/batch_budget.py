"""The pixel budget of the gpu profile's DALI batches under steady load: how often a batch exceeds it.

A batch the batcher forms in one pass holds at most ``spec.GPU.max_batch_pixels`` (tests/test_batch_budget.py).
Triton can still add requests to a batch that waits for a free instance, after re-initialising the batching
strategy as for a new batch, unless the batch was closed as saturated when formed; and, with a queue delay,
it merges batches that wait for the same instance without asking the strategy (core r24.10 to r26.06,
``DynamicBatchScheduler::GetDynamicBatch``, ``InstanceQueue::Dequeue``). These are races: they show under a
steady stream of requests with idle instances, not in one burst. So the gpu profile's ``preprocess`` has no
queue delay and prefers every batch size, which closes every batch as it is formed.

Three variants of the same repository (``configs.write_batch_recorder_repository``: the real ``validate``,
a python stand-in for the DALI ``preprocess`` with the generated config that records each batch's pixel
counts, a light ``resnet50``, on the bundled Triton 2.51), one after the other: ``shipped`` (the compiled
library and the spec's batching), ``before`` (the library and the batching the gpu profile had before: 500 us
queue delay, preferred sizes 32/64/128) and ``no library`` (the spec's batching, no budget). Closed-loop
clients send one image each, at random 120 MP and 48 MP (headers only: the stand-in decodes nothing).
Prints a table, writes ``results/batch_budget.json``.

    .venv/bin/python benchmarks/batch_budget.py [--clients 24] [--seconds 40] [--execute-ms 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # png_claiming: the tests' header-only PNGs

from image_helpers import png_claiming  # noqa: E402
from machine import hardware  # noqa: E402

BUILD = ROOT / "build" / "batch_budget"
SIZES = ((10954, 10954), (8000, 6000))  # 120 MP (four fill the budget) and 48 MP
VARIANTS = ("shipped", "before", "no library")


def repository(variant: str, library: Path, execute_seconds: float) -> Path:
    from google.protobuf import text_format

    from tritonvision import spec
    from tritonvision_server import configs

    dest = configs.write_batch_recorder_repository(BUILD / variant.replace(" ", "_"), execute_seconds=execute_seconds,
                                                   library=None if variant == "no library" else library)
    if variant == "before":
        path = dest / spec.PREPROCESS / "config.pbtxt"
        cfg = configs.parse(path.read_text())
        del cfg.dynamic_batching.preferred_batch_size[:]
        cfg.dynamic_batching.preferred_batch_size.extend([32, 64, 128])
        cfg.dynamic_batching.max_queue_delay_microseconds = 500
        path.write_text(text_format.MessageToString(cfg))
    configs.read_batch_log(dest)
    return dest


def run(variant: str, repo: Path, clients: int, seconds: float) -> dict:
    import numpy as np
    import tritonclient.grpc as grpcclient

    from tritonvision import spec
    from tritonvision_server import configs
    from tritonvision_server.launcher import TritonServer

    images = [png_claiming(w, h, tag) for tag in range(8) for (w, h) in SIZES]
    done, errors = [0], [0]
    lock = threading.Lock()
    with TritonServer(repo, log_file=BUILD / f"{repo.name}.log") as server:
        stop = time.monotonic() + seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with grpcclient.InferenceServerClient(server.grpc_url) as c:
                while time.monotonic() < stop:
                    image = rng.choice(images)
                    inp = grpcclient.InferInput(spec.IMAGE.name, [1, len(image)], "UINT8")
                    inp.set_data_from_numpy(np.frombuffer(image, np.uint8)[None])
                    try:
                        c.infer(spec.ENSEMBLE, [inp], client_timeout=60)
                        ok = True
                    except grpcclient.InferenceServerException:
                        ok = False
                    with lock:
                        done[0] += ok
                        errors[0] += not ok

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = configs.read_batch_log(repo)
    budget = spec.GPU.max_batch_pixels
    several = [b for b in batches if len(b) > 1]
    over = [b for b in several if sum(b) > budget]
    return {"variant": variant, "requests": done[0], "errors": errors[0], "batches": len(batches),
            "batches_of_2_plus": len(several), "over_budget": len(over),
            "largest_mp": max((sum(b) for b in batches), default=0) / 1e6,
            "largest_requests": max((len(b) for b in batches), default=0),
            "over_budget_examples": [[len(b), sum(b) / 1e6] for b in over[:5]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=24, help="closed-loop clients, one image a request")
    ap.add_argument("--seconds", type=float, default=40.0, help="per variant")
    ap.add_argument("--execute-ms", type=float, default=2.0, help="what the stand-in takes per batch")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "batch_budget.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from tritonvision import spec
    from tritonvision_server import batchstrategy

    library = batchstrategy.build(BUILD / batchstrategy.BATCH_STRATEGY_FILE)
    rows = []
    for variant in args.variants:
        rows.append(run(variant, repository(variant, library, args.execute_ms / 1e3), args.clients, args.seconds))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"hardware": hardware(), "budget_mp": spec.GPU.max_batch_pixels / 1e6, "clients": args.clients,
              "seconds": args.seconds, "execute_ms": args.execute_ms, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    hw = result["hardware"]
    print(f"\n{hw['cpu']} ({hw['cores']} cores), Triton 2.51 (bundled); budget {result['budget_mp']:.0f} MP; "
          f"{args.clients} closed-loop clients of 120/48 MP images for {args.seconds:g} s a variant; stand-in "
          f"{args.execute_ms:g} ms a batch\n")
    head = (f"{'variant':<11} {'requests':>8} {'errors':>6} {'batches':>7} {'2+ req':>7} {'over budget':>11} "
            f"{'largest MP':>10} {'largest req':>11}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['variant']:<11} {r['requests']:>8} {r['errors']:>6} {r['batches']:>7} {r['batches_of_2_plus']:>7} "
              f"{r['over_budget']:>11} {r['largest_mp']:>10.0f} {r['largest_requests']:>11}")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
