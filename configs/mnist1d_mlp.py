"""MNIST-1D, the paper's mlp (Greydanus & Kobak): Adam 1e-2, batch 100, 6000 steps.

    jaxopt-lab train --config configs/mnist1d_mlp.py --workdir runs/mnist1d_mlp
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "mnist1d"
    config.data.shuffle = False  # the paper walks its (already random) data in order
    config.data.validation_fraction = 0.0  # the paper trains on all 4000: its protocol, its table
    config.model = model_config("mlp")
    config.model.residual = True  # the paper's MLPBase: h + relu(W2 h) around the second layer
    return config
