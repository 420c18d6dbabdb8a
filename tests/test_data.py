"""Tests of the data package: TFDS-built data sets, the grain feed and on-device augmentation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.data import augment
from jaxopt_lab.data.pipeline import make_grain_loader
from jaxopt_lab.data.sources import (
    DATASET_NAMES,
    check_dataset_name,
    default_data_dir,
    load_dataset,
)
from jaxopt_lab.errors import UserError

# ---------------------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def mnist1d_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def mnist1d(mnist1d_dir):
    return load_dataset("mnist1d", mnist1d_dir)


def test_mnist1d_has_the_papers_split(mnist1d):
    assert mnist1d.name == "mnist1d"
    assert mnist1d.num_classes == 10 and mnist1d.input_shape == (40,)
    assert mnist1d.train["x"].shape == (4000, 40) and mnist1d.test["x"].shape == (1000, 40)
    for split in (mnist1d.train, mnist1d.test):
        assert split["x"].dtype == np.float32 and split["label"].dtype == np.int32
        assert set(np.unique(split["label"])) == set(range(10))


def test_mnist1d_is_built_once_then_reused(mnist1d, mnist1d_dir):
    files = [os.path.join(root, f) for root, _, names in os.walk(mnist1d_dir) for f in names
             if "array_record" in f]
    assert files
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    again = load_dataset("mnist1d", mnist1d_dir)
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps
    np.testing.assert_array_equal(again.train["x"], mnist1d.train["x"])


def test_mnist1d_build_is_deterministic(mnist1d, tmp_path):
    other = load_dataset("mnist1d", str(tmp_path))
    for split in ("train", "test"):
        for key in ("x", "label"):
            np.testing.assert_array_equal(getattr(other, split)[key],
                                          getattr(mnist1d, split)[key])


def test_mnist1d_shuffled_permutes_positions_only(mnist1d, tmp_path):
    shuffled = load_dataset("mnist1d_shuffled", str(tmp_path))
    assert shuffled.train["x"].shape == mnist1d.train["x"].shape
    assert shuffled.test["x"].shape == mnist1d.test["x"].shape
    assert not np.allclose(shuffled.train["x"], mnist1d.train["x"])
    # Same examples, same order, positions permuted: each signal holds the same values.
    np.testing.assert_array_equal(shuffled.train["label"], mnist1d.train["label"])
    np.testing.assert_allclose(np.sort(shuffled.train["x"], axis=1),
                               np.sort(mnist1d.train["x"], axis=1), rtol=1e-5, atol=1e-6)


def test_digits_images_in_unit_range(tmp_path):
    digits = load_dataset("digits", str(tmp_path))
    assert len(digits.train["label"]) + len(digits.test["label"]) == 1797
    assert digits.input_shape == (8, 8, 1) and digits.num_classes == 10
    for split in (digits.train, digits.test):
        assert split["x"].shape[1:] == (8, 8, 1) and split["x"].dtype == np.float32
        assert split["x"].min() >= 0.0 and split["x"].max() <= 1.0
        assert set(np.unique(split["label"])) == set(range(10))  # stratified


def test_synthetic_is_deterministic_by_seed():
    a = load_dataset("synthetic", synthetic_shape=(5, 3), synthetic_size=64, num_classes=4, seed=1)
    b = load_dataset("synthetic", synthetic_shape=(5, 3), synthetic_size=64, num_classes=4, seed=1)
    c = load_dataset("synthetic", synthetic_shape=(5, 3), synthetic_size=64, num_classes=4, seed=2)
    assert a.train["x"].shape == (64, 5, 3) and a.test["x"].shape == (16, 5, 3)
    assert a.input_shape == (5, 3) and a.num_classes == 4
    assert a.train["x"].dtype == np.float32 and a.train["label"].dtype == np.int32
    assert a.train["label"].min() >= 0 and a.train["label"].max() < 4
    np.testing.assert_array_equal(a.train["x"], b.train["x"])
    np.testing.assert_array_equal(a.test["label"], b.test["label"])
    assert not np.array_equal(a.train["x"], c.train["x"])


@pytest.mark.parametrize("name", ["mnist", "tfds:", "tfds: ", "", None])
def test_unknown_name_lists_allowed_names(name):
    with pytest.raises(UserError) as info:
        load_dataset(name)
    message = str(info.value)
    assert "\n" not in message
    for allowed in DATASET_NAMES + ("tfds:",):
        assert allowed in message


def test_tfds_names_are_accepted_without_download():
    check_dataset_name("tfds:cifar10")


@pytest.mark.parametrize("kwargs", [{"synthetic_size": 2}, {"synthetic_shape": ()},
                                    {"num_classes": 1}])
def test_bad_synthetic_arguments(kwargs):
    with pytest.raises(UserError):
        load_dataset("synthetic", **kwargs)


def test_default_data_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXOPT_LAB_DATA_DIR", str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    monkeypatch.delenv("JAXOPT_LAB_DATA_DIR")
    assert default_data_dir().endswith(os.path.join(".cache", "jaxopt_lab", "data"))


# --------------------------------------------------------------------------------------- pipeline

N = 96  # examples; the label of example i is i, so batches show which examples they hold


@pytest.fixture(scope="module")
def arrays():
    return {"x": np.arange(N * 3, dtype=np.float32).reshape(N, 3),
            "label": np.arange(N, dtype=np.int32)}


def labels(iterator, count):
    return [np.asarray(next(iterator)["label"]) for _ in range(count)]


def test_batches_have_the_right_shape(arrays):
    batch = next(iter(make_grain_loader(arrays, batch_size=8, seed=0)))
    assert batch["x"].shape == (8, 3) and batch["x"].dtype == np.float32
    assert batch["label"].shape == (8,)
    np.testing.assert_array_equal(batch["x"][:, 0], 3 * batch["label"])  # rows stay together


def test_same_seed_agrees_and_different_seeds_differ(arrays):
    a = labels(iter(make_grain_loader(arrays, batch_size=8, seed=0)), 5)
    b = labels(iter(make_grain_loader(arrays, batch_size=8, seed=0)), 5)
    c = labels(iter(make_grain_loader(arrays, batch_size=8, seed=1)), 5)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


def test_every_epoch_is_a_new_permutation(arrays):
    epochs = np.stack(labels(iter(make_grain_loader(arrays, batch_size=8, seed=0)), 24))
    first, second = epochs[:12].ravel(), epochs[12:].ravel()
    np.testing.assert_array_equal(np.sort(first), np.arange(N))
    np.testing.assert_array_equal(np.sort(second), np.arange(N))
    assert not np.array_equal(first, second)


def test_shards_are_disjoint_and_cover_an_epoch(arrays):
    shards = [np.concatenate(labels(iter(make_grain_loader(
        arrays, batch_size=8, seed=0, shard_index=i, shard_count=2)), 6)) for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(N))
    # Two processes of 8 see, step by step, the global batch one process of 16 would.
    single = np.stack(labels(iter(make_grain_loader(arrays, batch_size=16, seed=0)), 6))
    np.testing.assert_array_equal(
        single, np.concatenate([shards[0].reshape(6, 8), shards[1].reshape(6, 8)], axis=1))


@pytest.mark.parametrize("consumed", [3, 11, 13])  # mid-epoch, at and across the epoch boundary
def test_restored_iterator_continues_identically(arrays, consumed):
    loader = make_grain_loader(arrays, batch_size=8, seed=0)
    expected = labels(iter(loader), consumed + 5)[consumed:]
    interrupted = iter(loader)
    labels(interrupted, consumed)
    state = interrupted.get_state()
    resumed = iter(make_grain_loader(arrays, batch_size=8, seed=0))
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(labels(resumed, 5)), np.stack(expected))


def test_finite_epochs_and_the_remainder(arrays):
    dropped = list(make_grain_loader(arrays, batch_size=40, seed=0, num_epochs=2))
    assert [len(b["label"]) for b in dropped] == [40, 40, 40, 40]
    kept = list(make_grain_loader(arrays, batch_size=40, seed=0, num_epochs=1,
                                  drop_remainder=False))
    assert [len(b["label"]) for b in kept] == [40, 40, 16]
    np.testing.assert_array_equal(np.sort(np.concatenate([b["label"] for b in kept])),
                                  np.arange(N))


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": N + 1},
                                    {"batch_size": 8, "shard_index": 2, "shard_count": 2},
                                    {"batch_size": 8, "num_epochs": 0},
                                    {"batch_size": 8, "seed": -1}])
def test_bad_loader_arguments(arrays, kwargs):
    with pytest.raises(UserError):
        make_grain_loader(arrays, **{"seed": 0, **kwargs})


# ------------------------------------------------------------------------------------ augmentation

SIGNALS = jnp.arange(1.0, 1.0 + 6 * 10).reshape(6, 10)  # [B, L], no zeros
IMAGES = jnp.arange(1.0, 1.0 + 6 * 5 * 4 * 2).reshape(6, 5, 4, 2)  # [B, H, W, C]

# Each compiled once (they run inside the jitted train step) and shared by the tests below.
SHIFT = jax.jit(augment.random_shift_1d, static_argnums=(2, 3))
NOISE = jax.jit(augment.gaussian_noise)
CROP = jax.jit(augment.random_crop, static_argnums=2)
FLIP = jax.jit(augment.random_flip)

AUGMENTATIONS = {  # name: (augment(key, x, *args), x, args)
    "shift": (SHIFT, SIGNALS, (3, False)),
    "shift_channels": (SHIFT, SIGNALS[..., None], (3, False)),
    "shift_circular": (SHIFT, SIGNALS, (3, True)),
    "noise": (NOISE, SIGNALS, (0.1,)),
    "crop": (CROP, IMAGES, (2,)),
    "flip": (FLIP, IMAGES, ()),
    "composed": (jax.jit(augment.make_augment(shift=0, noise=0.1, crop=1, flip=True)), IMAGES, ()),
}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_contract(name):
    fn, x, args = AUGMENTATIONS[name]
    key = jax.random.key(0)
    out = fn(key, x, *args)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, fn(key, x, *args))  # deterministic per key
    assert not np.array_equal(out, x)  # it does something
    assert not np.array_equal(out, fn(jax.random.key(1), x, *args))


@pytest.mark.parametrize("circular", [False, True])
def test_shift_moves_each_signal(circular):
    out = np.asarray(SHIFT(jax.random.key(3), SIGNALS, 3, circular))
    for row, original in zip(out, np.asarray(SIGNALS)):
        if circular:
            candidates = [np.roll(original, s) for s in range(-3, 4)]
        else:  # zeros enter at the edge
            candidates = [np.concatenate([np.zeros(s), original[:len(original) - s]]) if s >= 0
                          else np.concatenate([original[-s:], np.zeros(-s)])
                          for s in range(-3, 4)]
        assert any(np.array_equal(row, c) for c in candidates)


def test_crop_is_a_window_of_the_padded_image():
    out = np.asarray(CROP(jax.random.key(3), IMAGES, 2))
    padded = np.pad(np.asarray(IMAGES), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for row, image in zip(out, padded):
        assert any(np.array_equal(row, image[i:i + 5, j:j + 4])
                   for i in range(5) for j in range(5))


def test_flip_mirrors_or_keeps_each_image():
    out = np.asarray(FLIP(jax.random.key(3), IMAGES))
    for row, image in zip(out, np.asarray(IMAGES)):
        assert np.array_equal(row, image) or np.array_equal(row, image[:, ::-1])


def test_zero_noise_is_identity():
    np.testing.assert_array_equal(NOISE(jax.random.key(0), SIGNALS, 0.0), SIGNALS)


def test_make_augment_is_none_when_all_off():
    assert augment.make_augment() is None
    assert augment.make_augment(shift=0, noise=0.0, crop=0, flip=False) is None


def test_bad_augment_settings_name_the_culprit():
    with pytest.raises(UserError, match="shift"):
        augment.make_augment(shift=-1)
    with pytest.raises(UserError, match="crop"):
        augment.make_augment(crop=2)(jax.random.key(0), SIGNALS)  # 1-D data cannot be cropped
