"""Test setup: quick mode for the notebook, a headless plot backend, and the real CIFAR-10 where it can be had."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import helpers` also under plain `pytest`

# Read by S9.ipynb's parameters cell: nbval re-executes it on a small subset for one epoch.
os.environ.setdefault("S9_QUICK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CIFAR10_ROOT", str(ROOT / "data"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: every download attempt fails as on a machine without internet."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def killed_in_epoch(monkeypatch: pytest.MonkeyPatch):
    """killed_in_epoch(module, k): module.train raises KeyboardInterrupt on its k-th call, as a kill or a lost
    runtime would mid-epoch; the returned function puts the real train back (a rerun then resumes)."""

    def kill(module, k: int):
        real_train, calls = module.train, []

        def train(*args, **kwargs):
            calls.append(1)
            if len(calls) == k:
                raise KeyboardInterrupt
            return real_train(*args, **kwargs)

        monkeypatch.setattr(module, "train", train)
        return lambda: monkeypatch.setattr(module, "train", real_train)

    return kill


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The folder holding cifar-10-batches-py ($CIFAR10_ROOT), or a skip saying why."""
    from helpers.dataset import DatasetNotFoundError, data_root, load_cifar10

    try:
        load_cifar10(False)
    except DatasetNotFoundError as err:
        pytest.skip(str(err))
    return data_root()


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


@pytest.fixture(scope="session")
def cifar(cifar_root: Path):
    """The real CIFAR-10 as ImageData, loaded once."""
    from helpers.dataset import cifar10

    return cifar10(cifar_root)


@pytest.fixture(scope="session")
def small(cifar):
    """Loader factory over a small real subset (256 train / 128 test), the recipe's augmentations, one process."""
    from helpers.dataset import make_loaders
    from helpers.recipe import RECIPE

    data = cifar.subsample(train_images=256, test_images=128)

    def loaders(seed: int = 0, batch_size: int = 64, augment=None, data=data):
        augment = RECIPE.augmentations(data.mean) if augment is None else augment
        return make_loaders(data, batch_size=batch_size, augment=augment, seed=seed, num_workers=0)

    return loaders


def pytest_terminal_summary(terminalreporter) -> None:
    """A run that could not reach the real CIFAR-10 says so last, in red: its skips are not passes."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "CIFAR-10 is not in" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("=", f"{len(skipped)} tests did NOT run: they need the real CIFAR-10", red=True)
        terminalreporter.write_line(
            "Point CIFAR10_ROOT at the folder that holds cifar-10-batches-py/ (or go online) and run them again.",
            red=True,
        )
