"""Learning rate and weight decay of the MNIST-1D MLP, 16 trials at a time as one vmapped
program (they differ only in values, which live in the state); every member is a trial of its
own in the study, and median stopping masks the members that fall behind.

    jaxopt-lab sweep --config configs/sweeps/mnist1d_population.py --workdir runs/sweep_pop
"""

from jaxopt_lab import default_config, model_config
from jaxopt_lab.tune import space


def get_config():
    c = default_config()
    c.data.name = "mnist1d"
    c.model = model_config("mlp")
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.train.steps = 3000
    c.train.eval_every = 500
    c.train.checkpoint_every = 1000
    c.sweep.space = (
        space.log_uniform("optim.lr", 1e-4, 3e-2),
        space.log_uniform("optim.weight_decay", 1e-5, 1e-1),
    )
    c.sweep.trials = 64
    c.sweep.population = 16
    c.sweep.sampler = "random"
    c.sweep.pruner = "median"
    return c
