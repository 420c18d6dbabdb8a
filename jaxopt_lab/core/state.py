"""The one TrainState pytree: whatever is in it is checkpointed, sharded and resumed; nothing else is."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # the model's trainable parameters
    opt_state: Any  # optax state (pruning masks, schedules and hyperparameters live here)
    model_state: Any  # non-trainable model collections, e.g. {"batch_stats": ...}; {} if none
    comm_state: Any  # gradient-communication state, leading axis = data-parallel devices
    rng: jax.Array  # uint32 key data (raw, so checkpoints need no typed-key support)


def create_train_state(model, sample_x: jax.Array, tx: optax.GradientTransformation,
                       comm_init, num_data_devices: int, seed: int) -> TrainState:
    """Initializes the model, optimizer and communication state from one seed.

    `comm_init(params)` gives one device's communication state; it is stacked over the
    data-parallel devices because each device keeps its own (e.g. error-feedback residuals).
    """
    init_key, state_key = jax.random.split(jax.random.key(seed))
    variables = model.init(init_key, sample_x, train=False)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    comm_state = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_data_devices, *jnp.shape(x))), comm_init(params)
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=model_state,
        comm_state=comm_state,
        rng=jax.random.key_data(state_key),
    )


def _init_and_shardings(experiment, input_shape: tuple[int, ...], mesh: Mesh, seed: int):
    sample_x = jnp.zeros((1, *input_shape), jnp.float32)

    def init():
        return create_train_state(experiment.model, sample_x, experiment.tx,
                                  experiment.reducer.init, mesh.size, seed)

    abstract = jax.eval_shape(init)
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
    shardings = shardings.replace(comm_state=jax.tree.map(
        lambda _: NamedSharding(mesh, P(mesh.axis_names[0])), abstract.comm_state))
    return init, abstract, shardings


def init_sharded_state(experiment, input_shape: tuple[int, ...], mesh: Mesh, seed: int) -> TrainState:
    """Builds the state directly with its shardings (shapes first, then a jitted init):
    everything replicated, comm_state split over the "data" axis."""
    init, _, shardings = _init_and_shardings(experiment, input_shape, mesh, seed)
    return jax.jit(init, out_shardings=shardings)()


def abstract_sharded_state(experiment, input_shape: tuple[int, ...], mesh: Mesh) -> TrainState:
    """The state's shapes, dtypes and shardings without computing it: a restore target."""
    _, abstract, shardings = _init_and_shardings(experiment, input_shape, mesh, seed=0)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
