"""The commands beside the library run end to end (quick mode: it proves the path, not accuracy):
train.py, the benchmark, the ablation (and its resume), and --help."""

import dataclasses
import json

import pytest
import torch

import train
from helpers.measure import measure
from helpers.model import Net
from helpers.recipe import RECIPE, SPEED_RECIPE
from helpers.results import held_from, time_to_target, where_trained
from tools import ablation, bench, evidence


def test_time_to_target_counts_training_seconds_until_the_first_epoch_at_85():
    history = [{"epoch": e, "test_acc": acc, "train_seconds": 10.0} for e, acc in enumerate([70, 84.9, 85.0, 86], 1)]
    assert time_to_target(history) == (3, 30.0)
    assert time_to_target(history[:2]) == (None, None)


def test_a_run_resumed_elsewhere_names_the_machine_of_each_stretch_of_epochs():
    history = [{"epoch": 1, "machine": "A"}, {"epoch": 2, "machine": "A"}, {"epoch": 3, "machine": "B"}, {"epoch": 4}]
    assert where_trained(history, here="C") == "epochs 1-2 on A; epoch 3 on B; epoch 4 on C"


def test_85_percent_is_held_from_the_first_epoch_after_the_last_fall_below_it():
    history = [{"epoch": e, "test_acc": acc} for e, acc in enumerate([84, 85.6, 83.5, 86, 85.0, 89], 1)]
    assert held_from(history) == 4 and held_from(history[:3]) is None and held_from(history[1:2]) == 2


def test_quick_run_writes_logs_metrics_plots_and_loadable_weights(cifar, cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR10_ROOT", str(cifar_root))
    assert train.main(["--quick", "--workers", "0", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    config = metrics["config"]
    assert config["quick"] and metrics["final_epoch"] == 1 and config["test_images"] == 256
    assert metrics["params"] < 200_000 and metrics["receptive_field"] > 44 and metrics["device"]
    # the record alone reruns the result: every field of the recipe, as run (quick: 1 epoch)
    assert {k: config[k] for k in RECIPE.record()} == dataclasses.replace(RECIPE, epochs=1).record()
    assert 0 <= metrics["final_test_acc_tta"] <= 100
    assert not (tmp_path / train.CHECKPOINT_NAME).exists(), "the default checkpoint is removed once results are written"
    for png in ("curves", "confusion_matrix", "gradcam"):
        assert (tmp_path / f"{png}.png").stat().st_size > 10_000
    log = (tmp_path / "training_logs.md").read_text()
    assert "QUICK" in log and metrics["device"] in log and f"{metrics['final_test_acc_tta']:.2f}% with flip TTA" in log
    assert "with flip TTA" in capsys.readouterr().out
    trained = Net()
    trained.load_state_dict(torch.load(tmp_path / "s9_net.pt", weights_only=True))
    quick = cifar.subsample(seed=RECIPE.seed)  # quick mode's
    fitted = Net().fit_whitening(quick)  # the frozen layer was fitted to the run's own train images
    assert torch.equal(trained.c1[0].weight, fitted.c1[0].weight)


def test_help_lists_every_option_and_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    text = capsys.readouterr().out
    options = [o for action in train.parser()._actions for o in action.option_strings if o.startswith("--")]
    assert exit_.value.code == 0 and len(options) > 5 and all(o in text for o in options)


@pytest.mark.parametrize(
    "tool, args", [(ablation, ["--epoch", "1"]), (bench, ["--batch", "1"]), (evidence, ["--quic"])]
)
def test_the_tools_refuse_an_abbreviated_option(tool, args, capsys):
    with pytest.raises(SystemExit) as exit_:
        tool.parser().parse_args(args)
    assert exit_.value.code == 2 and args[0] in capsys.readouterr().err


def test_the_speed_recipe_brings_its_own_epochs(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_ROOT", str(cifar_root))
    ran = []
    monkeypatch.setattr(train, "run", lambda recipe, *a, **k: ran.append(recipe) or {"params": 0})
    monkeypatch.setattr(train, "accuracy_line", lambda m: "")
    assert train.main(["--recipe", "speed", "--out", str(tmp_path)]) == 0
    assert ran == [dataclasses.replace(SPEED_RECIPE)]
    assert train.main(["--recipe", "speed", "--seed", "3", "--lr", "0.1", "--out", str(tmp_path)]) == 0
    assert ran[1] == dataclasses.replace(SPEED_RECIPE, seed=3, max_lr=0.1)


def test_benchmark_prints_both_loaders_and_the_worker_counts_side_by_side(cifar_root, monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR10_ROOT", str(cifar_root))
    args = ["--workers", "0", "--loader-batches", "2", "--steps", "1", "--epoch-images", "256", "--batch-size", "64"]
    assert bench.main(args + ["--compare-workers", "0", "1", "--out", str(tmp_path / "bench.md")]) == 0
    report = (tmp_path / "bench.md").read_text()
    assert "naive per-image loader | make_loaders" in report and "train step images/s, fp32, channels_last" in report
    assert (
        "| one training epoch, s, 0 loader workers |" in report
        and "| one training epoch, s, 1 loader workers |" in report
    )
    loader_row = next(line for line in report.splitlines() if line.startswith("| loader images/s"))
    assert all(float(cell.replace(",", "")) > 0 for cell in loader_row.strip("|").split("|")[1:])


def test_missing_data_ends_the_command_with_the_fix_not_a_traceback(tmp_path, monkeypatch, capsys, offline):
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path))
    assert train.main(["--quick", "--workers", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and "Traceback" not in err


def test_quick_ablation_writes_its_table_and_resumes_only_what_is_missing(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_ROOT", str(cifar_root))
    args = ["--quick", "--out", str(tmp_path), "--variants", "shipped", "max-pool downsampling", "no CoarseDropout"]
    assert ablation.main(args) == 0
    table = (tmp_path / "ablation.md").read_text()
    assert "QUICK" in table and "| max-pool downsampling | no MaxPooling" in table
    assert "| shipped | none |" in table and (tmp_path / "ablation.png").stat().st_size > 5_000
    (tmp_path / "runs" / "no-coarsedropout-seed0.json").unlink()  # as if it had been interrupted
    trained = []
    real = ablation.train_variant
    monkeypatch.setattr(
        ablation, "train_variant", lambda variant, *a: trained.append(variant.name) or real(variant, *a)
    )
    assert ablation.main(args) == 0
    assert trained == ["no CoarseDropout"]
    assert (tmp_path / "ablation.md").read_text().count("\n| ") == table.count("\n| ")
    row = tmp_path / "runs" / "shipped-seed0.json"
    row.write_text(json.dumps(json.loads(row.read_text()) | {"params": 187_562}))  # the network before the whitening
    with pytest.raises(SystemExit, match="another configuration \\(it differs in: params\\): pass another --out"):
        ablation.main(args)
    assert trained == ["no CoarseDropout"]  # refused before training anything


def test_every_ablation_variant_changes_the_shipped_net_or_recipe_in_the_one_way_its_name_says():
    nets = {v.name: v.net() for v in ablation.VARIANTS}
    assert len({repr(n) for n in nets.values()}) == 6  # shipped, stride, max-pool, dense, no residual, no whitening
    assert all(hasattr(RECIPE, key) for v in ablation.VARIANTS for key in v.recipe)
    assert [v.breaks for v in ablation.VARIANTS if v.name == "shipped"] == ["none"]
    convs = {name: [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)] for name, net in nets.items()}
    assert sum(c.stride == (2, 2) for c in convs["stride-2 downsampling"]) == 3
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in nets["max-pool downsampling"].modules()) == 3
    assert not [c for c in convs["dense 3x3 in C3/C4"] if c.groups > 1]
    assert not [m for m in nets["no residual connections"].modules() if isinstance(m, ablation.Residual)]
    geometry = {
        n: [(c.in_channels, c.out_channels, c.kernel_size, c.dilation, c.groups) for c in convs[n]] for n in nets
    }
    assert geometry["no patch whitening"][1:] == geometry["shipped"][2:]  # only the frozen 2x2 and C1's first differ
    assert isinstance(convs["shipped"][0], ablation.PatchWhitening) and geometry["no patch whitening"][0][0] == 3
    assert measure(nets["no patch whitening"]).receptive_field == measure(nets["shipped"]).receptive_field - 1
    x = torch.randn(2, 3, 32, 32)
    assert all(net.eval()(x).shape == (2, 10) for net in nets.values())
