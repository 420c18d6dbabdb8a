"""ResNet-18 on CIFAR-10 across every host of a TPU VM slice: one `train` command, run on each host.

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd jaxopt_lab && \
      JAXOPT_LAB_DISTRIBUTED=auto .venv/bin/jaxopt-lab train \
      --config configs/tpu/resnet18_cifar10.py --workdir /mnt/shared/runs/resnet18_cifar10"

JAXOPT_LAB_DISTRIBUTED=auto has each process call `jax.distributed.initialize()` with no
arguments: JAX finds the slice's hosts, this host's rank and the coordinator from the TPU VM's
metadata. The workdir must be one directory every host sees (an NFS/Filestore or gcsfuse mount):
process 0 writes the run's files, and the checkpoint is written by every process together.
A v4-8 or v5e-8 is one host: the same command without the variable, over ssh or not.

`data.batch_size` is the global batch, split over every device of every host (1024 on a v4-32's
16 chips: 64 per chip; it must divide by the device count). Each host streams its own shard of
the training set through grain (`data.on_device=False`); the crop and flip run on device.
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "tfds:cifar10"  # downloaded by TFDS into data.dir on first use
    config.data.on_device = False
    config.data.workers = 4  # grain worker processes per host
    config.data.batch_size = 1024  # global
    config.data.validation_fraction = 0.02
    config.data.augment.crop = 4
    config.data.augment.flip = True
    config.model = model_config("resnet18")
    config.optim.name = "nesterov"
    config.optim.lr = 0.8  # 0.1 per 128 examples, scaled linearly with the global batch
    config.optim.weight_decay = 5e-4
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 250
    config.train.steps = 9750  # 200 epochs of 48 full batches
    config.train.compute_dtype = "bfloat16"  # float32 parameters and optimizer state
    config.train.steps_per_call = 50  # a scan of 50 steps per dispatch: no timing run to pick K
    config.train.log_every = 250
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.eval_batch_size = 2048
    return config
