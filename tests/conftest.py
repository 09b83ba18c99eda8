"""Test setup: quick mode for the notebook, a headless plot backend, and the real CIFAR-10 when a copy exists."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_COPY = ROOT.parent / "shared" / "cifar10" / "unpack.py"
sys.path.insert(0, str(ROOT))  # `import helpers` also under plain `pytest`

# Read by S9.ipynb's parameters cell: nbval re-executes it on a small subset for one epoch.
os.environ.setdefault("S9_QUICK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CIFAR10_ROOT", str(ROOT / "data"))


def _data_dir() -> Path:
    return Path(os.environ["CIFAR10_ROOT"]) / "cifar-10-batches-py"


def pytest_configure(config: pytest.Config) -> None:
    """Unpack the offline CIFAR-10 copy (md5-checked) into CIFAR10_ROOT once, when it is there."""
    if not (_data_dir() / "test_batch").exists() and OFFLINE_COPY.exists():
        subprocess.run([sys.executable, str(OFFLINE_COPY), os.environ["CIFAR10_ROOT"]], check=True)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: every download attempt fails as it does on a machine without internet."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The folder holding cifar-10-batches-py, or a skip that says why there is none."""
    if not (_data_dir() / "test_batch").exists():
        pytest.skip(f"no CIFAR-10 in {_data_dir()} and no offline copy at {OFFLINE_COPY}; see README (Data)")
    return Path(os.environ["CIFAR10_ROOT"])


@pytest.fixture(scope="session")
def train_split(cifar_root: Path):
    """The real training split (uint8 images, labels)."""
    from helpers.dataset import load_cifar10

    return load_cifar10(True, cifar_root)


@pytest.fixture(scope="session")
def test_split(cifar_root: Path):
    """The real test split (uint8 images, labels)."""
    from helpers.dataset import load_cifar10

    return load_cifar10(False, cifar_root)
