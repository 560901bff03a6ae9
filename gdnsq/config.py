"""The whole config tree: the job's small dataclasses, the sweep schema, YAML files and dotted overrides.

Every setting has exactly one dotted name (``quant.target_w``), the same in YAML, on the CLI
(``--quant.target_w 2``), in a Tune search space and in MLflow params. Validation lives in
``__post_init__`` and raises :class:`ConfigError` with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, SweepError


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


# ------------------------------------------------------------------------------------ declared bounds
# Each setting declares its bounds once, on its field (``lr: float = checked(2e-3, gt=0)``); every setting of
# its type gets the type's rules as well (a finite float, an integer torch can hold, a string without control
# characters). :func:`check_section` runs both at the top of a section's ``__post_init__``, and :func:`from_dict`
# before a section is built, so a bad value fails in one line naming its field before any other check or use.

INT_LIMIT = 2**63 - 1  # torch's and numpy's int64: a larger count overflows the first tensor made from it
STR_LIMIT = 4096  # PATH_MAX: the longest path a setting can usefully hold
_LINE_BREAKS = {"Cc", "Zl", "Zp"}  # control characters and line/paragraph separators: not in a one-line message


@dataclass(frozen=True)
class Bounds:
    """What a setting accepts beyond its type: a range, a set of words, a test of its own."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    noun: str | None = None
    """Word for an unknown choice ("unknown estimator 'x'; choose one of ..."); else "must be one of ..."."""
    unit: str = ""
    """Shown after the range ("in [1, 16] bits")."""
    hint: str = ""
    """Why the bound, shown in parentheses."""
    empty: bool = False
    """A string may be empty (a regex matching everything); otherwise "" is refused."""
    test: Callable[[Any], str | None] | None = None
    """A check of its own: the problem in a few words, or None."""


def checked(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **bounds) -> Any:
    """A dataclass field with its :class:`Bounds` (``default`` or ``factory`` as in ``dataclasses.field``)."""
    meta = {"bounds": Bounds(**bounds)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_problem(value: float, b: Bounds, integer: bool) -> str | None:
    lo, hi = (b.gt, b.ge)[b.gt is None], (b.lt, b.le)[b.lt is None]
    ok = (
        (b.ge is None or value >= b.ge)
        and (b.gt is None or value > b.gt)
        and (b.le is None or value <= b.le)
        and (b.lt is None or value < b.lt)
    )
    if ok:
        return None
    hint = f" ({b.hint})" if b.hint else ""
    if lo is not None and hi is not None:
        left, right = "(["[b.gt is None], ")]"[b.lt is None]
        kind = "an integer in " if integer else "in "
        return f"must be {kind}{left}{_num(lo)}, {_num(hi)}{right}{b.unit}{hint}, got {value}"
    op, bound = (">" if b.gt is not None else ">=", lo) if lo is not None else ("<" if b.lt is not None else "<=", hi)
    return f"must be {op} {_num(bound)}{b.unit}{hint}, got {value}"


def _type_problem(value: Any, tp: Any) -> str | None:
    """The rules every setting of type ``tp`` follows, whatever its bounds."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and abs(value) > INT_LIMIT:
        return f"must be within ±{INT_LIMIT} (int64), got {value:.3g}"
    if isinstance(value, str):
        if len(value) > STR_LIMIT:
            return f"must be at most {STR_LIMIT} characters, got {len(value)}"
        kinds = {unicodedata.category(c) for c in value}
        if kinds & _LINE_BREAKS:
            return f"must not contain control characters, got {_show(value)}"
        if "Cs" in kinds:  # undecodable bytes from the command line (surrogate escapes): no file or console takes them
            return f"must be UTF-8 text, got {_show(value)}"
    return None


def check_value(name: str, value: Any, tp: Any, bounds: Bounds | None = None) -> None:
    """``value`` of the setting ``name`` (annotated ``tp``) against its type's rules and ``bounds``; one line."""
    tp, _ = _unwrap_optional(tp)
    if isinstance(value, list):
        args = typing.get_args(tp)
        for i, v in enumerate(value):
            if not dataclasses.is_dataclass(v):
                check_value(f"{name}[{i}]", v, args[0] if args else Any)
        return
    if isinstance(value, dict):
        args = typing.get_args(tp)
        for k, v in value.items():
            check_value(f"{name}.{k}", str(k), str)
            check_value(f"{name}.{k}", v, args[1] if len(args) == 2 else Any)
        return
    b, problem = bounds or Bounds(), None
    if tp is int and isinstance(value, float) and not value.is_integer():
        span = f" in [{_num(b.ge)}, {_num(b.le)}]{b.unit}" if b.ge is not None and b.le is not None else ""
        problem = f"must be an integer{span}, got {value}"
    if problem is None and isinstance(value, str):  # a control character first: it explains an odd range or name
        problem = _type_problem(value, tp) or _bounds_problem(value, b, integer=False)
    elif problem is None and value is not None:  # a declared range names NaN's problem better than "finite" does
        problem = _bounds_problem(value, b, integer=tp is int) or _type_problem(value, tp)
    if problem is not None:
        raise ConfigError(f"{name}: {problem}")


def _bounds_problem(value: Any, b: Bounds, integer: bool) -> str | None:
    if isinstance(value, str):
        if b.choices is not None and value not in b.choices:
            if b.noun:
                return f"unknown {b.noun} {_show(value)}; choose one of {', '.join(b.choices)}"
            return f"must be one of {', '.join(b.choices)}, got {_show(value)}"
        if not value and not b.empty:
            return "must not be empty (leave the setting out for its default)"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        problem = _range_problem(value, b, integer)
        if problem:
            return problem
    return b.test(value) if b.test is not None else None


# A run name is a folder under the storage path (and the same name in MLflow). Linux allows 255 bytes for one
# folder name; '--fresh' appends '.old-YYYYmmdd-HHMMSS' (20 bytes), and MLflow keeps 250 characters of a run name.
RUN_NAME_BYTES = 200
SWEEP_NAME_BYTES = RUN_NAME_BYTES - 40  # a trial's run is '<sweep.name>-<trial id>'


def run_name_problem(name: str, limit: int = RUN_NAME_BYTES) -> str | None:
    """What keeps ``name`` from being one safe folder name under the storage path, or None."""
    if name.startswith("."):
        return f"must not start with '.' ('..' is the folder above, '.x' a hidden one), got {_show(name)}"
    if "/" in name or "\\" in name:
        return f"must be one folder name, without '/' or '\\', got {_show(name)}"
    if name != name.strip():
        return f"must not start or end with a space, got {_show(name)}"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > limit:
        return f"must be at most {limit} bytes (one folder name, with room for '.old-<time>'), got {size}"
    return None


def check_section(section: Any, prefix: str) -> None:
    """Every field of the dataclass instance ``section`` (dotted under ``prefix``) against its type and bounds."""
    types_ = _field_types(type(section))
    for f in dataclasses.fields(section):
        name = f"{prefix}.{f.name}" if prefix else f.name
        check_value(name, getattr(section, f.name), types_[f.name], f.metadata.get("bounds") or Bounds())


ESTIMATORS = ("auto", "ste", "lsq", "ewgs", "aewgs")
DISTILL_LOSSES = ("jeffreys", "kl", "ce")
BATCHNORM_MODES = ("keep", "freeze", "fold")
DATA_KINDS = ("bundled", "ffcv", "imagefolder")
BAD_IMAGE_POLICIES = ("error", "skip")
PRECISIONS = ("fp32", "bf16", "fp16")
IMG_SIZE_LIMIT = 8192  # the longest crop side taken: one 8192² RGB float image is 768 MiB


def path_kind(path: str | Path) -> str | None:
    """What ``path`` is: "file", "dir", "other" or None (absent, or refused by the OS: too long, a NUL byte)."""
    try:
        p = Path(path)
        return "dir" if p.is_dir() else "file" if p.is_file() else "other" if p.exists() else None
    except (OSError, ValueError):
        return None


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "gdnsq_smallcnn"
    """timm model name (any registered timm CNN or ViT, plus gdnsq's small bundled-data CNN)."""
    pretrained: bool = False
    """Load timm's pretrained weights (needs hub access or a local cache on the cluster)."""
    checkpoint: str | None = None
    """Path to an FP state dict or gdnsq checkpoint used as the FP model and teacher."""
    num_classes: int | None = checked(None, ge=2, le=1_000_000)
    """Classifier width; None means the dataset's class count."""
    in_chans: int | None = checked(None, ge=1, le=1024)
    """Input channels; None means the dataset's."""

    def __post_init__(self):
        _check(bool(self.name), "model.name", "must name a timm model")
        check_section(self, "model")
        if self.checkpoint is not None:
            kind = path_kind(self.checkpoint)
            _check(kind != "dir", "model.checkpoint", f"{self.checkpoint!r} is a folder; give the weights file in it")
            _check(kind == "file", "model.checkpoint", f"no such file {self.checkpoint!r}")


@dataclass(kw_only=True)
class QuantRuleConfig:
    """One surgery rule: layers whose dotted name matches ``pattern`` get these overrides."""

    pattern: str = checked(empty=True)
    """Regular expression matched (re.search) against the module's dotted name."""
    skip: bool | None = None
    """Keep matching layers in floating point."""
    target_w: int | None = checked(None, ge=1, le=16, unit=" bits")
    """Weight bit target (an integer) for matching layers."""
    target_a: int | None = checked(None, ge=1, le=16, unit=" bits")
    """Activation bit target (an integer) for matching layers."""
    per_channel: bool | None = None
    """Per-output-channel weight steps for matching layers."""
    quantize_act: bool | None = None
    """Quantize the input activation of matching layers."""


BUDGET_KINDS = ("none", "avg_bits_w", "bytes", "bops")
ALLOCATIONS = ("probe", "penalty")


@dataclass(kw_only=True)
class BudgetConfig:
    """One model-wide budget that the layers share (learned mixed precision); kind none = per-layer targets."""

    kind: str = checked("none", choices=BUDGET_KINDS)
    """none (every layer at quant.target_w/target_a), avg_bits_w (parameter-weighted mean weight bits),
    bytes (the packed file's payload: codes at each layer's width + grids + every FP tensor) or bops
    (Σ MACs·b_w·b_a)."""
    value: float = checked(0.0, ge=0)
    """The budget: mean bits (avg_bits_w), bytes (bytes) or bit operations per sample (bops)."""
    value_a: float | None = checked(None, ge=1, unit=" bit")
    """Optional activation budget: the quantized inputs' bits per element (activation memory; else per-layer
    target_a). With allocate: probe each layer's input width is chosen too (a small input may keep 8 bits)."""
    min_bits: int = checked(1, ge=1, le=16)
    """Lower bound of every layer's bits: the level guard keeps 2**min_bits levels."""
    max_bits: int = checked(8, ge=1, le=16)
    """Upper bound of a layer's weight bits (a rule's target_w overrides it for its layers, as a bound)."""
    quantize_edges: bool = False
    """Put the stem conv's and classifier's weights under the budget too (at min_bits..max_bits; their inputs stay
    FP, as with keep_first_conv/keep_classifier): the bytes the paper's convention spends on them in FP become
    the budget's to share."""
    allocate: str = checked("probe", choices=ALLOCATIONS)
    """How the layers share the budget: probe (measure each layer's loss at each width once, on the first batch,
    and pick the widths with the least loss that fit; they become the layers' targets) or penalty (the exterior
    penalty on the aggregate alone; under Adam every layer descends at the same rate, so it tends to uniform)."""

    def __post_init__(self):
        check_section(self, "quant.budget")
        _check(
            self.kind == "none" or self.value > 0,
            "quant.budget.value",
            f"must be > 0 with kind {self.kind}, got {self.value}",
        )
        _check(
            self.min_bits <= self.max_bits,
            "quant.budget.max_bits",
            f"must be an integer in [min_bits, 16], got {self.max_bits}",
        )

    @property
    def active(self) -> bool:
        return self.kind != "none"


@dataclass(kw_only=True)
class QuantConfig:
    method: str = "gdnsq"
    """Quantization method: gdnsq (learnable bit-width) or a zoo method (lsq, dorefa, pact, ...)."""
    method_args: dict[str, float] = field(default_factory=dict)
    """Hyper-parameters of a zoo method (e.g. {error_weight: 0.1} for pege); each method checks its keys."""
    target_w: int = checked(2, ge=1, le=16, unit=" bits")
    """Weight bit-width target per layer, an integer (the constraint bits <= target)."""
    target_a: int = checked(2, ge=1, le=16, unit=" bits")
    """Activation bit-width target per layer, an integer."""
    init_bits: float = checked(10.0, gt=1, le=24)
    """Bit-width that calibration starts every quantizer at (near-lossless)."""
    per_channel: bool = True
    """Per-output-channel weight steps (else per tensor)."""
    estimator: str = checked("auto", choices=ESTIMATORS, noun="estimator")
    """Gradient estimator: auto (aewgs for a 1-bit target, ste otherwise), ste, lsq (rounding-error step gradient),
    ewgs, aewgs (adaptive EWGS)."""
    ewgs_delta: float = checked(1e-2, ge=0)
    """EWGS scaling factor delta."""
    act_signed: str = checked("auto", choices=("auto", "signed", "unsigned"))
    """Activation lower bound: auto (0 after ReLU, detected at calibration), signed, unsigned."""
    integer_grid: bool = False
    """Integer grids (GDNSQ): every grid point an integer times its step (offset z = a whole number of steps, 0 after
    a ReLU; weights int8 codes with zero point 0), so integer kernels run the model exactly (``gdnsq export --onnx
    --onnx-target int8``). Off: the float offset z = lo (exact fake-quant only)."""
    keep_first_conv: bool = True
    """Keep the stem conv FP (read from timm's pretrained_cfg)."""
    keep_classifier: bool = True
    """Keep the classifier FP (read from timm's pretrained_cfg)."""
    keep_pointwise: bool = False
    """Keep 1x1 convs (shortcuts) FP, as the reference code did."""
    batchnorm: str = checked("keep", choices=BATCHNORM_MODES)
    """BatchNorm handling: keep (trained), freeze (eval stats, no grad) or fold into the conv."""
    calib_batches: int = checked(4, ge=1)
    """Batches seen by the min/max observers before training."""
    fused: bool = True
    """GDNSQ's noisy rounding as one compiled pass each way on the CPU (built on first use; False: the torch ops)."""
    level_guard: bool = True
    """Project log s after every step so no learnable grid has fewer than 2**target levels."""
    hold_targets: bool = True
    """Once the descent has reached the targets (the first passing true-bit check), a later check that fails
    projects log s so no learnable grid has more than 2**target levels: a converged model stays converged while
    the LR anneals (without it a layer that drifts back out holds the anneal, and selection, for the rest of the
    run)."""
    level_margin: float = checked(0.1, gt=0, lt=0.45, unit=" levels")
    """Level guard's (and target hold's) margin, in grid levels: it keeps 2**b >= 2**T - 1/2 + margin (T = the
    layer's target)."""
    rules: list[QuantRuleConfig] = field(default_factory=list)
    """Ordered (regex -> override) rules; first match wins; each must match at least one layer."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """One model-wide budget shared by the layers (mixed precision); targets then act as per-layer upper bounds."""

    def __post_init__(self):
        if not isinstance(self.budget, BudgetConfig):
            self.budget = from_dict(BudgetConfig, self.budget, "quant.budget")
        self.rules = [
            r if isinstance(r, QuantRuleConfig) else from_dict(QuantRuleConfig, r, f"quant.rules[{i}]")
            for i, r in enumerate(self.rules)
        ]
        check_section(self, "quant")
        for i, r in enumerate(self.rules):
            check_section(r, f"quant.rules[{i}]")


@dataclass(kw_only=True)
class ObjectiveConfig:
    distill: str = checked("jeffreys", choices=DISTILL_LOSSES)
    """Task term: jeffreys (symmetric KL to the teacher), kl (KL(teacher||student)) or ce (labels)."""
    penalty_weight: float = checked(1.0, ge=0)
    """Weight of the bit-width penalty term (l1 in the paper's objective)."""
    task_weight: float = checked(1.0, ge=0)
    """Weight of the distillation / task loss term (l2 in the paper's objective)."""
    p: float = checked(1.0, gt=0)
    """Exponent of the exterior-point penalty."""
    eps: float = checked(1e-3, gt=0, lt=1)
    """Margin below the bit target that counts as feasible."""
    lossless: bool = False
    """Move the temperature from the penalty term to the task term (the objective's lossless form)."""
    loss_scale: str = checked("ema", choices=("ema", "cumulative"))
    """Running mean m̄ of the task loss that scales the penalty: ema, or cumulative (since step 0, the reference's)."""
    loss_ema: float = checked(0.99, ge=0, lt=1)
    """Decay of the EMA m̄ (loss_scale: ema)."""
    count_active: str = checked("layers", choices=("layers", "channels"))
    """Active-constraint weights ω: count violated layers, or weight channels (the reference's)."""

    def __post_init__(self):
        check_section(self, "objective")


SCHEDULE_MODES = ("planned", "absolute")


@dataclass(kw_only=True)
class ScheduleConfig:
    mode: str = checked("planned", choices=SCHEDULE_MODES)
    """planned: derive warm-up, descent, quantizer LR and anneal from the planned steps; absolute: the paper's knobs."""
    descent_end: float = checked(0.5, gt=0, le=1)
    """planned: fraction of the planned steps by which every layer should reach its bit target."""
    descent_end_a: float | None = checked(None, gt=0, le=1)
    """planned: fraction of the planned steps by which the activations reach their targets (None = descent_end).
    Earlier, the inputs go first while the weights still have bits (the order of two-step binary-network
    training); measured both ways at W1A1, so not a default (docs/results.md, "Decisions")."""
    warmup: float = checked(0.05, ge=0, lt=1)
    """planned: fraction of the planned steps with temperature 0 and linear LR warm-up."""
    final_lr_ratio: float = checked(0.05, gt=0, le=1)
    """planned: LR at the end of the run (as a fraction of the base LR), reached by the anneal after descent_end."""
    max_temperature: float = checked(32.0, ge=1)
    """planned: cap of the penalty multiplier t (in units of the running task loss). Past it the task term is
    noise next to the penalty: uncapped, W1A1 runs whose bits lagged the plan drove t up until the task loss
    collapsed (docs/results.md, "Decisions": temperature cap)."""
    warmup_steps: int = checked(100, ge=0)
    """absolute: steps with temperature 0 and linear LR warm-up."""
    scale_t: float = checked(2.0, ge=0)
    """absolute: temperature growth per step, in units of the base LR."""
    anneal: float = checked(0.9985, gt=0, le=1)
    """absolute: per-step LR factor while every layer meets its target."""
    check_every: int = checked(10, ge=1)
    """Steps between true-bit convergence checks; the LR anneal runs only while the last check passed."""
    min_lr_ratio: float = checked(0.0, ge=0, le=1)
    """Floor of the annealed LR as a fraction of the base LR."""
    noise_ratio: float = checked(0.0, ge=0, le=1)
    """Initial share of extra uniform rounding noise (0 = pure rounding)."""
    noise_step: float = checked(0.01, ge=0, le=1)
    """Decrease of the noise ratio whenever the penalty is ~0."""

    def __post_init__(self):
        check_section(self, "schedule")
        _check(
            self.warmup < self.descent_end <= 1,
            "schedule.descent_end",
            f"must be in (schedule.warmup, 1], got {self.descent_end}",
        )
        _check(
            self.descent_end_a is None or self.warmup < self.descent_end_a <= 1,
            "schedule.descent_end_a",
            f"must be in (schedule.warmup, 1], got {self.descent_end_a}",
        )


OPTIMIZERS = ("auto", "radam", "adamw", "sgd")


@dataclass(kw_only=True)
class OptimConfig:
    name: str = checked("auto", choices=OPTIMIZERS, noun="optimizer")
    """Optimizer: auto (adamw for a run of fewer than 10,000 planned steps, radam from there: RAdam's rectification
    acts as a ~1,000-step warm-up), radam, adamw or sgd."""
    lr: float = checked(2e-3, gt=0)
    """Learning rate of the network weights (base LR of the schedules)."""
    quant_lr: float | None = checked(None, gt=0)
    """Learning rate of quantizer parameters; None = derived from the plan (planned mode) or ``lr`` (absolute)."""
    quant_grad_clip: float | None = checked(10.0, gt=0)
    """Gradient-norm cap of the quantizer parameter group (a spike must not freeze Adam's state); None = off."""
    weight_decay: float = checked(0.0, ge=0)
    """Weight decay of network weights (quantizer parameters never decay)."""

    def __post_init__(self):
        check_section(self, "optim")


@dataclass(kw_only=True)
class AugmentConfig:
    """Training augmentation of the imagefolder and ffcv kinds (timm's names; the bundled digits have none).
    The default is light, for fine-tuning at any image size; jobs/imagenet_*.yaml set the ImageNet protocol."""

    scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    """RandomResizedCrop's range of the crop's share of the image area (ImageNet training: [0.08, 1])."""
    ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    """RandomResizedCrop's range of the crop's aspect ratio (width / height)."""
    hflip: float = 0.0
    """Probability of a horizontal flip (0: off; flips change the meaning of characters, digits and text)."""
    vflip: float = 0.0
    """Probability of a vertical flip (imagefolder only)."""
    color_jitter: float = 0.0
    """Brightness, contrast and saturation jitter strength (0: off)."""
    auto_augment: str | None = None
    """timm's auto-augment policy, e.g. rand-m9-mstd0.5 or augmix (None: off; imagefolder only)."""
    re_prob: float = 0.0
    """Random erasing probability (0: off; imagefolder only)."""

    def __post_init__(self):
        for name, hi in (("scale", 1.0), ("ratio", float("inf"))):
            v = getattr(self, name)
            _check(
                len(v) == 2 and 0 < v[0] <= v[1] <= hi,
                f"data.augment.{name}",
                f"must be [low, high] with 0 < low <= high{' <= 1' if hi == 1 else ''}, got {v}",
            )
        for name in ("hflip", "vflip", "re_prob"):
            v = getattr(self, name)
            _check(0 <= v <= 1, f"data.augment.{name}", f"must be a probability in [0, 1], got {v}")
        _check(0 <= self.color_jitter <= 1, "data.augment.color_jitter", f"must be in [0, 1], got {self.color_jitter}")
        if self.auto_augment is not None:
            _check(
                self.auto_augment.startswith(("rand", "augmix", "original", "v0", "3a", "trivial")),
                "data.augment.auto_augment",
                f"not a timm policy name (rand-m9-mstd0.5, augmix, original, v0, 3a), got {self.auto_augment!r}",
            )

    def ffcv_unsupported(self) -> list[str]:
        """Settings FFCV's pipeline has no op for (set, they would be silently ignored)."""
        return [
            f"data.augment.{k}" for k in ("vflip", "auto_augment", "re_prob") if getattr(self, k) not in (0, 0.0, None)
        ]


@dataclass(kw_only=True)
class DataConfig:
    kind: str = checked("bundled", choices=DATA_KINDS)
    """bundled (MNIST-5k shipped in a wheel), ffcv (.beton files) or imagefolder (torchvision)."""
    train_path: str | None = None
    """Training data: a .beton file (ffcv) or an ImageFolder directory."""
    val_path: str | None = None
    """Validation data, same kind as train_path."""
    img_size: int = checked(224, ge=1, le=IMG_SIZE_LIMIT)
    """Training crop size (ffcv / imagefolder)."""
    val_resize: int | None = checked(None, ge=1, le=IMG_SIZE_LIMIT)
    """Resize before the validation centre crop; None = img_size · 256/224 (256 for 224-pixel crops)."""
    batch_size: int = checked(128, ge=1)
    """Per-worker batch size."""
    num_workers: int | None = checked(None, ge=0, le=1024)
    """Loader worker threads/processes per Ray worker; None = its CPU share (torch's thread count there)."""
    os_cache: bool = True
    """FFCV: rely on the OS page cache (False = QUASI_RANDOM for data larger than memory)."""
    bad_images: str = checked("error", choices=BAD_IMAGE_POLICIES)
    """An image that cannot be decoded (imagefolder, and gdnsq data write): error (stop, naming the file) or skip
    (train on the next image instead; the summary counts the skipped files). Not skip by default: a dataset that
    silently shrinks gives figures no other run can be compared with."""
    val_fraction: float = checked(0.1, gt=0, le=0.5)
    """Bundled data: share of the 5,000 digits held out for checkpoint selection (the 1,000 test digits are fixed
    and reported separately); other kinds take validation from data.val_path."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation (imagefolder and ffcv)."""

    def __post_init__(self):
        if not isinstance(self.augment, AugmentConfig):
            self.augment = from_dict(AugmentConfig, self.augment, "data.augment")
        check_section(self, "data")
        if self.kind == "ffcv" and self.augment.ffcv_unsupported():
            raise ConfigError(
                f"{self.augment.ffcv_unsupported()[0]}: not available with data.kind ffcv (imagefolder only)"
            )
        if self.val_resize is None:  # the usual 0.875 crop ratio, whatever the image size
            self.val_resize = round(self.img_size * 256 / 224)
        if self.kind != "bundled":
            _check(self.train_path is not None, "data.train_path", f"required for data.kind={self.kind}")
            _check(self.val_path is not None, "data.val_path", f"required for data.kind={self.kind}")


SHORT_RUN_RULES = ("extend", "stop", "allow")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = checked(10, ge=1)
    """Quantization-aware fine-tuning epochs."""
    teacher_epochs: int | None = checked(None, ge=1)
    """FP teacher epochs when no weights are given; None = train to a validation plateau (see teacher_max_epochs)."""
    teacher_max_epochs: int = checked(30, ge=1)
    """Cap on the plateau-trained FP teacher's epochs."""
    seed: int = checked(0, ge=0, le=2**31 - 1, hint="numpy's seed range, with room for a rank per worker")
    """Global seed."""
    device: str = checked("auto", choices=("auto", "cpu", "cuda"))
    """auto (CUDA if available), cpu or cuda."""
    patience: int = checked(0, ge=0)
    """Early stopping: epochs without a better ns_top1 once converged (0 = off)."""
    sync_batchnorm: bool = True
    """Under DDP on GPUs, BatchNorm statistics over the global batch (SyncBatchNorm), as the reference did."""
    max_steps_per_epoch: int | None = checked(None, ge=1)
    """Cap on steps per epoch (short test runs)."""
    precision: str = checked("fp32", choices=PRECISIONS)
    """Forward passes: fp32, bf16 or fp16 (CUDA only) autocast; quantizer maths and the loss stay fp32."""
    channels_last: bool = False
    """Student, teacher and inputs in channels_last memory format (faster convs on GPUs and oneDNN)."""
    compile: bool = False
    """Run the student through torch.compile (first steps are slow while it compiles)."""
    bn_reestimate_batches: int = checked(0, ge=0)
    """Before each validation, recompute the student's BatchNorm statistics over this many training batches
    with the quantized forward (0 = keep the running averages, the default). Low-bit weights flip between
    grid points late in training, so the running averages mix statistics of networks that no longer exist;
    on the bundled digits it did not change W1A1 (docs/results.md, "Decisions"), on other data it may."""
    short_run: str = checked("extend", choices=SHORT_RUN_RULES)
    """A GDNSQ run (planned schedule) with fewer planned steps than its descent needs: extend (pre-flight raises
    train.epochs to the steps needed and the run header says so), stop (refuse in one line before anything
    trains) or allow (run as configured). A run with train.max_steps_per_epoch set is taken as deliberately short."""

    def __post_init__(self):
        check_section(self, "train")
        _check(
            not (self.precision == "fp16" and self.device == "cpu"),
            "train.precision",
            "fp16 needs CUDA (loss scaling); use bf16 on CPU",
        )


@dataclass(kw_only=True)
class RayConfig:
    enabled: bool = True
    """Run through Ray Train (False = in-process engine, no Ray)."""
    address: str | None = None
    """Ray cluster address; None starts or joins a local cluster."""
    num_workers: int = checked(1, ge=1, le=4096)
    """Training workers (DDP ranks)."""
    use_gpu: bool | None = None
    """One GPU per worker; None = if the cluster has GPUs."""
    cpus_per_worker: int | None = checked(1, ge=1, le=4096)
    """CPUs reserved per worker (also torch's threads and the loader's); None = a node's CPUs shared by its workers."""
    storage_path: str | None = None
    """Checkpoint storage: a shared path or s3:// URI; None = ./runs."""
    max_failures: int = checked(2, ge=-1)
    """Worker-group restarts before the run fails (-1: no limit, as in Ray's FailureConfig)."""
    checkpoints_to_keep: int = checked(2, ge=2, hint="a torn latest checkpoint falls back to the one before it")
    """Checkpoints kept on storage."""

    def __post_init__(self):
        check_section(self, "ray")


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow."""
    uri: str | None = None
    """MLflow tracking URI; None = local sqlite store under .gdnsq/."""
    experiment: str = "gdnsq"
    """MLflow experiment name."""
    register: bool = True
    """Register the best converged model at the end of a run."""
    registered_name: str | None = None
    """Registry name; None = '<model>-w<W>a<A>'."""

    def __post_init__(self):
        check_section(self, "tracking")


@dataclass(kw_only=True)
class JobConfig:
    name: str | None = checked(None, test=run_name_problem)
    """Run name; a run with an existing name and storage path resumes (only with the same defining settings).
    None = '<model>-w<W>a<A>-<hash of the defining settings>', so jobs with other settings never collide."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        check_section(self, "")


# ------------------------------------------------------------------------------------------ sweep
# The ``sweep:`` section of a sweep file (a job file plus a search space); gdnsq.launch.sweep.plan reads it.

SWEEP_SEARCHES = ("grid", "random", "optuna")
SWEEP_SCHEDULERS = ("asha", "fifo")


@dataclass(kw_only=True)
class SchedulerConfig:
    type: str = "asha"
    """asha (early-stops trials below the rung quantile) or fifo (every trial runs to the end)."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: keep the top 1/reduction_factor at each rung."""
    max_t: int | None = None
    """ASHA: the epoch budget; None = train.epochs (a trial that reaches train.epochs always finishes its run)."""

    def __post_init__(self):
        if self.type not in SWEEP_SCHEDULERS:
            raise SweepError(f"sweep.scheduler.type: must be one of {', '.join(SWEEP_SCHEDULERS)}, got {self.type!r}")
        if self.grace_period < 1:
            raise SweepError("sweep.scheduler.grace_period: must be >= 1")
        if self.reduction_factor <= 1:
            raise SweepError("sweep.scheduler.reduction_factor: must be > 1")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise SweepError("sweep.scheduler.max_t: must be >= sweep.scheduler.grace_period")


@dataclass(kw_only=True)
class SweepConfig:
    name: str
    """Tune experiment name (<storage>/<name>); also the prefix of every trial's run name."""
    metric: str = "val/ns_top1"
    """Reported metric that ranks trials (the scheduler's and the registry's)."""
    mode: str = "max"
    """max or min."""
    search: str = "grid"
    """grid (only {grid: [...]} specs), random (Tune's variant generator) or optuna (TPE)."""
    num_samples: int = 1
    """grid/random: repeats of the grid (each repeat samples the other specs afresh); optuna: trials."""
    seed: int = 0
    """Seed of the random / optuna searcher."""
    max_concurrent_trials: int = 1
    """Upper bound on trials running at once (lowered to what the cluster can place)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trial_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.1})
    """Resources of a trial's driver function only; its Train workers take ray.num_workers x ray.cpus_per_worker."""
    max_failures: int = 1
    """Tune retries of a failed trial (its Train run resumes from its latest checkpoint)."""
    controller_failure_limit: int = 2
    """Train controller failures (e.g. a worker group that cannot be placed) before the trial fails."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted job setting -> {grid|choice: [...]} or {uniform|loguniform|randint: [lo, hi]}."""

    def __post_init__(self):
        problem = "must not be empty" if not self.name else run_name_problem(self.name, SWEEP_NAME_BYTES)
        if problem:
            raise SweepError(f"sweep.name: {problem}")
        if self.mode not in ("max", "min"):
            raise SweepError(f"sweep.mode: must be max or min, got {self.mode!r}")
        if self.search not in SWEEP_SEARCHES:
            raise SweepError(f"sweep.search: must be one of {', '.join(SWEEP_SEARCHES)}, got {self.search!r}")
        for key in ("num_samples", "max_concurrent_trials"):
            if getattr(self, key) < 1:
                raise SweepError(f"sweep.{key}: must be >= 1")
        amounts = self.trial_resources.values()
        if not any(v > 0 for v in amounts) or any(v < 0 for v in amounts):
            raise SweepError("sweep.trial_resources: needs a positive amount of some resource, e.g. {CPU: 0.1}")


# --------------------------------------------------------------------------------------------- io


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn YAML/CLI values into the annotated type, with a one-line error naming the field."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        _check(optional, name, "must not be empty")
        return None
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), name, f"must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, name)
    if typing.get_origin(tp) is dict:
        if isinstance(value, str):  # a mapping given on the command line
            value = _yaml_value(value, name)
        _check(isinstance(value, dict), name, f"must be a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{name}.{k}") for k, v in value.items()}
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = _yaml_value(value, name)
        _check(isinstance(value, list), name, f"must be a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            _check(low in ("true", "false", "1", "0", "yes", "no"), name, f"must be true or false, got {value!r}")
            return low in ("true", "1", "yes")
        _check(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        kind = "an integer" if tp is int else "a number"
        if isinstance(value, bool):
            raise ConfigError(f"{name}: must be {kind}, got {value!r}")
        if tp is int and (isinstance(value, int) or (isinstance(value, str) and _INT_TEXT.fullmatch(value))):
            return int(value)  # exactly, where float() would round past 2**53
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name}: must be {kind}, got {_show(value)}") from None
        if tp is float:
            return number
        _check(number.is_integer(), name, f"must be an integer, got {_show(value)}")
        return int(number)
    if tp is str:
        _check(isinstance(value, (str, int, float)), name, f"must be a string, got {_show(value)}")
        return str(value)
    return value


_INT_TEXT = re.compile(r"\s*[+-]?[0-9]{1,30}\s*")  # longer digit strings go through float() to a range error


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message stays one readable line whatever it quotes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _yaml_value(text: str, name: str) -> Any:
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML ({_yaml_problem(e)[1]})") from None


# Renamed settings, {section: {old key: new key}}: configs stored before the rename (in checkpoints and
# registered models) carry the old keys and must still load.
_LEGACY_KEYS = {"objective": {"l1": "penalty_weight", "l2": "task_weight"}}


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors naming the dotted key."""
    fields = _field_types(cls)
    bounds = {f.name: f.metadata.get("bounds") for f in dataclasses.fields(cls)}
    kwargs = {}
    legacy = _LEGACY_KEYS.get(prefix, {})
    for key, value in (data or {}).items():
        key = legacy.get(key, key)
        name = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = [f"{prefix}.{k}" if prefix else k for k in fields]
            raise ConfigError(f"{name}: unknown setting{did_you_mean(name, known)} (known here: {', '.join(fields)})")
        kwargs[key] = _coerce(value, fields[key], name)
        check_value(name, kwargs[key], fields[key], bounds[key] or Bounds())
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # missing required field
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted.key: value} (lists stay values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def known_keys() -> set[str]:
    """Every dotted setting name of a JobConfig (a mapping such as ``quant.method_args`` is one setting)."""
    return set(_leaf_types(JobConfig))


@functools.cache
def _leaf_types(cls, prefix: str = "") -> dict[str, Any]:
    """{dotted key: annotated type (Optional unwrapped)} of every leaf setting under dataclass ``cls``."""
    out = {}
    for name, tp in _field_types(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        tp, _ = _unwrap_optional(tp)
        out.update(_leaf_types(tp, key) if dataclasses.is_dataclass(tp) else {key: tp})
    return out


def did_you_mean(word: str, candidates, n: int = 3) -> str:
    """``"; did you mean a, b?"`` for the candidates closest to ``word`` (difflib), or ``""``.

    A dotted key also matches on its last part, so ``epochs`` or ``optim.epochs`` suggests ``train.epochs``.
    """
    import difflib

    candidates = sorted(set(candidates))
    close = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    leaf = word.rsplit(".", 1)[-1]
    close += [c for c in candidates if c.rsplit(".", 1)[-1] == leaf and c not in close]
    return f"; did you mean {', '.join(close[:n])}?" if close else ""


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string right after each field), read from its source."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


@dataclass(frozen=True)
class Setting:
    """One leaf of the config tree, as ``gdnsq config show`` prints it."""

    key: str
    """Dotted name (``quant.target_w``)."""
    type: str
    """The annotation as written in this file (``float | None``)."""
    default: Any
    """The dataclass default."""
    value: Any
    """The value in the config being described."""
    doc: str
    """The field's one-line docstring."""


def describe(cfg=None, prefix: str = "") -> list[Setting]:
    """Every setting of ``cfg`` (default: a default JobConfig), in declaration order, with type, default and doc."""
    cfg = JobConfig() if cfg is None else cfg
    docs = field_docs(type(cfg))
    out = []
    for f in dataclasses.fields(cfg):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += describe(value, key)
            continue
        if f.default is not dataclasses.MISSING:
            dflt = f.default
        elif f.default_factory is not dataclasses.MISSING:
            dflt = f.default_factory()
        else:  # a required field (QuantRuleConfig.pattern): no default
            dflt = dataclasses.MISSING
        out.append(Setting(key, str(f.type), dflt, value, docs.get(f.name, "")))
    return out


def setting_type(key: str):
    """The annotated type of a dotted JobConfig setting (Optional unwrapped), e.g. float for ``optim.lr``."""
    tp = JobConfig
    for part in key.split("."):
        tp, _ = _unwrap_optional(_field_types(tp)[part])
    return tp


def setting_bounds(key: str) -> Bounds:
    """The declared :class:`Bounds` of a dotted JobConfig setting (empty where it declares none)."""
    *parents, leaf = key.split(".")
    cls = JobConfig
    for part in parents:
        cls, _ = _unwrap_optional(_field_types(cls)[part])
    f = next(f for f in dataclasses.fields(cls) if f.name == leaf)
    return f.metadata.get("bounds") or Bounds()


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (copying); unknown keys raise ConfigError."""
    import copy

    data = copy.deepcopy(data)
    valid = known_keys()
    mappings = tuple(f"{k}." for k, tp in _leaf_types(JobConfig).items() if typing.get_origin(tp) is dict)
    for key, value in overrides.items():
        if key not in valid and not key.startswith(mappings):
            raise ConfigError(f"{key}: unknown setting{did_you_mean(key, valid)}; 'gdnsq config keys' lists them all")
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``key`` ``a.b.c``, creating the sections on the way (in place)."""
    node = data
    *parents, leaf = key.split(".")
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):  # a job file with `quant: 3` under --quant.target_w 2
            raise ConfigError(f"{'.'.join(parents[: i + 1])}: must be a mapping, got {type(node).__name__}")
    node[leaf] = value


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last, silently).
    Keys merged in with ``<<`` may be overridden: that is what a merge is for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key)}, first on line {first[key] + 1}", key_node.start_mark
                    )
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, safely (no tags that build objects), refusing duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(e: yaml.YAMLError) -> tuple[str, str]:
    """(':line:column' or '', the problem in a few words) of a YAML error."""
    mark = getattr(e, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    return where, getattr(e, "problem", None) or str(e).splitlines()[0]


def read_yaml(path: str | Path, label: str = "config", error: type[Exception] = ConfigError) -> Any:
    """A YAML file's content; a missing, unreadable or non-UTF-8 file, a directory or bad YAML (duplicate keys
    included) raises ``error`` with one line led by ``label`` that names the file (and the line)."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "dir":
        raise error(f"{label}: {str(path)!r} is a directory; give a YAML job file")
    if kind != "file":
        raise error(f"{label}: no such file {str(path)!r}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{label}: cannot read {path} ({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{label}: {path}:{line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8") from None
    try:
        return parse_yaml(text) or {}
    except yaml.YAMLError as e:
        where, problem = _yaml_problem(e)
        raise error(f"{label}: {path}{where} is not valid YAML ({problem})") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """YAML file (or defaults) + dotted overrides -> validated JobConfig."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping at the top level")
        data.pop("sweep", None)  # sweep files carry a base job plus a search space
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(JobConfig, data)


def config_from_dict(data: dict) -> JobConfig:
    return from_dict(JobConfig, data)


def parse_cli_overrides(args: list[str]) -> dict[str, str]:
    """``--a.b 1 --c=2 d.e=3`` -> {'a.b': '1', 'c': '2', 'd.e': '3'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            a = a[2:]
            if "=" in a:
                k, v = a.split("=", 1)
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"{a}: missing value")
                k, v = a, args[i + 1]
                i += 1
        elif "=" in a:
            k, v = a.split("=", 1)
        else:
            raise ConfigError(f"{a}: expected --key value or key=value")
        out[k] = v
        i += 1
    return out
