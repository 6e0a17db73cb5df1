"""Print one line naming this machine's CPU, its SIMD/matrix features and torch's CPU kernel libraries.

Called by .ci/run before the tests, so that a failure names the hardware it happened on: float reduction order,
and with it anything that goes through PGD's sign(), depends on which kernels oneDNN/MKL pick for this CPU.
"""
import os
import re

import torch

FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
            "amx_bf16", "amx_int8")


def cpu() -> tuple[str, list[str]]:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in FEATURES if f in flags]


def kernel_libraries() -> str:
    config = torch.__config__.show()
    found = [m.group(0) for m in (re.search(r"Math Kernel Library Version [\w.\-]+", config),
                                  re.search(r"MKL-DNN v[\d.]+", config)) if m]
    return ", ".join(found) or "no MKL/oneDNN"


def main() -> None:
    model, features = cpu()
    print(f"machine: {model}; {len(os.sched_getaffinity(0))} cores usable; features {' '.join(features) or 'none'}; "
          f"torch {torch.__version__} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{kernel_libraries()})")


if __name__ == "__main__":
    main()
