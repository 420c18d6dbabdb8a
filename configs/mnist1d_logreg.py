"""MNIST-1D, the paper's logreg (Greydanus & Kobak): Adam 1e-2, batch 100, 6000 steps.

    jaxopt-lab train --config configs/mnist1d_logreg.py --workdir runs/mnist1d_logreg
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "mnist1d"
    config.data.shuffle = False  # the paper walks its (already random) data in order
    config.data.validation_fraction = 0.0  # the paper trains on all 4000: its protocol, its table
    config.model = model_config("logreg")
    return config
