"""Hardware-aware architecture search for the MNIST-1D CNN: its width, uniform or per conv,
against validation accuracy and the latency measured on this device (NSGA-II; the Pareto front
is tabled and plotted in the sweep directory). An MLP's depth and widths search the same way:
space.categorical("model.hidden", ((64,), (128,), (64, 64), (128, 128, 128))).

    jaxopt-lab sweep --config configs/sweeps/mnist1d_cnn_latency.py --workdir runs/nas_cnn
"""

from jaxopt_lab import default_config, model_config
from jaxopt_lab.tune import space


def get_config():
    c = default_config()
    c.data.name = "mnist1d"
    c.model = model_config("cnn1d")
    c.train.steps = 2000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.sweep.space = (
        space.categorical("model.channels", (8, 16, 32, 64, (16, 32, 64), (64, 32, 16))),
        space.categorical("optim.lr", (3e-3, 1e-2)),
    )
    c.sweep.objectives = (("validation_accuracy", "maximize"), ("latency_ms_batch1", "minimize"))
    c.sweep.trials = 20
    c.sweep.sampler = "nsga2"
    return c
