"""Training-step speed of a model under fp32, channels-last, bf16 autocast and both, in one process.

    python benchmarks/train_step.py [--model cnn] [--batch 256] [--steps 20] [--rounds 3] [--compile]

Each setting runs `--steps` training steps (forward, loss, backward, SGD
step) on random images after 3 warm-up steps; the settings alternate for
`--rounds` rounds and the table gives each one's median images/s and its
ratio to fp32. With --compile, torch.compile is measured too, its compile
time reported apart. Also prints the step's achieved GFLOP/s (3x the forward
multiply-adds x 2) beside this machine's fp32 and bf16 matrix-multiply GFLOP/s.
Measured 2026-11-29 on the 2-core VM: see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fmnist import devices, models


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def step_rate(model, x, y, opt, steps: int, bf16: bool) -> float:
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also torch.compile (slow to start)")
    args = ap.parse_args()
    torch.set_num_threads(devices.cores())
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    settings = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True),
                "channels_last + bf16": (True, True)}
    nets = {}
    for name, (cl, _) in settings.items():
        m = models.create(args.model).train()
        nets[name] = m.to(memory_format=torch.channels_last) if cl else m
    if args.compile:
        m = models.create(args.model).train().to(memory_format=torch.channels_last)
        t = time.perf_counter()
        nets["compiled, channels_last + bf16"] = torch.compile(m)
        opt = torch.optim.SGD(nets["compiled, channels_last + bf16"].parameters(), lr=0.01)
        step_rate(nets["compiled, channels_last + bf16"], x, y, opt, 1, True)
        print(f"torch.compile: first steps took {time.perf_counter() - t:.1f} s")
        settings["compiled, channels_last + bf16"] = (True, True)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True) for k, m in nets.items()}
    rates: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for name, (_, bf16) in settings.items():
            rates[name].append(step_rate(nets[name], x, y, opts[name], args.steps, bf16))
    macs = models.macs_per_image(models.create(args.model))
    base = statistics.median(rates["fp32"])
    print(f"model {args.model}, {macs / 1e6:.2f}M multiply-adds per image, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, CPU {devices.instruction_set()}\n")
    print("| setting | images/s (median) | vs fp32 | achieved GFLOP/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rates.items():
        rate = statistics.median(r)
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {rate * macs * 6 / 1e9:.0f} |")
    print(f"\nthis machine's matrix multiply (2048x2048): fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s, "
          f"bf16 {matmul_gflops(torch.bfloat16):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
