"""Devices: where and in what dtype the CLIs run (`--device` and `--dtype` as a user means them), and how the
loop moves its small host-made tensors to the target's device without waiting for it.

Plain helpers with no model code, imported by every command line (demo, bench, make-responses,
train-drafter), by the benchmark scripts and by the loop (`to_device`, `host_tensor`).
"""

from __future__ import annotations

import numpy as np
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


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device` without the host waiting for the device's queue.

    A copy from pageable host memory to a GPU (`tensor.to("cuda")`, `torch.tensor(..., device="cuda")`) makes the
    host wait until every kernel already queued on the stream has run: a hidden sync each round. A CPU tensor going
    to CUDA is staged in pinned memory (the caching host allocator keeps it alive until the copy's stream event)
    and copied with non_blocking=True; anything else is a plain non-blocking `.to` (a no-op where it already is)."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cpu":  # to the host: a read, blocking on purpose (never hand the host unfinished data)
        return tensor.to(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=True)


_NUMPY_DTYPES = {torch.long: np.int64, torch.int32: np.int32, torch.float64: np.float64, torch.float32: np.float32,
                 torch.bool: np.bool_}


def host_tensor(values, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (nested lists of numbers, rectangular) as a tensor on `device`, copied without a host wait
    (`to_device`). Made through NumPy: `torch.tensor` on a Python list costs ~0.1 us per element (~17 us for 178
    ints on this project's CPU), `np.array` 3-6x less; the loop makes such tensors every round."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    made = torch.tensor(values, dtype=dtype) if np_dtype is None else torch.from_numpy(np.array(values, dtype=np_dtype))
    return to_device(made, device)
