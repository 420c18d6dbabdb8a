"""A small 2-D CNN for tiny images such as scikit-learn's 8×8 digits."""

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.models.channels import Wiring, conv_stack_wiring
from jaxopt_lab.models.remat import checkpointed


def _conv(module: "CNN2D", x: jax.Array, features: int) -> jax.Array:
    """3×3 conv → ReLU → 2×2 max-pool, the block `remat` recomputes."""
    x = nn.Conv(features, (3, 3), conv_general_dilated_cls=module.conv_general_dilated_cls,
                dtype=module.dtype)(x)
    return nn.max_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))


class CNN2D(nn.Module):
    """Per entry of `features`: 3×3 conv → ReLU → 2×2 max-pool; then flatten → Dense.

    Flattening rather than global pooling keeps where a stroke is, which matters on 8×8 digits
    (8×8 → 4×4 → 2×2, so 2·2·64 = 256 features reach the classifier). Input is [B, H, W] or
    [B, H, W, C].
    """

    num_classes: int
    features: tuple[int, ...] = (32, 64)
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    remat: str = "none"  # see models/remat.py: each conv with its pooling is a block
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("features",)  # what a half-width student halves

    @nn.nowrap
    def channel_wiring(self) -> tuple[Wiring, ...]:
        """Each conv's filters (`models.channels.ChannelModel`), read by the next conv or, after
        the flatten, by the Dense layer (one row per position)."""
        return conv_stack_wiring(len(self.features), "features", spatial=2)

    @nn.nowrap
    def layer_widths(self) -> dict[str, tuple[int, ...]]:
        return {"features": self.features}

    @nn.nowrap
    def with_layer_widths(self, **widths: tuple[int, ...]) -> "CNN2D":
        return self.clone(**widths)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        if x.ndim == 3:
            x = x[..., None]
        conv = checkpointed(_conv, self.remat, static_argnums=(2,))
        for features in self.features:
            x = conv(self, x, features)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls,
                        dtype=self.dtype)(x)
