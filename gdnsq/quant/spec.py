"""What surgery decides for one layer, handed to the method factories; plain data, imports nothing."""

from __future__ import annotations

# Names a QuantSpec field had before: recipes in packed files and registered models written then still rebuild.
_OLD_NAMES = {"target_w": "bound_w", "target_a": "bound_a"}


class QuantSpec:
    """Per-layer settings decided by surgery: bit bounds, granularity, estimator, method.

    ``bound_w`` / ``bound_a``: the most weight / input bits the layer may keep, fixed at surgery:
    quant.target_w / target_a (or a rule's) without a budget, quant.budget.max_bits under one (a rule's target
    still lowers it); a fixed-width (zoo) method's width. The layer's target during the run is not here: it is
    the layer's ``target_w`` / ``target_a`` buffer (quant.layers), which starts at the bound and which a budget's
    allocation lowers (training.targets)."""

    def __init__(
        self,
        *,
        bound_w: float,
        bound_a: float,
        per_channel: bool = True,
        estimator: str = "ste",
        delta: float = 1e-2,
        act_signed: str = "auto",
        quantize_act: bool = True,
        method: str = "gdnsq",
        method_args: dict | None = None,
        integer_grid: bool = False,
    ):
        self.bound_w, self.bound_a = float(bound_w), float(bound_a)
        self.per_channel, self.estimator, self.delta = per_channel, estimator, delta
        self.act_signed, self.quantize_act, self.method = act_signed, quantize_act, method
        self.method_args = dict(method_args or {})
        self.integer_grid = bool(integer_grid)

    def as_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        """The spec of an ``as_dict()``, also one written under the old field names (target_w / target_a)."""
        return cls(**{_OLD_NAMES.get(k, k): v for k, v in data.items()})
