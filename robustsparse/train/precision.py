"""Which autocast precision ``train.amp=auto`` picks, and why (the reason is recorded in run.json).

    CUDA:  bf16 where the GPU supports it (Ampere and later), else fp16 with loss scaling
    CPU:   bf16 where the cores execute bf16 natively, else fp32

Native bf16 on x86 means AMX-BF16 (Sapphire Rapids and later: bf16 tile matrix multiply) or AVX512-BF16 (Cooper
Lake, Zen 4 and later: ``vdpbf16ps``, a bf16 dot product accumulating in fp32). oneDNN then runs convolutions and
matrix products in bf16 at 2× (AVX512-BF16) to ≥ 8× (AMX) the fp32 FLOP rate. On a CPU without them oneDNN emulates
bf16 by converting to fp32, so autocast only adds casts: fp32 is the right default there.

Detection reads the ``flags`` line of /proc/cpuinfo (Linux, what the kernel enabled; AMX also needs the kernel to
grant the tile state, which Linux ≥ 5.16 does and lists as ``amx_bf16``). Where /proc/cpuinfo is missing (macOS,
Windows) it asks torch's own cpuinfo query (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``,
private, so guarded). Tests replace :func:`cpu_bf16_support` to mock either machine.
"""
from __future__ import annotations

import torch

from ..runs.machine import cpuinfo

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # in order of preference for the reason string


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags the kernel reports (first ``flags`` line), or None where there is no such file."""
    info = cpuinfo(path)
    return info.get("flags", set()) if info else None


def cpu_bf16_support() -> str | None:
    """Why this CPU runs bf16 natively (e.g. ``"cpu has amx_bf16"``), or None when it does not."""
    flags = cpu_flags()
    if flags is not None:
        found = [f for f in CPU_BF16_FLAGS if f in flags]
        return f"cpu has {' and '.join(found)}" if found else None
    queries = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for flag, query in queries:  # torch's private cpuinfo bindings; absent in some builds
        fn = getattr(getattr(torch, "cpu", None), query, None)
        try:
            if fn is not None and fn():
                return f"cpu has {flag} (torch cpuinfo)"
        except RuntimeError:
            continue
    return None


def auto_precision(device: torch.device) -> tuple[str, str]:
    """(precision, reason) for ``amp=auto`` on ``device``: one of bf16 | fp16 | fp32 and a short why."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "cuda device supports bf16"
        return "fp16", "cuda device without bf16: fp16 with loss scaling"
    if device.type == "cpu":
        reason = cpu_bf16_support()
        if reason is not None:
            return "bf16", reason
        return "fp32", "cpu has neither amx_bf16 nor avx512_bf16 (bf16 would be emulated)"
    return "fp32", f"no autocast default for device type {device.type!r}"
