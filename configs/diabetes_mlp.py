"""Diabetes regression (scikit-learn's 442 patients, 10 features): MLP 10 → 64 → 64 → 1, MSE.

    jaxopt-lab train --config configs/diabetes_mlp.py --workdir runs/diabetes_mlp

The targets are standardized with the train split's mean and std (see `builders.Diabetes`), so the
loss and the reported mse are in units of the target's variance: 1.0 is predicting the mean. The
validation split (`data.validation_fraction`, 10 % of the 353 training patients) is what to select
on; test (89 patients) is reported only.
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "diabetes"
    config.data.batch_size = 32
    config.model = model_config("mlp", hidden=(64, 64))
    config.optim.name = "adam"
    config.optim.lr = 1e-3
    config.train.steps = 1000  # ~100 epochs of the 318 training patients
    config.train.eval_every = 100
    config.train.log_every = 100
    config.train.checkpoint_every = 500
    return config
