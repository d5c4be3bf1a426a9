"""report.html: one self-contained page for a run (no scripts, no fonts, no network).

The figures are referenced as plots/<file>, relative to the run directory, so
the page shows them wherever the run directory is copied.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from . import runs
from .runs import write_text

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; min-width: 9em; }
.card b { display: block; font-size: 1.5em; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f5f5f5; } tr.best { background: #eaf6ea; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: 13px; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 13px; }
"""

CAPTIONS = {
    "curves.png": "Loss and accuracy on the training and validation splits per epoch, and the learning rate. "
                  "The dashed line marks the epoch with the best validation accuracy (its weights are the ones "
                  "tested); the dotted line is the test accuracy.",
    "samples.png": "Real training images, one row per class.",
    "neurons_atlas.png": "The incoming weights of every first-layer neuron after the last epoch.",
    "confusion_matrix.png": "Which classes the model confuses on the test split.",
    "mistakes.png": "The test images the model got wrong with the most confidence.",
    "reliability.png": "Reliability: in each bin of confidence (the largest probability), the share of test images "
                       "the model got right, before and after temperature scaling (fitted on the validation "
                       "split). On the diagonal, a probability of 0.8 is right 8 times in 10; ECE is the mean gap, "
                       "weighted by the images in each bin.",
}


def _cards(summary: dict) -> str:
    items = [
        ("test accuracy", f"{100 * summary['test_accuracy']:.2f}%" if "test_accuracy" in summary else "not tested"),
        *([("test accuracy as answered (no views)", f"{100 * summary['test_accuracy_inference']:.2f}%")]
          if "test_accuracy_inference" in summary else []),
        ("best validation accuracy", f"{100 * summary['best_val_accuracy']:.2f}%"),
        ("best epoch", f"{summary['best_epoch']} / {summary['epochs']}"),
        ("wall time", f"{summary.get('wall_seconds', 0):.1f} s"),
        ("training speed", f"{summary.get('train_samples_per_second', 0):,} images/s"),
        ("parameters", f"{summary.get('parameters', 0):,}"),
        ("device", html.escape(str(summary.get("device", "?")))),
    ]
    if "temperature" in summary:
        items.append(("temperature", f"{summary['temperature']:.3f}"))
    if "test_ece" in summary and "test_ece_calibrated" in summary:
        items.append(("test calibration error", f"{100 * summary['test_ece']:.2f}% &rarr; "
                                                f"{100 * summary['test_ece_calibrated']:.2f}%"))
    if "test_unsure" in summary:
        items.append(("test images marked unsure", f"{100 * summary['test_unsure']:.1f}% "
                                                   f"({html.escape(str(summary.get('ood_method', '?')))})"))
    return '<div class="cards">' + "".join(f'<div class="card">{k}<b>{v}</b></div>' for k, v in items) + "</div>"


def _history_table(history: list[dict], best_epoch: int | None) -> str:
    head = "<tr><th>epoch</th><th>learning rate</th><th>train loss</th><th>train acc</th>" \
           "<th>val loss</th><th>val acc</th><th>seconds</th></tr>"
    rows = []
    for r in history:
        cls = ' class="best"' if r["epoch"] == best_epoch else ""
        rows.append(f"<tr{cls}><td>{r['epoch']}</td><td>{r['lr']:.2e}</td><td>{r['train_loss']:.4f}</td>"
                    f"<td>{100 * r['train_acc']:.2f}%</td><td>{r['val_loss']:.4f}</td>"
                    f"<td>{100 * r['val_acc']:.2f}%</td><td>{r['seconds']:.2f}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _class_table(classes: dict) -> str:
    """evaluate.per_class's figures as a table, and the most-confused pairs as a list."""
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>test images</th></tr>"
    rows = [f"<tr><td>{html.escape(name)}</td><td>{f['precision']:.4f}</td><td>{f['recall']:.4f}</td>"
            f"<td>{f['f1']:.4f}</td><td>{f['support']}</td></tr>" for name, f in classes["per_class"].items()]
    m = classes["macro"]
    rows.append(f"<tr class=\"best\"><td>mean</td><td>{m['precision']:.4f}</td><td>{m['recall']:.4f}</td>"
                f"<td>{m['f1']:.4f}</td><td></td></tr>")
    pairs = "".join(f"<li>{html.escape(p['true'])} taken for {html.escape(p['predicted'])}: {p['count']} times "
                    f"({100 * p['share_of_true']:.1f}% of {html.escape(p['true'])})</li>"
                    for p in classes["most_confused"])
    return (f"<table>{head}{''.join(rows)}</table><p>Recall is the accuracy on each class; precision, how often "
            f"the class is right when it is the answer.</p>"
            + (f"<p>The most-confused pairs:</p><ol>{pairs}</ol>" if pairs else ""))


def _figure(name: str, caption: str, alt: str) -> str:
    return (f'<figure><img src="plots/{html.escape(name)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _shape(cfg: dict) -> str:
    parts = [f"{k} {','.join(map(str, cfg[k]))}" for k in ("channels", "hidden") if cfg.get(k)]
    return "(" + "; ".join(parts) + ")" if parts else ""


def draw(run_dir: str | Path, data_dir: str | None = None, device: str = "auto", splits=None, scores=None,
         final_model=None) -> list[Path]:
    """Every figure of a run into run_dir/plots/, then report.html; returns their paths.

    After a training, `fit` hands over what it has in memory (the splits, best.pt's test `evaluate.Scores` with
    probabilities, the final model); `fmnist plot` passes nothing and everything is recomputed from the run's
    files and its data, evaluated as training tested it (evaluate.scores).
    """
    from . import devices, evaluate, models, plots

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"{run_dir} is not a directory.")
    missing = [f for f in ("best.pt", "last.pt", "history.jsonl", "summary.json", "neurons.npz")
               if not (run_dir / f).is_file()]
    if missing:
        raise runs.RunError(f"{run_dir} is not a finished fmnist run (no {missing[0]}).")
    history = runs.read_history(run_dir, at_least=1)
    summary, neurons = runs.read_summary(run_dir), runs.read_neurons(run_dir)
    if final_model is None:
        last = runs.load_checkpoint(run_dir / "last.pt", "last")
        cfg = runs.checkpoint_config(last, run_dir / "last.pt")
        runs.check_pair(run_dir, cfg)
        final_model = runs.load_state(runs.build_model(cfg), last["model"], run_dir / "last.pt")
    if splits is None or scores is None:
        model, best_cfg, _ = runs.load_model(run_dir / "best.pt")
        splits = evaluate.load_splits(best_cfg, data_dir)
        dev = devices.pick_device(device)
        with devices.cpu_share():
            scores = evaluate.scores(model.to(dev), best_cfg, splits.test, dev, probabilities=True)
    n = len(scores.labels)
    paths = plots.plot_run(run_dir, history, summary, neurons, splits.test[0][:n].numpy(),
                           scores.labels.numpy(), scores.probabilities.numpy(), scores.confusion().numpy(),
                           (splits.train[0].numpy(), splits.train[1].numpy()),
                           models.first_layer_pictures(final_model.cpu()).numpy(), models.is_conv(final_model),
                           _reliability(scores, summary.get("temperature")))
    paths += _neuron_profiles(run_dir, final_model, splits.test, runs.read_config(run_dir).track_neurons or [])
    return [*paths, write(run_dir, evaluate.per_class(scores.labels, scores.probabilities.argmax(1)))]


def _neuron_profiles(run_dir: Path, model, test: tuple, neurons: list[int]) -> list[Path]:
    """plots/neuron_<k>_profile.png for each tracked neuron: what it responds to on the test split (the final
    weights, as neuron_<k>.png's last picture)."""
    from . import evaluate, models, plots

    x, y = test
    kind = "filter" if models.is_conv(model) else "neuron"
    return [plots.neuron_profile(evaluate.neuron_profile(model.cpu(), x, y, k), x.numpy(), y.numpy(),
                                 run_dir / "plots" / f"neuron_{k}_profile.png", kind) for k in neurons]


def _reliability(scores, temperature: float | None) -> dict:
    """plots.reliability's tables of the test `scores`, before and after the run's temperature (None: a run from
    before calibration, drawn before only)."""
    from . import calibrate

    probs, labels = scores.probabilities, scores.labels
    after = (scores.logits / temperature).softmax(1) if temperature is not None else None
    return {"before": calibrate.reliability(probs, labels),
            "after": calibrate.reliability(after, labels) if after is not None else None,
            "ece": (calibrate.calibration_error(probs, labels),
                    calibrate.calibration_error(after, labels) if after is not None else None),
            "temperature": temperature}


def write(run_dir: str | Path, classes: dict | None = None) -> Path:
    """Write run_dir/report.html from the run's files and, when given, the test split's per-class figures
    (evaluate.per_class); returns its path."""
    run_dir = Path(run_dir)
    summary = runs.read_summary(run_dir)
    history = runs.read_history(run_dir)
    cfg = vars(runs.read_config(run_dir))
    cfg_text = (run_dir / "config.toml").read_text(encoding="utf-8")
    plots = run_dir / "plots"
    neurons = sorted((p.name for p in plots.glob("neuron_*.png") if re.fullmatch(r"neuron_\d+\.png", p.name)),
                     key=lambda s: int(s[7:-4]))  # neuron_7 before neuron_50; a stray neuron_7-old.png is no neuron

    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>fmnist run {html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Run {html.escape(run_dir.name)}</h1>",
        f"<p>{html.escape(cfg.get('model', ''))} {html.escape(_shape(cfg))}, "
        f"{html.escape(cfg.get('optimizer', ''))} lr {cfg.get('lr')}, {summary['epochs']} epochs, seed "
        f"{cfg.get('seed')}, torch {html.escape(str(summary.get('torch_version', '?')))}. "
        f"Reproduce: <code>{html.escape(summary.get('command', ''))}</code></p>",
        _cards(summary),
        "<h2>Learning curves</h2>", _figure("curves.png", CAPTIONS["curves.png"], "learning curves"),
        "<h2>What the first layer learned</h2>",
    ]
    for name in neurons:
        k = name[7:-4]
        parts.append(_figure(name, f"Neuron {k}: its incoming weights before training (epoch 0) and after each "
                                   "epoch, all on one colour scale (red positive, blue negative).",
                             f"neuron {k} across epochs"))
        if (plots / f"neuron_{k}.gif").exists():
            parts.append(_figure(f"neuron_{k}.gif", f"Neuron {k} as an animation, one frame per epoch.",
                                 f"neuron {k} animation"))
        if (plots / f"neuron_{k}_profile.png").exists():
            parts.append(_figure(f"neuron_{k}_profile.png", f"What neuron {k} responds to, with its final weights: "
                                 "the test images that excite it most, its mean activation per class, and how "
                                 "much each class's logit moves when it is silenced.", f"neuron {k} profile"))
    parts += [
        _figure("neurons_atlas.png", CAPTIONS["neurons_atlas.png"], "first-layer atlas"),
        "<h2>Test results</h2>",
        *([_class_table(classes)] if classes else []),
        _figure("confusion_matrix.png", CAPTIONS["confusion_matrix.png"], "confusion matrix"),
        _figure("mistakes.png", CAPTIONS["mistakes.png"], "confident mistakes"),
        *([_figure("reliability.png", CAPTIONS["reliability.png"], "reliability diagram")]
          if (plots / "reliability.png").exists() else []),
        "<h2>The data</h2>", _figure("samples.png", CAPTIONS["samples.png"], "training samples"),
        "<h2>History</h2>", _history_table(history, summary.get("best_epoch")),
        "<h2>Configuration</h2>", f"<pre>{html.escape(cfg_text)}</pre>",
        "<h2>Summary</h2>", f"<pre>{html.escape(json.dumps(summary, indent=2))}</pre>",
        "</body></html>\n",
    ]
    path = run_dir / "report.html"
    write_text(path, "\n".join(parts))
    return path
