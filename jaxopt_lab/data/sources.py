"""Data sets as host numpy arrays: the one entry point the trainer, sweeps and notebooks call.

The embedded data sets are built once into a local data dir by TFDS builders (array_record) and
read back whole: they are small, and arrays in memory are what both feeds need (the on-device
feed copies them to the devices, the grain feed gathers batches from them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import requests
import tensorflow_datasets as tfds

from jaxopt_lab.data import builders
from jaxopt_lab.errors import UserError
from jaxopt_lab.importpath import is_import_path, load_object

DATASET_NAMES = ("mnist1d", "mnist1d_shuffled", "digits", "diabetes", "python_text", "synthetic")
TFDS_PREFIX = "tfds:"
VALIDATION_SEED = 0  # fixes which training examples are held out for validation

# name -> (builder class, builder config); all generated offline.
_EMBEDDED = {
    "mnist1d": (builders.Mnist1d, "default"),
    "mnist1d_shuffled": (builders.Mnist1d, "shuffled"),
    "digits": (builders.Digits, None),
    "diabetes": (builders.Diabetes, None),  # regression
    "python_text": (builders.PythonText, None),  # language model
}

# name -> how its x is made from the raw data (exported beside a model: its callers must match it)
PREPROCESSING = {
    "mnist1d": "the mnist1d generator's signals as generated: float32 [40], no scaling",
    "mnist1d_shuffled": "as mnist1d, positions permuted by the generator's shuffle_seq",
    "digits": "scikit-learn's 8x8 pixel values (0..16) divided by 16: float32 [8, 8, 1] in [0, 1]",
    "diabetes": "scikit-learn's 10 features as shipped (columns centred and scaled to unit "
                "norm): float32 [10]",
    "python_text": "bytes as int32 tokens (ASCII 1..127 as themselves, other bytes 0), "
                   "windows of 128",
    "synthetic": "standard normal noise, float32",
}

TASKS = ("classification", "regression", "language_model")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set held in host memory: splits of equal-length arrays "x" and "label".

    classification: x float32 [N, ...], label int32 [N] in [0, num_classes);
    regression: x float32 [N, ...], label float32 [N] or [N, num_classes] (the targets);
    language_model: x int32 tokens [N, T], label int32 [N, T] (the next tokens).
    `validation` is carved from train by `with_validation`; None until then.
    """

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    num_classes: int  # the model's output width: classes, regression targets or vocabulary size
    input_shape: tuple[int, ...]  # one example's x shape
    name: str
    task: str = "classification"  # one of TASKS: picks the default loss and evaluation
    validation: dict[str, np.ndarray] | None = None
    # what was done to the raw data to make x: what a deployed model's callers must do too
    preprocessing: str = "as the data set gives them"


def default_data_dir() -> str:
    """Where data sets are built: $JAXOPT_LAB_DATA_DIR, else ~/.cache/jaxopt_lab/data."""
    return os.environ.get("JAXOPT_LAB_DATA_DIR") or os.path.expanduser("~/.cache/jaxopt_lab/data")


# data.name of a run given its data set from Python: config.json says so, and what it cannot
# rebuild is asked for by name (`load_dataset`), instead of loading the config's data set.
FROM_PYTHON = "from-python:"


def check_dataset_name(name: str) -> None:
    """Raises UserError unless `name` is a data set `load_dataset` knows (checked before any work),
    or records one a run was given from Python (`FROM_PYTHON`)."""
    if isinstance(name, str) and (name in DATASET_NAMES or is_import_path(name) or (
            name.startswith(TFDS_PREFIX) and name[len(TFDS_PREFIX):].strip())
            or name.startswith(FROM_PYTHON)):
        return
    raise UserError(f"unknown data set {name!r}; allowed: {', '.join(DATASET_NAMES)}, "
                    f"{TFDS_PREFIX}<TFDS catalog name> or an import path package.module:function")


def load_dataset(name: str, data_dir: str | None = None, *,
                 synthetic_shape: Sequence[int] = (32,), synthetic_size: int = 1024,
                 num_classes: int = 10, seed: int = 0) -> Dataset:
    """Loads data set `name` into host arrays, building it into `data_dir` on first use.

    Args:
      name: one of DATASET_NAMES, "tfds:<catalog name>" (downloaded by TFDS where a network
        exists), or an import path "package.module:function" to a user's function that takes no
        arguments and returns a `Dataset` (or what `as_dataset` accepts).
      data_dir: where TFDS data sets are built; None means `default_data_dir()`.
      synthetic_shape, synthetic_size, num_classes, seed: only for "synthetic" (random inputs for
        throughput work): one example's shape, the number of training examples (the test set has
        a quarter as many), the number of label values and the seed that fixes them.
    """
    check_dataset_name(name)
    if name.startswith(FROM_PYTHON):
        raise UserError(
            f"the run was trained on data set {name[len(FROM_PYTHON):]!r} passed from Python "
            "(dataset=), which its config cannot rebuild: pass it again (load_run(workdir, "
            "dataset=...), train_and_evaluate(..., dataset=...)), or set data.name to an "
            "import path 'package.module:function' that returns it")
    if is_import_path(name) and not name.startswith(TFDS_PREFIX):
        return as_dataset(load_object(name, "data.name")(), name)
    if name == "synthetic":
        return _synthetic(tuple(synthetic_shape), synthetic_size, num_classes, seed)
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    if name.startswith(TFDS_PREFIX):
        return _catalog(name, data_dir)
    builder_cls, config = _EMBEDDED[name]
    lock_name = builder_cls.name + (f"_{config}" if config else "")
    with _build_lock(data_dir, lock_name), _quiet_progress():
        builder = builder_cls(data_dir=data_dir, config=config, file_format=builders.FILE_FORMAT)
        builder.download_and_prepare()
    splits = builder.as_data_source()
    dataset = _from_splits(name, splits, "x", "label", builder.info.features["label"].num_classes)
    return dataclasses.replace(dataset, preprocessing=PREPROCESSING[name])


def _synthetic(shape: tuple[int, ...], size: int, num_classes: int, seed: int) -> Dataset:
    """Gaussian inputs with uniform labels: nothing to learn, but the shapes and cost of real data."""
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise UserError(f"synthetic_shape={shape} must be a non-empty tuple of positive ints")
    if size < 4:
        raise UserError(f"synthetic_size={size} must be at least 4 (the test set is a quarter)")
    if num_classes < 2:
        raise UserError(f"num_classes={num_classes} must be at least 2")
    rng = np.random.default_rng(seed)

    def split(n):
        return {"x": rng.standard_normal((n, *shape), dtype=np.float32),
                "label": rng.integers(0, num_classes, n).astype(np.int32)}

    return Dataset(train=split(size), test=split(size // 4), num_classes=num_classes,
                   input_shape=shape, name="synthetic", preprocessing=PREPROCESSING["synthetic"])


def _catalog(name: str, data_dir: str) -> Dataset:
    """A TFDS catalog data set, prepared as array_record (TFDS downloads it if it must)."""
    catalog_name = name[len(TFDS_PREFIX):].strip()
    lock = (contextlib.nullcontext() if "://" in data_dir  # e.g. gs://: nothing to lock locally
            else _build_lock(data_dir, catalog_name.replace("/", "_")))
    try:
        with lock, _quiet_progress():
            # With an explicit data_dir, TFDS would otherwise prepare TFRecords, which have no
            # random access. A name TFDS has no code for is read from the files prepared in
            # data_dir (e.g. copied from another machine): `tfds.builder` looks there first.
            builder = tfds.builder(catalog_name, data_dir=data_dir,
                                   file_format=builders.FILE_FORMAT)
            if not builder.is_prepared():
                _check_can_prepare(name, builder, data_dir)
                builder.download_and_prepare()
            splits = builder.as_data_source()
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"data set {name!r}: {catalog_name!r} is neither in the TFDS catalog "
                        f"(https://www.tensorflow.org/datasets/catalog) nor prepared in "
                        f"{data_dir}") from None
    except (requests.RequestException, tfds.download.DownloadError) as e:
        raise UserError(f"data set {name!r} is not prepared in {data_dir} and its download "
                        f"failed: {_one_line(e)}") from None
    info = next(iter(splits.values())).dataset_info
    if "image" in info.features and "label" in info.features:
        x_key, label_key = "image", "label"
    elif info.supervised_keys and len(info.supervised_keys) == 2:
        x_key, label_key = info.supervised_keys
    else:
        raise UserError(f"data set {name!r} has neither image/label features nor a supervised "
                        "(input, label) pair")
    num_classes = getattr(info.features[label_key], "num_classes", None)
    if not num_classes:
        raise UserError(f"data set {name!r}: its label {label_key!r} is not a class label")
    return _from_splits(name, splits, x_key, label_key, num_classes)


def _check_can_prepare(name: str, builder, data_dir: str) -> None:
    """Fails in seconds, with one line, where TFDS would fail only after a long wait or a download.

    TFDS retries an unreachable download host 10 times with exponential backoff (about 3.5
    minutes when the name does not even resolve; with no timeout, far longer where packets are
    dropped), so each host of the builder's known URLs is tried once here, with a timeout.
    Preparing a catalog data set also needs TensorFlow (TFDS encodes images and reads the
    downloads with it), which our install leaves out: better said before the download than after.
    """
    roots = sorted({"/".join(url.split("/", 3)[:3]) for url in builder.url_infos or ()
                    if url.startswith(("http://", "https://"))})  # scheme://host
    for root in roots:
        try:
            requests.head(root, timeout=10)  # any HTTP answer, even an error, means reachable
        except requests.ConnectionError as e:  # unresolved, refused, proxy, TLS, connect timeout
            raise UserError(f"data set {name!r} is not prepared in {data_dir} and cannot be "
                            f"downloaded: {root} is unreachable ({_one_line(e)}); prepare it on "
                            "a machine with a network and copy it into that data dir") from None
    if importlib.util.find_spec("tensorflow") is None:
        raise UserError(f"data set {name!r} is not prepared in {data_dir}, and preparing it needs "
                        "TensorFlow, the [tfds] extra: pip install -c constraints.txt -e '.[tfds]'")


def _one_line(error: Exception) -> str:
    """The innermost reason of a download error (requests nests urllib3's two deep), one line."""
    inner = error.args[0] if error.args and isinstance(error.args[0], Exception) else error
    reason = getattr(inner, "reason", None) or inner
    return f"{type(reason).__name__}: {reason}".replace("\n", " ")


def _from_splits(name: str, splits: dict, x_key: str, label_key: str,
                 num_classes: int) -> Dataset:
    """Reads the train and test (else validation) splits whole into arrays.

    The task is the data set's `metadata["task"]` where its builder states one (ours do), else
    classification.
    """
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise UserError(f"data set {name!r} has splits {sorted(splits)}; need 'train' and "
                        "'test' or 'validation'")
    metadata = getattr(getattr(splits["train"], "dataset_info", None), "metadata", None)
    task = metadata.get("task", "classification") if isinstance(metadata, dict) else "classification"
    if task not in TASKS:
        raise UserError(f"data set {name!r} has task {task!r}; allowed: {', '.join(TASKS)}")
    train, test = (_read(splits[s], x_key, label_key, task) for s in ("train", test_split))
    scaled = task != "language_model" and np.asarray(splits["train"][0][x_key]).dtype == np.uint8
    return Dataset(train=train, test=test, num_classes=int(num_classes),
                   input_shape=tuple(train["x"].shape[1:]), name=name, task=task,
                   **({"preprocessing": "uint8 values divided by 255: float32 in [0, 1]"}
                      if scaled else {}))


def _read(source, x_key: str, label_key: str, task: str) -> dict[str, np.ndarray]:
    """One split in the dtypes of `task` (see `Dataset`); integer images are scaled to [0, 1].

    classification: x float32, label int32; regression: x float32, label float32;
    language_model: x and label int32 tokens.
    """
    indices = list(range(len(source)))
    # One batched read where the source offers it (TFDS, grain), not N small ones.
    examples = (source.__getitems__(indices) if hasattr(source, "__getitems__")
                else [source[i] for i in indices])
    x = np.stack([e[x_key] for e in examples])
    if task == "language_model":
        x = x.astype(np.int32)
    else:
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    label_dtype = np.float32 if task == "regression" else np.int32
    label = np.asarray([e[label_key] for e in examples], dtype=label_dtype)
    return {"x": x, "label": label}


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str) -> Iterator[None]:
    """Serializes building `name` across processes, so N processes started at once build it once.

    TFDS writes into a temporary directory and renames it, but two concurrent builders can still
    race on that rename; with the lock the later ones find the data ready and only read it.
    """
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hides TFDS's progress bars while building, then restores the caller's setting."""
    was_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_on)


def as_dataset(data, name: str = "custom") -> Dataset:
    """A `Dataset` from what a user brings: a Dataset, or a mapping of split names to
    random-access sources of {"x"/"image", "label"} records — what `tfds.data_source(...)` returns,
    or grain data sources — read whole into host arrays (class labels: num_classes from the TFDS
    features where known, else the largest label + 1)."""
    if isinstance(data, Dataset):
        return data
    if not isinstance(data, Mapping) or "train" not in data:
        raise UserError(f"data set {name!r} must be a jaxopt_lab Dataset or a mapping of split "
                        f"names ('train', 'test') to data sources; got {type(data).__name__}")
    first = data["train"][0]
    x_key = next((k for k in ("x", "image") if k in first), None)
    if x_key is None or "label" not in first:
        raise UserError(f"data set {name!r}: records need 'x' (or 'image') and 'label'; "
                        f"got keys {sorted(first)}")
    info = getattr(data["train"], "dataset_info", None)
    num_classes = getattr(info.features["label"], "num_classes", None) if info else None
    if not num_classes:
        num_classes = 1 + max(int(np.max(data["train"][i]["label"]))
                              for i in range(len(data["train"])))
    return _from_splits(name, data, x_key, "label", num_classes)


def with_validation(dataset: Dataset, fraction: float) -> Dataset:
    """`dataset` with a validation split carved from train: the same examples on every run and
    every machine (a permutation with a fixed seed, independent of the training seed), so runs
    with different seeds select on one validation set. A data set that has one keeps it."""
    if dataset.validation is not None or fraction <= 0:
        return dataset
    n = len(dataset.train["label"])
    held_out = round(fraction * n)
    if not 0 < held_out < n:
        raise UserError(f"data.validation_fraction={fraction} leaves {n - held_out} of {n} "
                        f"examples of {dataset.name!r} for training and {held_out} for validation")
    order = np.random.default_rng(VALIDATION_SEED).permutation(n)
    # Stored order is kept within each part (a paper's unshuffled protocol still walks it).
    validation, train = np.sort(order[:held_out]), np.sort(order[held_out:])
    return dataclasses.replace(
        dataset, train={k: v[train] for k, v in dataset.train.items()},
        validation={k: v[validation] for k, v in dataset.train.items()})
