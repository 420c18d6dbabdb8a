"""Wrote tests/data/run_before_restructure with the code of main at 4000ee9 (before compose/, run/,
workflows/): `PYTHONPATH=<checkout of 4000ee9> python tests/data/make_run_before_restructure.py DIR`."""
import sys

from jaxopt_lab.core.loop import train_and_evaluate

from jaxopt_lab.core.config import default_config, model_config, validate

config = default_config()
config.data.name = "digits"
config.data.batch_size = 32
config.model = model_config("mlp", hidden=(16,))
config.train.steps = 20
config.train.eval_every = 10
config.train.log_every = 10
config.train.checkpoint_every = 10
config.train.keep_checkpoints = 1
config.train.progress = False
config.train.measure = False
config.train.steps_per_call = 1
config.techniques.quantize.method = "qat"
config.techniques.quantize.skip = ()
config.techniques.prune.method = "magnitude"
config.techniques.prune.sparsity = 0.5
config.techniques.prune.begin_step = 5
config.techniques.prune.end_step = 15
config.techniques.prune.frequency = 5
config.techniques.prune.skip = ()
validate(config)
print(train_and_evaluate(config, sys.argv[1])["test_accuracy"])
