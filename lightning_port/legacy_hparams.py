"""Legacy hyperparameters: SageMaker's ``hyperparameters.json`` of a ``train.py`` job, read safely
(legacy-tsa.md §15), and checked against the dimensions a legacy ``state_dict`` fixes.

The one reader of legacy hyperparameters, used by ``tsa-convert``, ``tsa-verify`` and
:meth:`lightning_port.module._TSAModule.from_config`:

- :func:`read_hyperparameters`: SageMaker's ``hyperparameters.json`` (or a dict) -> typed legacy
  hyperparameters. Values are parsed with ``train.py``'s argparse types (SageMaker stores every value
  as a string, older SDKs JSON-quote them twice: ``"\\"OrderFeature\\""``); absent keys take
  ``train.py``'s defaults (§15); keys ``train.py`` does not know are ignored (and listed). A bad value
  is refused in one line naming the key. :func:`coerce_hyperparameters` is the same parsing without
  the defaults (``from_config``: absent keys keep the constructor's defaults).
- :func:`check_state_dict`: the hyperparameters against the dimensions a ``state_dict`` fixes
  (embedding table, feature counts, layers, experts, classes); every disagreeing key is named.

Every user-facing failure is a :class:`LegacyJobError` (also the error of :mod:`lightning_port.legacy_files`
and :mod:`lightning_port.legacy_job`): one line, no traceback (the CLIs exit 2). This module reads JSON
only: it imports nothing that opens tarballs or pickles, so the model core may use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MODELNAMES",
    "TRAIN_PY",
    "LegacyHyperparameters",
    "LegacyJobError",
    "check_state_dict",
    "coerce_hyperparameters",
    "load_json_object",
    "read_hyperparameters",
    "state_dict_dims",
]


class LegacyJobError(ValueError):
    """A user's legacy job cannot be read as it is: one line naming the file or key and what was expected."""


# ------------------------------------------------------------------------------- hyperparameters
# train.py's arguments: name -> (argparse type, default). §15 lists the defaults; keys not listed
# there but read by this project have default None ("not given": the port's own default applies).
TRAIN_PY: dict[str, tuple[type, Any]] = {
    "modelname": (str, "OrderFeature"),
    "num_seq": (int, None),  # "2" with TwoSeqMoEOrderFeature; its default is not recorded (checked only when given)
    "n_cat_features": (int, 53),
    "n_num_features": (int, 47),
    "n_embedding": (int, 1352),
    "seq_len": (int, 51),
    "n_classes": (int, 2),
    "n_engineered_num_features": (int, 0),
    "dim_embedding_table": (int, 128),
    "dim_attn_feedforward": (int, 64),
    "num_heads": (int, 1),
    "n_layers_order": (int, 6),
    "n_layers_feature": (int, 6),
    "emb_tbl_use_bias": (int, 1),
    "dropout": (float, 0.1),
    "use_time_seq": (int, 1),
    "use_moe": (int, 1),
    "num_experts": (int, 1),
    "use_mlp": (int, 1),  # the legacy model cannot build use_mlp=1 (NameError): see read_hyperparameters
    "loss": (str, "CrossEntropyLoss"),
    "loss_reduction": (str, "mean"),
    "gamma": (float, None),  # FocalLoss arguments, when the job's train.py had them
    "alpha": (float, None),
    "lr": (float, 1e-5),
    "scheduler_maxlr": (float, 1e-3),
    "max_epoch": (int, 70),
    "patience": (int, 10),
    "batch_size": (int, 1024),
    "use_amp": (int, 0),
    "seed": (int, 0),
    "test_name": (str, None),
}
MODELNAMES = {"OrderFeature": "single", "TwoSeqMoEOrderFeature": "dual"}
FLAGS = ("emb_tbl_use_bias", "use_time_seq", "use_moe", "use_mlp", "use_amp")
MODEL_KEYS = ("n_cat_features", "n_num_features", "n_classes", "n_embedding", "seq_len", "n_engineered_num_features",
              "dim_embedding_table", "dim_attn_feedforward", "num_heads", "dropout", "n_layers_order",
              "n_layers_feature", "emb_tbl_use_bias", "use_moe", "num_experts", "use_time_seq")
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}


def _unquote(raw: str) -> str:
    """Older SageMaker SDKs JSON-encode each value before storing it as a string: ``"\\"OrderFeature\\""``."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        with contextlib.suppress(json.JSONDecodeError):
            inner = json.loads(text)
            if isinstance(inner, str):
                return inner.strip()
    return text


def _parse(key: str, raw: Any, typ: type, where: str) -> Any:
    """One value with train.py's argparse type; typed values (a config dict) are accepted as they are."""
    want = _TYPE_WORDS[typ]

    def bad(extra: str = "") -> LegacyJobError:
        shown = raw if not isinstance(raw, str) else repr(raw)
        return LegacyJobError(f"{where}: {key} = {shown} is not {want}{extra} (train.py parses it with {typ.__name__})")

    if isinstance(raw, str):
        text = _unquote(raw)
        if typ is str:
            return text
        try:
            value = int(text) if typ is int else float(text)
        except ValueError:
            raise bad() from None
        if typ is float and not math.isfinite(value):
            raise bad(" (finite)")
        return value
    if isinstance(raw, bool):
        if typ is int:  # a typed config's true/false for the 0/1 flags
            return int(raw)
        raise bad()
    if isinstance(raw, int):
        return raw if typ is int else float(raw) if typ is float else str(raw)
    if isinstance(raw, float):
        if typ is float:
            if not math.isfinite(raw):
                raise bad(" (finite)")
            return raw
        if typ is int and raw.is_integer():
            return int(raw)
        raise bad()
    raise bad()


def coerce_hyperparameters(values: Mapping[str, Any], where: str = "hyperparameters") -> dict[str, Any]:
    """``values`` with every ``train.py`` key parsed by its type (strings, SageMaker's double quoting,
    typed values); other keys are returned untouched, absent keys stay absent, ``None`` stays ``None``."""
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if key in TRAIN_PY and raw is not None:
            out[key] = _parse(key, raw, TRAIN_PY[key][0], where)
        else:
            out[key] = raw
    return out


@dataclass(frozen=True)
class LegacyHyperparameters:
    """A legacy job's hyperparameters, typed, every ``train.py`` key present (absent ones by default).

    ``explicit``: the keys the source gave; ``ignored``: keys ``train.py`` does not know."""

    values: dict[str, Any]
    explicit: frozenset[str]
    source: str
    ignored: tuple[str, ...] = ()

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key)
        return default if value is None else value

    def origin(self, key: str) -> str:
        """Where a value comes from, for messages."""
        if key in self.explicit:
            return f"from {self.source}"
        return f"train.py's default: {key} is absent from {self.source}"

    @property
    def kind(self) -> str:
        return MODELNAMES[self.values["modelname"]]

    @property
    def uses_moe(self) -> bool:
        """True when the MoE coin flips can change a score (MoE with at least two experts)."""
        return bool(self.values["use_moe"]) and int(self.values["num_experts"]) > 1

    def constructor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the legacy model's constructor (``reference.build_model``)."""
        kw = {k: self.values[k] for k in MODEL_KEYS}
        kw["use_moe"], kw["use_time_seq"] = bool(kw["use_moe"]), bool(kw["use_time_seq"])
        if self.kind == "single":
            kw["use_mlp"] = self.values["use_mlp"]
        return kw

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the port LightningModule (legacy names; training keys mapped the way
        the legacy ``set_loss`` / optimizer read them), plus ``modelname``."""
        v = self.values
        kw = {k: v[k] for k in MODEL_KEYS}
        kw["use_moe"], kw["use_time_seq"] = bool(kw["use_moe"]), bool(kw["use_time_seq"])
        kw.update(modelname=v["modelname"], lr=v["lr"], scheduler_maxlr=v["scheduler_maxlr"],
                  max_epochs=v["max_epoch"], loss=v["loss"])
        if v["loss"] == "FocalLoss":  # legacy set_loss passes loss_reduction to FocalLoss only
            kw["loss_reduction"] = v["loss_reduction"]
        if v.get("gamma") is not None:
            kw["loss_gamma"] = v["gamma"]
        if v.get("alpha") is not None:
            kw["loss_alpha"] = v["alpha"]
        return kw

    def as_dict(self) -> dict[str, Any]:
        """For reports: every value, and which were absent (defaulted)."""
        return {"values": dict(self.values), "defaulted": sorted(set(self.values) - self.explicit),
                "ignored_keys": list(self.ignored), "source": self.source}


def load_json_object(path: Path) -> dict[str, Any]:
    """A hyperparameter file's flat JSON object (a saved DescribeTrainingJob answer: its ``HyperParameters``)."""
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise LegacyJobError(f"{path}: no such hyperparameter file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LegacyJobError(f"{path}: not a JSON file ({msg}); expected SageMaker's hyperparameters.json") from None
    if isinstance(values, dict) and isinstance(values.get("HyperParameters"), dict):
        values = values["HyperParameters"]  # a saved DescribeTrainingJob answer
    if not isinstance(values, dict):
        raise LegacyJobError(f"{path}: holds a JSON {type(values).__name__}; expected a flat JSON object of "
                             "train.py hyperparameters")
    return values


def read_hyperparameters(source: str | os.PathLike | Mapping[str, Any], *, where: str | None = None
                         ) -> LegacyHyperparameters:
    """SageMaker's ``hyperparameters.json`` (a path) or a dict -> :class:`LegacyHyperparameters`.

    Absent keys take train.py's defaults (§15). Refused in one line: a value train.py's type cannot
    parse, an unknown ``modelname``, ``num_seq`` disagreeing with ``modelname``, and ``use_mlp`` 1 on
    the single model (given, or absent so that train.py's default 1 applies): the legacy model raises
    NameError for it, so no job with that file could have run.
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), where or "hyperparameters"
    else:
        raw, where = load_json_object(Path(source)), where or str(source)
    if not all(isinstance(k, str) for k in raw):
        raise LegacyJobError(f"{where}: keys must be strings")
    typed = coerce_hyperparameters({k: v for k, v in raw.items() if k in TRAIN_PY}, where)
    explicit = frozenset(k for k, v in typed.items() if v is not None)
    values = {k: (typed[k] if typed.get(k) is not None else default) for k, (_, default) in TRAIN_PY.items()}
    ignored = tuple(sorted(k for k in raw if k not in TRAIN_PY))
    hp = LegacyHyperparameters(values, explicit, where, ignored)

    name = values["modelname"]
    if name not in MODELNAMES:
        raise LegacyJobError(f"{where}: modelname = {name!r}; expected OrderFeature (single sequence) or "
                             "TwoSeqMoEOrderFeature (customer + card sequences)")
    if values["num_seq"] is not None and values["num_seq"] != (2 if hp.kind == "dual" else 1):
        raise LegacyJobError(f"{where}: num_seq = {values['num_seq']} disagrees with modelname = {name!r} "
                             f"(expected num_seq {2 if hp.kind == 'dual' else 1})")
    for flag in FLAGS:
        if values[flag] not in (0, 1):
            raise LegacyJobError(f"{where}: {flag} = {values[flag]}; expected 0 or 1")
    if hp.kind == "single" and values["use_mlp"]:
        if "use_mlp" in explicit:
            raise LegacyJobError(f"{where}: use_mlp = 1: the legacy model cannot build it (NameError: MLPBlock is "
                                 "undefined), so no legacy job ran with it; expected 0")
        raise LegacyJobError(f"{where}: use_mlp is absent, so train.py's default 1 applies, which the legacy model "
                             "cannot build (NameError: MLPBlock is undefined): a job with this file could not have "
                             'run; if yours did, its use_mlp was 0: add "use_mlp": "0"')
    for key in ("n_cat_features", "n_num_features", "n_embedding", "seq_len", "dim_embedding_table",
                "dim_attn_feedforward", "num_heads", "num_experts", "batch_size", "max_epoch"):
        if values[key] < 1:
            raise LegacyJobError(f"{where}: {key} = {values[key]}; expected an integer >= 1")
    for key in ("n_engineered_num_features", "n_layers_order", "n_layers_feature"):
        if values[key] < 0:
            raise LegacyJobError(f"{where}: {key} = {values[key]}; expected an integer >= 0")
    if values["n_classes"] < 2:
        raise LegacyJobError(f"{where}: n_classes = {values['n_classes']}; expected an integer >= 2")
    if not 0.0 <= values["dropout"] < 1.0:
        raise LegacyJobError(f"{where}: dropout = {values['dropout']}; expected a number in [0, 1)")
    return hp


# ------------------------------------------------------------------- state_dict vs hyperparameters
def _layers(sd: Mapping[str, Any], prefix: str) -> tuple[int, str]:
    idx = [int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return (max(idx) + 1 if idx else 0), (f"{prefix}{max(idx)}.*" if idx else f"no {prefix}* keys")


def state_dict_dims(sd: Mapping[str, Any], kind: str) -> dict[str, tuple[Any, str]]:
    """What a legacy state_dict fixes: ``{hyperparameter: (value, evidence)}``. ``num_heads``,
    ``seq_len``, ``dropout`` and ``use_time_seq`` leave no trace in the weights and are not listed."""
    order = "order_attention." if kind == "single" else "order_attention_cid."
    out: dict[str, tuple[Any, str]] = {}

    def shape(key: str) -> tuple[int, ...] | None:
        t = sd.get(key)
        return None if t is None else tuple(t.shape)

    if (s := shape("embedding.weight")) is not None and len(s) == 2:
        out["n_embedding"] = (s[0] - 2, f"embedding.weight has {s[0]} rows = n_embedding + 2")
        out["dim_embedding_table"] = (s[1], f"embedding.weight has width {s[1]}")
    if (s := shape("embedding_engineered.weight")) is not None and len(s) == 2:
        out["n_engineered_num_features"] = (s[0] - 1, f"embedding_engineered.weight has {s[0]} rows = "
                                                      "n_engineered_num_features + 1")
    for key, name in (("n_cat_features", "cat"), ("n_num_features", "num")):
        k = f"{order}feature_aggregation_{name}.encoder.0.weight"
        if (s := shape(k)) is not None and len(s) == 2:
            out[key] = (s[1], f"{k} has {s[1]} inputs")
    if (s := shape("clf.3.weight")) is not None and len(s) == 2:
        out["n_classes"] = (s[0], f"clf.3.weight has {s[0]} outputs")
    n, ev = _layers(sd, f"{order}layer_stack.")
    out["n_layers_order"] = (n, ev)
    n, ev = _layers(sd, "feature_attention.layer_stack_feature.")
    out["n_layers_feature"] = (n, ev)
    out["emb_tbl_use_bias"] = (int(f"{order}emb_tbl_bias" in sd),
                               f"{order}emb_tbl_bias is {'present' if f'{order}emb_tbl_bias' in sd else 'absent'}")
    w1 = f"{order}layer_stack.0.feedforward.experts.w1"
    ff = f"{order}layer_stack.0.feedforward.0.weight"
    if (s := shape(w1)) is not None and len(s) == 3:
        out["use_moe"] = (1, f"{w1} is present")
        out["num_experts"] = (s[0], f"{w1} has {s[0]} experts")
        out["dim_attn_feedforward"] = (s[2], f"{w1} has shape {s}")
    elif (s := shape(ff)) is not None and len(s) == 2:
        out["use_moe"] = (0, f"{ff} is present (a plain feed-forward)")
        out["dim_attn_feedforward"] = (s[0], f"{ff} has shape {s}")
    return out


def check_state_dict(hp: LegacyHyperparameters, sd: Mapping[str, Any], source: str = "SOURCE") -> None:
    """Refuse, naming every disagreeing key, hyperparameters that do not fit the state_dict's dimensions."""
    from .weight_map import infer_kind

    found = infer_kind(sd)
    if found != hp.kind:
        raise LegacyJobError(f"{source}: holds a {found} model but modelname = {hp['modelname']!r} "
                             f"({hp.origin('modelname')}) asks for a {hp.kind} one")
    problems = []
    dims = state_dict_dims(sd, hp.kind)
    for key, (value, evidence) in dims.items():
        have = hp[key]
        if key == "num_experts" and not hp["use_moe"]:
            continue
        if key in ("num_experts", "dim_attn_feedforward") and dims.get("use_moe", (None,))[0] != int(bool(hp["use_moe"])):
            continue  # the use_moe disagreement is the one to report
        if int(have) != int(value):
            problems.append(f"{key} = {have} ({hp.origin(key)}) but {evidence}")
    if problems:
        raise LegacyJobError(f"{source}: the hyperparameters do not fit the state_dict: " + "; ".join(problems))
