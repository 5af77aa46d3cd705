"""``tsa-convert``: legacy TSA checkpoints -> Lightning checkpoints, and back.

::

    tsa-convert SOURCE [--hparams H.json] --output OUT.ckpt [--trust-pickle] [--allow-nonfinite] [--verify]
    tsa-convert CKPT --to-legacy --output LEGACY.pt

SOURCE is a legacy file, a model folder or SageMaker's ``model.tar.gz`` (read by
:func:`lightning_port.legacy_job.open_job`: hostile tar members refused, nothing written outside a
private temporary folder); ``H.json`` is SageMaker's ``hyperparameters.json`` (string values, absent
keys = ``train.py``'s defaults; :func:`lightning_port.legacy_hparams.read_hyperparameters`), found inside
or beside SOURCE when ``--hparams`` is not given, and checked against the dimensions the state_dict
fixes.

The core is pure functions on in-memory objects (:func:`legacy_to_lightning`,
:func:`lightning_to_legacy`, :func:`remap_optimizer_state`, ...); the weight names come from the
ONE mapping table in :mod:`lightning_port.weight_map` (no second mapping here). The CLI is a thin
wrapper: every user-facing failure is a :class:`ConvertError` printed as one line on stderr with
exit code 2 (``--verify`` beyond :data:`lightning_port.tolerances.LEGACY_VS_PORT`: exit code 1); files are written to a temporary file in
the output folder and renamed, so a failure never leaves a partial output.

Safety: files are read with ``torch.load(weights_only=True)``. A file that needs more (pickled
functions or objects) is refused, naming the globals it asks for. ``--trust-pickle`` loads with
``weights_only=False``, which RUNS whatever code the pickle carries: use it only for files you
trust (e.g. old training checkpoints whose scheduler pickled its annealing function).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .legacy_hparams import MODELNAMES as LEGACY_MODELNAMES
from .legacy_hparams import LegacyJobError
from .tolerances import LEGACY_VS_PORT, abs_diff, close

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_ERROR = 0, 1, 2
MODELNAMES = {**LEGACY_MODELNAMES, "single": "single", "dual": "dual"}  # legacy names, and the port's kinds
META_KEY = "tsa_convert"  # extra top-level key of the Lightning checkpoint (ignored by Lightning)
VERIFY_ATOL, VERIFY_RTOL = LEGACY_VS_PORT.atol, LEGACY_VS_PORT.rtol  # --verify's tolerance (reason: the table)


class ConvertError(Exception):
    """A user-facing conversion failure (one line, no traceback)."""


# ----------------------------------------------------------------------------------- reading
def _unsafe_globals(message: str) -> list[str]:
    out: list[str] = []
    for g in re.findall(r"GLOBAL ([\w.]+)", message):
        if g not in out:
            out.append(g)
    return out


def load_file(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """``torch.load`` on CPU, safely unless ``trust_pickle``; every failure becomes a ConvertError."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    with path.open("rb") as fh:
        head = fh.read(8)
    if not head:
        raise ConvertError(f"{path}: the file is empty, not a PyTorch checkpoint")
    is_zip, is_pickle = head[:4] == b"PK\x03\x04", head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        raise ConvertError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle; "
                           f"starts with {head[:8]!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(str(e))
        if names and not trust_pickle:
            raise ConvertError(
                f"{path}: refused under safe loading (weights_only=True): the file needs the unsafe "
                f"pickled global(s) {', '.join(names)}; only if you trust this file, rerun with "
                f"--trust-pickle (which lets the pickle run code)") from None
        raise ConvertError(f"{path}: damaged or unreadable pickle data ({_first_line(e)})") from None
    except RuntimeError as e:
        msg = str(e)
        if "zip archive" in msg or "central directory" in msg or "PytorchStreamReader" in msg:
            raise ConvertError(f"{path}: the file is damaged (truncated or corrupted torch archive)") from None
        raise ConvertError(f"{path}: cannot be read as a PyTorch checkpoint ({_first_line(e)})") from None
    except (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            ImportError, MemoryError) as e:
        kind = "truncated" if isinstance(e, EOFError) else "damaged or not a checkpoint"
        raise ConvertError(f"{path}: the file is {kind} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException, limit: int | None = 300) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if limit is None or len(line) <= limit else line[:limit] + "..."


def split_legacy(obj: Any, source: str = "SOURCE") -> tuple[dict[str, Tensor], dict[str, Any] | None, str]:
    """A loaded legacy file -> (legacy state_dict, training state or None, format name).

    Formats (legacy-tsa §14): a plain state_dict, a ``module.``-prefixed (DDP) one, and the
    training dict ``{model, optimizer, scheduler, epoch, best_auc}`` (whose ``model`` may itself
    be DDP-prefixed). Pre-1.6 serialization is handled by ``torch.load``.
    """
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{source}: not a TSA checkpoint (holds a {type(obj).__name__}, not a dict)")
    if "pytorch-lightning_version" in obj and "state_dict" in obj:
        raise ConvertError(f"{source}: already a Lightning checkpoint; use --to-legacy to go back")
    training = None
    fmt = "state_dict"
    if "model" in obj and isinstance(obj["model"], Mapping):
        training = {k: v for k, v in obj.items() if k != "model"}
        obj, fmt = obj["model"], "training checkpoint"
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if bad:
        raise ConvertError(f"{source}: not a TSA state_dict (entries that are not tensors: {', '.join(bad[:8])}"
                           + (", ..." if len(bad) > 8 else "") + ")")
    if not obj:
        raise ConvertError(f"{source}: the state_dict is empty")
    sd = dict(obj)
    prefixed = [k for k in sd if k.startswith("module.")]
    if prefixed and len(prefixed) != len(sd):
        raise ConvertError(f"{source}: some keys have the DDP prefix 'module.' and some do not")
    if prefixed:
        sd = {k[len("module."):]: v for k, v in sd.items()}
        fmt = "DDP (module.) " + fmt
    return sd, training, fmt


# ------------------------------------------------------------------------- model & hparams
def kind_of(hparams: Mapping[str, Any], legacy_sd: Mapping[str, Tensor] | None = None) -> str:
    name = hparams.get("modelname")
    if name is None:
        from .weight_map import infer_kind

        if legacy_sd is None:
            raise ConvertError("hyperparameters: 'modelname' is missing (OrderFeature or TwoSeqMoEOrderFeature)")
        return infer_kind(legacy_sd)
    if name not in MODELNAMES:
        raise ConvertError(f"hyperparameters: unknown modelname {name!r} (expected OrderFeature or "
                           f"TwoSeqMoEOrderFeature)")
    return MODELNAMES[name]


def module_class(kind: str):
    from .module import DualSequenceTSA, TemporalSelfAttentionClassification

    return DualSequenceTSA if kind == "dual" else TemporalSelfAttentionClassification


def build_module(kind: str, hparams: Mapping[str, Any]):
    """The LightningModule for legacy-named ``hparams`` (the global RNG is left untouched)."""
    cls = module_class(kind)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return cls.from_config(dict(hparams))
        except (TypeError, ValueError) as e:
            raise ConvertError(f"hyperparameters: {_first_line(e)}") from None


def _weight_map():
    from . import weight_map

    return weight_map


def legacy_param_names(legacy_sd: Mapping[str, Tensor], config, kind: str) -> list[str]:
    """The legacy ``model.parameters()`` order as names: the state_dict order (the legacy model
    has no buffers), each shared table counted once, under its first name."""
    wm = _weight_map()
    rows = wm.mapping_rows(kind)
    seen: set[str] = set()
    names: list[str] = []
    for key in legacy_sd:
        target = legacy_key_to_port(key, rows)
        group = target if target is not None else key
        if group in seen:
            continue
        seen.add(group)
        names.append(key)
    return names


def legacy_key_to_port(key: str, rows=None, kind: str | None = None) -> str | None:
    """The port network key of a legacy key from the weight-map table (None: dropped)."""
    wm = _weight_map()
    try:
        return wm.lookup_legacy_key(key, kind, rows)[1]
    except wm.WeightMapError as e:
        raise ConvertError(str(e)) from None


def _row_transform(key: str, rows):
    return _weight_map().lookup_legacy_key(key, rows=rows)[0].transform


def nonfinite_keys(sd: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


# ------------------------------------------------------------------------- training state
def remap_optimizer_state(opt_state: Mapping[str, Any], legacy_sd: Mapping[str, Tensor], module, kind: str
                          ) -> dict[str, Any]:
    """Legacy Adam state (indexed by the legacy ``parameters()`` order) -> the port module's
    Adam state (indexed by ``module.parameters()``), matched by parameter NAME through the
    weight map; the state of parameters the port drops (never used, no moments) is discarded."""
    wm = _weight_map()
    rows = wm.mapping_rows(kind)
    if not isinstance(opt_state, Mapping) or "state" not in opt_state or "param_groups" not in opt_state:
        raise ConvertError("training checkpoint: 'optimizer' is not an optimizer state_dict")
    legacy_names = legacy_param_names(legacy_sd, module.config, kind)
    groups = opt_state["param_groups"]
    indices = [i for g in groups for i in g["params"]]
    if len(indices) != len(legacy_names):
        raise ConvertError(f"training checkpoint: the optimizer holds {len(indices)} parameters but the legacy "
                           f"model has {len(legacy_names)}")
    if len(groups) != 1:
        raise ConvertError(f"training checkpoint: the optimizer has {len(groups)} parameter groups; the port's "
                           f"Adam has one")
    port_names = [n for n, _ in module.named_parameters()]
    port_params = dict(module.named_parameters())
    port_index = {n: i for i, n in enumerate(port_names)}
    prefix = "network."
    state: dict[int, dict[str, Any]] = {}
    for idx, lname in zip(indices, legacy_names):
        pkey = legacy_key_to_port(lname, rows)
        entry = opt_state["state"].get(idx)
        if pkey is None or entry is None:
            continue
        full = prefix + pkey
        if full not in port_index:
            raise ConvertError(f"training checkpoint: optimizer parameter {lname} maps to {full}, "
                               f"which the port module does not have")
        transform = _row_transform(lname, rows)
        new = {}
        for k, v in entry.items():
            if isinstance(v, Tensor) and v.dim() > 0:
                if tuple(v.shape) != tuple(legacy_sd[lname].shape):
                    raise ConvertError(f"training checkpoint: optimizer state {k} of {lname} has shape "
                                       f"{tuple(v.shape)}, the parameter {tuple(legacy_sd[lname].shape)}")
                v = transform(v) if transform else v
                if tuple(v.shape) != tuple(port_params[full].shape):
                    raise ConvertError(f"training checkpoint: optimizer state {k} of {lname} does not fit {full}")
            new[k] = v
        state[port_index[full]] = new
    group = {k: v for k, v in groups[0].items() if k != "params"}
    group["params"] = list(range(len(port_names)))
    return {"state": state, "param_groups": [group]}


def sanitize_scheduler_state(sched: Any) -> dict[str, Any]:
    """Keep the numbers of a (OneCycleLR) scheduler state; drop pickled functions (older torch
    stored ``anneal_func``; newer torch stores ``_anneal_func_type`` instead)."""
    if not isinstance(sched, Mapping):
        raise ConvertError("training checkpoint: 'scheduler' is not a scheduler state_dict")

    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return True
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, Mapping):
            return all(isinstance(k, (str, int)) and plain(x) for k, x in v.items())
        return False

    out = {k: v for k, v in sched.items() if plain(v)}
    func = sched.get("anneal_func")
    if func is not None and "_anneal_func_type" not in out:
        name = getattr(func, "__name__", "")
        out["_anneal_func_type"] = "linear" if "linear" in name else "cos"
    return out


def loops_state(epochs_done: int, steps_done: int, batches_per_epoch: int) -> dict[str, Any]:
    """The ``loops`` entry of a Lightning checkpoint saved at the end of epoch ``epochs_done - 1``
    (the layout ``ModelCheckpoint`` writes at an epoch end, Lightning 2.x)."""
    def p4(cur, tot):
        return {"current": dict.fromkeys(("ready", "started", "processed", "completed"), cur),
                "total": dict.fromkeys(("ready", "started", "processed", "completed"), tot)}

    def p2(cur, tot):
        return {"current": {"ready": cur, "completed": cur}, "total": {"ready": tot, "completed": tot}}

    def p3(cur, tot):
        return {"current": dict.fromkeys(("ready", "started", "completed"), cur),
                "total": dict.fromkeys(("ready", "started", "completed"), tot)}

    bpe = batches_per_epoch if epochs_done else 0
    fit = {
        "state_dict": {},
        "epoch_progress": p4(epochs_done, epochs_done),
        "epoch_loop.state_dict": {"_batches_that_stepped": steps_done},
        "epoch_loop.batch_progress": {**p4(bpe, steps_done), "is_last_batch": bool(epochs_done)},
        "epoch_loop.scheduler_progress": p2(1 if epochs_done else 0, epochs_done),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {
            "optimizer": {"step": p2(bpe, steps_done), "zero_grad": p3(bpe, steps_done)}},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": p2(0, 0),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {**p4(0, 0), "is_last_batch": False},
    }
    other = {"state_dict": {}, "batch_progress": {**p4(0, 0), "is_last_batch": False}}
    predict = {"state_dict": {}, "batch_progress": p4(0, 0)}
    return {"fit_loop": fit, "validate_loop": dict(other), "test_loop": dict(other), "predict_loop": predict}


# ------------------------------------------------------------------------------ conversion
def legacy_to_lightning(legacy_sd: Mapping[str, Tensor], hparams: Mapping[str, Any],
                        training: Mapping[str, Any] | None = None, *, allow_nonfinite: bool = False,
                        source: str = "SOURCE") -> tuple[dict[str, Any], list[str]]:
    """Legacy state_dict (+ optional training state) -> (Lightning checkpoint dict, warnings)."""
    import lightning

    wm = _weight_map()
    notes: list[str] = []
    kind = kind_of(hparams, legacy_sd)
    bad = nonfinite_keys(legacy_sd)
    if bad and not allow_nonfinite:
        raise ConvertError(f"{source}: non-finite weights (NaN/inf) in {', '.join(bad)}; refusing to convert "
                           f"(pass --allow-nonfinite to convert anyway)")
    if bad:
        notes.append(f"WARNING: converting NON-FINITE weights (NaN/inf) in {', '.join(bad)}: the converted "
                     f"model will produce NaN scores")
    module = build_module(kind, hparams)
    config = module.config
    try:
        port_sd = wm.legacy_to_port(legacy_sd, config, kind)
    except wm.WeightMapError as e:
        hint = ""
        if wm.infer_kind(legacy_sd) != kind:
            hint = (f" (modelname {hparams.get('modelname')!r} asks for a {kind} model, but the file holds "
                    f"a {wm.infer_kind(legacy_sd)} one)")
        # every offending key is named: the whole message, on one line
        raise ConvertError(f"{source}: does not fit the hyperparameters{hint}: {_first_line(e, None)}") from None
    try:
        module.network.load_state_dict(port_sd, strict=True)
    except RuntimeError as e:
        raise ConvertError(f"{source}: the port network rejects the mapped weights ({_first_line(e)})") from None
    state_dict = {k: v.detach().clone() for k, v in module.state_dict().items()}
    dropped = {k: legacy_sd[k].detach().clone() for k in wm.dropped_legacy_keys(config, kind) if k in legacy_sd}
    ckpt: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state_dict,
        "hparams_name": "kwargs",
        "hyper_parameters": dict(module.hparams),
        META_KEY: {"kind": kind, "legacy_dropped": dropped, "legacy_keys": list(legacy_sd),
                   "source_hparams": dict(hparams)},
    }
    if training is not None:
        ckpt.update(_training_entries(training, legacy_sd, module, kind, source))
        ckpt[META_KEY]["best_auc"] = training.get("best_auc")
        ckpt[META_KEY]["legacy_epoch"] = training.get("epoch")
    return ckpt, notes


def _training_entries(training: Mapping[str, Any], legacy_sd, module, kind: str, source: str) -> dict[str, Any]:
    missing = [k for k in ("optimizer", "scheduler", "epoch") if k not in training]
    if missing:
        raise ConvertError(f"{source}: training checkpoint lacks {', '.join(missing)}")
    opt_state = remap_optimizer_state(training["optimizer"], legacy_sd, module, kind)
    sched_state = sanitize_scheduler_state(training["scheduler"])
    epoch = training["epoch"]
    if isinstance(epoch, Tensor):
        epoch = int(epoch.item())
    if not isinstance(epoch, int) or epoch < 0:
        raise ConvertError(f"{source}: training checkpoint epoch {epoch!r} is not a non-negative integer")
    epochs_done = epoch + 1  # legacy saves the index of the epoch just finished
    steps = [int(s["step"].item() if isinstance(s.get("step"), Tensor) else s.get("step", 0))
             for s in opt_state["state"].values()]
    steps_done = max(steps, default=0)
    batches = steps_done // epochs_done if steps_done % epochs_done == 0 else steps_done // epochs_done + 1
    # the state must load into the module's own optimizer and scheduler
    hp = module.hparams
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt = torch.optim.Adam(module.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2))
            opt.load_state_dict(opt_state)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.scheduler_maxlr,
                                                        total_steps=max(int(sched_state.get("total_steps", 1)), 1))
            sched.load_state_dict(sched_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ConvertError(f"{source}: optimizer / scheduler state does not fit the port ({_first_line(e)})") \
                from None
    return {"epoch": epochs_done, "global_step": steps_done, "optimizer_states": [opt_state],
            "lr_schedulers": [sched_state], "loops": loops_state(epochs_done, steps_done, batches)}


def lightning_to_legacy(ckpt: Mapping[str, Any], source: str = "CKPT") -> dict[str, Tensor]:
    """Lightning checkpoint (from this converter or from training the port) -> legacy state_dict
    that the legacy model loads strictly. Never-used legacy parameters come back as the stored
    originals when the checkpoint carries them (converted files), else as zeros."""
    from .config import TSAConfig

    wm = _weight_map()
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConvertError(f"{source}: not a Lightning checkpoint of the port (needs state_dict and "
                           f"hyper_parameters)")
    meta = ckpt.get(META_KEY) or {}
    sd = ckpt["state_dict"]
    port_sd = {k[len("network."):]: v for k, v in sd.items() if k.startswith("network.")}
    other = sorted(k for k in sd if not k.startswith("network."))
    if other:
        raise ConvertError(f"{source}: unexpected state_dict keys outside the network: {', '.join(other[:8])}")
    kind = meta.get("kind") or wm.infer_kind(port_sd)
    try:
        config = TSAConfig.from_dict(dict(ckpt["hyper_parameters"]))
        legacy = wm.port_to_legacy(port_sd, config, kind)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{source}: {_first_line(e)}") from None
    for k, v in (meta.get("legacy_dropped") or {}).items():
        if k in legacy and tuple(v.shape) == tuple(legacy[k].shape):
            legacy[k] = v
    order = [k for k in meta.get("legacy_keys") or [] if k in legacy]
    if len(order) != len(legacy):
        order = list(legacy)  # the legacy key order of the source file when known
    # the legacy model shares its tables: they stay one tensor, as the legacy state_dict had them
    return {k: legacy[k].detach().contiguous() for k in order}


# --------------------------------------------------------------------------------- verify
def _generated_inputs(config, kind: str, batch: int, seed: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    L_ = config.seq_len

    def seq():
        x_cat = torch.randint(1, config.n_cat_codes + 1, (batch, L_, config.n_cat_features), generator=g).float()
        x_num = torch.randn(batch, L_, config.n_num_features, generator=g)
        t = torch.rand(batch, L_, 1, generator=g) * 100
        lengths = torch.randint(1, L_ + 1, (batch,), generator=g)
        lengths[0] = L_
        if batch > 1:
            lengths[1] = 1  # only the current order
        not_padded = (torch.arange(L_)[None, :] >= (L_ - lengths)[:, None]).float()  # left padded
        x_cat = x_cat * not_padded[..., None]
        x_num = x_num * not_padded[..., None]
        kpm = torch.logical_not(torch.nn.functional.pad(not_padded, (0, 1), value=True))
        return x_cat, x_num, t, kpm

    x_eng = torch.randn(batch, config.n_engineered_num_features, generator=g) \
        if config.n_engineered_num_features else None
    if kind == "single":
        x_cat, x_num, t, kpm = seq()
        return (x_cat, x_num, x_eng, t), {"key_padding_mask": kpm}
    a, b = seq(), seq()
    return (a[0], a[1], a[2], b[0], b[1], b[2], x_eng), {"key_padding_mask_cid": a[3], "key_padding_mask_ccid": b[3]}


def verify(legacy_sd: Mapping[str, Tensor], ckpt: Mapping[str, Any], hparams: Mapping[str, Any],
           batch: int = 16, seeds: tuple[int, ...] = (0, 1, 2)) -> tuple[float, bool]:
    """(worst |legacy - port|, all within :data:`lightning_port.tolerances.LEGACY_VS_PORT`) over scores and
    ensembles, eval mode, the same seed before each forward (NaN on both sides agrees, on one side fails).
    Imports ``reference/`` (the legacy model) only here."""
    import inspect

    import reference

    kind = ckpt[META_KEY]["kind"]
    module = build_module(kind, ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"], strict=True)
    cls = reference.models.LEGACY_CLASSES[kind]
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    cfg = module.config.to_dict()
    kwargs = {k: v for k, v in cfg.items() if k in names}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = cls(**kwargs)
        try:
            legacy.load_state_dict(dict(legacy_sd), strict=True)
        except RuntimeError as e:
            raise ConvertError(f"verify: the legacy model rejects the source weights ({_first_line(e)})") from None
        legacy.eval()
        module.eval()
        worst, ok = 0.0, True
        for s in seeds:
            args, kw = _generated_inputs(module.config, kind, batch, 1000 + s)
            with torch.no_grad():
                torch.manual_seed(s)
                ref = legacy(*args, **kw)
                torch.manual_seed(s)
                out = module(*args, **kw)
            for r, o in zip(ref, out):
                worst = max(worst, float(abs_diff(o.numpy(), r.numpy()).max(initial=0.0)))
                ok = ok and bool(close(o.numpy(), r.numpy(), LEGACY_VS_PORT.rtol, LEGACY_VS_PORT.atol).all())
    return worst, ok


# ----------------------------------------------------------------------------------- writing
def atomic_save(obj: Any, output: str | os.PathLike) -> None:
    """torch.save to a temporary file next to ``output``, then rename (no partial outputs)."""
    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise ConvertError(f"{output}: the output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, output)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ConvertError(f"{output}: cannot write ({_first_line(e)})") from None
        raise


# --------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tsa-convert",
        description="Convert legacy TSA checkpoints to Lightning checkpoints (and back with --to-legacy).",
        epilog="Exit codes: 0 ok, 1 --verify beyond tolerance, 2 refused or failed (one line on stderr).")
    p.add_argument("source", help="legacy file (state_dict, DDP, training checkpoint), a model folder or SageMaker's "
                                  "model.tar.gz; with --to-legacy, a Lightning checkpoint")
    p.add_argument("--hparams", help="SageMaker's hyperparameters.json (train.py names, string values; absent keys "
                                     "take train.py's defaults); default: hyperparameters.json inside or beside SOURCE")
    p.add_argument("--test-name", help="the job's test_name: picks {test_name}.pt in a folder or tarball (default: "
                                       "test_name from the hyperparameters, else the single state_dict)")
    p.add_argument("--output", required=True, help="file to write (atomically)")
    p.add_argument("--to-legacy", action="store_true", help="Lightning checkpoint -> legacy state_dict")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False: RUNS code carried by the file; only for files you trust")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights containing NaN/inf (with a warning) instead of refusing")
    p.add_argument("--verify", action="store_true",
                   help="run the legacy model and the converted port on generated inputs; exit 1 beyond "
                        f"tolerance (atol {VERIFY_ATOL}, rtol {VERIFY_RTOL})")
    return p


def run(args: argparse.Namespace) -> int:
    if args.to_legacy:
        if args.hparams:
            print("note: --hparams is ignored with --to-legacy (the checkpoint carries them)", file=sys.stderr)
        ckpt = load_file(args.source, args.trust_pickle)
        legacy = lightning_to_legacy(ckpt, source=args.source)
        atomic_save(legacy, args.output)
        print(f"wrote {args.output}: legacy {ckpt.get(META_KEY, {}).get('kind', '')} state_dict, "
              f"{len(legacy)} keys")
        return EXIT_OK
    from .legacy_hparams import check_state_dict, read_hyperparameters
    from .legacy_job import open_job

    with open_job(args.source, args.hparams, args.test_name) as job:
        if job.hparams is None:
            raise ConvertError(f"{args.source}: no hyperparameters.json inside or beside it; pass --hparams H.json "
                               "(SageMaker's hyperparameters.json of the job)")
        hp = read_hyperparameters(job.hparams)
        label = args.source if job.source_kind == "file" else f"{args.source}:{job.model_name}"
        obj = load_file(job.model, args.trust_pickle)
        legacy_sd, training, fmt = split_legacy(obj, label)
        check_state_dict(hp, legacy_sd, label)
        hparams = hp.module_kwargs()
        ckpt, notes = legacy_to_lightning(legacy_sd, hparams, training, allow_nonfinite=args.allow_nonfinite,
                                          source=label)
        notes = [*job.notes, *notes]
    for n in notes:
        print(n, file=sys.stderr)
    code = EXIT_OK
    if args.verify:
        worst, ok = verify(legacy_sd, ckpt, hparams)
        print(f"verify: worst |legacy - port| = {worst:.3g} over scores and ensembles "
              f"(tolerance atol {VERIFY_ATOL} + rtol {VERIFY_RTOL}): {'OK' if ok else 'FAILED'}")
        if not ok:
            print(f"error: --verify: the converted model differs from the legacy one by {worst:.3g}; "
                  f"{args.output} not written", file=sys.stderr)
            return EXIT_VERIFY_FAILED
    atomic_save(ckpt, args.output)
    kind = ckpt[META_KEY]["kind"]
    cls = module_class(kind).__name__
    extra = ""
    if training is not None:
        extra = (f", optimizer ({len(ckpt['optimizer_states'][0]['state'])} moments), scheduler, "
                 f"epoch {ckpt['epoch']}, global_step {ckpt['global_step']}")
    print(f"wrote {args.output}: {cls} from a {fmt} ({len(legacy_sd)} legacy keys -> "
          f"{len(ckpt['state_dict'])} port keys, {len(ckpt[META_KEY]['legacy_dropped'])} never-used kept "
          f"aside{extra})")
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except LegacyJobError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # never a traceback for a user; TSA_CONVERT_DEBUG=1 re-raises
        if os.environ.get("TSA_CONVERT_DEBUG"):
            raise
        print(f"error: internal error ({type(e).__name__}: {_first_line(e)}); rerun with TSA_CONVERT_DEBUG=1 "
              f"for details", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
