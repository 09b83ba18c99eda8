"""The evidence command runs every step (benchmark, shipped and speed seeds, the notebook) in quick mode."""

import tarfile

from helpers.recipe import RECIPE, SPEED_RECIPE
from tools import evidence


def test_speed_configuration_is_the_shipped_recipe_on_a_shorter_schedule():
    assert SPEED_RECIPE.epochs < RECIPE.epochs
    assert {k: v for k, v in SPEED_RECIPE.record().items() if k != "epochs"} == {
        k: v for k, v in RECIPE.record().items() if k != "epochs"
    }


def test_quick_evidence_runs_every_step_and_summarizes_three_seeds_each(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_ROOT", str(cifar_root))
    results, out = tmp_path / "Results", tmp_path / "out"
    assert evidence.main(["--quick", "--results", str(results), "--copy-to", str(out)]) == 0
    (folder,) = results.iterdir()
    assert folder.name.endswith("-quick")
    summary = (folder / "summary.md").read_text()
    assert "QUICK" in summary and "| shipped | 1 |" in summary and "| speed | 1 |" in summary
    assert "each in its own process" in summary and "S9.ipynb executed top to bottom" in summary
    assert "| loader images/s" in (folder / "bench.md").read_text()
    for name in ("shipped", "speed"):
        assert sorted(p.name for p in (folder / name).iterdir()) == ["seed0", "seed1", "seed2"]
    assert (out / "summary.md").read_text() == summary
    with tarfile.open(out / "evidence.tar.gz") as archive:
        names = archive.getnames()
    assert any(n.endswith("shipped/seed1/metrics.json") for n in names)
    assert not any(n.endswith("seed1/s9_net.pt") for n in names), "per-seed weights stay out of the archive"
