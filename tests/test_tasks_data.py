"""Data and a model for the tasks beyond classification: diabetes (regression), python_text and
the TransformerLM (character-level language model)."""

import math
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxopt_lab.data.builders import Diabetes, PythonText
from jaxopt_lab.data.sources import DATASET_NAMES, load_dataset
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import MODELS, build_model, model_hparams

NAMES = ("diabetes", "python_text")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each data set built twice, into two fresh data dirs: {name: (first, second)}."""
    dirs = [str(tmp_path_factory.mktemp(f"data{i}")) for i in range(2)]
    return {name: tuple(load_dataset(name, d) for d in dirs) for name in NAMES}


def test_both_are_listed_data_sets():
    assert set(NAMES) <= set(DATASET_NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_builds_are_deterministic(built, name):
    first, second = built[name]
    for split in ("train", "test"):
        for key in ("x", "label"):
            a, b = getattr(first, split)[key], getattr(second, split)[key]
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------- diabetes


def test_diabetes_shapes_dtypes_and_task(built):
    data = built["diabetes"][0]
    assert (data.name, data.task, data.num_classes) == ("diabetes", "regression", 1)
    assert data.input_shape == (10,)
    for split, n in ((data.train, 353), (data.test, 89)):
        assert split["x"].shape == (n, 10) and split["x"].dtype == np.float32
        assert split["label"].shape == (n,) and split["label"].dtype == np.float32


def test_diabetes_labels_are_standardized_with_the_train_statistics(built):
    from sklearn.datasets import load_diabetes

    data = built["diabetes"][0]
    assert abs(data.train["label"].mean()) < 1e-5 and abs(data.train["label"].std() - 1) < 1e-5
    # Undoing the documented standardization gives scikit-learn's targets back, all 442 of them.
    labels = np.concatenate([data.train["label"], data.test["label"]]).astype(np.float64)
    targets = labels * Diabetes.TARGET_STD + Diabetes.TARGET_MEAN
    np.testing.assert_allclose(np.sort(targets), np.sort(load_diabetes().target), atol=1e-3)
    assert "151.606" in Diabetes.__doc__ and "78.299" in Diabetes.__doc__


# ------------------------------------------------------------------------------------ python_text


def _split_bytes() -> dict[str, bytes]:
    return {split: b"".join(pathlib.Path(p).read_bytes() for p in paths)
            for split, paths in PythonText.split_files().items()}


def test_python_text_shapes_dtypes_and_task(built):
    data = built["python_text"][0]
    assert (data.name, data.task, data.num_classes) == ("python_text", "language_model", 128)
    assert data.input_shape == (128,)
    for split, text in _split_bytes().items():
        arrays = getattr(data, split)
        n = (len(text) - 1) // 128  # windows of 129 tokens, stepping by 128
        for key in ("x", "label"):
            assert arrays[key].shape == (n, 128) and arrays[key].dtype == np.int32
            assert arrays[key].min() >= 0 and arrays[key].max() < 128


def test_python_text_labels_are_the_next_tokens(built):
    data = built["python_text"][0]
    text = _split_bytes()
    for split in ("train", "test"):
        x, label = getattr(data, split)["x"], getattr(data, split)["label"]
        np.testing.assert_array_equal(label[:, :-1], x[:, 1:])
        np.testing.assert_array_equal(x[1:, 0], label[:-1, -1])  # stored in text order
        # The first window is the first file's first 129 bytes.
        np.testing.assert_array_equal(x[0], np.frombuffer(text[split][:128], np.uint8))
        assert label[0, -1] == text[split][128]


def test_python_text_maps_non_ascii_bytes_to_the_unknown_token():
    tokens = PythonText.encode("aé\n".encode())
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [ord("a"), PythonText.UNKNOWN, PythonText.UNKNOWN, ord("\n")]


def test_python_text_files_are_a_fixed_sorted_list_split_one_in_ten():
    modules = PythonText.MODULES
    assert list(modules) == sorted(set(modules)) and 40 <= len(modules) <= 80
    files = PythonText.split_files()
    assert len(files["test"]) == len(modules) // 10
    assert [os.path.basename(p) for p in files["test"]] == [f"{m}.py" for m in modules[9::10]]
    sizes = {split: len(text) for split, text in _split_bytes().items()}
    assert 1.5e6 <= sum(sizes.values()) <= 3e6


def test_python_text_names_a_missing_standard_library_file(tmp_path):
    with pytest.raises(UserError, match=r"standard library file .*argparse\.py is missing"):
        PythonText.split_files(str(tmp_path))


def test_existing_data_sets_stay_classification(tmp_path):
    digits = load_dataset("digits", str(tmp_path))
    assert digits.task == "classification"
    assert digits.train["x"].dtype == np.float32 and digits.train["label"].dtype == np.int32


# ---------------------------------------------------------------------------------- TransformerLM

SMALL = {"dim": 32, "depth": 2, "heads": 4, "mlp_dim": 64, "max_len": 16}
VOCAB = 128


def _tokens(batch: int = 2, length: int = 16) -> jax.Array:
    return jax.random.randint(jax.random.key(1), (batch, length), 0, VOCAB, jnp.int32)


def test_transformer_lm_is_registered_with_tunable_hparams():
    assert MODELS["transformer_lm"].__name__ == "TransformerLM"
    hparams = model_hparams("transformer_lm")
    assert hparams == {"dim": 128, "depth": 2, "heads": 4, "mlp_dim": 512, "max_len": 128}
    model = build_model("transformer_lm", VOCAB, **hparams)
    x = _tokens(2, 128)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 128, VOCAB)
    sizes = [math.prod(p.shape) for p in jax.tree.leaves(variables)]
    # embed + positions + 2 × (2 LN, q/k/v/out, 2 MLP) + final LN + head
    block = 2 * 256 + 4 * (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128)
    assert sum(sizes) == 128 * 128 + 128 * 128 + 2 * block + 256 + (128 * 128 + 128)


def test_transformer_lm_is_causal():
    model = build_model("transformer_lm", VOCAB, **SMALL)
    x = _tokens()
    variables = model.init(jax.random.key(0), x)
    apply = jax.jit(model.apply)
    t = 7
    changed = x.at[:, t].set((x[:, t] + 1) % VOCAB)
    logits, logits_changed = apply(variables, x), apply(variables, changed)
    assert logits.shape == (2, 16, VOCAB) and jnp.isfinite(logits).all()
    np.testing.assert_array_equal(logits[:, :t], logits_changed[:, :t])
    assert not jnp.allclose(logits[:, t:], logits_changed[:, t:])
    # A shorter sequence gives the same logits as the prefix of a longer one.
    np.testing.assert_allclose(apply(variables, x[:, :5]), logits[:, :5], atol=1e-5)


def test_transformer_lm_seam_reaches_every_projection():
    calls = []

    class Recording(nn.Module):
        def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                     preferred_element_type=None):
            calls.append(self.path[:-1])
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                       preferred_element_type=preferred_element_type)

    model = build_model("transformer_lm", VOCAB, dot_general_cls=Recording, **SMALL)
    variables = jax.eval_shape(model.init, jax.random.key(0), _tokens())
    calls.clear()
    jax.eval_shape(model.apply, variables, _tokens())
    kernels = {path[:-1] for path in traverse_util.flatten_dict(variables["params"])
               if path[-1] == "kernel"}
    # q, k, v, out, 2 MLP and attention's QK^T and weights x V per block; the head.
    assert len(calls) == len(set(calls)) == SMALL["depth"] * 8 + 1
    attention = {call for call in calls if call[-1].startswith("DotGeneralEinsum")}
    assert len(attention) == SMALL["depth"] * 2 and set(calls) == kernels | attention


@pytest.mark.parametrize(
    ("hparams", "x", "match"),
    [
        ({"max_len": 8}, _tokens(2, 16), r"16 tokens, more than model.max_len=8"),
        ({}, jnp.zeros((2, 16)), r"takes integer token ids"),
        ({"dim": 30}, _tokens(), r"model.dim=30 is not divisible by model.heads=4"),
    ],
)
def test_transformer_lm_bad_input_is_a_user_error(hparams, x, match):
    with pytest.raises(UserError, match=match):
        model = build_model("transformer_lm", VOCAB, **{**SMALL, **hparams})
        jax.eval_shape(model.init, jax.random.key(0), x)
