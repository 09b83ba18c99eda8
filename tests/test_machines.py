"""Right on every machine: the precision policy row by row (hardware queries faked), the fp16 path for
real, the device order, the albumentations update check, and the Colab setup cell."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import backprop as B
from helpers.dataset import make_loaders
from helpers.model import Net

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def _fake_gpu(monkeypatch, name, capability):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def _fake_cpu(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize(
    "name, capability",
    [("NVIDIA A100-SXM4-40GB", (8, 0)), ("NVIDIA L4", (8, 9)), ("NVIDIA H100 80GB HBM3", (9, 0))],
)
def test_gpus_with_bf16_tensor_cores_train_in_bf16(monkeypatch, name, capability):
    _fake_gpu(monkeypatch, name, capability)
    precision = B.precision_policy(CUDA)
    assert precision.dtype == torch.bfloat16 and not precision.scaled
    assert str(precision).startswith("bf16 autocast: ") and name in str(precision)


@pytest.mark.parametrize("name, capability", [("Tesla T4", (7, 5)), ("Tesla V100-SXM2-16GB", (7, 0))])
def test_t4_and_v100_train_in_fp16_with_a_grad_scaler(monkeypatch, name, capability):
    _fake_gpu(monkeypatch, name, capability)
    # the trap: torch.cuda.is_bf16_supported() says True on a T4 (emulation); the policy must not ask it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision = B.precision_policy(CUDA)
    assert precision.dtype == torch.float16 and precision.scaled
    major, minor = capability
    expected = (
        f"fp16 autocast + GradScaler: {name} (compute capability {major}.{minor}) has fp16 but no bf16 tensor cores"
    )
    assert str(precision) == expected


def test_older_gpus_train_in_fp32(monkeypatch):
    _fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    assert B.precision_policy(CUDA).dtype is None


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected", [(True, True, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)]
)
def test_cpus_use_bf16_only_with_bf16_units(monkeypatch, amx, avx512_bf16, expected):
    _fake_cpu(monkeypatch, amx, avx512_bf16)
    # the trap: oneDNN says yes to plain AVX512 chips, where bf16 is emulated and slower than fp32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert B.precision_policy(torch.device("cpu")).dtype == expected


def test_cpu_builds_without_the_instruction_checks_run_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    precision = B.precision_policy(torch.device("cpu"))
    assert precision.dtype is None and str(precision).startswith("fp32: ")


def test_apple_gpus_train_in_fp32():
    precision = B.precision_policy(torch.device("mps"))
    assert precision.dtype is None and "Apple" in str(precision)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_order_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert B.pick_device().type == expected


def test_fp16_autocast_with_grad_scaler_trains_for_real(cifar_root, monkeypatch):
    steps = []
    real_step = torch.amp.GradScaler.step

    def counted_step(self, optimizer, *args, **kwargs):
        steps.append(self.get_scale())
        return real_step(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", counted_step)
    B.seed_everything(0)
    loaders = make_loaders(64, seed=0, num_workers=0, train_size=256, test_size=64, root=cifar_root)
    fp16 = B.Precision(torch.float16, "a T4, simulated on the CPU")
    narrow = Net(widths=(8, 8, 16, 16))  # CPUs emulate fp16 slowly: a narrow Net keeps this test short
    history = B.fit(narrow, *loaders, 3, max_lr=0.05, device=torch.device("cpu"), precision=fp16).history
    assert len(steps) == 3 * 4, "every optimizer step goes through the scaler"
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_importing_the_helpers_switches_off_the_albumentations_update_check(tmp_path):
    probe = """
import json, urllib.request
calls = []
urllib.request.OpenerDirector.open = lambda self, *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError("offline"))
import helpers.dataset, os
print(json.dumps({"calls": len(calls), "env": os.environ.get("NO_ALBUMENTATIONS_UPDATE")}))
"""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    # no request from this process, and the setting is inherited by every DataLoader worker
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"calls": 0, "env": "1"}


def test_the_colab_setup_cell_clones_the_repository_and_helpers_import(tmp_path):
    clone = tmp_path / "origin"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    cells = json.loads((ROOT / "S9.ipynb").read_text())["cells"]
    cell = next(c for c in cells if c["cell_type"] == "code" and "REPO_URL" in "".join(c["source"]))
    source = "".join(cell["source"])
    placeholder = 'REPO_URL = "https://github.com/<you>/S9.git"'
    assert placeholder in source
    script = f"""
import sys, types
sys.modules["google"] = types.ModuleType("google")
sys.modules["google.colab"] = types.ModuleType("google.colab")  # what Colab's runtime has imported
{source.replace(placeholder, f"REPO_URL = {str(clone)!r}")}
import helpers.dataset, helpers.model
print("imported from", helpers.__file__)
"""
    content = tmp_path / "content"  # Colab's working folder
    content.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=content, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"imported from {content / 'S9' / 'helpers' / '__init__.py'}" in out.stdout
