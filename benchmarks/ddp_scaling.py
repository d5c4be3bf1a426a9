"""One process with all the cores against torchrun's N processes with a share each, on this machine.

    python benchmarks/ddp_scaling.py [--preset ...] [--epochs 3] [--procs 2] [--rounds 2] [--data-dir DIR]

Both train the same configuration (`batch_size` is the global batch, so both
see the same batches): `fmnist train` with --threads = the cores, and
`torchrun --standalone --nproc-per-node N -m fmnist train` with --threads =
cores / N per process. The set-ups take turns for --rounds rounds; printed:
the median seconds per training epoch (history.jsonl), the wall time of the
whole command, and the test accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fmnist import devices


def run(cmd: list[str], out: Path) -> dict:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"wall": wall, "epoch": statistics.median(r["seconds"] for r in rows), "test": summary["test_accuracy"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", help="a preset to train (default: the default MLP)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data-dir")
    args = p.parse_args()
    cores = devices.cores()
    common = ["--epochs", str(args.epochs), "--no-plots", "--quiet", "--device", "cpu"]
    common += ["--preset", args.preset] if args.preset else []
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    results: dict[str, list[dict]] = {"one": [], "ddp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind in ("one", "ddp"):
                name = f"{kind}{r}"
                train = ["-m", "fmnist", "train", *common, "--out-dir", tmp, "--name", name]
                if kind == "one":
                    cmd = [sys.executable, *train, "--threads", str(cores)]
                else:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(args.procs), *train, "--threads", str(max(1, cores // args.procs))]
                results[kind].append(run(cmd, Path(tmp) / name))
                print(f"  round {r + 1} {kind}: {results[kind][-1]}", flush=True)
    print(f"\n{cores} cores; {args.epochs} epochs of {args.preset or 'the default MLP'}; medians over {args.rounds} "
          "rounds\n")
    print("| set-up | seconds per epoch | wall seconds | test accuracy |")
    print("| --- | ---: | ---: | ---: |")
    labels = {"one": f"1 process x {cores} threads",
              "ddp": f"{args.procs} processes x {max(1, cores // args.procs)} thread(s), torchrun + gloo"}
    for kind, rs in results.items():
        print(f"| {labels[kind]} | {statistics.median(x['epoch'] for x in rs):.2f} | "
              f"{statistics.median(x['wall'] for x in rs):.1f} | {100 * rs[0]['test']:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
