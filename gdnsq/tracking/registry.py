"""MLflow model registry for quantized students: register (champion rule), load, list, show, pull.

A registered version is one MLflow model directory holding two views of the same student:

* ``data/model.pt2`` — the eval-mode student exported with ``torch.export`` (MLflow's default ``pt2``
  format): ``mlflow.pytorch.load_model("models:/NAME@champion")`` returns a runnable GraphModule
  without unpickling code, and needs neither gdnsq nor timm.
* ``extra_files/`` — gdnsq-native files: ``state_dict.safetensors``, ``config.json``, ``manifest.json``
  (per-layer bits, accuracy, bytes, BOPs; the size figures are the caller's export report, see
  :func:`register_model`). :func:`load_model` rebuilds the real student class from
  them with :func:`gdnsq.training.surgery.build_student`, so it can be trained on, exported, or inspected.

The ``champion`` alias moves to a new version only when its ``ns_top1`` tag beats the champion's.
Functions return plain data and print nothing (the CLI formats).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import to_dict
from ..errors import RegistryError
from ..training.bits import FP_BITS, bits_table
from ..training.checkpoint import structure_config
from .manifest import MANIFEST_FILE, MANIFEST_FORMAT, estimate_stats, manifest_stats, model_card, version_tags
from .names import as_float, scrub_tree, scrub_value
from .store import resolve_read_uri, resolve_tracking_uri

CHAMPION = "champion"
NATIVE_DIR = "extra_files"  # where mlflow.pytorch puts ``extra_files`` inside the model directory
WEIGHTS_SAFETENSORS = "state_dict.safetensors"
WEIGHTS_TORCH = "state_dict.pt"
CONFIG_FILE = "config.json"


# ------------------------------------------------------------------------------------ names, refs


def sanitize_model_name(name: str) -> str:
    """Registry names: letters, digits, '.', '_', '-' ('/' and ':' are refused, '@' breaks refs)."""
    out = re.sub(r"[^A-Za-z0-9._\-]+", "-", name).strip("-.")
    if not out:
        raise RegistryError(f"registered name {name!r} has no usable characters")
    return out


def registered_name(cfg) -> str:
    """``tracking.registered_name`` or ``<model>-w<W>a<A>``, e.g. ``resnet18-w2a2``; under a budget
    ``<model>-mixed-<kind>-a<A>`` (e.g. ``resnet18-mixed-bytes-a2``): a front's points share one name; A is the
    activation budget (bits per input element) when it has one."""
    b = cfg.quant.budget
    a = b.value_a if b.value_a is not None else cfg.quant.target_a
    default = (
        f"{cfg.model.name}-mixed-{b.kind.replace('_', '-')}-a{a:g}"
        if b.active
        else f"{cfg.model.name}-w{cfg.quant.target_w:g}a{cfg.quant.target_a:g}"
    )
    name = cfg.tracking.registered_name or default
    return sanitize_model_name(name)


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME``, ``NAME/VERSION``, ``NAME/latest``, ``NAME@ALIAS`` (optionally prefixed ``models:/``) ->
    (name, version, alias); ``latest`` and a bare NAME give version None (the highest)."""
    body = ref[len("models:/") :] if ref.startswith("models:/") else ref
    name, version, alias = body, None, None
    if "@" in body:
        name, alias = body.rsplit("@", 1)
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if version == "latest":
            version = None
        elif not version.isdigit():
            raise RegistryError(
                f"bad model reference {ref!r}: version must be a number (stages are not supported; use NAME@ALIAS)"
            )
    if not name or "/" in name or (alias is not None and not alias):
        raise RegistryError(
            f"bad model reference {ref!r}: expected NAME, NAME/VERSION, NAME/latest, NAME@ALIAS or models:/..."
        )
    return name, version, alias


# ------------------------------------------------------------------------------- mlflow plumbing


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """MLflow's model logging reads the global tracking URI; set it for the call, then restore."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _store_error(uri: str, e: Exception, what: str = "model registry") -> RegistryError:
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return RegistryError(f"{what} at {scrub_value(uri)} failed: {type(e).__name__}: {first}")


def _not_found(e: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _resolve(client, ref: str, uri: str):
    """ModelVersion for a reference, or a one-line RegistryError naming what is missing."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_ref(ref)
    try:
        try:
            rm = client.get_registered_model(name)
        except MlflowException as e:
            if not _not_found(e):
                raise
            known = sorted(m.name for m in client.search_registered_models(max_results=100))
            hint = f"; registered: {', '.join(known[:12])}" if known else "; the registry is empty"
            raise RegistryError(f"unknown model {name!r}{hint}") from None
        if alias is not None:
            if alias not in (rm.aliases or {}):
                have = ", ".join(sorted(rm.aliases or {})) or "none"
                raise RegistryError(f"model {name!r} has no alias {alias!r} (aliases: {have})")
            version = str(rm.aliases[alias])
        if version is None:
            versions = [int(v.version) for v in client.search_model_versions(f"name='{name}'", max_results=10000)]
            if not versions:
                raise RegistryError(f"model {name!r} has no versions")
            version = str(max(versions))
        try:
            return client.get_model_version(name, version)
        except MlflowException as e:
            if not _not_found(e):
                raise
            raise RegistryError(f"model {name!r} has no version {version}") from None
    except RegistryError:
        raise
    except Exception as e:  # noqa: BLE001 - connection errors etc. become one line
        raise _store_error(uri, e) from None


def _download(uri: str, name: str, version: str, path: str, dst: Path) -> Path:
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    try:
        with _tracking_uri(uri):  # logged-model sources (models:/<id>) resolve through the global URI
            repo = ModelsArtifactRepository(f"models:/{name}/{version}", tracking_uri=uri, registry_uri=uri)
            return Path(repo.download_artifacts(path, str(dst)))
    except Exception as e:  # noqa: BLE001
        if "not found" in str(e).lower() or "No such file" in str(e) or _not_found(e):
            raise RegistryError(f"{name}/{version} is not a gdnsq model (no {path})") from None
        raise _store_error(uri, e) from None


# ----------------------------------------------------------------------------------- weights io


def _save_weights(model: nn.Module, folder: Path) -> str:
    """safetensors when the state dict is all tensors, else torch.save (loadable with weights_only)."""
    state = model.state_dict()
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        from safetensors.torch import save_file

        # clone: safetensors refuses tensors that share storage (tied weights)
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
            str(folder / WEIGHTS_SAFETENSORS),
            metadata={"format": "pt"},
        )
        return WEIGHTS_SAFETENSORS
    torch.save(
        {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}, folder / WEIGHTS_TORCH
    )
    return WEIGHTS_TORCH


def _read_weights(folder: Path, allow_pickle: bool) -> dict:
    if (folder / WEIGHTS_SAFETENSORS).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / WEIGHTS_SAFETENSORS))
    if (folder / WEIGHTS_TORCH).is_file():
        # weights_only refuses arbitrary objects; allow_pickle is the caller's explicit trust decision.
        return torch.load(folder / WEIGHTS_TORCH, map_location="cpu", weights_only=not allow_pickle)
    raise RegistryError(f"{folder}: no {WEIGHTS_SAFETENSORS} or {WEIGHTS_TORCH}")


def _bake_flags(model: nn.Module) -> None:
    """Turn 0-d bool buffers into Python bools, in place, so torch.export can trace the model.

    Quantizer flags such as ``signed`` are bool buffers read with ``bool(...)`` in forward, which
    torch.export refuses as a data-dependent guard. An exported inference graph is specialised on
    such flags anyway, so baking them changes nothing numerically.
    """
    for m in model.modules():
        for name, buf in list(m._buffers.items()):
            if buf is not None and buf.dim() == 0 and buf.dtype == torch.bool:
                del m._buffers[name]
                setattr(m, name, bool(buf))
        # A weight quantizer caches its weight range (plain tensor attributes) from the last forward:
        # torch.export warned about each as an unregistered tensor constant. The exported graph computes
        # the range itself, so the stale cache of our example forward is dropped.
        if getattr(m, "_cache", None) is not None:
            m._cache = None


# ------------------------------------------------------------------------------------- register


def register_model(
    model: nn.Module,
    cfg,
    summary: dict,
    example_input: torch.Tensor,
    *,
    tracker_or_run_id,
    stats: dict | None = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    alias: str = CHAMPION,
    tags: dict[str, str] | None = None,
) -> dict:
    """Log the eval-mode student (pt2 + native files) to the run, register a version, maybe promote.

    ``tracker_or_run_id``: a :class:`gdnsq.tracking.run.RunTracker` (flushed first; its store is used) or a
    run id in ``tracking_uri`` / ``cfg.tracking.uri``. ``summary``: the end-of-training summary
    (``ns_top1`` decides the ``champion`` alias; ``layers`` = bits table, recomputed if absent).

    ``stats``: the size/BOPs figures of this student, as the report that
    ``gdnsq.export.export_packed(model, path, example_input=x)`` returns (the packed file's size is the
    truth for the card). Read: ``bytes_file`` (recorded as ``bytes_packed``), ``bytes_fp32``,
    ``compression``, ``macs``, ``bops``, ``bops_fp32`` and ``layers``, one row per Conv/Linear with
    ``name``, ``kind``, ``params``, ``macs``, ``bops``: the rows of layers in the bits table give them
    their MACs/BOPs, the others become ``fp_layers``. Other keys are ignored. ``None``: estimated with
    :func:`estimate_stats` (no grids or header in the size, so a larger compression than the file's).
    ``tags``: added to the version's own (:func:`gdnsq.tracking.manifest.version_tags`), e.g. a sweep's
    ``pareto_front``. Returns ``{name, version, model_uri, model_id, run_id, champion, champion_version,
    ns_top1, manifest}``.
    """
    import mlflow
    from mlflow.models import infer_signature

    from .._version import __version__

    if isinstance(tracker_or_run_id, str):
        run_id, uri = tracker_or_run_id, resolve_tracking_uri(tracking_uri or cfg.tracking.uri)
    else:
        tracker = tracker_or_run_id
        tracker.flush(60.0)
        run_id, uri = tracker.run_id, tracker.uri
        if run_id is None:
            raise RegistryError(f"tracking store {scrub_value(uri)} unreachable: the run was never created")
    name = sanitize_model_name(name) if name else registered_name(cfg)

    # A CPU copy in eval mode: the caller's model keeps its device and mode, and the exported graph
    # is CPU (MLflow's pt2 loader cannot move an exported program across devices).
    student = copy.deepcopy(model).cpu().eval()
    x = example_input.detach().float().cpu()
    if x.shape[0] == 1:  # torch.export keeps a size-1 batch static; 2 rows give a dynamic batch
        x = torch.cat([x, x])
    with torch.no_grad():
        out = student(x)
    table = summary.get("layers") or bits_table(student)
    if stats is None:
        stats = estimate_stats(student, x, table)
    sizes = manifest_stats(stats, table, student)

    manifest = {
        "format": MANIFEST_FORMAT,
        "gdnsq_version": __version__,
        "registered_name": name,
        "model": cfg.model.name,
        "num_classes": int(out.shape[-1]),
        "in_chans": int(x.shape[1]),
        "input_shape": list(x.shape[1:]),
        "target_w": float(cfg.quant.target_w),
        "target_a": float(cfg.quant.target_a),
        **{k: summary.get(k) for k in ("top1", "top5", "fp_top1", "ns_top1", "avg_bits_w", "avg_bits_a", "converged")},
        **sizes,
        "run_id": run_id,
        "fp_checkpoint": cfg.model.checkpoint,
    }
    if cfg.quant.budget.active:  # the version was trained under one model-wide budget (mixed precision)
        manifest.update(budget_kind=cfg.quant.budget.kind, budget_value=cfg.quant.budget.value)
    client = _client(uri)
    with tempfile.TemporaryDirectory(prefix="gdnsq-register-") as tmp:
        folder = Path(tmp)
        manifest["weights_file"] = _save_weights(student, folder)
        _bake_flags(student)  # after saving the weights: the flags stay buffers in the state dict
        (folder / CONFIG_FILE).write_text(json.dumps(scrub_tree(to_dict(cfg)), indent=1))
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
        signature = infer_signature(x.numpy(), out.detach().numpy())
        try:
            run = client.get_run(run_id)
            # Created here (not by log_model) so the model lands in the run's experiment, not the
            # fluent API's default experiment.
            logged = client.create_logged_model(
                run.info.experiment_id, name="model", source_run_id=run_id, tags={"gdnsq.registered_name": name}
            )
            with _tracking_uri(uri):
                mlflow.pytorch.log_model(
                    student,
                    name="model",
                    run_id=run_id,
                    model_id=logged.model_id,
                    signature=signature,
                    input_example=x.numpy(),
                    serialization_format="pt2",
                    extra_files=[str(folder / f) for f in (manifest["weights_file"], CONFIG_FILE, MANIFEST_FILE)],
                    # explicit requirements skip MLflow's slow inference subprocess; pt2 needs only torch
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                )
        except Exception as e:  # noqa: BLE001 - export or upload: the caller keeps its checkpoint either way
            raise _store_error(uri, e, f"logging model {name}") from e
        with _tracking_uri(uri):  # the SQL registry resolves ``models:/<id>`` sources via the global URI
            return _create_version(client, uri, name, logged.model_id, run_id, manifest, alias, tags)


def _create_version(client, uri, name, model_id, run_id, manifest, alias, tags=None) -> dict:
    from mlflow.exceptions import MlflowException

    try:
        try:
            client.get_registered_model(name)
        except MlflowException as e:
            if not _not_found(e):
                raise
            with contextlib.suppress(MlflowException):  # a concurrent sweep trial may create it first
                client.create_registered_model(
                    name,
                    tags={"model": manifest["model"]},
                    description=f"GDNSQ-quantized {manifest['model']} students, target "
                    f"W{manifest['target_w']:g}A{manifest['target_a']:g}. The `{alias}` alias "
                    "is the version with the best ns_top1.",
                )
        mv = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            tags={**version_tags(manifest), **(tags or {})},
            description=model_card(name, manifest),
            model_id=model_id,
        )
        champion = client.get_registered_model(name).aliases.get(alias)
        new = as_float(manifest.get("ns_top1"))
        old = as_float(client.get_model_version(name, champion).tags.get("ns_top1")) if champion else None
        promote = new is not None and (champion is None or old is None or new > old)
        if promote:
            client.set_registered_model_alias(name, alias, mv.version)
            champion = mv.version
        client.set_tag(run_id, "gdnsq.registered_model", f"{name}/{mv.version}")
    except Exception as e:  # noqa: BLE001
        raise _store_error(uri, e) from e
    return {
        "name": name,
        "version": str(mv.version),
        "model_uri": f"models:/{name}/{mv.version}",
        "model_id": model_id,
        "run_id": run_id,
        "champion": promote,
        "champion_version": None if champion is None else str(champion),
        "ns_top1": new,
        "manifest": manifest,
    }


# ----------------------------------------------------------------------------- load / list / show


def load_model(
    ref: str,
    device: str | torch.device = "cpu",
    *,
    allow_pickle: bool = False,
    tracking_uri: str | None = None,
    builder=None,
) -> nn.Module:
    """The registered student, rebuilt with ``build_student`` and its weights, in eval mode on ``device``.

    ``ref``: ``NAME@ALIAS``, ``NAME/VERSION``, ``NAME`` (latest), ``models:/...``, or a folder written
    by :func:`pull_model`. Weights come from safetensors / ``torch.load(weights_only=True)``; nothing
    is unpickled unless ``allow_pickle=True``. ``builder(cfg, num_classes, in_chans)`` replaces
    ``gdnsq.training.surgery.build_student`` (tests, custom architectures).
    """
    if os.path.isdir(ref):
        return _load_native(Path(ref), device, allow_pickle, builder)
    uri = resolve_read_uri(tracking_uri)
    mv = _resolve(_client(uri), ref, uri)
    with tempfile.TemporaryDirectory(prefix="gdnsq-load-") as tmp:
        folder = _download(uri, mv.name, mv.version, NATIVE_DIR, Path(tmp))
        return _load_native(folder, device, allow_pickle, builder)


def _load_native(folder: Path, device, allow_pickle: bool, builder) -> nn.Module:
    for f in (CONFIG_FILE, MANIFEST_FILE):
        if not (folder / f).is_file():
            raise RegistryError(f"{folder}: not a gdnsq model folder (no {f})")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    cfg = structure_config(json.loads((folder / CONFIG_FILE).read_text()))
    if builder is None:
        from ..training.surgery import build_student as builder
    model = builder(cfg, manifest["num_classes"], manifest["in_chans"])
    model.load_state_dict(_read_weights(folder, allow_pickle))
    return model.eval().to(device)


def list_models(*, tracking_uri: str | None = None) -> list[dict]:
    """Every registered model: name, latest version, aliases, and ``headline``: the champion's tags (else the
    latest version's) that a listing shows (top-1, FP top-1, bits, the exporter's packed bytes)."""
    uri = resolve_read_uri(tracking_uri)
    client = _client(uri)
    out, token = [], None
    keys = (
        "ns_top1",
        "top1",
        "fp_top1",
        "avg_bits_w",
        "avg_bits_a",
        "target_w",
        "target_a",
        "bytes_packed",
        "compression",
        "gbops",
    )
    try:
        while True:
            page = client.search_registered_models(max_results=1000, page_token=token)
            for rm in page:
                versions = [int(v.version) for v in (rm.latest_versions or [])]
                latest = str(max(versions)) if versions else None
                champ = (rm.aliases or {}).get(CHAMPION)
                shown = str(champ) if champ else latest
                tags = client.get_model_version(rm.name, shown).tags if shown else {}
                headline = {"version": shown, **{k: tags.get(k) for k in keys}} if shown else None
                out.append(
                    {
                        "name": rm.name,
                        "latest_version": latest,
                        "aliases": {k: str(v) for k, v in (rm.aliases or {}).items()},
                        "description": rm.description,
                        "tags": dict(rm.tags or {}),
                        "updated_ms": rm.last_updated_timestamp,
                        "headline": headline,
                        "champion": headline if champ else None,
                    }
                )
            token = page.token
            if not token:
                break
    except Exception as e:  # noqa: BLE001
        raise _store_error(uri, e) from None
    return sorted(out, key=lambda m: m["name"])


def show_model(ref: str, *, tracking_uri: str | None = None) -> dict:
    """One version: identity, aliases, tags, description, and its manifest (per-layer bits etc.)."""
    uri = resolve_read_uri(tracking_uri)
    client = _client(uri)
    mv = _resolve(client, ref, uri)
    with tempfile.TemporaryDirectory(prefix="gdnsq-show-") as tmp:
        path = _download(uri, mv.name, mv.version, f"{NATIVE_DIR}/{MANIFEST_FILE}", Path(tmp))
        manifest = json.loads(path.read_text())
    try:
        aliases = sorted(
            a for a, v in (client.get_registered_model(mv.name).aliases or {}).items() if str(v) == str(mv.version)
        )
    except Exception as e:  # noqa: BLE001
        raise _store_error(uri, e) from None
    return {
        "name": mv.name,
        "version": str(mv.version),
        "model_uri": f"models:/{mv.name}/{mv.version}",
        "aliases": aliases,
        "run_id": mv.run_id,
        "source": mv.source,
        "status": mv.status,
        "created_ms": mv.creation_timestamp,
        "description": mv.description,
        "tags": dict(mv.tags or {}),
        "manifest": manifest,
    }


def pull_model(
    ref: str, out_dir: str | os.PathLike, *, tracking_uri: str | None = None, include_mlflow_model: bool = False
) -> dict:
    """Write the native files (weights, config.json, manifest.json) and layers.csv into ``out_dir``.

    ``load_model(out_dir)`` then works offline. ``include_mlflow_model`` adds the whole MLflow model
    directory (pt2 graph, MLmodel) under ``out_dir/mlflow_model``.
    """
    uri = resolve_read_uri(tracking_uri)
    mv = _resolve(_client(uri), ref, uri)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gdnsq-pull-") as tmp:
        native = _download(uri, mv.name, mv.version, NATIVE_DIR, Path(tmp))
        for f in native.iterdir():
            shutil.copy2(f, out / f.name)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    rows = manifest["layers"] + [{**r, "true_bits_w": FP_BITS, "true_bits_a": FP_BITS} for r in manifest["fp_layers"]]
    cols = [
        "name",
        "kind",
        "true_bits_w",
        "true_bits_a",
        "bits_w",
        "bits_a",
        "target_w",
        "target_a",
        "params",
        "macs",
        "bops",
    ]
    with open(out / "layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    source = {
        "name": mv.name,
        "version": str(mv.version),
        "model_uri": f"models:/{mv.name}/{mv.version}",
        "run_id": mv.run_id,
    }
    (out / "source.json").write_text(json.dumps(source, indent=1))
    if include_mlflow_model:
        import mlflow

        target = out / "mlflow_model"
        target.mkdir(exist_ok=True)
        with _tracking_uri(uri):
            mlflow.artifacts.download_artifacts(artifact_uri=source["model_uri"], dst_path=str(target))
    return {**source, "dir": str(out), "files": sorted(p.name for p in out.iterdir())}


# ----------------------------------------------------------------------------- choose by budget

BUDGET_TAGS = {"max_bytes": "bytes_packed", "max_bops": "bops"}


def budget_filter(name: str) -> str:
    """The ``search_model_versions`` filter of :func:`select_by_budget`: converged versions of ``name``.

    MLflow compares version tags as strings only (=, !=, LIKE), so the numeric bounds are applied to the
    returned tags: ``float(v.tags["bytes_packed"]) <= N`` (``bops`` likewise), then the largest ``top1`` wins.
    """
    return f"name='{name}' AND tags.converged='True'"


def select_by_budget(
    name: str, *, max_bytes: float | None = None, max_bops: float | None = None, tracking_uri: str | None = None
) -> dict:
    """The most accurate converged version of ``name`` within the budget: packed file bytes (the exporter's
    ``bytes_file``, tag ``bytes_packed``) <= ``max_bytes`` and BOPs (tag ``bops``) <= ``max_bops``.

    Returns ``{name, version, ref, top1, bytes_packed, bops}``; RegistryError when no version fits.
    """
    if max_bytes is None and max_bops is None:
        raise RegistryError("select_by_budget: pass max_bytes and/or max_bops")
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    try:
        versions = client.search_model_versions(budget_filter(name), max_results=10000)
    except Exception as e:  # noqa: BLE001
        raise _store_error(uri, e) from None
    bounds = {"bytes_packed": max_bytes, "bops": max_bops}
    fits = []
    for v in versions:
        figures = {k: as_float(v.tags.get(k)) for k in ("top1", "bytes_packed", "bops")}
        if figures["top1"] is None or any(
            b is not None and (figures[k] is None or figures[k] > b) for k, b in bounds.items()
        ):
            continue
        fits.append((figures["top1"], -(figures["bytes_packed"] or 0), int(v.version), figures))
    if not fits:
        asked = ", ".join(f"{k} <= {b:g}" for k, b in bounds.items() if b is not None)
        raise RegistryError(f"{name}: no converged version with {asked} (of {len(versions)} converged versions)")
    top1, _, version, figures = max(fits)  # most accurate; ties: the smaller file, then the newer version
    return {"name": name, "version": str(version), "ref": f"{name}/{version}", **figures}
