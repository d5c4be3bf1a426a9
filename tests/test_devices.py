"""The CPU's instruction set, as benchmarks name it beside their figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmnist import devices


def test_instruction_set_names_what_the_cpu_offers():
    isa = devices.instruction_set()
    assert isa in ("AMX", "AVX-512 BF16", "AVX-512", "AVX2", "NEON", "no AVX2")
    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo to check against")
    flags = set(info.read_text().split())
    expected = ("AMX" if {"amx_bf16", "amx_tile"} <= flags else "AVX-512 BF16" if "avx512_bf16" in flags
                else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None)
    if expected:
        assert isa == expected
    if isa == "AVX-512 BF16" or isa == "AMX":
        assert devices.native_bf16()  # oneDNN computes bf16 natively where the CPU has these


def test_instruction_set_reads_the_flags(monkeypatch, tmp_path):
    for flags, isa in (("fpu avx2 fma", "AVX2"), ("avx2 avx512f", "AVX-512"), ("avx512f avx512_bf16", "AVX-512 BF16"),
                       ("avx512_bf16 amx_bf16 amx_tile", "AMX")):
        fake = tmp_path / "cpuinfo"
        fake.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(devices, "Path", lambda p, fake=fake: fake if str(p) == "/proc/cpuinfo" else Path(p))
        monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
        assert devices.instruction_set() == isa


def test_a_cpu_held_to_narrower_kernels_says_both(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor : 0\nflags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    monkeypatch.setattr(devices, "Path", lambda p: fake if str(p) == "/proc/cpuinfo" else Path(p))
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert devices.instruction_set() == "AVX2 (ONEDNN_MAX_CPU_ISA; the CPU has AMX)"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")  # no lower than the CPU: the CPU's own
    assert devices.instruction_set() == "AMX"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert devices.instruction_set() == "AMX"
