"""A seconds-long run for checking an install: the MNIST-1D MLP for 200 steps.

    jaxopt-lab train --config configs/smoke.py --workdir runs/smoke
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.model = model_config("mlp")
    config.train.steps = 200
    config.train.eval_every = 100
    config.train.log_every = 50
    config.train.checkpoint_every = 100
    config.train.steps_per_call = 1
    return config
