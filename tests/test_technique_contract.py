"""A technique written outside the library plugs in through `techniques=`: its config block is
generated and checked, it changes training, it is recorded, and it resumes exactly. The
technique is gradient noise (Neelakantan et al. 2015) at the update seam, in a dozen lines."""

import dataclasses
import inspect
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab import TECHNIQUES, default_config, distill, load_run, train_and_evaluate, validate
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.compress.options import CompressOptions
from jaxopt_lab.techniques.contract import Parts, Technique
from jaxopt_lab.techniques.distill.options import DistillOptions
from jaxopt_lab.techniques.prune.adapter import TECHNIQUE as PRUNE
from jaxopt_lab.techniques.prune.options import PruneOptions
from jaxopt_lab.techniques.quantize.options import QuantizeOptions
from tests.helpers import tiny_config


@dataclasses.dataclass(frozen=True)
class GradNoiseOptions:
    eta: float = 0.0  # variance of the Gaussian noise added to the gradients; 0 = off
    gamma: float = 0.55  # the variance decays as eta / (1 + step) ** gamma


class NoiseState(NamedTuple):
    count: jax.Array  # int32 []: updates so far
    key: jax.Array  # uint32 [2]: raw key data, as every key in a TrainState (checkpointable)


def add_noise(eta: float, gamma: float, seed: int) -> optax.GradientTransformation:
    def init(params):
        del params
        return NoiseState(jnp.zeros([], jnp.int32), jax.random.key_data(jax.random.key(seed)))

    def update(updates, state, params=None):
        del params
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        std = jnp.sqrt(eta / (1.0 + state.count) ** gamma)
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(sub, len(leaves))
        noisy = [x + std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
        return treedef.unflatten(noisy), NoiseState(state.count + 1, jax.random.key_data(key))

    return optax.GradientTransformation(init, update)


def _check(config) -> GradNoiseOptions | None:
    options = GradNoiseOptions(**GRAD_NOISE.block(config))
    if options.eta < 0:
        raise UserError(f"grad_noise eta={options.eta} must be >= 0")
    return options if options.eta > 0 else None


def _apply(parts: Parts, options: GradNoiseOptions) -> Parts:
    tx = optax.chain(add_noise(options.eta, options.gamma, parts.config.seed), parts.tx)
    return dataclasses.replace(
        parts, tx=tx, record={**parts.record, "grad_noise": dataclasses.asdict(options)},
        state_metrics=(*parts.state_metrics,
                       lambda state: {"grad_noise_eta": jnp.float32(options.eta)}))


GRAD_NOISE = Technique(name="grad_noise", options=GradNoiseOptions, check=_check, apply=_apply,
                       seam="update")
WITH_NOISE = (*TECHNIQUES, GRAD_NOISE)


def _config(steps: int = 20, eta: float = 0.3, **train):
    config = tiny_config(steps=steps, **train)
    with config.unlocked():
        config.techniques.grad_noise = GRAD_NOISE.config_block()
    config.techniques.grad_noise.eta = eta
    validate(config, techniques=WITH_NOISE)
    return config


def _losses(workdir) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_its_block_is_generated_and_every_key_is_checked():
    config = _config()
    assert config.techniques.grad_noise.to_dict() == {"eta": 0.3, "gamma": 0.55}
    with config.unlocked():
        config.techniques.grad_noise.etaa = 1.0
    with pytest.raises(UserError, match="unknown config key 'techniques.grad_noise.etaa'"):
        validate(config, techniques=WITH_NOISE)
    config = _config()
    config.techniques.grad_noise.eta = -1.0
    with pytest.raises(UserError, match=r"^techniques.grad_noise.eta=-1.0 must be >= 0"):
        validate(config, techniques=WITH_NOISE)
    with pytest.raises(UserError, match="unknown config key 'techniques.grad_noise'"):
        validate(_config(), techniques=TECHNIQUES)  # the tuple is the list: nothing registers


def test_it_changes_training_is_recorded_and_resumes_exactly(tmp_path):
    plain = train_and_evaluate(_config(eta=0.0), str(tmp_path / "plain"), techniques=WITH_NOISE)
    noisy = train_and_evaluate(_config(), str(tmp_path / "noisy"), techniques=WITH_NOISE)
    assert "grad_noise" not in plain["techniques"]
    assert noisy["techniques"]["grad_noise"] == {"eta": 0.3, "gamma": 0.55}
    assert _losses(tmp_path / "plain")[-1] != _losses(tmp_path / "noisy")[-1]
    records = [json.loads(line) for line in (tmp_path / "noisy/metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_noise_eta"] == pytest.approx(0.3) for r in records)

    resumed = tmp_path / "resumed"
    train_and_evaluate(_config(steps=10), str(resumed), techniques=WITH_NOISE)
    summary = train_and_evaluate(_config(steps=20), str(resumed), techniques=WITH_NOISE)
    assert summary["resumed_from"] == 10
    straight = load_run(str(tmp_path / "noisy"), techniques=WITH_NOISE).state
    again = load_run(str(resumed), techniques=WITH_NOISE).state
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_default_is_written_once_and_both_paths_keep_their_values():
    """The config block comes from the options; where the two paths differ, the Technique
    declares it, and these are today's values on both."""
    block = default_config().techniques
    assert [t.name for t in TECHNIQUES] == ["quantize", "distill", "prune", "compress"]
    for technique in TECHNIQUES:
        declared = {**technique.config_only, **technique.config_defaults}
        for field in dataclasses.fields(technique.options):
            if field.name in technique.python_only:
                assert field.name not in block[technique.name]
            elif field.name not in declared:
                assert block[technique.name][field.name] == field.default, field.name
    assert (block.prune.method, block.prune.end_step) == ("none", -1)
    assert (PruneOptions().method, PruneOptions().end_step) == ("magnitude", 1000)
    assert block.quantize.method == "none" and QuantizeOptions().static_activations is False
    assert block.compress.method == CompressOptions().method == "none"
    assert block.distill.teacher == DistillOptions().teacher == ""
    wrap_defaults = {k: p.default for k, p in inspect.signature(distill.wrap).parameters.items()
                     if p.default is not inspect.Parameter.empty}
    assert wrap_defaults == {"temperature": 4.0, "alpha": 0.9, "form": "kl", "member": -1,
                             "features": (), "feature_weight": 1.0}
    config = tiny_config(steps=400)
    config.techniques.prune.method = "magnitude"
    assert PRUNE.check(config).end_step == 300  # -1: three quarters of train.steps
