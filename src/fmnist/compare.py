"""Initialisation schemes compared over several seeds: the course project's first lesson, measured.

    fmnist compare-init --inits xavier,normal,kaiming,default --seeds 3 --epochs 20 --out compare/

Every init x seed is an ordinary run in <out>/<init>-s<seed>/. A run that
already finished is reused, and one that was stopped is resumed, so the
command can be rerun after an interruption. Results: <out>/results.json and
<out>/init_comparison.png.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import config as config_mod
from . import models, runs, train
from .config import ConfigError, TrainConfig


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def parse_inits(text: str) -> list[str]:
    inits = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in inits if s not in models.INITS]
    if unknown or not inits:
        raise ConfigError(f"unknown init '{unknown[0] if unknown else text}'; known: {', '.join(models.INITS)}.")
    return inits


def compare_init(base: TrainConfig, inits: list[str], seeds: int, out: str | Path,
                 echo: Callable[[str], None] = lambda s: None, progress: bool = False) -> dict:
    """Train every init x seed (reusing finished runs) and summarise; returns the results dict."""
    if not 1 <= seeds <= 1000:
        raise ConfigError(f"--seeds must be between 1 and 1000, got {seeds}.")
    base = runs.resolve(replace(base, plots=False, out_dir=str(out)))
    out = runs.claim_output_dir(out, "compare-init")
    if base.seed + seeds - 1 > config_mod.SEED_MAX:
        raise ConfigError(f"seeds {base.seed}..{base.seed + seeds - 1} go past the largest seed, "
                          f"{config_mod.SEED_MAX}.")
    results: dict = {"config": {k: v for k, v in vars(base).items() if k not in ("init", "seed", "name")},
                     "inits": {}}
    for init in inits:
        per_seed = []
        for seed in range(base.seed, base.seed + seeds):
            cfg = replace(base, init=init, seed=seed, name=f"{init}-s{seed}")
            run_dir = out / cfg.name
            summary = None
            if (run_dir / "config.toml").is_file():
                if runs.read_config(run_dir).identity() != cfg.identity():
                    raise ConfigError(f"{run_dir} was trained with another configuration; "
                                      "use a new --out-dir or the same flags as before.")
                if (run_dir / "summary.json").is_file() and (run_dir / "last.pt").is_file():
                    echo(f"{cfg.name}: finished earlier, reused")
                    summary = runs.read_summary(run_dir, need=("best_val_accuracy", "test_accuracy"))
                elif (run_dir / "last.pt").is_file():
                    echo(f"{cfg.name}: resuming")
                    summary = train.fit(cfg, resume=run_dir, progress=progress, data_dir=base.data_dir).summary
            if summary is None:
                echo(f"{cfg.name}: training")
                summary = train.fit(cfg, progress=progress).summary
            history = runs.read_history(run_dir, at_least=1)
            per_seed.append({"seed": seed, "summary": summary,
                             "val_acc": [r["val_acc"] for r in history],
                             "val_loss": [r["val_loss"] for r in history],
                             "train_loss": [r["train_loss"] for r in history]})
        results["inits"][init] = {
            "runs": per_seed,
            "best_val_accuracy": _mean_std([r["summary"]["best_val_accuracy"] for r in per_seed]),
            "test_accuracy": _mean_std([r["summary"]["test_accuracy"] for r in per_seed]),
            "first_epoch_val_accuracy": _mean_std([r["val_acc"][0] for r in per_seed]),
        }
    runs.write_json(out / "results.json", results)
    from . import plots

    plots.init_comparison(results, out / "init_comparison.png")
    return results


def table(results: dict) -> str:
    """The console summary: one line per init."""
    lines = [f"{'init':<14}{'epoch-1 val acc':>18}{'best val acc':>18}{'test acc':>18}"]
    for init, r in results["inits"].items():
        cells = [r[k] for k in ("first_epoch_val_accuracy", "best_val_accuracy", "test_accuracy")]
        lines.append(f"{init:<14}" + "".join(f"{100 * c['mean']:>10.2f} ± {100 * c['std']:<5.2f}" for c in cells))
    n = len(next(iter(results["inits"].values()))["runs"])
    lines.append(f"(mean ± std over {n} seed{'s' if n > 1 else ''}; percent)")
    return "\n".join(lines)
