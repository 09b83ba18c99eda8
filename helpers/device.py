"""Which device trains, and at which precision: one policy per machine, with its reason in words
(docs/precision.md has the table; a test fakes each row)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """Where and how a run trains: the device, the autocast dtype (None: fp32), the machine's name, and why."""

    device: torch.device
    dtype: torch.dtype | None
    reason: str
    hardware: str

    @property
    def name(self) -> str:
        """'bf16 autocast', 'fp16 autocast + GradScaler' or 'fp32'."""
        return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}.get(self.dtype, "fp32")

    @property
    def machine(self) -> str:
        """'CPU: AMD EPYC, 2 cores (bf16 autocast)': what ran an epoch, as logs and records name it."""
        return f"{self.hardware} ({self.name})"

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16, whose small gradients underflow without loss scaling; None for bf16 and fp32."""
        if self.dtype != torch.float16:
            return None
        if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
            return torch.amp.GradScaler(self.device.type)
        return torch.cuda.amp.GradScaler()


def _cpu_has(check: str) -> bool:
    """torch.cpu's instruction-set checks (torch >= 2.3); False on builds that lack them."""
    probe = getattr(torch.cpu, check, None)
    return bool(probe and probe())


def _cpu_name() -> str:
    """'CPU: AMD EPYC 9R14, 2 cores': the model name from /proc/cpuinfo where there is one."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name}, {os.cpu_count()} cores"


def precision_policy(device: torch.device | None = None) -> Precision:
    """The one place that decides device and precision: a CUDA GPU, else an Apple GPU (mps), else the CPU. Never asks
    torch.cuda.is_bf16_supported() (True on a T4, emulated) or oneDNN (True on AVX512 chips that emulate bf16)."""
    if device is None:
        cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
        device = torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        chip = f"{name} (compute capability {major}.{minor})"
        if major >= 8:
            return Precision(device, torch.bfloat16, f"{chip} has bf16 tensor cores", name)
        if major == 7:
            return Precision(device, torch.float16, f"{chip} has fp16 but no bf16 tensor cores", name)
        return Precision(device, None, f"{chip} has no tensor cores", name)
    if device.type == "mps":
        mac = f"Apple GPU (mps), {platform.machine()}"
        return Precision(device, None, "Apple GPU: mixed precision not measured, fp32 is the safe choice", mac)
    if _cpu_has("_is_amx_tile_supported"):
        return Precision(device, torch.bfloat16, "this CPU has AMX bf16 units", _cpu_name())
    if _cpu_has("_is_avx512_bf16_supported"):
        return Precision(device, torch.bfloat16, "this CPU has AVX512-BF16 instructions", _cpu_name())
    reason = "this CPU has no bf16 units (AMX or AVX512-BF16): emulated bf16 is slower than fp32"
    return Precision(device, None, reason, _cpu_name())
