"""Where and in what dtype the CLIs run: `--device` and `--dtype` as a user means them.

Plain helpers with no model code, imported by every command line (demo, bench, make-responses,
train-drafter) and by the benchmark scripts.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "fp32", "bf16")


def pick_device(name: str) -> torch.device:
    """`--device`: "auto" is cuda when torch sees a GPU, else cpu; anything else goes to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: not a torch device ({err}); use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: torch sees no CUDA device here; use --device cpu (or auto).")
    return device


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, aarch64 `Features` in /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX-BF16, aarch64 bf16


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls run natively: CUDA devices that support bf16, CPUs with a bf16 flag."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """`--dtype`: (torch dtype, why). "auto" is bf16 where `native_bf16(device)`, else fp32."""
    if name == "auto":
        device = torch.device(device)
        if native_bf16(device):
            why = "native bf16 on " + ("this GPU" if device.type == "cuda" else
                                       "this CPU (" + ", ".join(sorted(cpu_flags() & BF16_CPU_FLAGS)) + ")")
            return torch.bfloat16, f"bf16 (auto: {why})"
        return torch.float32, f"fp32 (auto: no native bf16 on {device.type})"
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}.")
    return DTYPES[name], "bf16" if DTYPES[name] == torch.bfloat16 else "fp32"
