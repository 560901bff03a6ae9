"""What surgery decides for one layer, handed to the method factories; plain data, imports nothing."""

from __future__ import annotations


class QuantSpec:
    """Per-layer settings decided by surgery: targets, granularity, estimator, method."""

    def __init__(
        self,
        *,
        target_w: float,
        target_a: float,
        per_channel: bool = True,
        estimator: str = "ste",
        delta: float = 1e-2,
        act_signed: str = "auto",
        quantize_act: bool = True,
        method: str = "gdnsq",
        method_args: dict | None = None,
        integer_grid: bool = False,
    ):
        self.target_w, self.target_a = float(target_w), float(target_a)
        self.per_channel, self.estimator, self.delta = per_channel, estimator, delta
        self.act_signed, self.quantize_act, self.method = act_signed, quantize_act, method
        self.method_args = dict(method_args or {})
        self.integer_grid = bool(integer_grid)

    def as_dict(self) -> dict:
        return dict(vars(self))
