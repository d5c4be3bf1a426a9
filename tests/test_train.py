from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fmnist import calibrate, devices, distributed, evaluate, runs, train
from fmnist.config import TrainConfig


def tiny_config(tiny_dir: Path, out: Path, **kw) -> TrainConfig:
    base = TrainConfig(data_dir=str(tiny_dir), out_dir=str(out), hidden=[64, 16], epochs=3, batch_size=64,
                       val_size=100, device="cpu", plots=False, name="run", track_neurons=[50, 7],
                       threads=1)  # runs compared bit for bit need one thread count, whatever else runs here
    return dataclasses.replace(base, **kw)


def weights(run_dir: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / name, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fit_writes_the_run_directory(tiny_dir, tmp_path):
    run = train.fit(tiny_config(tiny_dir, tmp_path))
    d = run.dir
    for f in ("config.toml", "history.jsonl", "summary.json", "best.pt", "last.pt", "neurons.npz"):
        assert (d / f).is_file(), f
    rows = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    summary = json.loads((d / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "best_epoch", "epochs", "wall_seconds",
                "train_samples_per_second", "parameters", "device", "torch_version", "seed", "command"):
        assert key in summary, key
    assert summary["best_val_accuracy"] == max(r["val_acc"] for r in rows)
    assert summary["test_accuracy"] > 0.9  # the synthetic classes are easy: learning happened
    npz = np.load(d / "neurons.npz")
    assert npz["neuron_50"].shape == (4, 28, 28) and npz["neuron_7"].shape == (4, 28, 28)
    assert not np.array_equal(npz["neuron_50"][0], npz["neuron_50"][-1])
    mode = (d / "summary.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # atomic writes keep ordinary permissions, not mkstemp's 0600
    final_first = weights(d)["net.1.weight"]
    assert torch.equal(torch.from_numpy(npz["neuron_50"][-1]).flatten(), final_first[49])


def test_best_checkpoint_is_the_best_validation_epoch(tiny_dir, tmp_path):
    run = train.fit(tiny_config(tiny_dir, tmp_path, epochs=4))
    best = torch.load(run.dir / "best.pt", weights_only=True)
    assert best["epoch"] == run.summary["best_epoch"]
    assert best["val_acc"] == max(r["val_acc"] for r in run.history)


def test_same_seed_same_weights_other_seed_differs(tiny_dir, tmp_path):
    a = train.fit(tiny_config(tiny_dir, tmp_path, name="a", erase=0.3, dropout=0.2))
    b = train.fit(tiny_config(tiny_dir, tmp_path, name="b", erase=0.3, dropout=0.2))
    c = train.fit(tiny_config(tiny_dir, tmp_path, name="c", erase=0.3, dropout=0.2, seed=1))
    assert_same_weights(weights(a.dir), weights(b.dir))
    assert not torch.equal(weights(a.dir)["net.1.weight"], weights(c.dir)["net.1.weight"])


def test_refuses_to_overwrite_a_run(tiny_dir, tmp_path):
    train.fit(tiny_config(tiny_dir, tmp_path, epochs=1))
    with pytest.raises(runs.RunError, match="--resume"):
        train.fit(tiny_config(tiny_dir, tmp_path, epochs=1))


@pytest.mark.parametrize("schedule,optimizer,extra", [
    ("plateau", "adamw", {}), ("onecycle", "sgd", {}), ("cosine", "adam", {}),
    ("linear", "sgd", {"ema": 0.9, "tta": True, "nesterov": True})])
def test_interrupted_between_checkpoint_and_history_resumes_exactly(tiny_dir, tmp_path, monkeypatch, schedule,
                                                                    optimizer, extra):
    kw = dict(epochs=4, schedule=schedule, optimizer=optimizer, dropout=0.1, erase=0.2, **extra)
    whole = train.fit(tiny_config(tiny_dir, tmp_path / "whole", **kw))

    real = runs.write_history
    calls = {"n": 0}

    def dies_on_third(*a):
        calls["n"] += 1
        if calls["n"] == 3:  # after last.pt of epoch 2, before its history row lands
            raise KeyboardInterrupt
        real(*a)

    monkeypatch.setattr(runs, "write_history", dies_on_third)
    with pytest.raises(train.Interrupted):
        train.fit(tiny_config(tiny_dir, tmp_path / "cut", **kw))
    monkeypatch.setattr(runs, "write_history", real)
    cut = tmp_path / "cut" / "run"
    assert len((cut / "history.jsonl").read_text().splitlines()) == 1  # the row of epoch 2 was lost
    resumed = train.fit(TrainConfig(), resume=cut)
    assert_same_weights(weights(whole.dir), weights(resumed.dir))
    assert_same_weights(weights(whole.dir, "best.pt"), weights(resumed.dir, "best.pt"))  # the EMA's, with ema
    assert [r["val_acc"] for r in whole.history] == [r["val_acc"] for r in resumed.history]
    a, b = np.load(whole.dir / "neurons.npz"), np.load(cut / "neurons.npz")
    np.testing.assert_array_equal(a["neuron_50"], b["neuron_50"])


@pytest.mark.slow  # several processes and a kill: run by CI's second pass (pytest -m slow)
def test_killed_process_resumes_to_the_same_weights(tiny_dir, tmp_path):
    """SIGKILL a real `fmnist train` at an arbitrary moment, resume it, compare with an unbroken run."""
    args = ["--data-dir", str(tiny_dir), "--hidden", "64,16", "--epochs", "40", "--batch-size", "32",
            "--val-size", "100", "--device", "cpu", "--no-plots", "--quiet", "--dropout", "0.1", "--erase", "0.2",
            "--threads", "1"]  # both runs alike, whatever else runs on this machine
    cmd = [sys.executable, "-m", "fmnist", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + args + ["--out-dir", str(tmp_path / "whole"), "--name", "r"], check=True, env=env)

    p = subprocess.Popen(cmd + args + ["--out-dir", str(tmp_path / "cut"), "--name", "r"], env=env)
    hist = tmp_path / "cut" / "r" / "history.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        if hist.exists() and len(hist.read_text().splitlines()) >= 5:
            break
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(hist.read_text().splitlines())
    assert done < 40
    r = subprocess.run(cmd + ["--resume", str(tmp_path / "cut" / "r"), "--quiet"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(tmp_path / "whole" / "r"), weights(tmp_path / "cut" / "r"))
    assert len(hist.read_text().splitlines()) == 40


def test_divergence_stops_with_a_clear_message(tiny_dir, tmp_path):
    with pytest.raises(train.TrainError, match="diverged at epoch 1.*lower --lr"):
        train.fit(tiny_config(tiny_dir, tmp_path, optimizer="sgd", lr=1e6, momentum=0.0))
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing poisoned was saved


def test_divergence_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch):
    real = train.train_one_epoch

    def nan_on_epoch_3(model, loader, *a, **kw):
        loss, acc, secs = real(model, loader, *a, **kw)
        if loader.epoch == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
            return float("nan"), acc, secs
        return loss, acc, secs

    monkeypatch.setattr(train, "train_one_epoch", nan_on_epoch_3)
    with pytest.raises(train.TrainError, match="epoch 3"):
        train.fit(tiny_config(tiny_dir, tmp_path, epochs=5))
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["epoch"] == 2
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_dry_run_is_short_and_complete(tiny_dir, tmp_path):
    run = train.fit(tiny_config(tiny_dir, tmp_path, dry_run=True, epochs=20, batch_size=8))
    assert len(run.history) == 2
    assert (run.dir / "summary.json").is_file()


def test_missing_device_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(distributed.DeviceError, match="not available"):
        devices.pick_device("cuda")


def test_evaluate_checkpoint(tiny_dir, tmp_path):
    run = train.fit(tiny_config(tiny_dir, tmp_path))
    r = evaluate.evaluate_run(run.dir, "test", data_dir=str(tiny_dir), device="cpu")
    assert r["accuracy"] == pytest.approx(run.summary["test_accuracy"])
    cm = np.array(r["confusion_matrix"])
    assert cm.sum() == 200 and np.trace(cm) / 200 == pytest.approx(r["accuracy"])
    r_val = evaluate.evaluate_run(run.dir / "best.pt", "val", data_dir=str(tiny_dir), device="cpu")
    assert r_val["accuracy"] == pytest.approx(run.summary["best_val_accuracy"])


@pytest.mark.realdata
@pytest.mark.slow
def test_real_data_two_epochs_learn(real_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(real_dir), out_dir=str(tmp_path), name="real", epochs=2, plots=False)
    run = train.fit(cfg)
    assert run.summary["test_accuracy"] > 0.84
    assert run.summary["epochs"] == 2


def test_cores_are_shared_among_running_trainings():
    with devices.cpu_share() as alone:
        assert alone == devices.cores()
        with devices.cpu_share() as second:  # a second training on this machine
            assert second == max(1, devices.cores() // 2)
    with devices.cpu_share(3) as asked:
        assert asked == 3 and torch.get_num_threads() == 3


def test_resume_keeps_the_thread_count(tiny_dir, tmp_path):
    if devices.cores() < 2:
        pytest.skip("needs 2 cores for the automatic thread count to change")
    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(train.Interrupted):
        train.fit(tiny_config(tiny_dir, tmp_path, name="cut", epochs=3, threads=0), on_epoch=stop)
    threads = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["threads"]
    whole = train.fit(tiny_config(tiny_dir, tmp_path, name="whole", epochs=3, threads=threads))
    claims = max(devices.cores(), 2) + 1  # so many others run beside it that auto would take 1 thread
    with contextlib.ExitStack() as stack:
        for _ in range(claims):
            stack.enter_context(devices.cpu_share())
        resumed = train.fit(TrainConfig(), resume=tmp_path / "cut")
    assert resumed.summary["threads"] == threads
    assert_same_weights(weights(whole.dir), weights(resumed.dir))


def test_ema_is_the_hand_computed_average(tiny_dir):
    """After each step the average moves (1 - ema) of the way to the weights; the first step copies them."""
    from fmnist import data, models

    splits = data.load(tiny_dir, val_size=100)
    cfg = TrainConfig(hidden=[8], batch_norm=False, optimizer="sgd", lr=0.1, momentum=0.0, ema=0.8, flip=False)
    torch.manual_seed(0)
    model = models.create("mlp", hidden=[8], batch_norm=False)
    twin = models.create("mlp", hidden=[8], batch_norm=False)
    twin.load_state_dict(model.state_dict())
    loader = data.BatchLoader(*splits.train, 100, shuffle=False, max_batches=4)
    ema = train.make_ema(cfg, model)
    train.train_one_epoch(model, loader, train.Step(train.make_optimizer(cfg, model), ema=ema))
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)  # the same steps by hand, the average beside them
    expected = None
    for x, y in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        opt.step()
        now = [p.detach().clone() for p in twin.parameters()]
        expected = now if expected is None else [0.8 * e + 0.2 * w for e, w in zip(expected, now)]
    for got, want in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(got, want)


def test_tta_is_the_hand_computed_mean():
    from fmnist import models

    torch.manual_seed(0)
    model = models.create("cnn", channels=[4], batch_norm=False).eval()
    x = torch.randn(3, 1, 28, 28)
    idx = torch.arange(28)
    up_left = x[..., (idx - 1).clamp(0, 27)[:, None], (idx - 1).clamp(0, 27)[None, :]]  # content moved down-right
    down_right = x[..., (idx + 1).clamp(0, 27)[:, None], (idx + 1).clamp(0, 27)[None, :]]
    with torch.no_grad():
        m = [(model(v) + model(torch.flip(v, dims=[3]))) / 2 for v in (x, up_left, down_right)]
        want = m[0] / 2 + (m[1] + m[2]) / 4
        torch.testing.assert_close(models.tta_logits(model, x), want)


def test_mirror_views_are_the_mean_of_the_image_and_its_mirror_and_follow_the_training_shifts():
    from fmnist import models

    torch.manual_seed(0)
    model = models.create("mlp", hidden=[8], batch_norm=False).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(models.tta_logits(model, x, "mirror"), (model(x) + model(x.flip(-1))) / 2)
        assert not torch.allclose(models.tta_logits(model, x, "mirror"), models.tta_logits(model, x, "six"))
        taps, logits = models.taps_and_logits(model, x, tta="mirror")  # the OOD score's features: the image's own
        plain_taps, _ = models.taps_and_logits(model, x)
        assert torch.equal(logits, models.tta_logits(model, x, "mirror"))
        assert all(torch.equal(taps[k], plain_taps[k]) for k in plain_taps)
        assert torch.equal(taps[calibrate.OWN_LOGITS], model(x))  # what the energy reads: the image alone
    assert models.views(TrainConfig(tta=False, translate=2)) == ""
    assert models.views(TrainConfig(tta=True, translate=0)) == "mirror"
    assert models.views(TrainConfig(tta=True, translate=2)) == "six"
    with pytest.raises(ValueError, match="views"):
        models.tta_logits(model, x, "nine")


def test_linear_schedule_warms_up_then_falls_to_zero():
    cfg = TrainConfig(schedule="linear", warmup=0.2, lr=1.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched, per_batch = train.make_schedule(cfg, opt, steps_per_epoch=5, epochs=2)  # 10 steps, 2 of warm-up
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert per_batch and lrs == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_bf16_and_channels_last_train_a_convnet_that_loads_anywhere(tiny_dir, tmp_path):
    from fmnist import predict

    run = train.fit(tiny_config(tiny_dir, tmp_path, model="cnn", hidden=None, channels=[4, 8], track_neurons=None,
                                epochs=1, precision="bf16", channels_last=True, tta=True, ema=0.5))
    assert 0 < run.summary["test_accuracy"] <= 1
    model, cfg, _ = runs.load_model(run.dir)  # a plain, contiguous model
    assert all(t.is_contiguous() for t in model.state_dict().values())
    x = torch.zeros(2, 28, 28, dtype=torch.uint8).numpy()
    assert predict.Predictor(run.dir).probabilities(x).shape == (2, 10)


def test_a_whitening_stem_starts_from_the_training_images_and_resumes_to_the_same_weights(tiny_dir, tmp_path,
                                                                                         monkeypatch):
    from fmnist import models

    cfg = tiny_config(tiny_dir, tmp_path / "whole", model="cnn", hidden=None, channels=[4, 8], track_neurons=None,
                      epochs=3, stem="whiten")
    splits = evaluate.load_splits(cfg)
    model = train.new_model(cfg, torch.device("cpu"), images=splits.train[0])
    want = models.create("cnn", channels=[4, 8], stem="whiten")
    models.whiten_stem(want, splits.train[0][: train.WHITEN_IMAGES])
    w = model.net[0].weight.detach()
    assert torch.equal(w, want.net[0].weight.detach()) and torch.equal(w[2:], -w[:2])
    with pytest.raises(train.TrainError, match="training images"):
        train.new_model(cfg, torch.device("cpu"))

    whole = train.fit(cfg)
    real, calls = runs.write_history, {"n": 0}

    def dies_on_third(*a):
        calls["n"] += 1
        if calls["n"] == 3:  # after last.pt of epoch 2
            raise KeyboardInterrupt
        real(*a)

    monkeypatch.setattr(runs, "write_history", dies_on_third)
    with pytest.raises(train.Interrupted):
        train.fit(dataclasses.replace(cfg, out_dir=str(tmp_path / "cut")))
    monkeypatch.setattr(runs, "write_history", real)
    resumed = train.fit(TrainConfig(), resume=tmp_path / "cut" / "run")
    assert_same_weights(weights(whole.dir), weights(resumed.dir))


def test_plain_epoch_validation_measures_the_views_once_at_the_end(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, tmp_path, model="cnn", hidden=None, channels=[4, 8], track_neurons=None, epochs=2,
                      tta=True, epoch_tta=False)
    run = train.fit(cfg)
    model, _, _ = runs.load_model(run.dir)
    splits = evaluate.load_splits(cfg)
    plain = evaluate.scores(model, dataclasses.replace(cfg, tta=False), splits.val, torch.device("cpu"))
    views = evaluate.scores(model, cfg, splits.val, torch.device("cpu"))
    best = run.history[run.summary["best_epoch"] - 1]
    assert best["val_acc"] == run.summary["best_val_accuracy_plain"] == plain.accuracy  # the epochs: plain images
    assert run.summary["best_val_accuracy"] == views.accuracy  # best.pt with its views
    assert run.summary["tta_val_gain"] == pytest.approx(views.accuracy - plain.accuracy)
    assert plain.accuracy != views.accuracy  # else the test could not tell the two apart


def test_bf16_on_a_cpu_without_it_says_so(tiny_dir, tmp_path, monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(devices, "native_bf16", lambda: False)
    train.fit(tiny_config(tiny_dir, tmp_path, precision="bf16", dry_run=True), echo=said.append)
    assert any("no native bfloat16" in s for s in said)
    said.clear()
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    train.fit(tiny_config(tiny_dir, tmp_path, name="other", precision="bf16", dry_run=True), echo=said.append)
    assert not any("bfloat16" in s for s in said)


def test_distillation_loss_is_the_hand_computed_one():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    T, w = 3.0, 0.7
    p_t, p_s = (t / T).softmax(1), (s / T).softmax(1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    ce = -(s.log_softmax(1)[torch.arange(5), y]).mean()
    torch.testing.assert_close(train.distill_loss(s, t, y, T, w), (1 - w) * ce + w * T * T * kl)
    torch.testing.assert_close(train.distill_loss(s, t, y, T, 0.0), ce)  # weight 0: the labels alone


def test_a_student_learns_from_a_teacher_run(tiny_dir, tmp_path, monkeypatch):
    teacher = train.fit(tiny_config(tiny_dir, tmp_path, name="teacher", model="cnn", hidden=None, channels=[4, 8],
                                    track_neurons=None, epochs=2))
    seen = []
    real = train.distill_loss

    def spy(*a, **kw):
        seen.append(a[3:5])
        return real(*a, **kw)

    monkeypatch.setattr(train, "distill_loss", spy)
    monkeypatch.chdir(tmp_path)  # a relative --teacher is kept as an absolute path
    student = train.fit(tiny_config(tiny_dir, tmp_path, name="student", epochs=2, teacher="teacher",
                                    distill_temperature=2.0, distill_weight=0.9))
    assert seen and set(seen) == {(2.0, 0.9)}
    assert runs.read_config(student.dir).teacher == str(teacher.dir.resolve())
    assert 0 < student.summary["test_accuracy"] <= 1


def test_a_missing_teacher_is_one_sentence_and_writes_nothing(tiny_dir, tmp_path):
    with pytest.raises(train.TrainError, match="--teacher"):
        train.fit(tiny_config(tiny_dir, tmp_path, teacher=str(tmp_path / "nowhere")))
    assert not (tmp_path / "run").exists()


def test_batch_norm_biases_get_their_own_learning_rate(tiny_dir, tmp_path):
    from fmnist import models

    model = models.create("cnn", channels=[4, 8])
    cfg = tiny_config(tiny_dir, tmp_path, optimizer="sgd", lr=0.1, weight_decay=5e-4, bn_bias_lr_scale=64.0)
    opt = train.make_optimizer(cfg, model)
    assert len(opt.param_groups) == 2
    rest, biases = opt.param_groups
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in biases["params"]} == {id(m.bias) for m in bn}
    assert biases["lr"] == pytest.approx(6.4) and biases["weight_decay"] == pytest.approx(5e-4 / 64)
    assert rest["lr"] == 0.1 and len(rest["params"]) == len(list(model.parameters())) - len(bn)
    # one plain SGD step moves a bias 64 times as far as the same gradient moves an ordinary weight
    cfg = dataclasses.replace(cfg, momentum=0.0, weight_decay=0.0)
    opt = train.make_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt.step()
    moved = {id(p): (before[id(p)] - p.detach()).abs().max().item() for p in model.parameters()}
    assert moved[id(bn[0].bias)] == pytest.approx(6.4) and moved[id(bn[0].weight)] == pytest.approx(0.1)
    sched, per_batch = train.make_schedule(dataclasses.replace(cfg, schedule="onecycle"), opt, 10, 2)
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([0.1, 6.4])  # each group peaks at its own rate
    assert len(train.make_optimizer(tiny_config(tiny_dir, tmp_path), model).param_groups) == 1  # default: one group


def test_compile_trains_through_the_compiled_module_and_saves_plain_weights(tiny_dir, tmp_path, monkeypatch):
    compiled = []
    real = torch.compile

    def eager(model, **kw):  # torch's own wrapper without code generation: seconds, not minutes
        compiled.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager)
    run = train.fit(tiny_config(tiny_dir, tmp_path, compile=True, epochs=1))
    assert len(compiled) == 1
    assert not any(k.startswith("_orig_mod") for k in weights(run.dir))  # loads without torch.compile
    assert runs.load_model(run.dir)[0] is not None and run.summary["test_accuracy"] > 0.5


def test_compile_without_a_cpp_compiler_is_one_sentence(tiny_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(train.TrainError, match="C\\+\\+ compiler"):
        train.fit(tiny_config(tiny_dir, tmp_path, compile=True, epochs=1))


def test_a_teacher_runs_as_it_was_trained(tiny_dir, tmp_path):
    from fmnist import models

    plain = models.create("cnn", channels=[4, 8]).eval()
    trained = tiny_config(tiny_dir, tmp_path, model="cnn", channels_last=True, precision="fp32")
    teacher = train.Teacher(plain, trained, torch.device("cpu"))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), plain(x), rtol=1e-4, atol=1e-5)
    assert next(teacher.parameters()).requires_grad is False
    assert teacher.model.net[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_evaluate_and_plot_agree_with_training_on_a_bf16_channels_last_tta_run(tiny_dir, tmp_path, monkeypatch):
    """Training's test, `fmnist evaluate` and `fmnist plot` evaluate one way (evaluate.scores): the same accuracy,
    the same probabilities and the same confusion matrix, in the run's precision, memory format and TTA."""
    from fmnist import plots, report

    drawn = []  # what the figures are handed (probabilities, confusion matrix), without drawing them
    monkeypatch.setattr(plots, "plot_run", lambda *a: drawn.append((a[6], a[7])) or [])
    run = train.fit(tiny_config(tiny_dir, tmp_path, model="cnn", hidden=None, channels=[4, 8], track_neurons=None,
                                epochs=1, precision="bf16", channels_last=True, tta=True, plots=True))
    result = evaluate.evaluate_run(run.dir, data_dir=str(tiny_dir), device="cpu")
    assert result["accuracy"] == run.summary["test_accuracy"]
    report.draw(run.dir, data_dir=str(tiny_dir), device="cpu")  # what `fmnist plot` does
    assert len(drawn) == 2
    (after_training, cm_training), (replotted, cm_replotted) = drawn
    assert cm_training.tolist() == cm_replotted.tolist() == result["confusion_matrix"]
    np.testing.assert_array_equal(after_training, replotted)
    model, cfg, _ = runs.load_model(run.dir)
    plain = evaluate.scores(model, dataclasses.replace(cfg, precision="fp32", tta=False, channels_last=False),
                            evaluate.load_splits(cfg).test, torch.device("cpu"), probabilities=True)
    assert not np.array_equal(plain.probabilities.numpy(), replotted)  # the run's own way is what was drawn


def test_precision_auto_is_bf16_only_where_the_cpu_computes_it(tiny_dir, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(devices, "native_bf16", lambda native=native: native)
        assert devices.use_bf16("auto", cpu) is native
        assert devices.use_bf16("bf16", cpu) is True and devices.use_bf16("fp32", cpu) is False
    said: list[str] = []
    run = train.fit(tiny_config(tiny_dir, tmp_path, precision="auto", dry_run=True), echo=said.append)
    assert run.summary["precision"] == "fp32" and not any("bfloat16" in s for s in said)  # no native bf16 here now


def test_a_full_disk_never_leaves_a_dead_end(tiny_dir, tmp_path, monkeypatch):
    import errno

    from fmnist import cli
    from fmnist.errors import RunError

    real = runs.atomic_write

    def full_at(name: str, second: bool = False):
        def write(path, fn):
            if Path(path).name == name and (not second or Path(path).exists()):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, fn)
        return write

    cfg = tiny_config(tiny_dir, tmp_path, epochs=2)
    monkeypatch.setattr(runs, "atomic_write", full_at("last.pt"))  # best.pt written, last.pt not
    with pytest.raises(RunError) as e:
        train.fit(cfg)
    assert "No space left on device" in e.value.sentence() and "run the same command again" in e.value.sentence()
    assert (tmp_path / "run" / "best.pt").is_file() and not (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setattr(runs, "atomic_write", real)
    assert train.fit(cfg).dir == tmp_path / "run"  # it was "not an fmnist run": neither resumable nor restartable
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 2

    monkeypatch.setattr(runs, "atomic_write", full_at("last.pt", second=True))  # the second epoch's last.pt
    with pytest.raises(RunError) as e:
        train.fit(tiny_config(tiny_dir, tmp_path, name="s", epochs=2))
    assert "continue with: fmnist train --resume" in e.value.sentence()
    monkeypatch.setattr(runs, "atomic_write", real)
    assert cli.main(["train", "--resume", str(tmp_path / "s"), "--quiet"]) == 0


def test_paths_and_names_are_checked_before_anything_is_written(tiny_dir, tmp_path, capsys):
    from fmnist import cli

    common = ["--hidden", "8", "--epochs", "1", "--batch-size", "64", "--val-size", "100", "--device", "cpu",
              "--no-plots", "--quiet"]
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/o\xff")
    config = tmp_path / "c.toml"
    config.write_text('data_dir = "ti\\u0000ny"\n')
    for argv, words in ((["--data-dir", str(tiny_dir), "--out-dir", bad], "is not UTF-8 text"),
                        (["--data-dir", bad, "--out-dir", str(tmp_path / "o")], "is not UTF-8 text"),
                        (["--config", str(config), "--out-dir", str(tmp_path / "o")], "holds a NUL character"),
                        (["--data-dir", str(tiny_dir), "--out-dir", "/dev/null"], "/dev/null is not a directory")):
        assert cli.main(["train", *argv, "--name", "a", *common]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "tiny"]  # no folder holding only a lock
    assert cli.main(["train", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path / "o"), "--name",
                     "cafe\u0301", *common]) == 0  # e + combining accent: café, as typed on some keyboards
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["caf\u00e9"]


def test_an_empty_teacher_switches_off_a_presets_teacher():
    from fmnist import cli

    args = cli.build_parser().parse_args(["train", "--preset", "mlp-best", "--teacher", ""])
    assert cli.config_mod.preset("mlp-best", TrainConfig()).teacher  # the preset has one
    assert cli.config_from_args(args).teacher == ""
