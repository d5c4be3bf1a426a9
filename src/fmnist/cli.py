"""`fmnist <command>`: parse arguments, call the library, print the results.

One grammar across commands: `--out-dir` is where a command writes, `--quiet`
silences progress, `--json` prints results as JSON, `--data-dir` says where the
data is. Every error a user can cause ends here as one sentence on stderr,
`fmnist: error: ...`, and exit code 2 (argparse's own errors included); Ctrl-C
says how to continue, if anything can be, and exits with 130.

Only the standard library and config.py are imported at start-up: torch and the
rest load inside main(), where an interrupt is caught too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from . import config as config_mod
from .config import INITS, TrainConfig
from .errors import ConfigError, FmnistError, Interrupted, UsageError

FIGURE_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors, in fmnist's one-sentence form
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def _print_message(self, message: str, file: Any = None) -> None:  # --help: a failed write is not ignored
        if message:
            (file or sys.stderr).write(message)


class _Version(argparse.Action):
    """--version, printed so that a failed write is an error (argparse's own action ignores it: `> /dev/full`
    exited 0)."""

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"fmnist {__version__}\n")
        sys.stdout.flush()
        parser.exit()


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def add_config_flags(p: argparse.ArgumentParser, helps: dict[str, str] | None = None) -> None:
    """One flag per TrainConfig field (`batch_size` -> `--batch-size`), plus --config/--preset."""
    g = p.add_argument_group("configuration (defaults < --preset < --config < flags)")
    g.add_argument("--preset", help=f"a shipped configuration: {', '.join(config_mod.presets())}")
    g.add_argument("--config", metavar="FILE.toml", help="a TOML file of configuration fields")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = f.metadata["kind"]
        help_ = (helps or {}).get(f.name)
        if help_ is None:
            said = [config_mod.describe(f.name)]  # the range that TrainConfig.validate checks
            if default is not None and default != "":
                said.append(f"default: {','.join(map(str, default)) if isinstance(default, list) else default}")
            said = [s for s in said if s]
            help_ = f.metadata["help"] + (f" ({'; '.join(said)})" if said else "")
        if kind == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif kind == "ints":
            g.add_argument(flag, type=_int_list, default=argparse.SUPPRESS, metavar="N,N", help=help_)
        elif f.name == "lr":  # a number, or "auto": fmnist train runs the range test first (see lr-find)
            g.add_argument(flag, type=_lr, default=argparse.SUPPRESS, metavar="LR|auto",
                           help=help_ + "; 'auto' (fmnist train): run the learning-rate range test first and use "
                                        "its suggestion (see fmnist lr-find)")
        else:
            typ = {"int": int, "float": float, "str": str}[kind]
            g.add_argument(flag, type=typ, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)


def _lr(text: str) -> float | str:
    return "auto" if text.strip().lower() == "auto" else float(text)


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields set by flags on this command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}


def config_from_args(args: argparse.Namespace, refuse: dict[str, str] | None = None) -> TrainConfig:
    """Defaults < --preset < --config < flags; a flag in `refuse` (field -> why) is an error, not ignored."""
    flags = given_fields(args)
    if isinstance(flags.get("name"), str):  # é typed as e + a combining accent is the same name as é
        flags["name"] = unicodedata.normalize("NFC", flags["name"])
    for name, value in flags.items():
        if value == "" and name not in ("name", "teacher"):  # --teacher '': no distillation, whatever a preset says
            raise ConfigError(f"--{name.replace('_', '-')} was given an empty value.")
    if flags.get("lr") == "auto":
        raise ConfigError(f"--lr auto is for fmnist train (it runs the range test first); run fmnist lr-find to "
                          f"see the suggestion, then give {args.command} that rate.")
    for flag in ("preset", "config"):
        if getattr(args, flag) == "":
            raise ConfigError(f"--{flag} was given an empty value.")
    for name, why in (refuse or {}).items():
        if name in flags:
            raise ConfigError(f"{args.command} does not take --{name.replace('_', '-')}: {why}.")
    cfg = TrainConfig()
    if args.preset is not None:
        cfg = config_mod.preset(args.preset, cfg)
    if args.config is not None:
        cfg = config_mod.load(args.config, cfg)
        cfg = dataclasses.replace(cfg, name=unicodedata.normalize("NFC", cfg.name))
    return config_mod.from_dict(flags, cfg, where="flags").validate()


def _computes_bf16(cfg: TrainConfig) -> bool:
    """Whether a run of `cfg` computes in bfloat16 on the device it will take (precision auto: where native)."""
    from . import devices

    return devices.use_bf16(cfg.precision, devices.pick_device(cfg.device))


def _precision_here() -> dict[str, str]:
    """Preset -> what a plain `fmnist train --preset NAME` computes in on this machine, for the presets whose
    precision is "auto" (bf16 autocast where the CPU or GPU computes bfloat16 natively, else fp32)."""
    return {name: "bf16" if _computes_bf16(cfg) else "fp32"
            for name in config_mod.presets() if (cfg := config_mod.preset(name)).precision == "auto"}


def _echo(args: argparse.Namespace):
    return (lambda s: None) if args.quiet or args.json else (lambda s: print(s, flush=True))


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and not getattr(args, "json", False) and sys.stderr.isatty()


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    from . import train

    found = None  # the range test's result, with --lr auto
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: give the number of processes to train on, 1 or more.")
    if args.nproc is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError("--nproc starts its own processes, so it is not given under torchrun (whose "
                          "--nproc-per-node says how many): leave one of them out.")
    if args.resume:
        given = [k for k in given_fields(args) if k != "data_dir"]
        if given or args.config or args.preset:
            flag = f"--{given[0].replace('_', '-')}" if given else "--config" if args.config else "--preset"
            raise ConfigError(f"--resume continues a run with its saved configuration, so {flag} cannot be "
                              "changed; only --data-dir may say where the data is now.")
        cfg = TrainConfig()
    else:
        auto = getattr(args, "lr", None) == "auto"
        if auto:
            if os.environ.get("WORLD_SIZE", "1") != "1":
                raise ConfigError("--lr auto is not run under torchrun (each rank would sweep alone): run fmnist "
                                  "lr-find first and give its rate with --lr.")
            del args.lr
        cfg = config_from_args(args)
        if auto and args.nproc not in (None, 1):
            raise ConfigError("--lr auto is not run on several processes (each would sweep alone): run fmnist "
                              "lr-find first and give its rate with --lr.")
        found = _find_lr(cfg, _echo(args)) if auto else None
        if found is not None:
            cfg = dataclasses.replace(cfg, lr=found.suggested_lr).validate()
    if args.nproc not in (None, 1):  # the flags are good: the workers run this command without --nproc
        from . import distributed

        return distributed.launch(args.nproc, _without_nproc(args.argv))
    run = train.fit(cfg, resume=args.resume, progress=_progress(args), echo=_echo(args),
                    command=" ".join(["fmnist"] + sys.argv[1:]), data_dir=getattr(args, "data_dir", None))
    if not args.resume and found is not None:
        _keep_lr_find(run, found)
    s = run.summary
    report = run.dir / "report.html"
    if _torchrun_rank() != 0:  # under torchrun: one voice, rank 0's
        return 0
    if args.json:
        _print_json({"run": str(run.dir), **({"report": str(report)} if report.is_file() else {}), **s})
        return 0
    print(f"test accuracy {s['test_accuracy']:.4f} (best val {s['best_val_accuracy']:.4f} at epoch "
          f"{s['best_epoch']}), {s['wall_seconds']:.1f}s, {s['train_samples_per_second']} images/s on {s['device']}")
    if "tta_val_gain" in s:  # whether predict and serve average the test-time views, and why
        gain = f"{100 * s['tta_val_gain']:+.2f} points of validation accuracy"
        print(f"answers average the {s['inference_views']} views ({gain})" if s.get("inference_tta") else
              f"answers without the test-time views ({gain}): {s['test_accuracy_inference']:.4f} on the test set")
    if "photo_views_val_gain" in s:  # whether a photo's input is answered with its own views, and why
        gain = f"{100 * s['photo_views_val_gain']:+.2f} points on validation images reframed as photos"
        print(f"photos are answered with {s['photo_views']} views ({gain})" if s.get("photo_views") else
              f"photos are answered as any other image (six views: {gain})")
    print(f"run: {run.dir}")
    if report.is_file():
        print(f"report: {report}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The train command line `argv` less its --nproc N (or --nproc=N, or an abbreviation argparse took)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--":
            return out + argv[i:]
        elif len(a.split("=")[0]) > 3 and "--nproc".startswith(a.split("=")[0]):
            skip = "=" not in a
        else:
            out.append(a)
    return out


def _find_lr(cfg: TrainConfig, echo, sweep: tuple[float, float, int] | None = None) -> Any:
    """The range test of `cfg` on its training split (lr_find.sweep; `sweep`: its start, end and batches),
    with its figures said through `echo`."""
    from . import data, devices, lr_find

    splits = data.load(cfg.data_dir or None, cfg.val_size, cfg.split_seed)
    device = devices.pick_device(cfg.device)
    with devices.cpu_share(cfg.threads):
        try:
            found = lr_find.sweep(cfg, splits, device, *(sweep or ()), echo=echo)
        except ValueError as e:
            raise ConfigError(f"the learning-rate range test found no rate: {e} (the loss was not finite almost "
                              "at once; try a smaller --lr-start).") from None
    echo(f"learning-rate range test: the smoothed loss is lowest at {found.lowest_lr:.3g}; suggested "
         f"{found.suggested_lr:.3g} ({len(found.lrs)} batches, {found.stopped})")
    return found


def _keep_lr_find(run: Any, found: Any) -> None:
    """The range test that chose a run's rate, in its summary.json ("lr_find") and plots/lr_find.png."""
    from . import plots, runs

    run.summary["lr_find"] = {"suggested_lr": found.suggested_lr, "lowest_lr": found.lowest_lr,
                              "batches": len(found.lrs), "stopped": found.stopped}
    runs.write_summary(run.dir, run.summary)
    plots.lr_find(found.lrs, found.losses, found.smoothed, found.suggested_lr, found.lowest_lr,
                  run.dir / "plots" / "lr_find.png", title=f"Learning-rate range test of run {run.dir.name}")


def cmd_lr_find(args: argparse.Namespace) -> int:
    from . import plots

    if not (0 < args.lr_start < args.lr_end) or not math.isfinite(args.lr_end):
        raise ConfigError(f"--lr-start {args.lr_start} and --lr-end {args.lr_end}: need 0 < start < end, both "
                          "finite.")
    if args.steps < 5:
        raise ConfigError(f"--steps {args.steps}: the sweep needs at least 5 batches.")
    if args.plot and Path(args.plot).suffix.lower() not in FIGURE_FORMATS:
        raise ConfigError(f"--plot {args.plot}: the file name must end in one of {', '.join(FIGURE_FORMATS)}.")
    cfg = config_from_args(args, refuse={"epochs": "the sweep's length is --steps"})
    found = _find_lr(cfg, (lambda s: None) if args.quiet or args.json else (lambda s: print(s, flush=True)),
                     (args.lr_start, args.lr_end, args.steps))
    path = None
    if args.plot:
        path = plots.lr_find(found.lrs, found.losses, found.smoothed, found.suggested_lr, found.lowest_lr,
                             Path(args.plot), title=f"Learning-rate range test: {cfg.model}, {cfg.optimizer}, "
                                                     f"batch {cfg.batch_size}")
    if args.json:
        _print_json({"suggested_lr": found.suggested_lr, "lowest_lr": found.lowest_lr, "configured_lr": cfg.lr,
                     "batches": len(found.lrs), "stopped": found.stopped,
                     **({"plot": str(path)} if path else {}),
                     "lrs": found.lrs, "losses": found.losses, "smoothed": found.smoothed})
        return 0
    print(f"suggested learning rate {found.suggested_lr:.3g} (a tenth of {found.lowest_lr:.3g}, where the "
          f"smoothed loss is lowest); this configuration's is {cfg.lr:.3g}")
    if path:
        print(f"plot: {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import calibrate, data, evaluate

    r = evaluate.evaluate_run(args.run, args.split, args.data_dir, args.device)
    if args.json:
        _print_json(r)
        return 0
    print(f"{r['checkpoint']}  split {r['split']} ({r['images']} images)")
    print(f"accuracy {r['accuracy']:.4f}   loss {r['loss']:.4f}")
    if r["calibrated"]:
        print(f"calibration: temperature {r['temperature']:.3f} (fitted on the validation split); expected "
              f"calibration error (15 bins) {100 * r['ece']:.2f}% before, {100 * r['ece_calibrated']:.2f}% after")
        print(f"unsure: {100 * r['unsure']:.1f}% of these images (out-of-distribution score {r['ood_method']}, "
              f"threshold {r['ood_threshold']:.4g}, chosen to keep {calibrate.VAL_KEPT:.0%} of the validation images)")
    else:
        print(f"calibration: none (a run trained before fmnist calibrated): temperature 1, expected calibration "
              f"error (15 bins) {100 * r['ece']:.2f}%; never marked unsure (train again to calibrate)")
    print(f"\n{'per class':<14} {'precision':>9} {'recall':>8} {'F1':>8} {'images':>7}   "
          "(recall: the accuracy on the class)")
    for name, f in r["per_class"].items():
        print(f"  {name:<12} {f['precision']:>9.4f} {f['recall']:>8.4f} {f['f1']:>8.4f} {f['support']:>7}")
    m = r["macro"]
    print(f"  {'mean':<12} {m['precision']:>9.4f} {m['recall']:>8.4f} {m['f1']:>8.4f}")
    if r["most_confused"]:
        print("\nmost confused (true class -> predicted)")
        for pair in r["most_confused"]:
            print(f"  {pair['true'] + ' -> ' + pair['predicted']:<28} {pair['count']:>5}  "
                  f"({100 * pair['share_of_true']:.1f}% of {pair['true']})")
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    short = [c.split("/")[0][:7] for c in data.CLASSES]
    print(" " * 12 + "".join(f"{s:>8}" for s in short))
    for name, row in zip(data.CLASSES, r["confusion_matrix"]):
        print(f"{name:<12}" + "".join(f"{v:>8}" for v in row))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import numpy as np

    from . import data, runs

    if args.mirror is not None and not args.download:
        raise ConfigError("--mirror says where to download from; add --download (nothing else uses it).")
    if args.samples is not None and Path(args.samples).suffix.lower() not in FIGURE_FORMATS:
        raise ConfigError(f"--samples {args.samples}: the file name must end in one of {', '.join(FIGURE_FORMATS)}.")
    downloaded = None
    if args.download:
        mirror = args.mirror or os.environ.get("FMNIST_MIRROR") or data.OFFICIAL_URL
        downloaded = data.download(args.data_dir, base_url=mirror, progress=_progress(args))
    directory = data.locate(args.data_dir)
    checks = data.verify(directory)
    splits = {s: data.load_split(directory, s) for s in ("train", "test")}
    counts = {s: np.bincount(y, minlength=10) for s, (_, y) in splits.items()}
    x = splits["train"][0].astype(np.float64) / 255.0
    bad = [k for k, ok in checks.items() if not ok]
    samples = None
    if args.samples:
        from . import plots

        samples = plots.samples(*splits["train"], runs.overwritable(Path(args.samples), runs.made_by_fmnist))
    if args.json:
        _print_json({"directory": str(directory.resolve()), "downloaded": downloaded is not None,
                     "verified": checks, "counts": {s: c.tolist() for s, c in counts.items()},
                     "classes": list(data.CLASSES), "train_pixel_mean": x.mean(), "train_pixel_std": x.std(),
                     "samples": str(samples) if samples else None})
        return 0 if not bad else 1
    if downloaded is not None:
        print(f"downloaded and verified: {downloaded}")
    print(f"data:      {directory.resolve()}")
    print("verified:  " + ("yes (SHA-256 of all four files)" if not bad
                           else f"NO: {', '.join(bad)} differ from the real files"))
    print(f"\n{'class':<14}{'train':>8}{'test':>8}")
    for i, name in enumerate(data.CLASSES):
        print(f"{i} {name:<12}{counts['train'][i]:>8}{counts['test'][i]:>8}")
    print(f"{'total':<14}{counts['train'].sum():>8}{counts['test'].sum():>8}")
    print(f"\ntrain pixels in [0, 1]: mean {x.mean():.4f}  std {x.std():.4f}")
    if samples:
        print(f"samples:   {samples}")
    return 0 if not bad else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from . import report

    paths = report.draw(args.run, args.data_dir, args.device)
    if args.json:
        _print_json([str(p) for p in paths])
        return 0
    for p in paths:
        print(p)
    return 0


def cmd_compare_init(args: argparse.Namespace) -> int:
    from . import compare

    inits = compare.parse_inits(args.inits)
    cfg = config_from_args(args, refuse={
        "init": "it trains every init of --inits", "name": "its runs are named <init>-s<seed>",
        "plots": "its runs draw no figures; init_comparison.png compares them"})
    out = getattr(args, "out_dir", None) or "compare-init"
    results = compare.compare_init(cfg, inits, args.seeds, out, echo=_echo(args), progress=_progress(args))
    if args.json:
        _print_json({"results": str(Path(out) / "results.json"), **results})
        return 0
    print(compare.table(results))
    print(f"results: {Path(out) / 'results.json'}, {Path(out) / 'init_comparison.png'}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tune

    cfg = config_from_args(args, refuse={
        "name": "trials are named <study>-trial_<n>", "plots": "trials draw no figures",
        "tensorboard": "trials log nothing to TensorBoard"})
    out = getattr(args, "out_dir", None) or "tune"
    result = tune.tune(cfg, out, trials=args.trials, timeout=args.timeout, study_name=args.study,
                       storage=args.storage, space_file=args.space, pruner=args.pruner, heartbeat=args.heartbeat,
                       verbose=args.verbose, progress=_progress(args))
    study = result.study
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    counts = {s: states.count(s) for s in ("complete", "pruned", "fail", "running", "waiting") if s in states}
    best = study.best_trial if result.best_toml is not None else None
    failures = {t.number: t.user_attrs["error"] for t in study.get_trials(deepcopy=False) if "error" in t.user_attrs}
    if args.json:
        _print_json({"study": study.study_name, "trials": len(states), "states": counts, "failures": failures,
                     "reaped": result.reaped, "best_trial": best.number if best else None,
                     "best_value": best.value if best else None, "best_params": best.params if best else None,
                     "config": str(result.best_toml) if best else None, "figures": [str(f) for f in result.figures]})
        return 0
    print(f"study '{study.study_name}': {len(states)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    if result.reaped:
        print(f"marked failed (their worker had died) and queued again: trials {', '.join(map(str, result.reaped))}")
    for number, why in list(failures.items())[-5:]:
        print(f"trial {number} failed: {why}")
    if best is None:
        print("no trial has completed yet")
        return 0
    print(f"best: trial {best.number}, validation accuracy {best.value:.4f}")
    for k, v in best.params.items():
        print(f"  {k:<16} {v:.4g}" if isinstance(v, float) else f"  {k:<16} {v}")
    print(f"config: {result.best_toml}  (fmnist train --config {result.best_toml})")
    for f in result.figures:
        print(f"figure: {f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from . import predict

    if args.paths.count("-") > 1:
        raise ConfigError("'-' (standard input) can be given once: it holds one image.")
    predictor = predict.Predictor(args.model, device=args.device, batch_size=args.batch_size)
    inputs, skipped = predict.find_images(args.paths)
    if not inputs:
        raise predict.PredictError(f"no image files in {', '.join(args.paths)} (looked for "
                                   f"{', '.join(predict.IMAGE_SUFFIXES)}).")
    width = min(max(len(s) for s in inputs), 60)
    if not args.json:
        print(f"{'file':<{width}}  {'class':<12} {'prob':>6}  runners-up")
    done = failed = 0
    for rec in predictor.iter_predict(inputs, args.top_k, args.preprocess, args.save_inputs):
        failed += "error" in rec
        done += "error" not in rec
        if args.json:  # valid UTF-8 JSON; plain ASCII escapes where the output takes no UTF-8
            print(json.dumps(rec, ensure_ascii=not _utf8(sys.stdout)))
            continue
        name = rec["file"]  # in full, however long: a table row must name its file
        if "error" in rec:
            print(f"{name:<{width}}  error: {rec['error']}")
            continue
        if rec.get("unsure"):  # no confident class for what the model does not know
            print(f"{name:<{width}}  {'unsure':<12} {'':>6}  does not look like a Fashion-MNIST product "
                  f"(its guess: {rec['label']} {rec['probability']:.2f})")
            continue
        others = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in rec["top"][1:])
        print(f"{name:<{width}}  {rec['label']:<12} {rec['probability']:>6.3f}  {others}")
    if not args.quiet:
        where = f"; 28x28 inputs in {args.save_inputs}" if args.save_inputs and done else ""
        passed = f"; passed over {skipped} files not named as images" if skipped else ""
        print(f"fmnist: classified {done} of {done + failed} files with {predictor.backend}"
              f"{f', {failed} could not be read' if failed else ''}{passed}{where}", file=sys.stderr)
    return 0 if not failed else 1 if done else 2


def cmd_explain(args: argparse.Namespace) -> int:
    from . import explain, predict

    if args.paths.count("-") > 1:
        raise ConfigError("'-' (standard input) can be given once: it holds one image.")
    explainer = explain.predictor(args.model, device=args.device)
    explain.parse_target(args.target, explainer.classes)  # a bad --target is said before any image is read
    inputs, skipped = predict.find_images(args.paths)
    if not inputs:
        raise predict.PredictError(f"no image files in {', '.join(args.paths)} (looked for "
                                   f"{', '.join(predict.IMAGE_SUFFIXES)}).")
    out_dir = None
    if args.out is not None or not args.json:  # with --json, figures only where --out asks for them
        from . import files, plots

        out_dir = files.claim_output_dir(args.out or "explanations", "explain")
    width = min(max(len(s) for s in inputs), 60)
    if not args.json:
        print(f"{'file':<{width}}  {'class':<12} {'prob':>6}  explained")
    done = failed = 0
    for i, rec in enumerate(explain.iter_explain(explainer, inputs, args.method, args.target, args.preprocess)):
        failed += "error" in rec
        done += "error" not in rec
        if "error" not in rec and out_dir is not None:
            title = f"{rec['class']} {rec['probability']:.2f}"
            if rec["target"] != rec["class"]:
                title += f"; explained: {rec['target']} {rec['target_probability']:.2f}"
            rec["figure"] = str(plots.explanation(rec["pixels"], rec["attribution"], title,
                                                  predict.output_path(out_dir, i, inputs[i], len(inputs)),
                                                  args.method))
        rec.pop("pixels", None)
        if args.json:
            print(json.dumps(rec, ensure_ascii=not _utf8(sys.stdout)))
        elif "error" in rec:
            print(f"{rec['file']:<{width}}  error: {rec['error']}")
        else:
            print(f"{rec['file']:<{width}}  {rec['class']:<12} {rec['probability']:>6.3f}  {rec['target']} "
                  f"({rec['method']}): {rec['figure']}")
    if not args.quiet:
        where = f"; figures in {out_dir}" if out_dir is not None and done else ""
        passed = f"; passed over {skipped} files not named as images" if skipped else ""
        print(f"fmnist: explained {done} of {done + failed} files with {args.method}"
              f"{f', {failed} could not be read' if failed else ''}{passed}{where}", file=sys.stderr)
    return 0 if not failed else 1 if done else 2


def _utf8(stream: Any) -> bool:
    return (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "") == "utf8"


def cmd_export(args: argparse.Namespace) -> int:
    from . import export

    r = export.export(args.run, args.format, args.data_dir)
    if args.json:
        _print_json(r)
        return 0
    c = r["check"]
    print(f"wrote {r['path']} ({r['bytes'] / 1024:.0f} KiB, {r['format']})")
    print(f"checked on {c['images']:,} test images: largest difference in probability from PyTorch "
          f"{c['max_difference']:.1e}, top class the same on {c['argmax_agree']:,} of {c['images']:,}")
    print(f"use it: fmnist predict {r['path']} IMAGE...")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from . import serve
    except ImportError as e:
        raise ConfigError(f"fmnist serve needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'fmnist[serve]'.") from None
    key = args.api_key or os.environ.get("FMNIST_API_KEY", "")
    where = "--api-key" if args.api_key else "FMNIST_API_KEY"
    policy = serve.Policy(api_keys=(serve.check_key(key, where),) if key else (),
                          api_key_file=Path(args.api_key_file) if args.api_key_file else None,
                          cors_origins=tuple(args.cors_origin), allowed_hosts=tuple(args.allowed_host),
                          **{k: v for k, v in (("rate_limit", args.rate_limit), ("max_files", args.max_files),
                                               ("header_timeout", args.header_timeout)) if v is not None})
    serve.serve(args.run, args.host, args.port, max_body=serve.body_limit(args.max_body_mb), device=args.device,
                policy=policy, insecure_no_key=args.insecure_no_key, quiet=args.quiet, log_format=args.log_format,
                workers=args.workers, ready=lambda line: print(f"fmnist: {line}", flush=True))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from . import audit

    if args.preset == "":
        raise ConfigError("--preset was given an empty value.")
    if args.show < 0:
        raise ConfigError(f"--show {args.show}: the number of label issues to list cannot be negative.")
    result, paths = audit.run(args.data_dir, args.preset, args.folds, args.out_dir, args.seed, args.flip,
                              device=args.device, threads=args.threads, progress=_progress(args), echo=_echo(args))
    if args.json:
        _print_json({"files": {k: str(v) for k, v in paths.items()}, **result.to_dict()})
        return 0
    c = result.counts
    flagged, images = c["flagged"], c["images"]
    print(f"label issues ({result.settings['folds']} folds of {args.preset}, out-of-fold accuracy "
          f"{100 * c['out_of_fold_accuracy']:.2f} %): {flagged['train']:,} of {images['train']:,} training images, "
          f"{flagged['test']:,} of {images['test']:,} test images")
    if result.issues:
        print(f"\n{'split':<6}{'index':>7}  {'given':<12} {'suggested':<12} {'confidence':>10}")
        for r in result.issues[:args.show]:
            print(f"{r['split']:<6}{r['index']:>7}  {r['given']:<12} {r['suggested']:<12} "
                  f"{100 * r['confidence']:>9.1f}%")
        if len(result.issues) > args.show:
            print(f"... and {len(result.issues) - args.show:,} more in {paths['json']}")
    pairs = c["near_duplicate_pairs"]
    print(f"\nduplicates: {c['exact_duplicate_groups']} groups of byte-equal images; near duplicates (similarity "
          f">= {audit.NEAR}): {pairs['within train']} pairs within train, {pairs['within test']} within test, "
          f"{pairs['across']} across train and test; {c['near_duplicate_pairs_disagreeing']} of them disagree on "
          "the label")
    for d in [d for d in result.duplicates if not d["labels_agree"]][:args.show]:
        a, b = d["images"][:2]
        print(f"  {a['split']} {a['index']} ({a['label']})  ~  {b['split']} {b['index']} ({b['label']})  "
              f"similarity {d['similarity']:.4f}")
    if result.flip is not None:
        f = result.flip
        print(f"\nflipped {f['flipped']:,} training labels ({100 * f['fraction']:g} %): {f['found']:,} of them "
              f"flagged, recall {100 * f['recall']:.1f} %; precision {100 * f['precision']:.1f} % "
              f"({f['found']:,} of the {f['flagged_train']:,} training images flagged)")
    print(f"\n{result.seconds:.0f} s; results: {paths['json']}; figures: "
          + ", ".join(str(paths[k]) for k in ("label_issues", "label_issues_test", "duplicates_across")))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from . import models

    rows = []
    for name in models.names():
        with torch.device("meta"):  # shapes only
            m = models.create(name)
        rows.append({"model": name, "parameters": models.count_parameters(m),
                     "macs_per_image": models.macs_per_image(m), "defaults": models.defaults(name),
                     "track_neurons": models.default_track(name)})
    from . import devices

    precision = _precision_here()
    if args.json:
        _print_json({"models": rows, "presets": config_mod.presets(), "precision": precision,
                     "instruction_set": devices.instruction_set(), "native_bf16": devices.native_bf16()})
        return 0
    for r in rows:
        settings = ", ".join(f"{k}={(','.join(map(str, v)) or 'none') if isinstance(v, (list, tuple)) else v}"
                             for k, v in r["defaults"].items())
        print(f"{r['model']:<6} {r['parameters']:>9,} parameters {r['macs_per_image'] / 1e6:>6.2f}M multiply-adds"
              f"/image  {settings}; "
              f"tracks neuron {','.join(map(str, r['track_neurons']))}")
    print("presets: " + ", ".join(config_mod.presets()))
    native = "computes bfloat16 natively" if devices.native_bf16() else "has no native bfloat16"
    for which in ("bf16", "fp32"):
        names = [name for name, p in precision.items() if p == which]
        if names:
            words = "bf16 autocast" if which == "bf16" else "fp32"
            print(f"{', '.join(names)} on this machine ({devices.instruction_set()}, {native}): train in {words}")
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fmnist", description="Train, understand, tune and evaluate Fashion-MNIST classifiers.",
                allow_abbrev=False)
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)  # `--epoch` is not `--epochs`
    saved_data_help = "directory with the four IDX files (default: $FMNIST_DATA, else where the run found them)"
    device_help = "auto, cpu, cuda or mps (default: auto)"

    def common(c: argparse.ArgumentParser, quiet: bool = True) -> None:
        if quiet:
            c.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
        c.add_argument("--json", action="store_true", help="print the results as JSON")

    t = sub.add_parser("train", help="train a model into runs/<name>/")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last.pt "
                                                       "(with --data-dir if its data has moved)")
    t.add_argument("--nproc", type=int, metavar="N", help="train on N processes of this machine (DDP: gloo on "
                                                          "CPUs, NCCL on GPUs), started by torch's launcher")
    common(t)
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    lf = sub.add_parser("lr-find", help="the learning-rate range test: which rate to train at")
    lf.add_argument("--lr-start", type=float, default=1e-6, help="the sweep's first rate (default: %(default)g)")
    lf.add_argument("--lr-end", type=float, default=10.0, help="its last rate (default: %(default)g)")
    lf.add_argument("--steps", type=int, default=100, help="batches in the sweep (default: %(default)s)")
    lf.add_argument("--plot", default="lr_find.png", help="where to draw the curve ('' for none; default: "
                                                          "%(default)s)")
    common(lf)
    add_config_flags(lf)
    lf.set_defaults(func=cmd_lr_find)

    e = sub.add_parser("evaluate", help="accuracy, loss, calibration, per-class precision, recall and F1, the "
                                        "most-confused pairs and the confusion matrix of a model")
    e.add_argument("run", metavar="RUN_DIR|CHECKPOINT", help="a run directory (its best.pt is used) or a .pt file")
    e.add_argument("--split", choices=("test", "val"), default="test", help="which split (default: test)")
    e.add_argument("--data-dir", help=saved_data_help)
    e.add_argument("--device", default="auto", choices=config_mod.DEVICES, help=device_help)
    common(e, quiet=False)
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("data", help="where the data is, whether it verifies, class counts, pixel statistics")
    d.add_argument("--data-dir",
                   help="directory with the IDX files (default: search); with --download, where to put them")
    d.add_argument("--download", action="store_true", help="fetch the four files into the user cache (or --data-dir)")
    d.add_argument("--mirror",
                   help="base URL to download from (default: the official location, or $FMNIST_MIRROR)")
    d.add_argument("--samples", metavar="FILE.png", help="also write a grid of training images, a row per class")
    common(d)
    d.set_defaults(func=cmd_data)

    pl = sub.add_parser("plot", help="(re)draw the figures and report.html of a finished run")
    pl.add_argument("run", metavar="RUN_DIR", help="the run directory to draw")
    pl.add_argument("--data-dir", help=saved_data_help)
    pl.add_argument("--device", default="auto", choices=config_mod.DEVICES, help=device_help)
    common(pl, quiet=False)
    pl.set_defaults(func=cmd_plot)

    c = sub.add_parser("compare-init", help="train every init x seed and compare them on validation")
    c.add_argument("--inits", default="xavier,normal,kaiming,default",
                   help=f"comma-separated, from {', '.join(INITS)} (default: %(default)s)")
    c.add_argument("--seeds", type=int, default=3, help="seeds per init, counting up from --seed (default: 3)")
    common(c)
    add_config_flags(c, {"out_dir": "output directory: a run per init and seed, results.json, "
                                    "init_comparison.png (default: compare-init)"})
    c.set_defaults(func=cmd_compare_init)

    u = sub.add_parser("tune", help="search hyperparameters with Optuna (validation accuracy)")
    u.add_argument("--trials", type=int, default=20, help="trials for this worker to run (default: 20)")
    u.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    u.add_argument("--study", default="fmnist", help="study name (default: %(default)s)")
    u.add_argument("--storage", help="an RDB URL (postgresql://..., sqlite:///...) or a journal file path "
                                     "(default: <out-dir>/study.journal)")
    u.add_argument("--space", metavar="FILE.toml", help="search-space entries replacing the defaults")
    u.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"),
                   help="stop poor trials early by this rule (default: median)")
    u.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between a worker's heartbeats on an RDB storage (default: 10)")
    u.add_argument("--verbose", action="store_true", help="Optuna's own log messages")
    common(u)
    add_config_flags(u, {"out_dir": "output directory: trials/, study.journal, best.toml, figures (default: tune)",
                         "epochs": "epochs of each trial (default: 20, as a real run)"})
    u.set_defaults(func=cmd_tune)

    pr = sub.add_parser("predict", help="classify image files with a trained or exported model")
    pr.add_argument("model", metavar="MODEL", help="a run directory (its best.pt), a .pt checkpoint, "
                                                  "or a model.onnx / model.torchscript from fmnist export")
    pr.add_argument("paths", metavar="PATH", nargs="+", help="image files (PNG, JPEG, WebP, BMP, TIFF, GIF), "
                                                            "directories (searched recursively), or - for stdin")
    pr.add_argument("--top-k", type=int, default=3, help="classes to list per image (default: %(default)s)")
    pr.add_argument("--preprocess", choices=("auto", "photo", "dataset"), default="auto",
                    help="photo: find the product on its background (paper, uneven light, a shadow, a dark "
                         "table), then the dataset paper's pipeline; dataset: a small light-on-dark image, only "
                         "resized; auto: decide per image (default)")
    pr.add_argument("--save-inputs", metavar="DIR", help="write the 28x28 image each file became into DIR")
    pr.add_argument("--batch-size", type=int, default=256, help="images per model call (default: %(default)s)")
    pr.add_argument("--device", default="auto", choices=config_mod.DEVICES, help=device_help + "; a .pt only")
    common(pr)
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("explain", help="why the model answered: which pixels pushed it towards its class")
    ex.add_argument("model", metavar="MODEL", help="a run directory (its best.pt) or a .pt checkpoint (an exported "
                                                  "model keeps no gradients to explain)")
    ex.add_argument("paths", metavar="IMAGE", nargs="+", help="image files, directories (searched recursively), "
                                                             "or - for stdin, as fmnist predict takes them")
    ex.add_argument("--method", choices=("ig", "saliency", "occlusion"), default="ig",
                    help="ig: integrated gradients from a black (no product) baseline; saliency: the gradient's "
                         "size; occlusion: the logit's fall under a 4x4 black patch (default: %(default)s)")
    ex.add_argument("--target", metavar="CLASS", help="explain this class (a name such as Sneaker, or an index "
                                                      "0-9) instead of the predicted one")
    ex.add_argument("--out-dir", dest="out", metavar="DIR", help="write a figure per image here (default: "
                    "explanations; with --json, figures only when --out-dir is given)")
    ex.add_argument("--preprocess", choices=("auto", "photo", "dataset"), default="auto",
                    help="as fmnist predict --preprocess (default: %(default)s)")
    ex.add_argument("--device", default="auto", choices=config_mod.DEVICES, help=device_help)
    common(ex)
    ex.set_defaults(func=cmd_explain)

    x = sub.add_parser("export", help="write RUN_DIR/model.onnx (or TorchScript), checked against PyTorch")
    x.add_argument("run", metavar="RUN_DIR", help="the run directory to export (its best.pt)")
    x.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="(default: %(default)s)")
    x.add_argument("--data-dir", help=saved_data_help + "; test images check the export")
    common(x, quiet=False)
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="a web page and an HTTP API for a trained run (pip install 'fmnist[serve]')")
    s.add_argument("run", metavar="RUN_DIR", help="the run directory to serve (its best.pt), or a model.onnx "
                   "written by fmnist export (served with onnxruntime, without PyTorch; no neurons or curves)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                                                       "only; 0.0.0.0 for every network)")
    s.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any free port)")
    s.add_argument("--max-body-mb", type=float, default=10.0,
                   help="refuse request bodies larger than this with 413 (default: %(default)s MiB)")
    s.add_argument("--device", default="cpu", choices=config_mod.DEVICES, help="auto, cpu, cuda or mps "
                                                                               "(default: cpu)")
    s.add_argument("--quiet", action="store_true", help="no log line per request")
    s.add_argument("--workers", type=int, default=1, help="processes serving the port, each with its share of "
                   "the cores (default: %(default)s); SIGTERM stops them once the requests in flight are answered")
    s.add_argument("--log-format", choices=("text", "json"), default="text", help="text: uvicorn's access log; json: "
                   "one JSON object per request on stderr (method, route, path, status, duration_ms, client), even "
                   "with --quiet (default: %(default)s)")
    s.add_argument("--api-key", metavar="KEY", help="require this key on every API route (as 'Authorization: "
                   "Bearer KEY' or 'X-API-Key: KEY'); other users of this machine can read a command line, so "
                   "prefer the environment variable FMNIST_API_KEY or --api-key-file")
    s.add_argument("--api-key-file", metavar="FILE", help="keys, one a line, any of which opens the API; re-read "
                   "when the file changes, so keys rotate without a restart")
    s.add_argument("--insecure-no-key", action="store_true", help="listen beyond this machine (--host 0.0.0.0) "
                   "without a key: anyone who can reach the port may use the model")
    s.add_argument("--cors-origin", metavar="ORIGIN", action="append", default=[], help="a web origin whose pages "
                   "may call the API, such as https://example.org (repeatable; default: none)")
    s.add_argument("--allowed-host", metavar="NAME", action="append", default=[], help="a Host name clients may "
                   "use besides loopback's and the bound address, such as the name of a reverse proxy (repeatable)")
    s.add_argument("--rate-limit", help="requests per client address, every route but "
                   "/health; beyond it, 429 with Retry-After (default: 300/minute)")
    s.add_argument("--max-files", type=int, help="images per POST /predict (default: 16)")
    s.add_argument("--header-timeout", type=float, metavar="SECONDS", help="close a connection that has not sent "
                   "a request's line and headers within this time (default: 10)")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("audit", help="the data's own mistakes: likely label errors (confident learning on "
                                     "out-of-fold probabilities) and duplicate images, in both files")
    a.add_argument("--data-dir", help="directory with the four IDX files (default: search)")
    a.add_argument("--folds", type=int, default=5, help="models trained, each judging the images it left out "
                                                        "(default: %(default)s)")
    a.add_argument("--preset", default="mlp-fast", help=f"what each fold trains: {', '.join(config_mod.presets())} "
                                                        "(default: %(default)s)")
    a.add_argument("--out-dir", default="audit", help="where audit.json, out_of_fold.npz and the figures "
                                                               "go (default: %(default)s)")
    a.add_argument("--seed", type=int, default=0, help="seed of the folds, the models and the flips "
                                                       "(default: %(default)s)")
    a.add_argument("--flip", type=float, default=0.0, help="measure the detector: flip this fraction of a copy of "
                   "the training labels (0.01: 1 %%) and report how many it finds (default: 0, off)")
    a.add_argument("--show", type=int, default=20, help="label issues listed in the table (default: %(default)s)")
    a.add_argument("--threads", type=int, default=0, help="CPU threads (default: 0, this machine's share)")
    a.add_argument("--device", default="auto", choices=config_mod.DEVICES, help=device_help)
    common(a)
    a.set_defaults(func=cmd_audit)

    m = sub.add_parser("models", help="list the registered models, their defaults and the shipped presets")
    common(m, quiet=False)
    m.set_defaults(func=cmd_models)
    return p


def _interrupted(command: str | None, exc: BaseException) -> str:
    """What to say after Ctrl-C: how to continue, where anything can be continued."""
    if command in ("compare-init", "tune"):  # their runs are continued by the command, not by `train --resume`
        return f"fmnist: interrupted; run the same command again to continue the {command} where it stopped"
    if not isinstance(exc, Interrupted):
        return "fmnist: interrupted"
    if exc.drawing:
        return ("fmnist: interrupted while drawing the figures; the run is complete: draw them with "
                f"fmnist plot {exc.run_dir}")
    if exc.resumable:
        return f"fmnist: interrupted; continue with: fmnist train --resume {exc.run_dir}"
    return "fmnist: interrupted before the first epoch ended; nothing was kept, run the same command again"


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C waits until the block ends, then raises KeyboardInterrupt.

    Imports are not safe to interrupt: a KeyboardInterrupt inside numpy's or
    torch's import can be swallowed and leave a half-imported module that fails
    later with an unrelated traceback (seen here with numpy at 0.5 s).
    """
    hit: list[int] = []
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # whoever started us asked for Ctrl-C to be ignored
        yield
        return
    try:
        old = signal.signal(signal.SIGINT, lambda sig, frame: hit.append(sig))
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt


def _preload(args: argparse.Namespace) -> None:
    """Import what the command will need, all at once, while Ctrl-C waits."""
    import numpy  # noqa: F401

    if args.command == "predict":
        from . import predict  # noqa: F401 (numpy and Pillow: an exported model needs no torch)

        if Path(args.model).suffix == ".onnx":
            return
    if args.command == "serve" and Path(args.run).suffix == ".onnx":  # onnxruntime serves it: no torch
        with contextlib.suppress(ImportError):  # cmd_serve says what is missing
            from . import serve  # noqa: F401
        return
    import torch  # noqa: F401

    from . import data, devices, distributed, evaluate, models, runs, train  # noqa: F401

    if args.command == "tune":
        import optuna  # noqa: F401
    if args.command == "explain":
        with contextlib.suppress(ImportError):  # explain says what is missing
            import captum.attr  # noqa: F401
    if args.command == "serve":
        with contextlib.suppress(ImportError):  # cmd_serve says what is missing
            from . import serve  # noqa: F401
    if args.command == "audit":
        with contextlib.suppress(ImportError):  # audit.check says what is missing
            import cleanlab.filter  # noqa: F401
            import sklearn.neighbors  # noqa: F401
    if args.command in ("plot", "compare-init", "tune", "explain", "audit") or getattr(args, "samples", None) or (
            args.command == "train" and getattr(args, "plots", True)):
        from . import plots  # noqa: F401 (matplotlib)


def _dash_hint(argv: list[str]) -> str:
    """For a command line argparse refused: a file name that starts with '-' reads as an option unless -- comes
    before it."""
    for a in argv:
        if a == "--":
            return ""
        if a.startswith("-") and not a.startswith("--") and len(a) > 1 and ("." in a or os.path.lexists(a)):
            try:
                float(a)
            except ValueError:
                return f" '{a}' reads as an option: put -- before a file name that starts with '-' (-- {a})."
    return ""


def _safe_streams() -> None:
    """Output that cannot be encoded (a name that is not UTF-8, any non-ASCII name when PYTHONIOENCODING=ascii)
    is written as backslash escapes, not a traceback."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    """The command line: its exit code (SystemExit for --help and --version, as argparse gives them)."""
    try:
        code = _main(argv)
    except SystemExit:
        if not _output_written(argv):  # `fmnist --version > /dev/full`
            raise SystemExit(2) from None
        raise
    return code if _output_written(argv) else 2


def _output_written(argv: list[str] | None) -> bool:
    """Whether what was printed reached standard output (a full disk is found at the last flush); if not, says so."""
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:  # `fmnist ... | head`: the reader has gone, which is no error
        ok = True
    except OSError as e:
        with contextlib.suppress(OSError):
            print(f"fmnist: error: cannot write the output: {e.strerror or e}.", file=sys.stderr)
        ok = False
    if argv is None:  # the real command: what could not be written goes nowhere, not to a second error at exit
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return ok


def _main(argv: list[str] | None) -> int:
    args = None
    _safe_streams()
    hit: list[int] = []
    # The real command, once over, ignores Ctrl-C: Python's shutdown after torch takes most of a second, and a
    # Ctrl-C then made a finished command look killed (exit -2, its files written).
    restore = _note_interrupts(hit, then=signal.SIG_IGN if argv is None else signal.default_int_handler)
    try:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as e:
            hint = _dash_hint(sys.argv[1:] if argv is None else list(argv))
            if hint:
                e.hint = (e.hint + hint).strip()
            raise
        args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: what --nproc's workers run
        with interrupts_deferred():
            _preload(args)
        return args.func(args)
    except KeyboardInterrupt as e:
        if argv is None:  # the real command (not a caller in Python): a second Ctrl-C must not break the way out
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if _torchrun_rank() == 0:  # under torchrun every rank gets Ctrl-C: rank 0 says it once
            print(_interrupted(args.command if args is not None else None, e), file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # `fmnist ... | head`: the reader has gone, nothing more to say
        return 0
    except Exception as e:
        if hit:  # Ctrl-C inside a library that turned it into its own error (torch.onnx.export, gloo)
            if _torchrun_rank() == 0:
                print(_interrupted(args.command if args is not None else None, e), file=sys.stderr)
            return 130
        message = _user_error(e)
        if message is None:
            raise
        rank = _torchrun_rank()
        if not isinstance(e, FmnistError) or e.rank in (None, rank):  # under torchrun: rank 0 says what all found
            print(f"fmnist: error{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr)
        return 2
    finally:
        restore()


def _note_interrupts(hit: list[int], then=signal.default_int_handler):
    """Python's own Ctrl-C handler, which also notes that Ctrl-C came; returns what puts THEN in its place."""
    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return lambda: None  # ignored, or someone else's handler: theirs to keep

        def note(sig, frame):
            hit.append(sig)
            signal.default_int_handler(sig, frame)

        signal.signal(signal.SIGINT, note)
    except ValueError:  # not the main thread
        return lambda: None

    def restore() -> None:
        with contextlib.suppress(ValueError):
            if signal.getsignal(signal.SIGINT) is note:
                signal.signal(signal.SIGINT, then)
    return restore


def _torchrun_rank() -> int:
    """This process's rank under torchrun, 0 otherwise (read from the environment: no torch import)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _user_error(e: Exception) -> str | None:
    """The sentence for an error the user caused, or None for a bug (which keeps its traceback)."""
    if isinstance(e, FmnistError):
        return e.sentence()
    if isinstance(e, MemoryError):
        return "out of memory; choose a smaller --batch-size or model."
    if isinstance(e, OSError) and e.strerror:  # the file system said no: a path, a permission, a full disk
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}."
    return None


if __name__ == "__main__":
    sys.exit(main())
