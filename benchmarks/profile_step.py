"""Where a training step's time goes: per layer, multiply-adds and time, against this CPU's peaks.

    python benchmarks/profile_step.py [--preset cnn-fast] [--batch 256] [--repeats 7]

For the preset's model at its batch size, memory format and precision (bf16
autocast only where the CPU computes it natively, as `precision = "auto"`):

1. the whole step (forward, loss, backward, optimiser), median of --repeats;
2. each layer alone, forward and backward on the input it gets in the step
   (captured by a forward hook), median of --repeats, with its multiply-adds
   and achieved GFLOP/s (a backward costs about two forwards: 3 x 2 x MACs);
3. torch.profiler's table of the step's operators by their own CPU time;
4. this machine's peaks: a 2048x2048 matrix multiply and a large 3x3
   convolution, fp32 (and bf16 where native).

The instruction set (AVX2, AVX-512, AVX-512 BF16, AMX, NEON) is named beside
the figures. Results: benchmarks/RESULTS.md, "Where cnn-fast's time goes".
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from train_step import matmul_gflops  # benchmarks/ is on the path when this script runs

from fmnist import config, devices, models


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Multiply-adds of one forward of a convolution or linear layer on the batch (0 for the others)."""
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return y.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return y.numel() * module.in_features
    return 0


def peaks(bf16: bool, repeats: int) -> dict[str, float]:
    """GFLOP/s of a 2048x2048 matrix multiply and of a 3x3 convolution (256 x 64 x 28 x 28 -> 64 channels)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not bf16:
            continue
        out[f"matmul {name}"] = matmul_gflops(dtype, repeats=repeats)
        x = torch.randn(256, 64, 28, 28, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.randn(64, 64, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
        macs = 256 * 64 * 28 * 28 * 64 * 9
        out[f"conv 3x3 {name}"] = 2 * macs / median_time(lambda x=x, w=w: F.conv2d(x, w, padding=1), repeats) / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cnn-fast", help="a preset of `fmnist models` (default: cnn-fast)")
    ap.add_argument("--batch", type=int, default=0, help="images per step (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats of each measurement (default: 7)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core)")
    args = ap.parse_args()
    cfg = config.preset(args.preset)
    batch = args.batch or cfg.batch_size
    torch.set_num_threads(args.threads or devices.cores())
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    bf16 = devices.use_bf16(cfg.precision, torch.device("cpu"))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = models.create(cfg.model, **cfg.model_kwargs()).train().to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 1, 28, 28).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    whole = median_time(step, args.repeats)

    # Each leaf layer's input in the step, then the layer alone, forward and backward.
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:  # None: the output stays
            seen[name] = (inputs[0].detach(), output.detach())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in leaves]
    with autocast():
        model(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, m in leaves:
        inp, out = seen[name]
        grad = torch.randn_like(out)

        def fwd_bwd(m=m, inp=inp, grad=grad) -> None:
            a = inp.clone().requires_grad_(True)
            with autocast():
                o = m(a)
            o.backward(grad.to(o.dtype))

        t = median_time(fwd_bwd, args.repeats)
        macs = layer_macs(m, inp, out)
        rows.append((name, type(m).__name__, tuple(inp.shape[1:]), macs, t))
    layers_total = sum(r[4] for r in rows)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)

    macs_img = models.macs_per_image(models.create(cfg.model, **cfg.model_kwargs()))
    isa = devices.instruction_set()
    print(f"preset {args.preset}: model {cfg.model}, {macs_img / 1e6:.2f}M multiply-adds per image forward, "
          f"batch {batch}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"{'channels-last' if cfg.channels_last else 'contiguous'}, {torch.get_num_threads()} threads, "
          f"CPU {isa}; medians of {args.repeats}\n")
    print(f"whole step: {whole * 1e3:.1f} ms = {batch / whole:,.0f} images/s, "
          f"{3 * 2 * macs_img * batch / whole / 1e9:.1f} GFLOP/s achieved\n")
    print("| layer | kind | input (C, H, W) | MACs per image | share of MACs | forward + backward | share of the "
          "layers' time | GFLOP/s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    total_macs = sum(r[3] for r in rows)
    for name, kind, shape, macs, t in rows:
        gf = f"{3 * 2 * macs / t / 1e9:.1f}" if macs else ""
        share = f"{macs / total_macs:.1%}" if macs else ""
        print(f"| {name} | {kind} | {shape} | {macs // batch:,} | {share} | {t * 1e3:.2f} ms | "
              f"{t / layers_total:.1%} | {gf} |")
    print(f"\nlayers alone: {layers_total * 1e3:.1f} ms; the step: {whole * 1e3:.1f} ms (the rest: loss, "
          "optimiser, autograd's bookkeeping)\n")
    print("this machine's peaks, GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks(bf16, 5).items())
          + f" ({isa})\n")
    print(table)


if __name__ == "__main__":
    main()
