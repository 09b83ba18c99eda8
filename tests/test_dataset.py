"""The data pipeline: statistics, the exact augmentations, seeding, loaders, and clear errors."""

import warnings

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from helpers import dataset as ds
from helpers.recipe import RECIPE

AUGMENTATIONS = RECIPE.augmentations(ds.CIFAR10_MEAN)


def test_mean_and_std_match_the_real_training_set(train_split):
    pixels = train_split.data.reshape(-1, 3) / 255.0
    # "agree to 3 decimals": within half a unit of the third decimal
    assert np.abs(pixels.mean(0) - ds.CIFAR10_MEAN).max() < 5e-4
    assert np.abs(pixels.std(0) - ds.CIFAR10_STD).max() < 5e-4


def test_the_recipes_augmentations_are_the_assignments_in_order():
    assert [type(t).__name__ for t in AUGMENTATIONS] == ["HorizontalFlip", "ShiftScaleRotate", "CoarseDropout"]


def test_coarse_dropout_is_one_16x16_hole_of_mean_colour_with_2x_argument_names():
    dropout = next(t for t in AUGMENTATIONS if isinstance(t, A.CoarseDropout))
    assert dropout.num_holes_range == (1, 1)
    assert dropout.hole_height_range == (16, 16) and dropout.hole_width_range == (16, 16)
    assert dropout.fill == ds.MEAN_PIXEL == (125, 123, 114)  # 0..255 scale: it runs before Normalize
    shift = next(t for t in AUGMENTATIONS if isinstance(t, A.ShiftScaleRotate))
    assert shift.border_mode == cv2.BORDER_CONSTANT and tuple(shift.fill) == ds.MEAN_PIXEL


def _per_image_pipeline(augment=(), seed=None) -> A.Compose:
    """The classic per-image pipeline the kit's loader replaces: augment, Normalize, ToTensorV2."""
    return A.Compose([*augment, A.Normalize(ds.CIFAR10_MEAN, ds.CIFAR10_STD), ToTensorV2()], seed=seed)


def _warnings_while(build) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in caught]


def test_building_the_pipelines_warns_about_nothing():
    assert _warnings_while(lambda: (RECIPE.augmentations(ds.CIFAR10_MEAN), _per_image_pipeline())) == []


def test_the_warning_check_catches_1x_argument_names():
    # The failure this guards against: 2.x ignores 1.x names with nothing but a warning.
    caught = _warnings_while(lambda: A.CoarseDropout(max_holes=1, max_height=16, max_width=16, fill_value=0))
    assert any("not valid" in message for message in caught)


def _forced(kind: type, p: float = 1.0) -> A.Compose:
    transform = next(t for t in RECIPE.augmentations(ds.CIFAR10_MEAN) if isinstance(t, kind))
    transform.p = p
    return A.Compose([transform], seed=0)


def test_dropout_changes_exactly_one_16x16_square_to_the_mean_on_real_images(train_split):
    dropout = _forced(A.CoarseDropout)
    fill = np.array(ds.MEAN_PIXEL, dtype=np.uint8)
    for image in train_split.data[:500]:
        out = dropout(image=image)["image"]
        changed = (out != image).any(-1)
        is_fill = (out == fill).all(-1)
        # Count fill pixels in every 16x16 window with a summed-area table.
        table = np.pad(is_fill.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        windows = table[16:, 16:] - table[:-16, 16:] - table[16:, :-16] + table[:-16, :-16]
        full = np.argwhere(windows == 256)
        assert len(full) >= 1, "no 16x16 square of the fill colour"
        inside = [
            (y, x)
            for y, x in full
            if not changed[:y].any()
            and not changed[y + 16 :].any()
            and not changed[:, :x].any()
            and not changed[:, x + 16 :].any()
        ]
        assert inside, "pixels changed outside the 16x16 hole"
        assert changed.sum() > 0.5 * 256  # the hole really overwrote the image


def test_each_augmentation_is_applied_to_about_half_the_images_independently(train_split):
    # Our choice: p = 0.5 for each of the three, drawn independently (one generator per batch, not one per transform).
    images = [im for im in train_split.data[:600] if not np.array_equal(im, im[:, ::-1])][:512]
    dataset = ds.ImageDataset(
        np.stack(images),
        [0] * len(images),
        transform=A.Compose(AUGMENTATIONS),
        mean=(0,) * 3,
        std=(1,) * 3,
        classes="a",
    )
    flipped, dropped = [], []
    for seed in range(200):  # the first image of 200 batches: the one a shared seed used to correlate
        out = dataset[seed, [0, 1, 2, 3]][0].numpy()
        for k in range(4):
            original = images[k]
            flipped.append(
                np.abs(out[k].astype(int) - original[:, ::-1]).mean() < np.abs(out[k].astype(int) - original).mean()
            )
            dropped.append(bool(((out[k] == ds.MEAN_PIXEL).all(-1)).sum() >= 200))
    flipped, dropped = np.array(flipped), np.array(dropped)
    assert 0.4 < flipped.mean() < 0.6 and 0.4 < dropped.mean() < 0.6
    agreement = (flipped[::4] == dropped[::4]).mean()  # the first image of each batch
    assert 0.35 < agreement < 0.65, f"flip and dropout agree on {agreement:.0%} of first images: correlated draws"


def test_same_seed_gives_the_same_augmented_images(train_split):
    def augmented(seed):
        transform = _per_image_pipeline(AUGMENTATIONS, seed)
        return np.stack([transform(image=image)["image"].numpy() for image in train_split.data[:32]])

    assert np.array_equal(augmented(1), augmented(1))
    assert not np.array_equal(augmented(1), augmented(2))


def test_batch_normalize_matches_the_per_image_pipeline(train_split):
    images = train_split.data[:8]
    batch = ds.normalize(torch.from_numpy(images))
    per_image = torch.stack([_per_image_pipeline()(image=im)["image"] for im in images])
    expected = (images[0] / 255.0 - np.array(ds.CIFAR10_MEAN)) / np.array(ds.CIFAR10_STD)
    assert torch.allclose(per_image[0], torch.tensor(expected.transpose(2, 0, 1)).float(), atol=1e-5)
    assert batch.shape == (8, 3, 32, 32) and torch.allclose(batch, per_image, atol=1e-5)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    mean_image = torch.tensor(ds.MEAN_PIXEL, dtype=torch.uint8).expand(1, 32, 32, 3)
    assert ds.normalize(mean_image).abs().max() < 0.01  # the fill colour is ~0 after normalization


def test_bad_images_get_clear_errors():
    with pytest.raises(ValueError, match="N x H x W x 3"):
        ds.normalize(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="N x H x W x C"):
        ds.ImageData(np.zeros((4, 28, 28), np.uint8), [0] * 4, np.zeros((4, 28, 28), np.uint8), [0] * 4, ds.CLASSES)


def test_missing_data_offline_says_where_it_looked_and_how_a_student_gets_it(tmp_path, offline, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CIFAR10_ROOT", str(empty))
    with pytest.raises(ds.DatasetNotFoundError) as err:
        ds.cifar10()  # reads CIFAR10_ROOT, and nothing outside it
    message = str(err.value)
    assert f"{empty.resolve()}/cifar-10-batches-py" in message
    assert "cifar-10-python.tar.gz" in message and ds.CIFAR10_PAGE in message and "tar -xzf" in message
    assert "CIFAR10_ROOT" in message and "Colab" in message
    assert "shared" not in message and "unpack.py" not in message


def test_loaders_yield_normalized_float_batches_reproducibly_whatever_the_workers(cifar):
    data = cifar.subsample(train_images=256, test_images=128)

    def first_batches(workers):
        train, test = ds.make_loaders(data, batch_size=64, augment=AUGMENTATIONS, seed=3, num_workers=workers)
        train.sampler.set_epoch(2)
        return next(iter(train)), next(iter(test)), len(train), len(test)

    (x0, y0), (tx, ty), n_train, n_test = first_batches(0)
    (x2, y2), *_ = first_batches(2)
    assert x0.dtype == torch.float32 and x0.shape == (64, 3, 32, 32) and y0.dtype == torch.int64
    assert -3 < x0.min() < 0 < x0.max() < 3  # normalized, not 0..255
    assert tx.shape == (64, 3, 32, 32) and (n_train, n_test) == (4, 2)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_sampler_epochs_differ_and_cover_every_image():
    sampler = ds.SeededBatchSampler(100, 32, shuffle=True, seed=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for _, indices in epoch0 for i in indices) == list(range(100))
    assert [indices for _, indices in epoch0] != [indices for _, indices in epoch1]
    assert len(epoch0) == len(sampler) == 4 and len(epoch0[-1][1]) == 4  # the last batch is partial


def test_torch_manual_seed_alone_fixes_the_augmented_batches(cifar):
    data = cifar.subsample(train_images=64, test_images=32)

    def first_batch(seed):
        return next(iter(ds.make_loaders(data, batch_size=32, augment=AUGMENTATIONS, seed=seed, num_workers=0)[0]))[0]

    torch.manual_seed(5)
    assert torch.equal(first_batch(None), first_batch(5))
    assert not torch.equal(first_batch(5), first_batch(6))


def test_a_validation_split_is_held_out_of_the_training_images_and_never_trains(cifar):
    ids = np.arange(1000)
    images = np.zeros((1000, 4, 4, 3), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256  # each image names its index
    toy = ds.ImageData(images, ids % 10, images[:10], np.arange(10), ds.CLASSES)
    split = toy.hold_out(100, seed=0)
    index = lambda im: set((im[:, 0, 0, 0].astype(int) + 256 * im[:, 0, 0, 1].astype(int)).tolist())  # noqa: E731
    assert len(index(split.train_images)) == 900 and len(index(split.test_images)) == 100
    assert index(split.train_images) | index(split.test_images) == set(range(1000))  # disjoint, nothing lost
    assert index(toy.hold_out(100, seed=0).test_images) == index(split.test_images)  # seeded: one split
    assert index(toy.hold_out(100, seed=1).test_images) != index(split.test_images)
    data = cifar
    real = data.hold_out(5000, seed=0)
    assert real.evaluation == "validation" and (len(real.train_images), len(real.test_images)) == (45_000, 5000)
    assert (real.mean, real.std) == (data.mean, data.std) and np.bincount(real.test_labels).min() > 400
    with pytest.raises(ValueError, match="hold out between 1 and 49999"):
        data.hold_out(50_000)


def test_image_data_refuses_labels_that_do_not_fit_its_images_or_classes():
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    ok = np.array([0, 1, 2, 9])
    for train_labels, test_labels in ((ok[:3], ok), (ok, np.array([0, 1, 2, 10])), (np.array([-1, 0, 1, 2]), ok)):
        with pytest.raises(ValueError, match="labels must be 0..9 \\(one per class name\\)"):
            ds.ImageData(images, train_labels, images, test_labels, ds.CLASSES)


def test_make_loaders_refuses_a_batch_size_below_one_and_subsample_keeps_a_split_it_was_not_asked_to_cut(cifar):
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        ds.make_loaders(cifar, batch_size=0)
    kept = cifar.subsample(train_images=100, test_images=None)
    assert len(kept.train_images) == 100 and np.array_equal(kept.test_images, cifar.test_images)
