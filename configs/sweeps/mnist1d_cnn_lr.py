"""Tune the MNIST-1D CNN's optimizer: learning rate, weight decay, batch size and the schedule
family (warm-up steps only where the schedule warms up), by TPE, with ASHA stopping hopeless
trials at the evaluations; selection on the validation split.

    jaxopt-lab sweep --config configs/sweeps/mnist1d_cnn_lr.py --workdir runs/sweep_cnn
    jaxopt-lab sweep --config configs/sweeps/mnist1d_cnn_lr.py --workdir runs/sweep_cnn \
        --config.sweep.sampler=skopt_gp --workers 2
"""

from jaxopt_lab import default_config, model_config
from jaxopt_lab.tune import space


def get_config():
    c = default_config()
    c.data.name = "mnist1d"  # the default 10 % validation split is what the search reads
    c.model = model_config("cnn1d")
    c.optim.name = "adamw"
    c.train.steps = 2000
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.progress = False
    c.sweep.space = (
        space.log_uniform("optim.lr", 1e-4, 1e-1),
        space.log_uniform("optim.weight_decay", 1e-6, 1e-2),
        space.categorical("data.batch_size", (32, 64, 128, 256)),
        *space.schedule_family(("constant", "cosine", "warmup_cosine", "one_cycle")),
    )
    c.sweep.trials = 30
    c.sweep.sampler = "tpe"
    c.sweep.pruner = "asha"
    return c
