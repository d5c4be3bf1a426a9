"""What each training technique buys: a preset trained with one field changed at a time.

    python benchmarks/ablate.py [--preset cnn-fast] [--epochs 5] [--seeds 0] [--data-dir DIR]

Every variant is an ordinary `fmnist train` of the preset (figures off) with
its epochs cut to --epochs and one field changed; the table gives each one's
best validation accuracy (the test split is not touched: these are choices)
and its training seconds per epoch, as a difference from the preset itself.
The default changes switch off, one at a time, what cnn-fast uses (TTA,
Nesterov, the linear schedule, label smoothing) and switch on what it does not
(EMA, the batch-norm bias learning-rate scale). One seed at 5 epochs tells
differences of a point, not of a tenth: validation accuracy varies by about
0.2 points between seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

from fmnist import config, train

VARIANTS: dict[str, dict] = {
    "the preset": {},
    "no TTA": {"tta": False},
    "no Nesterov": {"nesterov": False},
    "onecycle instead of linear": {"schedule": "onecycle"},
    "no label smoothing": {"label_smoothing": 0.0},
    "EMA 0.99 (on)": {"ema": 0.99},
    "BN bias lr x64 (on)": {"bn_bias_lr_scale": 64.0},
}  # bf16 and channels-last change speed, not what is computed: benchmarks/train_step.py measures them


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cnn-fast")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", default="0")
    p.add_argument("--only", help="comma-separated variant names to run (default: all)")
    p.add_argument("--data-dir")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only.split(",") or not v}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in chosen.items():
            accs, secs = [], []
            for seed in seeds:
                cfg = config.from_dict({**change, "epochs": args.epochs, "seed": seed, "plots": False,
                                        "out_dir": tmp}, config.preset(args.preset))
                run = train.fit(cfg, test=False, data_dir=args.data_dir)
                accs.append(run.summary["best_val_accuracy"])
                secs.append(statistics.median(r["seconds"] for r in run.history))
            rows.append((name, statistics.mean(accs), statistics.median(secs)))
            print(f"  {name}: val {100 * rows[-1][1]:.2f} %, {rows[-1][2]:.1f} s per epoch", flush=True)
    base_acc, base_s = rows[0][1], rows[0][2]
    print(f"\n{args.preset}, {args.epochs} epochs, seeds {args.seeds}: best validation accuracy\n")
    print("| variant | val % | vs the preset | s per epoch | vs the preset |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, acc, s in rows:
        print(f"| {name} | {100 * acc:.2f} | {100 * (acc - base_acc):+.2f} | {s:.1f} | {s / base_s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
