"""The techniques a composed experiment applies, in seam order: model (quantization), loss
(distillation), update (pruning), communication (compression). An explicit tuple, not a
registry: a technique of your own joins by passing `TECHNIQUES + (yours,)` where a `techniques=`
argument is taken (`build_experiment`, `default_config`, `validate`, `load_config`, `build_run`,
`train_and_evaluate`)."""

from __future__ import annotations

from jaxopt_lab.techniques.compress.adapter import TECHNIQUE as COMPRESS
from jaxopt_lab.techniques.contract import Technique
from jaxopt_lab.techniques.distill.adapter import TECHNIQUE as DISTILL
from jaxopt_lab.techniques.prune.adapter import TECHNIQUE as PRUNE
from jaxopt_lab.techniques.quantize.adapter import TECHNIQUE as QUANTIZE

TECHNIQUES: tuple[Technique, ...] = (QUANTIZE, DISTILL, PRUNE, COMPRESS)
