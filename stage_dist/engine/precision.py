"""Mixed precision: which autocast dtype a run uses, and whether it needs a gradient scaler.

``auto`` picks bf16 on GPUs that support it, fp16 (with a GradScaler) on older GPUs, and off on
CPU, where autocast rarely pays. The model itself keeps softmax in float32 and masks with the
dtype's minimum, so every mode is numerically safe.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Precision:
    mode: str  # "bf16" | "fp16" | "off" after resolution
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)

    @property
    def needs_scaler(self) -> bool:
        return self.mode == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is a no-op unless the mode is fp16 (so its state is always saved)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    if mode not in AMP_MODES:
        raise ValueError(f"unknown AMP mode {mode!r}; choose one of {', '.join(AMP_MODES)}")
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "off"
    return Precision(mode=mode, device_type=device.type)
