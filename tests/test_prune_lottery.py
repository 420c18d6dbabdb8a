"""Lottery tickets: masks that only shrink to exact counts, rewinding to the saved step-k state,
the random re-init control on the same masks, and pruned weights exactly 0 after training."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from jaxopt_lab import load_run, train_and_evaluate
from jaxopt_lab.core.population import stack_trials
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.prune import find_state, magnitude_masks, pruned_fraction, with_masks
from jaxopt_lab.workflows.lottery import imp, lottery_config, make_trainer

STEPS, REWIND, SEEDS, FRACTION = 20, 5, (0, 1), 0.5


def _arrays(masks) -> list[np.ndarray]:
    return [np.asarray(m) for m in jax.tree.leaves(masks) if np.ndim(m) > 0]


def _pruned(masks) -> int:
    return sum(int(np.sum(~m)) for m in _arrays(masks))


@pytest.fixture(scope="module")
def trainer():
    config = tiny_config("cnn1d", steps=STEPS)
    config.model.channels = 4  # the default skip leaves Conv_1 and Conv_2 prunable: 2 × 48
    return make_trainer(lottery_config(config), steps_per_call=REWIND)


@pytest.fixture(scope="module")
def rounds(trainer):
    return list(imp(trainer, SEEDS, rounds=2, fraction=FRACTION, rewind_steps=(0, REWIND)))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_masks_only_shrink_and_reach_the_target_count_exactly(scope):
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
                    "bias": np.zeros(5, np.float32)},
              "b": {"kernel": rng.normal(size=(5, 7)).astype(np.float32)},
              "c": {"kernel": rng.normal(size=(7, 2)).astype(np.float32)}}
    masks = {"a": {"kernel": jnp.ones((6, 5), bool), "bias": jnp.ones((), bool)},
             "b": {"kernel": jnp.ones((5, 7), bool)}, "c": {"kernel": jnp.ones((), bool)}}
    cut = jax.jit(lambda p, m: magnitude_masks(p, m, 0.3, scope))
    for _ in range(4):
        new = cut(params, masks)
        weights = [np.abs(params["a"]["kernel"]), np.abs(params["b"]["kernel"])]
        before, after = _arrays(masks), _arrays(new)
        for old_m, new_m in zip(before, after, strict=True):
            assert not np.any(new_m & ~old_m)  # nothing pruned comes back
        groups = [[0, 1]] if scope == "global" else [[0], [1]]
        for g in groups:
            kept_before = sum(int(before[i].sum()) for i in g)
            expected = sum(before[i].size for i in g) - kept_before + int(np.round(
                np.float32(0.3) * np.float32(kept_before)))
            assert sum(int(np.sum(~after[i])) for i in g) == expected
            cut_now = np.concatenate([weights[i][before[i] & ~after[i]] for i in g])
            kept = np.concatenate([weights[i][after[i]] for i in g])
            assert cut_now.max() <= kept.min()  # the smallest magnitudes go first
        assert new["c"]["kernel"].shape == () and bool(new["c"]["kernel"])  # skipped stays
        # Kept weights trained to exactly 0, more than the next round prunes, tie with the
        # pruned ones' zeros: they must go in position order without bringing a pruned one back.
        params["a"]["kernel"][after[0]] = 0.0
        masks = new


def test_rewound_weights_are_the_saved_ones_where_kept_and_zero_elsewhere(trainer):
    state = stack_trials([trainer.init(0, 0)])
    at_k = trainer.train(state, REWIND)
    masks = magnitude_masks(*jax.tree.map(lambda x: x[0], (at_k.params, find_state(
        at_k.opt_state).masks)), FRACTION)
    rewound = with_masks(jax.tree.map(lambda x: x[0], at_k), masks)
    for p, saved, m in zip(jax.tree.leaves(rewound.params), jax.tree.leaves(at_k.params),
                           jax.tree.leaves(masks), strict=True):
        np.testing.assert_array_equal(p, np.where(m, saved[0], 0.0))
    assert int(rewound.step) == REWIND
    for a, b in zip(jax.tree.leaves(find_state(rewound.opt_state).masks), jax.tree.leaves(masks),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_imp_retrains_from_the_state_at_the_rewind_step(trainer, rounds):
    ticket = next(r for r in rounds if r.rewind_step == REWIND and r.index == 1)
    at_k = trainer.train(stack_trials([trainer.init(s, s) for s in SEEDS]), REWIND)
    again = trainer.train(jax.vmap(with_masks)(at_k, ticket.masks), STEPS - REWIND)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(ticket.ticket.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def _member(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def test_masks_shrink_across_rounds_to_the_target_count(rounds):
    for k, i in [(k, i) for k in (0, REWIND) for i in range(len(SEEDS))]:
        chain = [_member(r.masks, i) for r in sorted(
            (r for r in rounds if r.rewind_step == k), key=lambda r: r.index)]
        assert len(chain) == 3 and _pruned(chain[0]) == 0
        total = sum(m.size for m in _arrays(chain[0]))
        assert total == 2 * 3 * 4 * 4
        pruned = 0
        for before, after in itertools.pairwise(chain):
            for old_m, new_m in zip(_arrays(before), _arrays(after), strict=True):
                assert not np.any(new_m & ~old_m)
            pruned += int(np.round(np.float32(FRACTION) * np.float32(total - pruned)))
            assert _pruned(after) == pruned
            assert float(pruned_fraction(after)) == pytest.approx(pruned / total)
    assert all(r.control is None for r in rounds if r.index == 0)


def test_trained_params_are_exactly_zero_where_masked_and_the_control_differs(rounds):
    for r in rounds[2:]:  # every pruned round
        for state in (r.ticket, r.control):
            assert np.all(np.asarray(state.step) == STEPS)
            for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(r.masks), strict=True):
                m = np.broadcast_to(np.reshape(m, m.shape + (1,) * (p.ndim - m.ndim)), p.shape)
                assert np.all(np.asarray(p)[~m] == 0.0)
            for a, b in zip(jax.tree.leaves(find_state(state.opt_state).masks),
                            jax.tree.leaves(r.masks), strict=True):
                np.testing.assert_array_equal(a, b)  # the control trains the ticket's masks
        kernels = [np.asarray(p)[np.asarray(m)] for p, m in zip(
            jax.tree.leaves(r.ticket.params), jax.tree.leaves(r.masks), strict=True)
            if np.ndim(m) > 1]
        controls = [np.asarray(p)[np.asarray(m)] for p, m in zip(
            jax.tree.leaves(r.control.params), jax.tree.leaves(r.masks), strict=True)
            if np.ndim(m) > 1]
        assert all(np.all(a != b) for a, b in zip(kernels, controls, strict=True))


def test_members_alone_equal_the_vmapped_population(trainer):
    config = lottery_config(tiny_config("cnn1d", steps=STEPS))
    config.model.channels = 4
    alone = make_trainer(config, steps_per_call=REWIND, vmap=False)
    states = stack_trials([trainer.init(s, s) for s in SEEDS])
    for a, b in zip(jax.tree.leaves(alone.train(states, REWIND).params),
                    jax.tree.leaves(trainer.train(states, REWIND).params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_trainer_trains_as_the_core_loop_does(trainer, tmp_path):
    config = lottery_config(tiny_config("cnn1d", steps=STEPS))
    config.model.channels = 4
    train_and_evaluate(config, str(tmp_path))
    ours = trainer.train(stack_trials([trainer.init(config.seed, config.seed)]), STEPS)
    for a, b in zip(jax.tree.leaves(load_run(str(tmp_path)).state.params),
                    jax.tree.leaves(ours.params), strict=True):
        np.testing.assert_allclose(a, b[0], rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_line_naming_it(trainer):
    with pytest.raises(UserError, match="scope='row'"):
        magnitude_masks({"k": jnp.ones((2, 2))}, {"k": jnp.ones((2, 2), bool)}, 0.5, "row")
    with pytest.raises(UserError, match="fraction=1.5"):
        magnitude_masks({"k": jnp.ones((2, 2))}, {"k": jnp.ones((2, 2), bool)}, 1.5)
    with pytest.raises(UserError, match="techniques.prune is off"):
        make_trainer(tiny_config("cnn1d", steps=STEPS))
    with pytest.raises(UserError, match="rewind_steps"):
        next(imp(trainer, SEEDS, rounds=1, fraction=0.5, rewind_steps=(STEPS,)))
    state = trainer.init(0, 0)
    with pytest.raises(UserError, match="no pruning state"):
        with_masks(state.replace(opt_state=find_state(state.opt_state).inner), None)
