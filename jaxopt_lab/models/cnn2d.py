"""A small 2-D CNN for tiny images such as scikit-learn's 8×8 digits."""

from typing import Any

import jax
from flax import linen as nn


class CNN2D(nn.Module):
    """Per entry of `features`: 3×3 conv → ReLU → 2×2 max-pool; then flatten → Dense.

    Flattening rather than global pooling keeps where a stroke is, which matters on 8×8 digits
    (8×8 → 4×4 → 2×2, so 2·2·64 = 256 features reach the classifier). Input is [B, H, W] or
    [B, H, W, C].
    """

    num_classes: int
    features: tuple[int, ...] = (32, 64)
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        if x.ndim == 3:
            x = x[..., None]
        for features in self.features:
            x = nn.Conv(features, (3, 3), conv_general_dilated_cls=self.conv_general_dilated_cls)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls)(x)
