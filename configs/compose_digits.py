"""Every compression technique in one run: an int8 QAT, 80 %-sparse digits CNN distilled from a
float teacher twice its width, from this one file.

    jaxopt-lab train --config configs/compose_digits.py --workdir runs/compose_digits

The teacher (`configs/digits_cnn.py`, convs of 64 and 128 channels) is trained first into
WORKDIR/teacher by the same command, unless a finished run is there. The student is the digits
CNN with AQT int8 weights and activations at the model seam, gradual magnitude pruning to 80 % at
the update seam and soft-target distillation at the loss seam; its summary.json has each
technique's record, the teacher's test accuracy and size, and the student's sparsity.
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "digits"
    config.data.batch_size = 64
    config.data.augment.crop = 1  # the teacher labels the student's own crops, in the step
    config.model = model_config("cnn2d")
    config.optim.lr = 3e-3
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 100
    config.train.steps = 2000

    config.techniques.quantize.method = "qat"  # int8 weights and activations, forward
    prune = config.techniques.prune
    prune.method = "magnitude"
    prune.sparsity = 0.8
    prune.schedule = "gradual"
    prune.begin_step = 200
    prune.end_step = -1  # three quarters of train.steps
    prune.frequency = 50
    distill = config.techniques.distill
    distill.teacher_config = "configs/digits_cnn.py"
    distill.teacher_overrides = ("--config.model.features=(64, 128)",)
    distill.temperature = 4.0
    distill.alpha = 0.7
    return config
