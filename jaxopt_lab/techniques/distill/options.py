"""Distillation options: one frozen record of the teacher, the soft loss and the extra data.

`wrap` takes the loss's fields as keywords with these defaults; the config block
`techniques.distill` is this record as it is (an empty `teacher` and `teacher_config` is off).
"""

from __future__ import annotations

import dataclasses
import os

from jaxopt_lab.errors import UserError

FORMS = ("kl", "cross_entropy")
TEACHER_LOGITS_MODES = ("auto", "in_step", "precomputed")


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """What a distilled run learns from, and how."""

    teacher: str = ""  # a run directory whose model teaches (its newest checkpoint); "" = off
    teacher_member: int = -1  # a population teacher: the member that teaches
    # a config file: the teacher is trained from it first, into `teacher` (or WORKDIR/teacher
    # where that is ""), unless a finished run is there
    teacher_config: str = ""
    teacher_overrides: tuple[str, ...] = ()  # "--config.KEY=VALUE" strings for teacher_config
    temperature: float = 4.0  # softmax temperature of both; a per-trial value
    alpha: float = 0.9  # weight of the soft loss; 1 - alpha weighs the hard one; per-trial
    form: str = "kl"  # kl | cross_entropy (same gradients; the logged value differs by a constant)
    features: tuple = ()  # (student layer, teacher layer) pairs of module paths: FitNets hints
    feature_weight: float = 1.0  # weight of the hints' mean squared error
    transfer_size: int = 0  # unlabeled inputs from the data set's generator, teacher-labelled
    # auto: computed once before training when nothing changes them (no augmentation, no
    # features, a classification task), else in the step | in_step | precomputed
    teacher_logits: str = "auto"

    @property
    def on(self) -> bool:
        return bool(self.teacher or self.teacher_config)


DEFAULTS = DistillOptions()


def check_loss_options(temperature: float, alpha: float, form: str) -> None:
    """One line naming the first bad option of the soft loss."""
    if form not in FORMS:
        raise UserError(f"distill form={form!r} is unknown; allowed: {', '.join(FORMS)}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float))
                                             and temperature > 0):
        raise UserError(f"distill temperature={temperature!r} must be a number > 0")
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise UserError(f"distill alpha={alpha!r} must be a number in [0, 1]")


def check_teacher(options: DistillOptions) -> None:
    """The teacher must be a run directory, or come from a config file trained first."""
    if options.teacher_config:
        if not os.path.isfile(options.teacher_config):
            raise UserError(f"distill teacher_config={options.teacher_config!r}: no such config "
                            "file")
    elif not os.path.exists(os.path.join(options.teacher, "config.json")):
        raise UserError(f"distill teacher={options.teacher!r} holds no config.json: not a run "
                        "directory (train the teacher first, or set teacher_config)")
    if options.teacher_logits not in TEACHER_LOGITS_MODES:
        raise UserError(f"distill teacher_logits={options.teacher_logits!r} is unknown; "
                        f"allowed: {', '.join(TEACHER_LOGITS_MODES)}")
    if isinstance(options.transfer_size, bool) or options.transfer_size < 0:
        raise UserError(f"distill transfer_size={options.transfer_size!r} must be an int >= 0")
