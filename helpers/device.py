"""Which device trains, and at which precision: one policy per machine, with its reason in words.

T4 is not an A100, and a CPU without bf16 units is not one with them: `precision_policy` is the one
place that tells them apart (docs/precision.md has the table; a test fakes each row).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch


def pick_device() -> torch.device:
    """A CUDA GPU, else an Apple GPU (mps), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How a device trains: the autocast dtype (None: fp32), whether fp16 needs a GradScaler, and why."""

    dtype: torch.dtype | None
    reason: str

    def __str__(self) -> str:
        name = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}.get(self.dtype, "fp32")
        return f"{name}: {self.reason}"


def _cpu_has(check: str) -> bool:
    """torch.cpu's instruction-set checks (torch >= 2.3); False on builds that lack them."""
    probe = getattr(torch.cpu, check, None)
    return bool(probe and probe())


def precision_policy(device: torch.device) -> Precision:
    """The one place that decides precision per machine.

    Never asks torch.cuda.is_bf16_supported() (True on a T4, by emulation) or oneDNN's bf16 check
    (True on plain AVX512 chips, where bf16 is emulated and slower than fp32).
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        chip = f"{name} (compute capability {major}.{minor})"
        if major >= 8:
            return Precision(torch.bfloat16, f"{chip} has bf16 tensor cores")
        if major == 7:
            return Precision(torch.float16, f"{chip} has fp16 but no bf16 tensor cores")
        return Precision(None, f"{chip} has no tensor cores")
    if device.type == "mps":
        return Precision(None, "Apple GPU: mixed precision not measured, fp32 is the safe choice")
    if _cpu_has("_is_amx_tile_supported"):
        return Precision(torch.bfloat16, "this CPU has AMX bf16 units")
    if _cpu_has("_is_avx512_bf16_supported"):
        return Precision(torch.bfloat16, "this CPU has AVX512-BF16 instructions")
    return Precision(None, "this CPU has no bf16 units (AMX or AVX512-BF16): emulated bf16 is slower than fp32")


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16, whose small gradients underflow without loss scaling; None for bf16 (fp32's range)."""
    if dtype != torch.float16:
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def hardware(device: torch.device) -> str:
    """What ran the numbers, e.g. 'NVIDIA H100 80GB HBM3' or 'CPU: Intel(R) Xeon(R) Processor, 2 cores'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (mps), {platform.machine()}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"
