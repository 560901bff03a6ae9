"""How to rebuild a quantized model's structure from plain JSON: a *recipe*.

Two builders:

* ``{"builder": "gdnsq", "config": <JobConfig dict>, "num_classes": N, "in_chans": C}`` —
  :func:`gdnsq.training.surgery.build_student`, for models trained by a gdnsq job (what the CLI writes);
* ``{"builder": "timm", "name": <timm name>, "kwargs": {...}, "batchnorm": "keep"|"freeze"|"fold",
  "plan": [{"name", "kind", "spec"}, ...]}`` — ``timm.create_model`` then the surgery plan replayed
  layer by layer (each entry's ``spec`` is a :class:`QuantSpec` dict), for any quantized timm model.

Both carry the plan, and a rebuilt model must quantize exactly the planned layers.
:func:`infer_recipe` guesses a timm recipe from a live model and keeps it only if the rebuilt
structure has the same state-dict keys and shapes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ExportError
from ..quant.layers import QConv2d, QLinear, iter_quantized
from ..quant.spec import QuantSpec


def plan_of(model: nn.Module) -> list[dict]:
    """The surgery plan realised in ``model``: one entry per quantized layer, in module order."""
    return [
        {"name": name, "kind": "conv" if isinstance(layer, QConv2d) else "linear", "spec": layer.spec.as_dict()}
        for name, layer in iter_quantized(model)
    ]


def recipe_from_config(config, num_classes: int, in_chans: int, plan: list[dict] | None = None) -> dict:
    """A gdnsq-builder recipe from a JobConfig (or its dict).

    The recipe rebuilds the structure only (the packed file holds every weight), so the FP checkpoint
    and pretrained downloads are dropped from its config.
    """
    from ..config import to_dict

    data = copy.deepcopy(config if isinstance(config, dict) else to_dict(config))
    data.setdefault("model", {}).update(checkpoint=None, pretrained=False)
    return {
        "builder": "gdnsq",
        "config": data,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "plan": plan or [],
    }


def _first_conv(model: nn.Module) -> nn.Module | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    names = [name] if isinstance(name, str) else list(name or [])
    for n in names:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            continue
        if isinstance(m, nn.Conv2d):
            return m
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _timm_kwargs(model: nn.Module) -> dict:
    kwargs = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    conv = _first_conv(model)
    if conv is not None:
        kwargs["in_chans"] = conv.in_channels
    pe = getattr(model, "patch_embed", None)  # ViT-style models: grid geometry is a constructor argument
    for key in ("img_size", "patch_size"):
        v = getattr(pe, key, None)
        if v is not None:
            v = [int(i) for i in v] if isinstance(v, (tuple, list)) else int(v)
            kwargs[key] = v[0] if isinstance(v, list) and len(set(v)) == 1 else v
    return kwargs


def _batchnorm_modes(model: nn.Module) -> list[str]:
    frozen = any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    return ["freeze"] if frozen else ["keep", "fold"]


def _signature(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mismatch(want: dict[str, tuple], got: dict[str, tuple]) -> str | None:
    for k in want:
        if k not in got:
            return f"rebuilt model lacks {k}"
        if want[k] != got[k]:
            return f"{k} has shape {list(got[k])} in the rebuilt model, {list(want[k])} here"
    extra = [k for k in got if k not in want]
    return f"rebuilt model has an extra tensor {extra[0]}" if extra else None


def _rebuild_signature(recipe: dict) -> dict[str, tuple]:
    try:
        with torch.device("meta"):  # structure only: no memory, no init cost
            return _signature(build_from_recipe(recipe))
    except ExportError:
        raise
    except Exception:  # noqa: BLE001 - some model constructors need real tensors; build on CPU then
        return _signature(build_from_recipe(recipe))


def check_recipe(model: nn.Module, recipe: dict) -> None:
    """Raise ExportError unless ``recipe`` rebuilds ``model``'s exact structure (keys and shapes)."""
    problem = _mismatch(_signature(model), _rebuild_signature(recipe))
    if problem:
        raise ExportError(f"the rebuild recipe does not reproduce the model: {problem}")


def infer_recipe(model: nn.Module) -> dict:
    """A timm recipe for ``model``, checked by rebuilding its structure; ExportError if none fits."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ExportError(
            f"cannot tell which timm model {type(model).__name__} is (no pretrained_cfg['architecture']); pass recipe="
        )
    want, problem = _signature(model), None
    for bn in _batchnorm_modes(model):
        recipe = {
            "builder": "timm",
            "name": name,
            "kwargs": _timm_kwargs(model),
            "batchnorm": bn,
            "plan": plan_of(model),
        }
        try:
            problem = _mismatch(want, _rebuild_signature(recipe))
        except ExportError as e:
            problem = str(e)
        if problem is None:
            return recipe
    raise ExportError(f"cannot infer how to rebuild {name} ({problem}); pass recipe= (see gdnsq.export.recipe)")


def _replay_plan(model: nn.Module, plan: list[dict]) -> None:
    for entry in plan:
        parent_name, _, child = entry["name"].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        cls = QConv2d if entry["kind"] == "conv" else QLinear
        setattr(parent, child, cls.from_float(layer, QuantSpec.from_dict(entry["spec"])))


def build_from_recipe(recipe: dict) -> nn.Module:
    """The quantized model's structure (random FP weights, uncalibrated quantizers), in eval mode."""
    builder = recipe.get("builder")
    try:
        if builder == "gdnsq":
            from ..training.checkpoint import structure_config
            from ..training.surgery import build_student

            # Weights come from the packed file: only the structure of the stored config is needed.
            model = build_student(structure_config(recipe["config"]), recipe["num_classes"], recipe["in_chans"])
        elif builder == "timm":
            import timm

            from ..training import models  # noqa: F401 - registers gdnsq's own timm models
            from ..training.surgery import fold_batchnorm, freeze_batchnorm

            model = timm.create_model(recipe["name"], pretrained=False, **recipe.get("kwargs", {}))
            if recipe.get("batchnorm") == "fold":
                fold_batchnorm(model)
            _replay_plan(model, recipe["plan"])
            if recipe.get("batchnorm") == "freeze":
                freeze_batchnorm(model)
        else:
            raise ExportError(f"unknown rebuild recipe builder {builder!r}")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"cannot rebuild the model from its recipe ({type(e).__name__}: {e})") from None
    planned = [p["name"] for p in recipe.get("plan", [])]
    built = [name for name, _ in iter_quantized(model)]
    if planned and planned != built:
        diff = sorted(set(planned) ^ set(built)) or ["(order)"]
        raise ExportError(f"rebuilt model quantizes different layers than the recipe's plan (e.g. {diff[0]})")
    return model.eval()
