"""scikit-learn's 8x8 digits with a small 2-D CNN and random-crop augmentation.

    jaxopt-lab train --config configs/digits_cnn.py --workdir runs/digits_cnn
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "digits"
    config.data.batch_size = 64
    config.data.augment.crop = 1
    config.model = model_config("cnn2d")
    config.optim.lr = 3e-3
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 100
    config.train.steps = 2000
    return config
