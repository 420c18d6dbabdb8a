"""Throughput work: a CIFAR-style ResNet-20 on random 32x32x3 images (accuracy means nothing here).

    jaxopt-lab train --config configs/synthetic_resnet.py --workdir runs/synthetic_resnet
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "synthetic"
    config.data.synthetic_shape = (32, 32, 3)
    config.data.batch_size = 128
    config.model = model_config("resnet")
    config.optim.name = "momentum"
    config.optim.lr = 0.1
    config.optim.schedule = "cosine"
    config.train.steps = 500
    config.train.eval_every = 500
    return config
