"""The machine a number was measured on, and its nominal peak FLOP rate (the denominator of "share of peak").

CPU peak, per precision:

    peak = cores × clock × FLOP per cycle per core

* cores: the physical cores torch's threads can use, min(torch threads, physical cores in the affinity mask);
* clock: the larger of /proc/cpuinfo's ``cpu MHz`` and cpufreq's ``cpuinfo_max_freq``. A VM often reports its
  nominal clock only; all-core turbo may be higher, so the share of peak can be overstated, never understated by
  the clock;
* fp32 FLOP per cycle = FMA units × lanes × 2 (an FMA is a multiply and an add). Assumed: 2 FMA units per core
  (Intel server cores since Skylake-SP, AMD Zen 2-5); lanes = 16 with AVX-512 on Intel and on AMD Zen 5
  (``cpu family`` 26, whose EPYC and desktop parts have a 512-bit datapath), 8 with AVX2 or on earlier AMD (Zen 4
  runs AVX-512 on 256-bit units); 4 with SSE only. → 64 (AVX-512 at full width), 32 (AVX2). Zen 5 laptop parts
  run AVX-512 on 256-bit units and are counted at 16 lanes too, which overstates their peak;
* bf16 with AVX512-BF16 (``vdpbf16ps``: 32 bf16 products summed in pairs into 16 fp32 lanes per instruction):
  2 × the fp32 rate;
* bf16 with AMX-BF16: 1024 FLOP per cycle per core, Intel's published rate for the TMUL unit (one 16×16×32 tile
  product ``tdpbf16ps`` = 16,384 FLOP every 16 cycles). This is the matrix unit's peak only: the element-wise
  work around a convolution (BN, ReLU, casts) runs on the vector units, so small layers reach a small share of it.

CUDA peaks are the spec sheet's dense numbers (no sparsity) for the GPUs we know, else None.
"""
from __future__ import annotations

import os
import platform
import re

import torch

AMX_BF16_FLOP_PER_CYCLE = 1024
ZEN5_FAMILY = 26  # AMD's first family with 512-bit AVX-512 units (Zen 4 is 25 and splits AVX-512 in two)
# name fragment -> (fp32 non-tensor, tf32 dense tensor-core, bf16 dense tensor-core) FLOP/s; SXM parts. cuDNN
# runs "fp32" convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), so tf32 is the fp32 loops' peak.
CUDA_PEAKS = {"H200": (67e12, 494e12, 989e12), "H100": (67e12, 494e12, 989e12), "A100": (19.5e12, 156e12, 312e12),
              "L40S": (91.6e12, 183e12, 362e12)}


def cpuinfo(path: str = "/proc/cpuinfo") -> dict:
    """model name, flags, MHz and physical core ids of the first processor entries (Linux; {} elsewhere)."""
    info: dict = {"cores": set()}
    phys = core = None
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = (s.strip() for s in line.partition(":"))
                if key == "model name":
                    info.setdefault("model", value)
                elif key == "flags":
                    info.setdefault("flags", set(value.split()))
                elif key == "cpu MHz":
                    info.setdefault("mhz", float(value))
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif key == "vendor_id":
                    info.setdefault("vendor", value)
                elif key == "cpu family" and value.isdigit():
                    info.setdefault("family", int(value))
                elif not key and (phys, core) != (None, None):
                    info["cores"].add((phys, core))
                    phys = core = None
    except OSError:
        return {}
    if (phys, core) != (None, None):
        info["cores"].add((phys, core))
    return info


def _max_mhz() -> float | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as fh:
            return int(fh.read().strip()) / 1000
    except (OSError, ValueError):
        return None


def cpu_peak(threads: int | None = None, info: dict | None = None) -> dict:
    """The nominal fp32 and bf16 peak FLOP/s of the cores ``threads`` torch threads can use, with its inputs."""
    info = cpuinfo() if info is None else info
    flags = info.get("flags", set())
    mhz = max(v for v in (info.get("mhz"), _max_mhz(), 0.0) if v is not None)
    physical = len(info.get("cores", ())) or os.cpu_count() or 1
    try:
        physical = min(physical, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        pass
    cores = min(threads or torch.get_num_threads(), physical)
    half_width_avx512 = info.get("vendor") == "AuthenticAMD" and info.get("family", 0) < ZEN5_FAMILY
    lanes = 16 if "avx512f" in flags and not half_width_avx512 else 8 if "avx2" in flags or "avx512f" in flags else 4
    fp32_per_cycle = 2 * lanes * 2
    if "amx_bf16" in flags:
        bf16_per_cycle, bf16_unit = AMX_BF16_FLOP_PER_CYCLE, "amx_bf16"
    elif "avx512_bf16" in flags:
        bf16_per_cycle, bf16_unit = 2 * fp32_per_cycle, "avx512_bf16"
    else:
        bf16_per_cycle, bf16_unit = None, None
    hz = mhz * 1e6
    return {"model": info.get("model"), "cores": cores, "mhz": mhz, "fp32_flop_per_cycle": fp32_per_cycle,
            "bf16_flop_per_cycle": bf16_per_cycle, "bf16_unit": bf16_unit,
            "fp32": cores * hz * fp32_per_cycle if hz else None,
            "bf16": cores * hz * bf16_per_cycle if hz and bf16_per_cycle else None,
            "formula": "cores x clock x FLOP/cycle/core; fp32: 2 FMA units x lanes x 2; bf16: AVX512-BF16 2x fp32, "
                       "AMX-BF16 1024 (see robustsparse/runs/machine.py)"}


def device_peak(device: torch.device, threads: int | None = None) -> dict:
    if device.type != "cuda":
        return cpu_peak(threads)
    name = torch.cuda.get_device_name(device)
    for fragment, (fp32, tf32, bf16) in CUDA_PEAKS.items():
        if fragment in name:
            return {"model": name, "fp32": tf32 if torch.backends.cudnn.allow_tf32 else fp32, "fp32_no_tf32": fp32,
                    "bf16": bf16, "formula": "spec sheet, dense (no sparsity); fp32 = TF32 tensor cores where "
                                             "cuDNN may use them (torch's default for convolutions)"}
    return {"model": name, "fp32": None, "bf16": None, "formula": "unknown GPU: no peak on record"}


def cpu_name() -> str:
    return cpuinfo().get("model") or platform.processor() or platform.machine()


MACHINE_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                    "amx_tile", "amx_bf16", "amx_int8")


def machine_line() -> str:
    """One line naming the CPU, its SIMD/matrix features, torch's ATen CPU capability and its MKL/oneDNN versions:
    what decides which kernels (and so which float reduction order) a run gets. ``.ci/run`` prints it first."""
    flags = cpuinfo().get("flags", set())
    features = " ".join(f for f in MACHINE_FEATURES if f in flags) or "none listed"
    config = torch.__config__.show()
    libraries = [m.group(0) for m in (re.search(r"Math Kernel Library Version [\w.\-]+", config),
                                      re.search(r"MKL-DNN v[\d.]+", config)) if m]
    return (f"machine: {cpu_name()}; {len(os.sched_getaffinity(0))} cores usable; features {features}; "
            f"torch {torch.__version__} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"{', '.join(libraries) or 'no MKL/oneDNN'})")
