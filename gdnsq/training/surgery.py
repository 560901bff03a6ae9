"""Model surgery: a timm backbone -> a GDNSQ-quantized model, by ordered (regex -> override) rules.

Defaults follow the paper's protocol: the stem conv and the classifier stay FP (located through
timm's ``pretrained_cfg``, not guessed from module order); 1x1 convs optionally too. Rules come
after the defaults; for each layer the first matching rule wins and may override any default.

The student a job trains is made here from its teacher (:func:`prepare_student`: surgery, then calibration at the
planned start width), and a student's bare structure for loading a checkpoint (:func:`build_student`).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import JobConfig, QuantConfig
from ..data.loaders import Loaders
from ..errors import SurgeryError
from ..quant.layers import QConv2d, QLinear, iter_quantized, iter_quantizers
from ..quant.quantizer import ActivationQuantizer
from ..quant.spec import QuantSpec
from .runtime import take
from .schedules import plan_descent
from .targets import create_targets

log = logging.getLogger("gdnsq")


@dataclass
class LayerDecision:
    name: str
    kind: str
    quantized: bool
    reason: str
    spec: QuantSpec | None


def edge_layers(model: nn.Module) -> tuple[set[str], set[str]]:
    """Module names of the stem conv and the classifier, as the model's timm pretrained_cfg gives them."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}

    def names(v):
        if not v:
            return set()
        return {v} if isinstance(v, str) else set(v)

    return names(cfg.get("first_conv")), names(cfg.get("classifier"))


def _matches(module_name: str, edge: set[str]) -> bool:
    # pretrained_cfg may name a container ('head.fc') or the layer itself ('conv1'); match both ways.
    return any(module_name == e or module_name.startswith(e + ".") for e in edge)


def _is_supported_conv(m: nn.Module) -> bool:
    # timm's Conv2dSame gets dynamic padding in QConv2d; other subclasses override forward() in ways
    # (weight standardisation, ...) that a generic swap would silently change, so they stay FP.
    return type(m) is nn.Conv2d or type(m).__name__ == "Conv2dSame"


# QuantSpec field <- the rule's setting: a rule's target_w / target_a is its layers' bound (under a budget too).
_RULE_FIELDS = {
    "bound_w": "target_w",
    "bound_a": "target_a",
    "per_channel": "per_channel",
    "quantize_act": "quantize_act",
}


def plan(model: nn.Module, qcfg: QuantConfig) -> list[LayerDecision]:
    """Decide, per Conv2d/Linear, whether and how to quantize it. Raises on unmatched rules."""
    first, classifier = edge_layers(model)
    compiled = []
    for i, rule in enumerate(qcfg.rules):
        try:
            compiled.append(re.compile(rule.pattern))
        except re.error as e:
            raise SurgeryError(f"quant.rules[{i}].pattern: invalid regex {rule.pattern!r} ({e})") from None
    rule_hits = [0] * len(qcfg.rules)  # layers each regex matches at all
    rule_applied = [0] * len(qcfg.rules)  # layers where it was the first match
    decisions = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            kind = "conv"
        elif isinstance(m, nn.Linear):
            kind = "linear"
        else:
            continue
        skip, reason = False, "default"
        b = qcfg.budget  # with a budget the targets are per-layer upper bounds (rules may still set them)
        # An edge layer under the budget: weights priced like any other layer's, input kept FP as when skipped.
        edge_in_budget = b.active and b.quantize_edges and (_matches(name, first) or _matches(name, classifier))
        if edge_in_budget:
            reason = "edge layer under quant.budget (FP input)"
        elif qcfg.keep_first_conv and _matches(name, first):
            skip, reason = True, "first conv (pretrained_cfg)"
        elif qcfg.keep_classifier and _matches(name, classifier):
            skip, reason = True, "classifier (pretrained_cfg)"
        elif qcfg.keep_pointwise and kind == "conv" and tuple(m.kernel_size) == (1, 1):
            skip, reason = True, "1x1 conv"
        fields = dict(
            bound_w=b.max_bits if b.active else qcfg.target_w,
            bound_a=b.max_bits if b.active and b.value_a is not None else qcfg.target_a,
            per_channel=qcfg.per_channel,
            quantize_act=not edge_in_budget,
        )
        first_hit = None
        for i, rx in enumerate(compiled):
            if rx.search(name):
                rule_hits[i] += 1
                first_hit = i if first_hit is None else first_hit
        if first_hit is not None:
            rule_applied[first_hit] += 1
            rule = qcfg.rules[first_hit]
            if rule.skip is not None:
                skip, reason = rule.skip, f"rule {rule.pattern!r}"
            for k, rule_field in _RULE_FIELDS.items():
                if getattr(rule, rule_field) is not None:
                    fields[k] = getattr(rule, rule_field)
        if not skip and kind == "conv" and not _is_supported_conv(m):
            skip, reason = True, f"unsupported conv type {type(m).__name__}"
        spec = (
            None
            if skip
            else QuantSpec(
                estimator=qcfg.estimator,
                delta=qcfg.ewgs_delta,
                act_signed=qcfg.act_signed,
                integer_grid=qcfg.integer_grid,
                method=qcfg.method,
                method_args=qcfg.method_args,
                **fields,
            )
        )
        decisions.append(LayerDecision(name, kind, not skip, reason, spec))
    for i, hits in enumerate(rule_hits):
        if hits == 0:
            raise SurgeryError(f"quant.rules[{i}].pattern: {qcfg.rules[i].pattern!r} matches no Conv2d/Linear layer")
        if rule_applied[i] == 0:
            log.warning(
                "quant.rules[%d] (%r) is shadowed by earlier rules on every layer it matches", i, qcfg.rules[i].pattern
            )
    if not any(d.quantized for d in decisions):
        raise SurgeryError("quant: the model has no Conv2d/Linear layer left to quantize")
    return decisions


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d into the Conv2d registered just before it in the same parent. Returns count.

    Registration order is how timm's CNN blocks pair conv/bn (conv1/bn1, downsample.0/.1); a BN whose
    channel count does not fit the preceding conv is left alone.
    """
    folded = 0
    for parent in model.modules():
        prev = None
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, nn.BatchNorm2d)
                and isinstance(prev, nn.Conv2d)
                and prev.out_channels == child.num_features
                and child.track_running_stats
            ):
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                prev.weight.mul_(scale.reshape(-1, 1, 1, 1))
                bias = prev.bias if prev.bias is not None else torch.zeros_like(child.running_mean)
                new_bias = child.bias + (bias - child.running_mean) * scale
                prev.bias = nn.Parameter(new_bias)
                setattr(parent, name, nn.Identity())
                folded += 1
            prev = child
    return folded


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Batch statistics and affine parameters frozen (timm's FrozenBatchNorm2d)."""
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(model)


def quantize_model(model: nn.Module, qcfg: QuantConfig) -> list[LayerDecision]:
    """Swap Conv2d/Linear layers for quantized ones in place, following ``qcfg``. Returns the plan."""
    if qcfg.batchnorm == "fold":
        fold_batchnorm(model)
    decisions = plan(model, qcfg)
    for d in decisions:
        if d.quantized:
            layer = model.get_submodule(d.name)
            q = (QConv2d if d.kind == "conv" else QLinear).from_float(layer, d.spec)
            _set_submodule(model, d.name, q)
    if qcfg.batchnorm == "freeze":
        frozen = freeze_batchnorm(model)
        assert frozen is model, "freeze_batch_norm_2d must work in place below the root"
    return decisions


@torch.no_grad()
def calibrate_model(model: nn.Module, batches, init_bits: float) -> None:
    """Min/max observers on a few FP batches, then every quantizer starts at ~``init_bits`` bits."""
    was_training = model.training
    model.eval()
    quantizers = list(iter_quantizers(model))
    for q in quantizers:
        q.enabled = False
    for _, layer in iter_quantized(model):  # activation quantizers observe; weight ones read the weight itself
        if layer.act_quant is not None:
            layer.act_quant.observing = True
    seen = 0
    for x in batches:
        model(x)
        seen += 1
    if seen == 0:
        raise ValueError("calibration got no batches")
    for q in quantizers:
        q.observing, q.enabled = False, True
    for _, layer in iter_quantized(model):
        layer.weight_quant.calibrate_(layer.weight, init_bits)
        if layer.act_quant is not None:
            layer.act_quant.calibrate_(init_bits)
    model.train(was_training)


def broadcast_quantizer_state(model: nn.Module, src: int = 0) -> None:
    """Make every DDP rank start from rank ``src``'s calibration (parameters and buffers)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for q in iter_quantizers(model):
        for t in list(q.parameters()) + list(q.buffers()):
            dist.broadcast(t.data, src)
    for q in iter_quantizers(model):
        if isinstance(q, ActivationQuantizer):  # GDNSQ's lower bound trains only for rank 0's signedness
            q.lo.requires_grad_(bool(q.signed))


def prepare_student(
    cfg: JobConfig, teacher: nn.Module, loaders: Loaders, device: torch.device, resume: dict | None, steps: int
) -> tuple[nn.Module, list, dict]:
    """The quantized, calibrated student (or the resumed one), surgery's decisions, and the run's ``io``
    (``steps``: the run's planned optimizer steps, :func:`gdnsq.training.schedules.planned_steps`):
    {input_shape: [C, H, W], num_classes}, what registration and export need to rebuild the student without the
    data (read off the calibration batches, as the student sees its input in training)."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    decisions = quantize_model(student, cfg.quant)
    student.to(device)
    if resume is None:
        # A planned schedule may start a short budget below quant.init_bits (schedules.plan_descent).
        target = create_targets(cfg.quant).plan_target(student, cfg.quant.init_bits)
        plan = plan_descent(cfg.schedule, steps, cfg.quant.init_bits, target)
        batches = take(loaders.calib, cfg.quant.calib_batches)
        calibrate_model(student, batches, plan.init_bits)
        broadcast_quantizer_state(student)  # calibration before DDP: rank 0's result everywhere
        return student.train(), decisions, _describe_io(batches, loaders.num_classes)
    student.load_state_dict(resume["engine"]["model"])
    # Every checkpoint since the executors recorded io has it; an older one gets it from one batch.
    io = resume.get("io") or _describe_io(take(loaders.calib, 1), loaders.num_classes)
    return student.train(), decisions, dict(io)


def _describe_io(batches: list[torch.Tensor], num_classes: int) -> dict:
    return {"input_shape": list(batches[0].shape[1:]), "num_classes": int(num_classes)}


def build_student(cfg: JobConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The quantized student's structure (uncalibrated, no FP weights loaded): for checkpoint loading."""
    from .models import create_model

    model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, load_weights=False)
    quantize_model(model, cfg.quant)
    return model
