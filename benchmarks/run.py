"""The race: fmnist's presets against the tutorial pipelines, and the presets' results over seeds.

    python benchmarks/run.py [--presets mlp-fast,cnn-fast,mlp-best] [--seeds 0,1,2] [--target 0.91]
                             [--tutorial-epochs 10] [--data-dir DIR] [--out benchmarks]

In one process, one after another:

1. the tutorial MLP (fmnist's default MLP, torch's default init, Adam at 1e-3)
   and the tutorial-style CNN (tutorial_baseline.TutorialCNN), each fed by a
   per-sample Dataset and a DataLoader at batch 64, as the tutorials write them;
   the CNN trains until it reaches --target validation accuracy (or
   --tutorial-epochs), the MLP for 5 epochs;
2. each preset at each seed, as `fmnist train --preset P --seed S` would
   (mlp-best learns from this benchmark's own cnn-fast run at the first seed,
   whose time is given beside it);
3. inference through `fmnist predict`'s path (Predictor: normalisation, TTA
   where the run uses it, softmax) at batch 1024 and for a single image;
4. the training step's achieved GFLOP/s of the MLP and the CNN at their
   presets' settings, beside this machine's matrix-multiply GFLOP/s.

Every clock starts before the data is wrapped for training, so each line of
time_to_accuracy.png includes its system's own start-up (not Python's import).
Validation is the 5,000 held-out training images; the test split is used once
per run, at its end, with the epoch chosen on validation. Writes
benchmarks/RESULTS.md (the part between its race markers; the rest of the
file is kept), benchmarks/results.json and benchmarks/time_to_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402
import tutorial_baseline as tut  # noqa: E402

from fmnist import config, data, devices, models, train  # noqa: E402
from fmnist.predict import Predictor  # noqa: E402


def markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


def machine() -> str:
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16" if devices.native_bf16() else "no native bf16"
    return (f"{name}, {devices.instruction_set()}, {devices.cores()} cores ({bf16}), torch {torch.__version__}, "
            "no GPU used")


def tutorial(name: str, model: torch.nn.Module, splits: data.Splits, epochs: int, target: float | None) -> dict:
    """A tutorial pipeline: per-sample Dataset, DataLoader at 64, Adam 1e-3; curve of (seconds, val acc)."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tr, va = tut.loaders(splits)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    curve = []
    for _ in range(epochs):
        tut.train_epoch(model, tr, opt)
        curve.append((time.perf_counter() - t0, tut.val_accuracy(model, va)))
        print(f"  {name}: epoch {len(curve)}  val {curve[-1][1]:.4f}  at {curve[-1][0]:.0f} s", flush=True)
        if target is not None and curve[-1][1] >= target:
            break
    return {"name": name, "curve": curve, "model": model.eval(), "macs": models.macs_per_image(model),
            "parameters": models.count_parameters(model)}


def preset_runs(name: str, seeds: list[int], out: Path, teacher: Path | None, data_dir: str | None) -> dict:
    runs_ = []
    for seed in seeds:
        cfg = config.from_dict({"seed": seed, "out_dir": str(out), "name": f"{name}-s{seed}", "plots": False},
                               config.preset(name))
        if cfg.teacher and teacher is not None:
            cfg = config.from_dict({"teacher": str(teacher)}, cfg)
        curve: list[tuple[float, float]] = []

        def record(row: dict, t0: float = time.perf_counter(), curve: list = curve) -> None:
            curve.append((time.perf_counter() - t0, row["val_acc"]))

        run = train.fit(cfg, data_dir=data_dir, echo=lambda s: None, on_epoch=record)
        s = run.summary
        print(f"  {name} seed {seed}: test {s['test_accuracy']:.4f}  val {s['best_val_accuracy']:.4f}  "
              f"wall {s['wall_seconds']:.1f} s", flush=True)
        runs_.append({"seed": seed, "dir": str(run.dir), "curve": curve,
                      **{k: s[k] for k in (
            "test_accuracy", "best_val_accuracy", "best_epoch", "epochs", "wall_seconds", "parameters",
            "macs_per_image")}})
    return {"name": name, "runs": runs_}


def inference(predict, n: int = 1024, repeats: int = 5, singles: int = 200) -> tuple[float, float]:
    """(images/s at batch n, median ms for one image) of predict((N, 28, 28) uint8 pixels)."""
    x = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    predict(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - t)
    one = x[:1]
    lat = []
    for _ in range(singles):
        t = time.perf_counter()
        predict(one)
        lat.append(time.perf_counter() - t)
    return n / statistics.median(times), 1000 * statistics.median(lat)


def bare(model: torch.nn.Module):
    """The tutorial's model used as tutorials use it: normalise, forward, softmax."""
    @torch.inference_mode()
    def predict(pixels: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(pixels).float()[:, None] / 255 - data.MEAN) / data.STD
        return F.softmax(model(x), 1).numpy()
    return predict


def step_gflops(preset: str) -> dict:
    """The training step's images/s and achieved GFLOP/s (6 x forward multiply-adds per image) at the preset's
    model, batch, precision and memory format."""
    from fmnist import runs

    cfg = runs.resolve(config.preset(preset))
    bf16 = devices.use_bf16(cfg.precision, torch.device("cpu"))
    model = models.init_weights(runs.build_model(cfg), cfg.init).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = torch.randn(cfg.batch_size, 1, 28, 28), torch.randint(0, 10, (cfg.batch_size,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rate = statistics.median(train_step.step_rate(model, x, y, opt, 10, bf16) for _ in range(3))
    macs = models.macs_per_image(model)
    return {"preset": preset, "model": cfg.model, "precision": "bf16" if bf16 else "fp32",
            "channels_last": cfg.channels_last, "batch": cfg.batch_size, "images_per_s": rate,
            "gflops": rate * macs * 6 / 1e9}


def public(res: dict) -> str:
    """results.json's text: run directories by name only (where they were trained says nothing)."""
    out = {**res, "presets": [{**pr, "runs": [{**r, "dir": Path(r["dir"]).name} for r in pr["runs"]]}
                              for pr in res["presets"]]}
    return json.dumps(out, indent=1) + "\n"


LOCAL_PATHS = ("--keep-runs", "--data-dir", "--out")  # options whose value is a folder of this machine


def recorded_argv(argv: list[str]) -> str:
    """The command line as the results record it: this machine's folders are its business, not the figures'."""
    out, hide = [], False
    for a in argv:
        name = a.split("=", 1)[0]
        if hide:
            out.append("DIR")
        elif "=" in a and name in LOCAL_PATHS:
            out.append(f"{name}=DIR")
        else:
            out.append(a)
        hide = a in LOCAL_PATHS
    return " ".join(out)


def first_at(curve: list, target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def plot(systems: list[dict], target: float, path: Path, others: list[dict] = ()) -> None:
    """The race's curves on this machine (solid; dashed: tutorial pipelines) and, faded, those of `others`
    (results.json of other machines: another instruction set), each labelled with its instruction set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = {}
    for faded, group, where in [(False, systems, "")] + [(True, o["systems"], o["machine"]) for o in others]:
        for s in group:
            t, acc = zip(*s["curve"])
            colour = colours.setdefault(s["key"], f"C{len(colours)}")
            ax.plot(t, [100 * a for a in acc], marker="o", ms=3 if not faded else 2, lw=1.5 if not faded else 1,
                    ls="--" if s["tutorial"] else "-", color=colour, alpha=0.4 if faded else 1.0,
                    label=f"{s['label']} [{s.get('isa') or where}]")
    ax.axhline(100 * target, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(84, 98 if others else 95)  # room above the curves for the longer legend
    ax.set_xlabel("wall seconds since the start of training (log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Time to accuracy, one process (dashed: tutorial pipelines; faded: another CPU)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7 if others else 8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pct(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {sd:.2f}"


def report(res: dict, target: float, block: str) -> str:
    start, end = markers(block)
    lines = [start, "", f"Measured {res['date']} with `python benchmarks/run.py {res['argv']}` on: {res['machine']}.",
             f"Matrix multiply (2048x2048) on this machine: fp32 {res['matmul']['fp32']:.0f} GFLOP/s, bf16 "
             + (f"{res['matmul']['bf16']:.0f} GFLOP/s." if res["matmul"]["bf16"] else "not native (not measured)."),
             "",
             f"### The race to {100 * target:.0f} % validation accuracy (first seed; one process)", "",
             "| system | epochs | seconds to target | best val % | seconds, all epochs |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for s in res["systems"]:
        reach = first_at(s["curve"], target)
        lines.append(f"| {s['label']} | {len(s['curve'])} | {f'{reach:.0f}' if reach else 'not reached'} | "
                     f"{100 * max(a for _, a in s['curve']):.2f} | {s['curve'][-1][0]:.0f} |")
    by = {s["key"]: first_at(s["curve"], target) for s in res["systems"]}
    for key in (k for k in by if k.startswith("cnn-")):
        if by.get("tutorial-cnn") and by[key]:
            lines += ["", f"{key} reached {100 * target:.0f} % validation accuracy "
                          f"**{by['tutorial-cnn'] / by[key]:.1f}x sooner** than the tutorial-style CNN."]
        elif by[key]:
            last = next(s for s in res["systems"] if s["key"] == "tutorial-cnn")["curve"][-1][0]
            lines += ["", f"The tutorial-style CNN did not reach {100 * target:.0f} % in its epochs: {key} was "
                          f"more than {last / by[key]:.1f}x sooner."]
    lines += ["", "### Presets: test accuracy over seeds (each chosen on validation, tested once)", "",
              "| preset | seeds | test % (mean ± std) | per seed | best val % | wall s per run | parameters | "
              "multiply-adds |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for p in res["presets"]:
        r = p["runs"]
        per_seed = ", ".join(f"{100 * x['test_accuracy']:.2f}" for x in r)
        lines.append(f"| {p['name']} | {len(r)} | {pct([x['test_accuracy'] for x in r])} | {per_seed} | "
                     f"{pct([x['best_val_accuracy'] for x in r])} | "
                     f"{min(x['wall_seconds'] for x in r):.0f}-{max(x['wall_seconds'] for x in r):.0f} | "
                     f"{r[0]['parameters']:,} | {r[0]['macs_per_image'] / 1e6:.2f}M |")
    if res.get("teacher"):
        lines += ["", f"mlp-best's teacher: {res['teacher']}."]
    lines += ["", "### Inference (as `fmnist predict` runs it: fp32, normalisation, TTA where the run uses it)", "",
              "| model | images/s at batch 1024 | one image, ms |", "| --- | ---: | ---: |"]
    for name, (rate, ms) in res["inference"].items():
        lines.append(f"| {name} | {rate:,.0f} | {ms:.2f} |")
    lines += ["", "### The training step's achieved GFLOP/s (6 x forward multiply-adds x images/s)", "",
              "| preset | model | precision | channels_last | batch | images/s | GFLOP/s | of matmul's |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for g in res["gflops"]:
        peak = res["matmul"]["bf16" if g["precision"] == "bf16" else "fp32"] or float("nan")
        lines.append(f"| {g['preset']} | {g['model']} | {g['precision']} | {g['channels_last']} | {g['batch']} | "
                     f"{g['images_per_s']:,.0f} | {g['gflops']:.0f} | {100 * g['gflops'] / peak:.0f} % |")
    lines += ["", "**GPU rows: unmeasured.** No GPU was available for these measurements; on CUDA the same "
                  "commands keep the data on the device and use bf16 autocast and channels_last.", "", end]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="mlp-fast,cnn-fast,mlp-best")
    p.add_argument("--seeds", default="0,1,2", help="seeds per preset (the first one races)")
    p.add_argument("--target", type=float, default=0.91, help="validation accuracy of the race (default 0.91)")
    p.add_argument("--tutorial-epochs", type=int, default=10, help="at most this many tutorial CNN epochs")
    p.add_argument("--tutorial-mlp-epochs", type=int, default=5, help="tutorial MLP epochs (default 5)")
    p.add_argument("--data-dir")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="where RESULTS.md etc. go")
    p.add_argument("--keep-runs", metavar="DIR", help="train the presets' runs into DIR (default: a temp dir)")
    p.add_argument("--compare", action="append", default=[], metavar="RESULTS.json",
                   help="also draw this results file's race (another machine's: its instruction set is named)")
    p.add_argument("--block", default="race", help="the name of RESULTS.md's part to write, and the suffix of "
                                                   "the figure and JSON file of any other name (default: race)")
    args = p.parse_args()
    presets = [s for s in args.presets.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",")]
    isa = devices.instruction_set()
    torch.set_num_threads(devices.cores())
    torch.set_flush_denormal(True)
    splits = data.load(args.data_dir)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "argv": recorded_argv(sys.argv[1:]), "machine": machine(),
                 # bf16 only where native: elsewhere one 2048x2048 product takes minutes (nothing runs in it)
                 "matmul": {"fp32": train_step.matmul_gflops(torch.float32),
                            "bf16": train_step.matmul_gflops(torch.bfloat16) if devices.native_bf16() else None},
                 "systems": [], "presets": [], "inference": {}, "gflops": []}
    print(res["machine"], flush=True)
    outdir = Path(args.out)
    suffix = "" if args.block == "race" else f"_{args.block}"
    partial = outdir / f"results{suffix}.json"  # rewritten after every stage: a stopped benchmark keeps its figures
    tuts = [tutorial("tutorial MLP", models.create("mlp"), splits, args.tutorial_mlp_epochs, None),
            tutorial("tutorial-style CNN", tut.TutorialCNN(), splits, args.tutorial_epochs, args.target)]
    for key, t in zip(("tutorial-mlp", "tutorial-cnn"), tuts):
        res["systems"].append({"key": key, "label": f"{t['name']} (batch 64, per-sample DataLoader)",
                               "tutorial": True, "curve": t["curve"], "isa": isa})
        res["inference"][t["name"]] = inference(bare(t["model"]))
    partial.write_text(public(res))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep_runs or tmp)
        teacher = None
        for name in presets:
            pr = preset_runs(name, seeds, out, teacher, args.data_dir)
            res["presets"].append(pr)
            first = pr["runs"][0]
            res["systems"].append({"key": name, "label": f"fmnist --preset {name}", "tutorial": False, "isa": isa,
                                   "curve": first["curve"]})
            res["inference"][f"fmnist {name}"] = inference(Predictor(first["dir"]).probabilities)
            if name == "cnn-fast":
                teacher = Path(first["dir"])
                res["teacher"] = (f"the cnn-fast run at seed {first['seed']} of this benchmark "
                                  f"(test {100 * first['test_accuracy']:.2f} %, {first['wall_seconds']:.0f} s)")
            partial.write_text(public(res))
    for name in ("mlp-fast", "cnn-fast"):
        if name in config.presets():
            res["gflops"].append(step_gflops(name))
    plot(res["systems"], args.target, outdir / f"time_to_accuracy{suffix}.png",
         [json.loads(Path(f).read_text()) for f in args.compare])
    partial.write_text(public(res))
    block = report(res, args.target, args.block)
    md = outdir / "RESULTS.md"
    start, end = markers(args.block)
    old = md.read_text() if md.exists() else "# Benchmark results\n\n" + start + end + "\n"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    md.write_text(new)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
