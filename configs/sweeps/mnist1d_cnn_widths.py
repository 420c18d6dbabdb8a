"""Width NAS for the MNIST-1D CNN: each conv's channels from {8, 16, 32, 64} (64 architectures)
against validation accuracy and the latency of each trial's own narrow model (multi-objective
TPE). The config's model is the widest (64 channels); 8 trials at a time train as one
population of it, each member's extra channels masked to zero (jaxopt_lab/workflows/nas.py).

    jaxopt-lab sweep --config configs/sweeps/mnist1d_cnn_widths.py --workdir runs/nas_widths
"""

from jaxopt_lab import default_config, model_config


def get_config():
    c = default_config()
    c.data.name = "mnist1d"
    c.model = model_config("cnn1d", channels=64)
    c.train.steps = 1000
    c.train.eval_every = c.train.checkpoint_every = 500
    c.sweep.widths = (8, 16, 32, 64)
    c.sweep.objectives = (("validation_accuracy", "maximize"), ("latency_ms_batch1", "minimize"))
    c.sweep.trials = 16
    c.sweep.population = 8
    c.sweep.startup_trials = 8
    return c
