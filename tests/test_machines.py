"""Right on every machine: the precision policy row by row (hardware queries faked), the fp16 path for
real (overflowing first steps, a collapsing scale), the device order, loader workers per device, the
albumentations update check, and both Colab routes of the setup cell."""

import json
import os
import subprocess
import sys
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import backprop as B
from helpers import device as D
from helpers import utils
from helpers.dataset import default_workers
from helpers.model import Net
from helpers.recipe import RECIPE

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
PINNED = ["albumentations==2.0.8", "grad-cam==1.5.7"]  # what helpers/ is tested with


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
    precision = D.precision_policy(CUDA)
    assert precision.dtype == torch.bfloat16 and precision.grad_scaler() is None
    assert str(precision).startswith("bf16 autocast: ") and name in str(precision)


@pytest.mark.parametrize("name, capability", [("Tesla T4", (7, 5)), ("Tesla V100-SXM2-16GB", (7, 0))])
def test_t4_and_v100_train_in_fp16_with_a_grad_scaler(monkeypatch, name, capability):
    _fake_gpu(monkeypatch, name, capability)
    # the trap: torch.cuda.is_bf16_supported() says True on a T4 (emulation); the policy must not ask it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision = D.precision_policy(CUDA)
    assert precision.dtype == torch.float16
    assert isinstance(replace(precision, device=torch.device("cpu")).grad_scaler(), torch.amp.GradScaler)
    major, minor = capability
    expected = (
        f"fp16 autocast + GradScaler: {name} (compute capability {major}.{minor}) has fp16 but no bf16 tensor cores"
    )
    assert str(precision) == expected


def test_older_gpus_train_in_fp32(monkeypatch):
    _fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    assert D.precision_policy(CUDA).dtype is None


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected", [(True, True, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)]
)
def test_cpus_use_bf16_only_with_bf16_units(monkeypatch, amx, avx512_bf16, expected):
    _fake_cpu(monkeypatch, amx, avx512_bf16)
    # the trap: oneDNN says yes to plain AVX512 chips, where bf16 is emulated and slower than fp32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert D.precision_policy(torch.device("cpu")).dtype == expected


def test_cpu_builds_without_the_instruction_checks_run_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    precision = D.precision_policy(torch.device("cpu"))
    assert precision.dtype is None and str(precision).startswith("fp32: ")


def test_apple_gpus_train_in_fp32():
    precision = D.precision_policy(torch.device("mps"))
    assert precision.dtype is None and "Apple" in str(precision)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_order_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    _fake_gpu(monkeypatch, "NVIDIA L4", (8, 9))
    assert D.precision_policy().device.type == expected


def test_fp16_autocast_with_grad_scaler_trains_for_real(small, monkeypatch):
    steps = []
    real_step = torch.amp.GradScaler.step

    def counted_step(self, optimizer, *args, **kwargs):
        steps.append(self.get_scale())
        return real_step(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", counted_step)
    torch.manual_seed(0)
    train_loader = small()[0]
    narrow = Net(widths=(8, 8, 16, 16))  # CPUs emulate fp16 slowly: a narrow Net keeps this test short
    sgd, scaler = torch.optim.SGD(narrow.parameters(), lr=0.05, momentum=0.9), torch.amp.GradScaler("cpu")
    losses = [B.train(narrow, train_loader, sgd, scaler=scaler, dtype=torch.float16)[0] for _ in range(3)]
    assert len(steps) == 3 * 4, "every optimizer step goes through the scaler"
    assert losses[-1] < losses[0]


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


def _fp16_epochs(small, **scaler_settings):
    """Three epochs of a narrow Net in fp16 on the CPU, the recipe's schedule, a GradScaler("cpu") of these settings."""
    torch.manual_seed(0)
    train_loader = small()[0]
    narrow = Net(widths=(8, 8, 16, 16))
    recipe = replace(RECIPE, epochs=3, max_lr=0.05)
    optimizer = recipe.optimizer(narrow)
    scheduler = recipe.schedule(optimizer, steps_per_epoch=len(train_loader))
    scaler, lrs = torch.amp.GradScaler("cpu", **scaler_settings), []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        B.train(narrow, train_loader, optimizer, scheduler=scheduler, scaler=scaler, dtype=torch.float16)
    return lrs, scheduler


def test_fp16_steps_skipped_for_overflow_do_not_advance_the_schedule_or_warn(small, monkeypatch):
    steps_taken, real_step = [], torch.optim.SGD.step
    monkeypatch.setattr(
        torch.optim.SGD, "step", lambda self, *a, **k: steps_taken.append(1) or real_step(self, *a, **k)
    )
    # a scale of 2**40 overflows fp16 gradients: the first steps are skipped, each one dividing the scale by 256
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "lr_scheduler.step() before optimizer.step()"
        lrs, scheduler = _fp16_epochs(small, init_scale=2.0**40, backoff_factor=2.0**-8)
    assert 8 <= len(steps_taken) < 12, "of 3 epochs x 4 batches, the first steps were skipped"
    assert scheduler.last_epoch == len(steps_taken), "the schedule counts only the steps taken"
    assert lrs[0] == pytest.approx(0.005) and len(lrs) == 3  # the warm-up starts at lr / 10; skips are not divergence


def test_a_collapsed_fp16_loss_scale_stops_training_with_a_clear_error(small):
    with pytest.raises(B.DivergedError, match="fp16 skipped \\(nearly\\) every step"):
        _fp16_epochs(small, init_scale=2.0**40, backoff_factor=1e-30)


def test_loader_workers_leave_a_core_for_cpu_training_and_use_every_core_for_a_gpu(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # Colab
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (default_workers(cpu), default_workers(cuda)) == (1, 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert (default_workers(cpu), default_workers(cuda)) == (16, 16)


class _CudaLike(torch.Tensor):
    """A tensor that, like a CUDA one, refuses .numpy() until it is moved to the CPU."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *args, **kwargs):
        return torch.Tensor(self.as_subclass(torch.Tensor))


def test_confusion_matrix_takes_predictions_still_on_the_gpu():
    labels = torch.tensor([0, 1, 2, 2]).as_subclass(_CudaLike)
    predictions = torch.tensor([0, 2, 2, 2]).as_subclass(_CudaLike)
    matrix = utils.confusion_matrix(labels, predictions, classes=("a", "b", "c"))
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 2]]


def _setup_cell() -> str:
    cells = json.loads((ROOT / "S9.ipynb").read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code" and "REPO_URL" in "".join(c["source"]))["source"])


def _run_in_fake_colab(cell: str, content, tmp_path, installed: str, ok: bool = True):
    """Run the setup cell in a fresh Python whose google.colab is faked, from Colab's working folder.

    pip is faked too (it records what the cell asks for) and the packages in `installed` look absent.
    """
    log = tmp_path / "pip.log"
    script = f"""
import importlib.metadata, subprocess, sys, types
sys.modules["google"] = types.ModuleType("google")
sys.modules["google.colab"] = types.ModuleType("google.colab")  # what Colab's runtime has imported
real_version, real_run = importlib.metadata.version, subprocess.run
def version(name):
    if name in {installed.split()!r}:
        raise importlib.metadata.PackageNotFoundError(name)
    return real_version(name)
def run(command, *args, **kwargs):
    if command[1:4] == ["-m", "pip", "install"]:
        open({str(log)!r}, "a").write(" ".join(command[4:]) + "\\n")
        return subprocess.CompletedProcess(command, 0)
    return real_run(command, *args, **kwargs)
importlib.metadata.version, subprocess.run = version, run
{cell}
import helpers.dataset, helpers.model
print("imported from", helpers.__file__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=content, env=env, capture_output=True, text=True, timeout=300
    )
    assert (out.returncode == 0) == ok, out.stderr[-2000:]
    return (out.stdout if ok else out.stderr), log.read_text() if log.exists() else ""


def test_the_colab_setup_cell_clones_the_repository_and_installs_the_pinned_versions(tmp_path):
    clone = tmp_path / "origin"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    placeholder = 'REPO_URL = "https://github.com/your-user/S9.git"'
    cell = _setup_cell()
    assert placeholder in cell
    content = tmp_path / "content"  # Colab's working folder
    content.mkdir()
    out, pip = _run_in_fake_colab(
        cell.replace(placeholder, f"REPO_URL = {str(clone)!r}"), content, tmp_path, "grad-cam"
    )
    assert f"imported from {content / 'S9' / 'helpers' / '__init__.py'}" in out
    assert pip.split() == ["-q", *PINNED], "the versions helpers/ is tested with (pip skips what Colab has)"


def test_the_colab_setup_cell_unzips_an_uploaded_helpers_zip_and_installs_the_pinned_versions(tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    with zipfile.ZipFile(content / "helpers.zip", "w") as archive:  # what Compress / Send to zip makes
        for path in (ROOT / "helpers").glob("*.py"):
            archive.write(path, f"helpers/{path.name}")
    out, pip = _run_in_fake_colab(_setup_cell(), content, tmp_path, "grad-cam")
    assert f"imported from {content / 'helpers' / '__init__.py'}" in out
    assert pip.split() == ["-q", *PINNED]


def test_the_colab_setup_cell_says_what_is_wrong_with_a_zip_of_the_folders_contents(tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    with zipfile.ZipFile(content / "helpers.zip", "w") as archive:  # the files themselves, no helpers/ folder
        for path in (ROOT / "helpers").glob("*.py"):
            archive.write(path, path.name)
    err, pip = _run_in_fake_colab(_setup_cell(), content, tmp_path, "grad-cam", ok=False)
    assert "helpers.zip has no helpers/ folder inside" in err and "zip -r helpers.zip helpers" in err
    assert "ModuleNotFoundError" not in err and pip == ""
