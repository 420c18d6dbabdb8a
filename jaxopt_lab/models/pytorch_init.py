"""PyTorch's default layer initialisation, for models whose published numbers came from PyTorch.

The MNIST-1D baselines (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", 2020 /
ICML 2024) were trained with torch's defaults, which differ from Flax's (LeCun-normal kernels, zero
biases); reproducing the paper's accuracies starts with the same initial distribution.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

# torch draws kernels with kaiming_uniform(a=sqrt(5)): bound sqrt(6 / ((1 + 5) * fan_in)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is variance_scaling(1/3, fan_in, uniform).
_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def pytorch_init(fan_in: int) -> dict[str, nn.initializers.Initializer]:
    """`kernel_init`/`bias_init` kwargs of torch.nn.Linear/ConvNd for a layer with this fan-in.

    Both kernel and bias are U(-1/sqrt(fan_in), 1/sqrt(fan_in)). A Flax bias initialiser only sees
    the bias shape, which does not carry the fan-in, so the bound is closed over here.

    Args:
      fan_in: input features of a Dense layer; in_channels * prod(kernel_size) of a conv.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return {"kernel_init": _TORCH_KERNEL_INIT, "bias_init": bias_init}
