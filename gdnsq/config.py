"""The whole config tree: the job's small dataclasses, the sweep schema, YAML files and dotted overrides.

Every setting has exactly one dotted name (``quant.target_w``), the same in YAML, on the CLI
(``--quant.target_w 2``), in a Tune search space and in MLflow params. Validation lives in
``__post_init__`` and raises :class:`ConfigError` with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, SweepError


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


ESTIMATORS = ("auto", "ste", "lsq", "ewgs", "aewgs")
DISTILL_LOSSES = ("jeffreys", "kl", "ce")
BATCHNORM_MODES = ("keep", "freeze", "fold")
DATA_KINDS = ("bundled", "ffcv", "imagefolder")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "gdnsq_smallcnn"
    """timm model name (any registered timm CNN or ViT, plus gdnsq's small bundled-data CNN)."""
    pretrained: bool = False
    """Load timm's pretrained weights (needs hub access or a local cache on the cluster)."""
    checkpoint: str | None = None
    """Path to an FP state dict or gdnsq checkpoint used as the FP model and teacher."""
    num_classes: int | None = None
    """Classifier width; None means the dataset's class count."""
    in_chans: int | None = None
    """Input channels; None means the dataset's."""

    def __post_init__(self):
        _check(bool(self.name), "model.name", "must name a timm model")
        if self.checkpoint is not None:
            _check(Path(self.checkpoint).is_file(), "model.checkpoint", f"no such file {self.checkpoint!r}")


@dataclass(kw_only=True)
class QuantRuleConfig:
    """One surgery rule: layers whose dotted name matches ``pattern`` get these overrides."""

    pattern: str
    """Regular expression matched (re.search) against the module's dotted name."""
    skip: bool | None = None
    """Keep matching layers in floating point."""
    target_w: int | None = None
    """Weight bit target (an integer) for matching layers."""
    target_a: int | None = None
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

    kind: str = "none"
    """none (every layer at quant.target_w/target_a), avg_bits_w (parameter-weighted mean weight bits),
    bytes (the packed file's payload: codes at each layer's width + grids + every FP tensor) or bops
    (Σ MACs·b_w·b_a)."""
    value: float = 0.0
    """The budget: mean bits (avg_bits_w), bytes (bytes) or bit operations per sample (bops)."""
    value_a: float | None = None
    """Optional activation budget: the quantized inputs' bits per element (activation memory; else per-layer
    target_a). With allocate: probe each layer's input width is chosen too (a small input may keep 8 bits)."""
    min_bits: int = 1
    """Lower bound of every layer's bits: the level guard keeps 2**min_bits levels."""
    max_bits: int = 8
    """Upper bound of a layer's weight bits (a rule's target_w overrides it for its layers, as a bound)."""
    quantize_edges: bool = False
    """Put the stem conv's and classifier's weights under the budget too (at min_bits..max_bits; their inputs stay
    FP, as with keep_first_conv/keep_classifier): the bytes the paper's convention spends on them in FP become
    the budget's to share."""
    allocate: str = "probe"
    """How the layers share the budget: probe (measure each layer's loss at each width once, on the first batch,
    and pick the widths with the least loss that fit; they become the layers' targets) or penalty (the exterior
    penalty on the aggregate alone; under Adam every layer descends at the same rate, so it tends to uniform)."""

    def __post_init__(self):
        _check(
            self.kind in BUDGET_KINDS,
            "quant.budget.kind",
            f"must be one of {', '.join(BUDGET_KINDS)}, got {self.kind!r}",
        )
        _check(
            self.kind == "none" or self.value > 0,
            "quant.budget.value",
            f"must be > 0 with kind {self.kind}, got {self.value}",
        )
        _check(
            self.value_a is None or self.value_a >= 1, "quant.budget.value_a", f"must be >= 1 bit, got {self.value_a}"
        )
        _check(
            float(self.min_bits).is_integer() and 1 <= self.min_bits <= 16,
            "quant.budget.min_bits",
            f"must be an integer in [1, 16], got {self.min_bits}",
        )
        _check(
            float(self.max_bits).is_integer() and self.min_bits <= self.max_bits <= 16,
            "quant.budget.max_bits",
            f"must be an integer in [min_bits, 16], got {self.max_bits}",
        )
        _check(
            self.allocate in ALLOCATIONS,
            "quant.budget.allocate",
            f"must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}",
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
    target_w: int = 2
    """Weight bit-width target per layer, an integer (the constraint bits <= target)."""
    target_a: int = 2
    """Activation bit-width target per layer, an integer."""
    init_bits: float = 10.0
    """Bit-width that calibration starts every quantizer at (near-lossless)."""
    per_channel: bool = True
    """Per-output-channel weight steps (else per tensor)."""
    estimator: str = "auto"
    """Gradient estimator: auto (aewgs for a 1-bit target, ste otherwise), ste, lsq (rounding-error step gradient),
    ewgs, aewgs (adaptive EWGS)."""
    ewgs_delta: float = 1e-2
    """EWGS scaling factor delta."""
    act_signed: str = "auto"
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
    batchnorm: str = "keep"
    """BatchNorm handling: keep (trained), freeze (eval stats, no grad) or fold into the conv."""
    calib_batches: int = 4
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
    level_margin: float = 0.1
    """Level guard's (and target hold's) margin, in grid levels: it keeps 2**b >= 2**T - 1/2 + margin (T = the
    layer's target)."""
    rules: list[QuantRuleConfig] = field(default_factory=list)
    """Ordered (regex -> override) rules; first match wins; each must match at least one layer."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """One model-wide budget shared by the layers (mixed precision); targets then act as per-layer upper bounds."""

    def __post_init__(self):
        for name in ("target_w", "target_a"):
            v = getattr(self, name)
            _check(
                float(v).is_integer() and 1 <= v <= 16, f"quant.{name}", f"must be an integer in [1, 16] bits, got {v}"
            )
        _check(1 < self.init_bits <= 24, "quant.init_bits", f"must be in (1, 24], got {self.init_bits}")
        _check(
            self.estimator in ESTIMATORS,
            "quant.estimator",
            f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}",
        )
        _check(
            self.act_signed in ("auto", "signed", "unsigned"),
            "quant.act_signed",
            f"must be auto, signed or unsigned, got {self.act_signed!r}",
        )
        _check(
            self.batchnorm in BATCHNORM_MODES,
            "quant.batchnorm",
            f"must be one of {', '.join(BATCHNORM_MODES)}, got {self.batchnorm!r}",
        )
        _check(self.calib_batches >= 1, "quant.calib_batches", "must be >= 1")
        _check(
            0 < self.level_margin < 0.45, "quant.level_margin", f"must be in (0, 0.45) levels, got {self.level_margin}"
        )
        if not isinstance(self.budget, BudgetConfig):
            self.budget = from_dict(BudgetConfig, self.budget, "quant.budget")
        self.rules = [
            r if isinstance(r, QuantRuleConfig) else from_dict(QuantRuleConfig, r, "quant.rules") for r in self.rules
        ]
        for i, r in enumerate(self.rules):
            for name in ("target_w", "target_a"):
                v = getattr(r, name)
                _check(
                    v is None or (float(v).is_integer() and 1 <= v <= 16),
                    f"quant.rules[{i}].{name}",
                    f"must be an integer in [1, 16] bits, got {v}",
                )


@dataclass(kw_only=True)
class ObjectiveConfig:
    distill: str = "jeffreys"
    """Task term: jeffreys (symmetric KL to the teacher), kl (KL(teacher||student)) or ce (labels)."""
    penalty_weight: float = 1.0
    """Weight of the bit-width penalty term (l1 in the paper's objective)."""
    task_weight: float = 1.0
    """Weight of the distillation / task loss term (l2 in the paper's objective)."""
    p: float = 1.0
    """Exponent of the exterior-point penalty."""
    eps: float = 1e-3
    """Margin below the bit target that counts as feasible."""
    lossless: bool = False
    """Move the temperature from the penalty term to the task term (the objective's lossless form)."""
    loss_scale: str = "ema"
    """Running mean m̄ of the task loss that scales the penalty: ema, or cumulative (since step 0, the reference's)."""
    loss_ema: float = 0.99
    """Decay of the EMA m̄ (loss_scale: ema)."""
    count_active: str = "layers"
    """Active-constraint weights ω: count violated layers, or weight channels (the reference's)."""

    def __post_init__(self):
        _check(
            self.distill in DISTILL_LOSSES,
            "objective.distill",
            f"must be one of {', '.join(DISTILL_LOSSES)}, got {self.distill!r}",
        )
        _check(self.p > 0, "objective.p", "must be > 0")
        _check(0 <= self.loss_ema < 1, "objective.loss_ema", "must be in [0, 1)")
        _check(
            self.loss_scale in ("ema", "cumulative"),
            "objective.loss_scale",
            f"must be ema or cumulative, got {self.loss_scale!r}",
        )
        _check(
            self.count_active in ("layers", "channels"),
            "objective.count_active",
            f"must be layers or channels, got {self.count_active!r}",
        )


SCHEDULE_MODES = ("planned", "absolute")


@dataclass(kw_only=True)
class ScheduleConfig:
    mode: str = "planned"
    """planned: derive warm-up, descent, quantizer LR and anneal from the planned steps; absolute: the paper's knobs."""
    descent_end: float = 0.5
    """planned: fraction of the planned steps by which every layer should reach its bit target."""
    descent_end_a: float | None = None
    """planned: fraction of the planned steps by which the activations reach their targets (None = descent_end).
    Earlier, the inputs go first while the weights still have bits (the order of two-step binary-network
    training); measured both ways at W1A1, so not a default (docs/results.md, "Decisions")."""
    warmup: float = 0.05
    """planned: fraction of the planned steps with temperature 0 and linear LR warm-up."""
    final_lr_ratio: float = 0.05
    """planned: LR at the end of the run (as a fraction of the base LR), reached by the anneal after descent_end."""
    max_temperature: float = 32.0
    """planned: cap of the penalty multiplier t (in units of the running task loss). Past it the task term is
    noise next to the penalty: W1A1 runs whose bits lagged the plan drove t to ~900 and fell to 22 % top-1."""
    warmup_steps: int = 100
    """absolute: steps with temperature 0 and linear LR warm-up."""
    scale_t: float = 2.0
    """absolute: temperature growth per step, in units of the base LR."""
    anneal: float = 0.9985
    """absolute: per-step LR factor while every layer meets its target."""
    check_every: int = 10
    """Steps between true-bit convergence checks; the LR anneal runs only while the last check passed."""
    min_lr_ratio: float = 0.0
    """Floor of the annealed LR as a fraction of the base LR."""
    noise_ratio: float = 0.0
    """Initial share of extra uniform rounding noise (0 = pure rounding)."""
    noise_step: float = 0.01
    """Decrease of the noise ratio whenever the penalty is ~0."""

    def __post_init__(self):
        _check(
            self.mode in SCHEDULE_MODES,
            "schedule.mode",
            f"must be one of {', '.join(SCHEDULE_MODES)}, got {self.mode!r}",
        )
        _check(0 <= self.warmup < 1, "schedule.warmup", f"must be in [0, 1), got {self.warmup}")
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
        _check(0 < self.final_lr_ratio <= 1, "schedule.final_lr_ratio", "must be in (0, 1]")
        _check(self.max_temperature >= 1, "schedule.max_temperature", f"must be >= 1, got {self.max_temperature}")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        _check(self.scale_t >= 0, "schedule.scale_t", "must be >= 0")
        _check(0 < self.anneal <= 1, "schedule.anneal", "must be in (0, 1]")
        _check(self.check_every >= 1, "schedule.check_every", "must be >= 1")
        _check(0 <= self.noise_ratio <= 1, "schedule.noise_ratio", "must be in [0, 1]")


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "radam"
    """Optimizer: radam, adamw or sgd."""
    lr: float = 2e-3
    """Learning rate of the network weights (base LR of the schedules)."""
    quant_lr: float | None = None
    """Learning rate of quantizer parameters; None = derived from the plan (planned mode) or ``lr`` (absolute)."""
    quant_grad_clip: float | None = 10.0
    """Gradient-norm cap of the quantizer parameter group (a spike must not freeze Adam's state); None = off."""
    weight_decay: float = 0.0
    """Weight decay of network weights (quantizer parameters never decay)."""

    def __post_init__(self):
        _check(self.name in ("radam", "adamw", "sgd"), "optim.name", f"unknown optimizer {self.name!r}")
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.quant_lr is None or self.quant_lr > 0, "optim.quant_lr", "must be > 0")
        _check(self.quant_grad_clip is None or self.quant_grad_clip > 0, "optim.quant_grad_clip", "must be > 0")


@dataclass(kw_only=True)
class DataConfig:
    kind: str = "bundled"
    """bundled (MNIST-5k shipped in a wheel), ffcv (.beton files) or imagefolder (torchvision)."""
    train_path: str | None = None
    """Training data: a .beton file (ffcv) or an ImageFolder directory."""
    val_path: str | None = None
    """Validation data, same kind as train_path."""
    img_size: int = 224
    """Training crop size (ffcv / imagefolder)."""
    val_resize: int | None = None
    """Resize before the validation centre crop; None = img_size · 256/224 (256 for 224-pixel crops)."""
    batch_size: int = 128
    """Per-worker batch size."""
    num_workers: int | None = None
    """Loader worker threads/processes per Ray worker; None = its CPU share (torch's thread count there)."""
    os_cache: bool = True
    """FFCV: rely on the OS page cache (False = QUASI_RANDOM for data larger than memory)."""
    val_fraction: float = 0.1
    """Bundled data: share of the 5,000 digits held out for checkpoint selection (the 1,000 test digits are fixed
    and reported separately); other kinds take validation from data.val_path."""

    def __post_init__(self):
        _check(self.kind in DATA_KINDS, "data.kind", f"must be one of {', '.join(DATA_KINDS)}, got {self.kind!r}")
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(0 < self.val_fraction <= 0.5, "data.val_fraction", f"must be in (0, 0.5], got {self.val_fraction}")
        if self.val_resize is None:  # the usual 0.875 crop ratio, whatever the image size
            self.val_resize = round(self.img_size * 256 / 224)
        if self.kind != "bundled":
            _check(self.train_path is not None, "data.train_path", f"required for data.kind={self.kind}")
            _check(self.val_path is not None, "data.val_path", f"required for data.kind={self.kind}")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 10
    """Quantization-aware fine-tuning epochs."""
    teacher_epochs: int | None = None
    """FP teacher epochs when no weights are given; None = train to a validation plateau (see teacher_max_epochs)."""
    teacher_max_epochs: int = 30
    """Cap on the plateau-trained FP teacher's epochs."""
    seed: int = 0
    """Global seed."""
    device: str = "auto"
    """auto (CUDA if available), cpu or cuda."""
    patience: int = 0
    """Early stopping: epochs without a better ns_top1 once converged (0 = off)."""
    sync_batchnorm: bool = True
    """Under DDP on GPUs, BatchNorm statistics over the global batch (SyncBatchNorm), as the reference did."""
    max_steps_per_epoch: int | None = None
    """Cap on steps per epoch (short test runs)."""
    precision: str = "fp32"
    """Forward passes: fp32, bf16 or fp16 (CUDA only) autocast; quantizer maths and the loss stay fp32."""
    channels_last: bool = False
    """Student, teacher and inputs in channels_last memory format (faster convs on GPUs and oneDNN)."""
    compile: bool = False
    """Run the student through torch.compile (first steps are slow while it compiles)."""
    bn_reestimate_batches: int = 0
    """Before each validation, recompute the student's BatchNorm statistics over this many training batches
    with the quantized forward (0 = keep the running averages, the default). Low-bit weights flip between
    grid points late in training, so the running averages mix statistics of networks that no longer exist;
    on the bundled digits it did not change W1A1 (docs/results.md, "Decisions"), on other data it may."""

    def __post_init__(self):
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.bn_reestimate_batches >= 0, "train.bn_reestimate_batches", "must be >= 0")
        _check(self.teacher_epochs is None or self.teacher_epochs >= 1, "train.teacher_epochs", "must be >= 1")
        _check(self.teacher_max_epochs >= 1, "train.teacher_max_epochs", "must be >= 1")
        _check(
            self.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {self.device!r}"
        )
        _check(
            self.precision in PRECISIONS,
            "train.precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
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
    num_workers: int = 1
    """Training workers (DDP ranks)."""
    use_gpu: bool | None = None
    """One GPU per worker; None = if the cluster has GPUs."""
    cpus_per_worker: int | None = 1
    """CPUs reserved per worker (also torch's threads and the loader's); None = a node's CPUs shared by its workers."""
    storage_path: str | None = None
    """Checkpoint storage: a shared path or s3:// URI; None = ./runs."""
    max_failures: int = 2
    """Worker-group restarts before the run fails."""
    checkpoints_to_keep: int = 2
    """Checkpoints kept on storage."""

    def __post_init__(self):
        _check(self.num_workers >= 1, "ray.num_workers", "must be >= 1")
        _check(self.cpus_per_worker is None or self.cpus_per_worker >= 1, "ray.cpus_per_worker", "must be >= 1")
        _check(
            self.checkpoints_to_keep >= 2,
            "ray.checkpoints_to_keep",
            "must be >= 2 (a torn latest checkpoint falls back to the one before it)",
        )


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


@dataclass(kw_only=True)
class JobConfig:
    name: str | None = None
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
        _check(
            self.name is None or (bool(self.name) and "/" not in self.name),
            "name",
            f"must be a non-empty name without '/', got {self.name!r}",
        )


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
        if not self.name or "/" in self.name:
            raise SweepError(f"sweep.name: must be a non-empty name without '/', got {self.name!r}")
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
        _check(isinstance(value, dict), name, f"must be a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{name}.{k}") for k, v in value.items()}
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
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
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: must be {kind}, got {value!r}") from None
        if tp is float:
            return number
        _check(number.is_integer(), name, f"must be an integer, got {value!r}")
        return int(number)
    if tp is str:
        _check(isinstance(value, (str, int, float)), name, f"must be a string, got {value!r}")
        return str(value)
    return value


# Renamed settings, {section: {old key: new key}}: configs stored before the rename (in checkpoints and
# registered models) carry the old keys and must still load.
_LEGACY_KEYS = {"objective": {"l1": "penalty_weight", "l2": "task_weight"}}


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors naming the dotted key."""
    fields = _field_types(cls)
    kwargs = {}
    legacy = _LEGACY_KEYS.get(prefix, {})
    for key, value in (data or {}).items():
        key = legacy.get(key, key)
        name = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = [f"{prefix}.{k}" if prefix else k for k in fields]
            raise ConfigError(f"{name}: unknown setting{did_you_mean(name, known)} (known here: {', '.join(fields)})")
        kwargs[key] = _coerce(value, fields[key], name)
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
    """Every dotted setting name of a JobConfig."""
    return set(flatten(to_dict(JobConfig())))


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


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (copying); unknown keys raise ConfigError."""
    import copy

    data = copy.deepcopy(data)
    valid = known_keys()
    for key, value in overrides.items():
        if key not in valid:
            raise ConfigError(f"{key}: unknown setting{did_you_mean(key, valid)}; 'gdnsq config keys' lists them all")
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``key`` ``a.b.c``, creating the sections on the way (in place)."""
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def read_yaml(path: str | Path, label: str = "config", error: type[Exception] = ConfigError) -> Any:
    """A YAML file's content; a missing file or bad YAML raises ``error`` with one line led by ``label``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{label}: no such file {str(path)!r}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
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
