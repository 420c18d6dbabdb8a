"""Devices and processes: joining a multi-process run, and the data-parallel mesh.

The same code runs on one device, on N local devices and on N processes. `jaxopt-lab launch`
starts local processes and tells each who it is through JAXOPT_LAB_* variables; on a TPU pod or a
SLURM cluster JAX's own auto-detection (`jax.distributed.initialize()` with no arguments) applies:
where the environment shows a cluster (JAX_COORDINATOR_ADDRESS, GKE's TPU_WORKER_HOSTNAMES, SLURM
with several tasks), or where JAXOPT_LAB_DISTRIBUTED=auto asks for it — a TPU VM slice made with
`gcloud compute tpus tpu-vm create` sets none of these variables (JAX reads its metadata server).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from jaxopt_lab.core.step import DATA_AXIS
from jaxopt_lab.errors import UserError

COORDINATOR_ENV = "JAXOPT_LAB_COORDINATOR"
NUM_PROCESSES_ENV = "JAXOPT_LAB_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXOPT_LAB_PROCESS_ID"
DISTRIBUTED_ENV = "JAXOPT_LAB_DISTRIBUTED"  # "auto": join the cluster JAX detects


def _cluster_detected() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed() -> None:
    """Joins the multi-process run this process belongs to, if any; idempotent."""
    if jax.distributed.is_initialized():
        return
    if os.environ.get(COORDINATOR_ENV):
        # CPU processes need a collectives backend to talk to each other.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ[COORDINATOR_ENV],
            num_processes=int(os.environ[NUM_PROCESSES_ENV]),
            process_id=int(os.environ[PROCESS_ID_ENV]),
        )
    elif os.environ.get(DISTRIBUTED_ENV):
        if os.environ[DISTRIBUTED_ENV] != "auto":
            raise UserError(f"{DISTRIBUTED_ENV}={os.environ[DISTRIBUTED_ENV]!r} is unknown; "
                            "allowed: auto (or unset)")
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as error:
            raise UserError(f"{DISTRIBUTED_ENV}=auto, but JAX detected no cluster to join "
                            f"(Cloud TPU, GKE, SLURM, Open MPI): {error}") from None
    elif _cluster_detected():
        jax.distributed.initialize()


def data_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis "data"."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
