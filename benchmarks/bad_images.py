"""What an undecodable image costs the cpu profile's preprocess step, in process, on the step's own code.

DALI (2.4) cannot skip a sample that fails to decode, and after the failure the pipeline object is
invalid, so each failure costs a rebuild. Compared in the same run, alternating round by round:

* ``per-request`` (the baseline): after a batch fails, every request of it is decoded alone (each bad one
  fails again and costs another rebuild; the good ones lose the batch's threads);
* ``isolate`` (what the step does, :meth:`CpuPreprocessor.run_requests`): the request of the image DALI
  names is refused and the rest of the batch runs again as one batch.

Batches of ``--batch`` one-image requests, of which 0, 1, 4 or 8 are undecodable (headers intact: the
header check passes them). Prints ms per batch, rebuilds per batch and good images per second; writes
``results/bad_images.json``.

    .venv/bin/python benchmarks/bad_images.py [--batch 16] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import hardware  # noqa: E402

log = logging.getLogger("bad_images")


def undecodable(data: bytes) -> bytes:
    """The JPEG with its scan naming Huffman tables that do not exist."""
    i = 2
    while data[i + 1] != 0xDA:
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    broken = bytearray(data)
    broken[i + 6] = 0x77
    return bytes(broken)


def per_request(pre, requests):
    from tritonvision_server.pipeline import DecodeError

    try:
        pixels = pre([s for r in requests for s in r])
        return [pixels[i : i + 1] for i in range(len(requests))]
    except DecodeError:
        out = []
        for r in requests:
            try:
                out.append(pre(r))
            except DecodeError as exc:
                out.append(exc)
        return out


def isolate(pre, requests):
    return pre.run_requests(requests)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--bad", default="0,1,4,8", help="undecodable images per batch")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bad_images.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from tritonvision import sample_images, spec
    from tritonvision_server.pipeline import CpuPreprocessor

    good = next(p for p in sample_images() if p.name == "chelsea.jpg").read_bytes()
    bad = undecodable(good)
    strategies = {"per-request": per_request, "isolate": isolate}
    pres = {name: CpuPreprocessor(max_batch_size=spec.CPU.preprocess.batching.max_batch_size,
                                  num_threads=spec.CPU.cpu_threads) for name in strategies}
    rows = []
    for n_bad in [int(b) for b in args.bad.split(",")]:
        bad_at = {int(round(x)) for x in np.linspace(0, args.batch - 1, n_bad)} if n_bad else set()
        images = [bad if i in bad_at else good for i in range(args.batch)]
        requests = [[np.frombuffer(b, np.uint8)] for b in images]
        times = {name: [] for name in strategies}
        rebuilds = {name: 0 for name in strategies}
        for round_ in range(args.rounds + 1):
            order = list(strategies) if round_ % 2 == 0 else list(reversed(strategies))
            for name in order:
                pre = pres[name]
                before = pre.rebuilds
                t = time.perf_counter()
                results = strategies[name](pre, requests)
                elapsed = time.perf_counter() - t
                assert sum(isinstance(r, Exception) for r in results) == n_bad
                if round_:  # the first round warms up
                    times[name].append(elapsed)
                    rebuilds[name] += pre.rebuilds - before
        for name in strategies:
            ms = float(np.median(times[name]) * 1e3)
            rows.append({"bad_per_batch": n_bad, "strategy": name, "batch_ms": ms,
                         "rebuilds_per_batch": rebuilds[name] / args.rounds,
                         "good_img_per_s": (args.batch - n_bad) / (ms / 1e3)})
    hw = hardware()
    print(f"\n{hw['cpu']}, {hw['cores']} cores; batches of {args.batch} one-image requests, median of {args.rounds} rounds\n")
    print(f"{'bad/batch':>9}  {'strategy':>11}  {'ms/batch':>8}  {'rebuilds':>8}  {'good img/s':>10}")
    for r in rows:
        print(f"{r['bad_per_batch']:>9}  {r['strategy']:>11}  {r['batch_ms']:>8.1f}  {r['rebuilds_per_batch']:>8.1f}"
              f"  {r['good_img_per_s']:>10.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": hw, "batch": args.batch, "rounds": args.rounds, "rows": rows}, indent=2))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
