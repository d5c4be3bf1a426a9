"""`fmnist <command>`: parse arguments, call the library, print the results.

Every error a user can cause ends here as one sentence on stderr and exit
code 2; Ctrl-C during training says how to resume and exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import config as config_mod
from . import data, models
from .config import ConfigError, TrainConfig

USER_ERRORS: tuple[type[BaseException], ...] = (data.DataError, ConfigError, models.ModelError)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`batch_size` -> `--batch-size`), plus --config/--preset."""
    g = p.add_argument_group("configuration (defaults < --preset < --config < flags)")
    g.add_argument("--preset", help=f"a shipped configuration: {', '.join(config_mod.presets())}")
    g.add_argument("--config", metavar="FILE.toml", help="a TOML file of configuration fields")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_ = f"{f.metadata['help']} (default: {shown})"
        if isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif isinstance(default, list):
            g.add_argument(flag, type=_int_list, default=argparse.SUPPRESS, metavar="N,N", help=help_)
        else:
            g.add_argument(flag, type=type(default), default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    if args.preset:
        cfg = config_mod.preset(args.preset, cfg)
    if args.config:
        cfg = config_mod.load(args.config, cfg)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return config_mod.from_dict(flags, cfg, where="flags").validate()


# ---------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    from . import train

    if args.resume:
        given = [f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)]
        if given or args.config or args.preset:
            raise ConfigError("--resume continues a run with its saved configuration; drop the other flags.")
        cfg = TrainConfig()
    else:
        cfg = config_from_args(args)
    echo = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    progress = not args.quiet and sys.stderr.isatty()
    try:
        run = train.fit(cfg, resume=args.resume, progress=progress, echo=echo,
                        command=" ".join(["fmnist"] + sys.argv[1:]))
    except train.Interrupted as e:
        print(f"fmnist: interrupted; continue with: fmnist train --resume {e.run_dir}", file=sys.stderr)
        return 130
    s = run.summary
    print(f"test accuracy {s['test_accuracy']:.4f} (best val {s['best_val_accuracy']:.4f} at epoch "
          f"{s['best_epoch']}), {s['wall_seconds']:.1f}s, {s['train_samples_per_second']} images/s on {s['device']}")
    print(f"run: {run.dir}")
    if (run.dir / "report.html").is_file():
        print(f"report: {run.dir / 'report.html'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import train

    r = train.evaluate_checkpoint(args.run, args.split, args.data_dir, args.device)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['checkpoint']}  split {r['split']} ({r['images']} images)")
    print(f"accuracy {r['accuracy']:.4f}   loss {r['loss']:.4f}")
    print("\nper-class accuracy")
    for name, acc in r["per_class_accuracy"].items():
        print(f"  {name:<12} {acc:.4f}")
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    short = [c.split("/")[0][:7] for c in data.CLASSES]
    print(" " * 12 + "".join(f"{s:>8}" for s in short))
    for name, row in zip(data.CLASSES, r["confusion_matrix"]):
        print(f"{name:<12}" + "".join(f"{v:>8}" for v in row))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import numpy as np

    if args.download:
        dest = data.download(args.data_dir, base_url=args.mirror, progress=sys.stderr.isatty())
        print(f"downloaded and verified: {dest}")
    directory = data.locate(args.data_dir)
    checks = data.verify(directory)
    print(f"data:      {directory.resolve()}")
    bad = [k for k, ok in checks.items() if not ok]
    print("verified:  " + ("yes (SHA-256 of all four files)" if not bad
                           else f"NO: {', '.join(bad)} differ from the real files"))
    splits = {s: data.load_split(directory, s) for s in ("train", "test")}
    print(f"\n{'class':<14}{'train':>8}{'test':>8}")
    counts = {s: np.bincount(y, minlength=10) for s, (_, y) in splits.items()}
    for i, name in enumerate(data.CLASSES):
        print(f"{i} {name:<12}{counts['train'][i]:>8}{counts['test'][i]:>8}")
    print(f"{'total':<14}{counts['train'].sum():>8}{counts['test'].sum():>8}")
    x = splits["train"][0].astype(np.float64) / 255.0
    print(f"\ntrain pixels in [0, 1]: mean {x.mean():.4f}  std {x.std():.4f}")
    if args.samples:
        from . import plots

        plots.samples(*splits["train"], Path(args.samples))
        print(f"samples:   {args.samples}")
    return 0 if not bad else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from . import train

    paths = train.plot_existing(args.run, args.data_dir, args.device)
    for p in paths:
        print(p)
    return 0


def cmd_compare_init(args: argparse.Namespace) -> int:
    from . import compare

    inits = compare.parse_inits(args.inits)
    cfg = config_from_args(args)
    echo = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    results = compare.compare_init(cfg, inits, args.seeds, args.out, echo=echo,
                                   progress=not args.quiet and sys.stderr.isatty())
    print(compare.table(results))
    print(f"results: {Path(args.out) / 'results.json'}, {Path(args.out) / 'init_comparison.png'}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tune

    cfg = config_from_args(args)
    result = tune.tune(cfg, args.out, trials=args.trials, timeout=args.timeout, study_name=args.study,
                       storage=args.storage, epochs=cfg.epochs, seed=cfg.seed, space_file=args.space,
                       pruner=args.pruner, heartbeat=args.heartbeat, verbose=args.verbose,
                       progress=sys.stderr.isatty())
    study = result.study
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("complete", "pruned", "fail", "running") if s in states)
    print(f"study '{study.study_name}': {len(states)} trials ({counts})")
    if result.reaped:
        print(f"marked failed (their worker had died): trials {', '.join(map(str, result.reaped))}")
    if result.best_toml is None:
        print("no trial has completed yet")
        return 0
    best = study.best_trial
    print(f"best: trial {best.number}, validation accuracy {best.value:.4f}")
    for k, v in best.params.items():
        print(f"  {k:<16} {v:.4g}" if isinstance(v, float) else f"  {k:<16} {v}")
    print(f"config: {result.best_toml}  (fmnist train --config {result.best_toml})")
    for f in result.figures:
        print(f"figure: {f}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for name in models.names():
        m = models.create(name)
        print(f"{name:<8} {models.count_parameters(m):>9,} parameters (defaults)")
    print("presets: " + ", ".join(config_mod.presets()))
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmnist", description="Train, inspect and evaluate Fashion-MNIST classifiers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model into runs/<name>/")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="accuracy, loss, per-class accuracy and confusion matrix of a model")
    e.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    e.add_argument("--split", choices=("test", "val"), default="test", help="which split (default: test)")
    e.add_argument("--json", action="store_true", help="print JSON instead of tables")
    e.add_argument("--data-dir", help="directory with the IDX files (default: search)")
    e.add_argument("--device", default="auto", choices=config_mod.DEVICES)
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("data", help="where the data is, whether it verifies, class counts, pixel statistics")
    d.add_argument("--data-dir",
                   help="directory with the IDX files (default: search); with --download, where to put them")
    d.add_argument("--download", action="store_true", help="fetch the four files into the user cache (or --data-dir)")
    d.add_argument("--mirror", default=os.environ.get("FMNIST_MIRROR", data.OFFICIAL_URL),
                   help="base URL to download from (default: the official location, or $FMNIST_MIRROR)")
    d.add_argument("--samples", metavar="FILE.png", help="also write a grid of training images, a row per class")
    d.set_defaults(func=cmd_data)

    pl = sub.add_parser("plot", help="(re)draw the figures and report.html of a finished run")
    pl.add_argument("run", metavar="RUN_DIR")
    pl.add_argument("--data-dir", help="directory with the IDX files (default: the run's, else search)")
    pl.add_argument("--device", default="auto", choices=config_mod.DEVICES)
    pl.set_defaults(func=cmd_plot)

    c = sub.add_parser("compare-init", help="train every init x seed and compare them on validation")
    c.add_argument("--inits", default="xavier,normal,kaiming,default",
                   help=f"comma-separated, from {', '.join(models.INITS)} (default: %(default)s)")
    c.add_argument("--seeds", type=int, default=3, help="seeds per init, counting up from --seed (default: 3)")
    c.add_argument("--out", default="compare-init", help="output directory (default: %(default)s)")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    add_config_flags(c)
    c.set_defaults(func=cmd_compare_init)

    u = sub.add_parser("tune", help="search hyperparameters with Optuna (validation accuracy)")
    u.add_argument("--trials", type=int, default=20, help="trials for this worker to run (default: 20)")
    u.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    u.add_argument("--study", default="fmnist", help="study name (default: %(default)s)")
    u.add_argument("--storage", help="an RDB URL (postgresql://..., sqlite:///...) or a journal file path "
                                     "(default: <out>/study.journal)")
    u.add_argument("--space", metavar="FILE.toml", help="search-space entries replacing the defaults")
    u.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"))
    u.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between a worker's heartbeats on an RDB storage (default: 10)")
    u.add_argument("--out", default="tune", help="output directory (default: %(default)s)")
    u.add_argument("--verbose", action="store_true", help="Optuna's own log messages")
    add_config_flags(u)
    u.set_defaults(func=cmd_tune)

    m = sub.add_parser("models", help="list the registered models and the shipped presets")
    m.set_defaults(func=cmd_models)
    return p


def _optional_errors() -> tuple[type[BaseException], ...]:
    """TuneError, if the tuning module was imported (Optuna stays an import of tune.py only)."""
    mod = sys.modules.get("fmnist.tune")
    return (mod.TuneError,) if mod is not None else ()


def main(argv: list[str] | None = None) -> int:
    from . import train

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (*USER_ERRORS, train.TrainError, *_optional_errors()) as e:
        print(f"fmnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmnist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
