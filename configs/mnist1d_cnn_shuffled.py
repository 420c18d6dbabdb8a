"""MNIST-1D with every sequence permuted by one fixed shuffle: the paper's spatial-prior test.

    jaxopt-lab train --config configs/mnist1d_cnn_shuffled.py --workdir runs/mnist1d_cnn_shuffled
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "mnist1d_shuffled"
    config.data.shuffle = False  # the paper walks its (already random) data in order
    config.data.validation_fraction = 0.0  # the paper trains on all 4000: its protocol, its table
    config.model = model_config("cnn1d")
    return config
