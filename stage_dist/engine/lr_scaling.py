"""The learning rate a run gets for its effective batch, and why (issue 17).

The base LR (``--lr``) is the LR of ONE window per optimizer step (the published recipe). A run
with ``windows_per_step`` windows on each of ``world_size`` ranks has the effective batch
``B = windows_per_step x world_size`` windows, and its LR is ``base x factor(B)`` with the factor of
``--lr-scaling``: ``none`` 1, ``sqrt`` sqrt(B), ``linear`` B. A run whose LR is scaled up (factor
> 1) ramps it up linearly over ``--warmup-keyframes`` keyframes, i.e.
``ceil(warmup_keyframes / (window x B))`` steps; ``--warmup-steps N`` (N > 0) sets the ramp in
steps instead, whatever the factor. With factor 1 and no ``--warmup-steps`` there is no warmup,
so the published recipe (``--lr-scaling none``, one window, one rank) is unchanged bit for bit.

The defaults come from ``bench/time_to_accuracy.py`` (README, "Scaling out"); its table covers
effective batches ``MEASURED_BATCHES``; a run outside them, or above ``RECOVERED_UP_TO`` (where no
rule recovered the recipe's accuracy), gets a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("none", "linear", "sqrt")
# Measured (bench/results/time_to_accuracy.md): sqrt without warmup is the one setting that reached
# the recipe's val mAP at both B = 8 (1.5x its keyframes) and B = 32 (4.0x). linear needs a warmup
# at 8 (then 1.25x, the fastest there; without one it missed 2 seeds in 3) and stalls at 32 with or
# without one; a 4,800-keyframe warmup kept sqrt at 32 from the band. Nothing recovered at 128.
DEFAULT_RULE = "sqrt"
DEFAULT_WARMUP_KEYFRAMES = 0
MEASURED_BATCHES = (1, 128)  # the smallest and largest effective batch the bench measured
RECOVERED_UP_TO = 32  # the largest measured B at which a rule (sqrt) reached the recipe's accuracy within 4x


def lr_factor(rule: str, effective_batch: int) -> float:
    """How much the base LR grows at ``effective_batch`` windows per step under ``rule``."""
    if effective_batch < 1:
        raise ValueError(f"effective batch must be >= 1, got {effective_batch}")
    if rule == "none":
        return 1.0
    if rule == "linear":
        return float(effective_batch)
    if rule == "sqrt":
        return math.sqrt(effective_batch)
    raise ValueError(f"unknown LR scaling rule {rule!r} (one of {', '.join(RULES)})")


@dataclass(frozen=True)
class LRChoice:
    """The LR of a run and how it was chosen."""

    effective_batch: int  # windows per optimizer step, all ranks
    base_lr: float
    rule: str
    factor: float
    warmup_steps: int
    warmup_reason: str  # "--warmup-steps", "--warmup-keyframes K" or "none"

    @property
    def lr(self) -> float:
        return self.base_lr * self.factor

    def describe(self) -> str:
        warmup = f"warmup {self.warmup_steps} steps ({self.warmup_reason})" if self.warmup_steps else "no warmup"
        return (f"effective batch {self.effective_batch} windows: lr {self.lr:.4g} = base {self.base_lr:.4g} x "
                f"{self.factor:.4g} (--lr-scaling {self.rule}), {warmup}")

    def coverage_warning(self) -> str | None:
        """A message when the effective batch lies outside what the measured table covers."""
        low, high = MEASURED_BATCHES
        if not low <= self.effective_batch <= high:
            return (f"effective batch {self.effective_batch} windows is outside the measured range {low}-{high} "
                    "(README, 'Scaling out'): the LR rule and warmup are untested there; check val mAP against "
                    "a run at a measured batch")
        if self.effective_batch > RECOVERED_UP_TO:
            return (f"effective batch {self.effective_batch} windows is above {RECOVERED_UP_TO}, where no measured LR "
                    "rule, warmup or LAMB reached the recipe's val mAP within 4x its keyframes (README, 'Scaling "
                    f"out'): expect a worse model per epoch; fewer windows per step (at most {RECOVERED_UP_TO} "
                    "in all) recover it")
        return None


def choose_lr(base_lr: float, rule: str, windows_per_step: int, world_size: int, window: int,
              warmup_steps: int = 0, warmup_keyframes: int = DEFAULT_WARMUP_KEYFRAMES) -> LRChoice:
    """The LR and warmup of a run with ``windows_per_step`` windows of ``window`` keyframes on
    each of ``world_size`` ranks (see the module docstring for the rules)."""
    batch = windows_per_step * world_size
    factor = lr_factor(rule, batch)
    if warmup_steps > 0:
        steps, reason = warmup_steps, "--warmup-steps"
    elif warmup_keyframes > 0 and factor > 1.0:
        steps, reason = math.ceil(warmup_keyframes / (window * batch)), f"--warmup-keyframes {warmup_keyframes}"
    else:
        steps, reason = 0, "none"
    return LRChoice(batch, base_lr, rule, factor, steps, reason)
