"""The composer's floor, above the techniques and below the run: the config schema assembled
from the core's and the techniques' blocks (`config.py`), the techniques in seam order
(`techniques.py`) and the experiment composed from them (`experiment.py`)."""

from jaxopt_lab.compose.config import default_config, load_config, model_config, validate
from jaxopt_lab.compose.experiment import (
    Experiment,
    compose_experiment,
    data_seed,
    population_members,
    prepare_dataset,
    swept_keys,
    with_data_recorded,
    with_model_recorded,
)
from jaxopt_lab.compose.techniques import TECHNIQUES

__all__ = ["TECHNIQUES", "Experiment", "compose_experiment", "data_seed", "default_config",
           "load_config", "model_config", "population_members", "prepare_dataset", "swept_keys",
           "validate", "with_data_recorded", "with_model_recorded"]
