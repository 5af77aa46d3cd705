"""What a legacy SageMaker training job left behind, read safely (legacy-tsa.md §12-§15).

One reader per kind of thing, shared by ``tsa-convert``, ``tsa-verify`` and ``from_config``:

- :func:`read_hyperparameters`: SageMaker's ``hyperparameters.json`` (or a dict) -> typed legacy
  hyperparameters. Values are parsed with ``train.py``'s argparse types (SageMaker stores every value
  as a string, older SDKs JSON-quote them twice: ``"\\"OrderFeature\\""``); absent keys take
  ``train.py``'s defaults (§15); keys ``train.py`` does not know are ignored (and listed). A bad value
  is refused in one line naming the key. :func:`coerce_hyperparameters` is the same parsing without
  the defaults (``from_config``: absent keys keep the constructor's defaults).
- :func:`check_state_dict`: the hyperparameters against the dimensions a ``state_dict`` fixes
  (embedding table, feature counts, layers, experts, classes); every disagreeing key is named.
- :func:`open_job`: SOURCE = ``model.tar.gz``, a model folder or a model file -> a :class:`LegacyJob`
  (the model file, ``hyperparameters.json`` inside or beside, the legacy score files). Tar members
  with absolute paths, ``..``, links, devices or fifos are refused; only the needed members are
  extracted, into a private ``tempfile.mkdtemp()`` folder removed on exit.
- :func:`read_score_file`, :func:`read_tag_file`, :func:`read_percentile_table`: the legacy outputs;
  ``percentile_score.pkl`` is read with a restricted unpickler that only rebuilds numpy scalars.

Every user-facing failure is a :class:`LegacyJobError`: one line, no traceback (the CLIs exit 2).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

__all__ = [
    "LEGACY_OUTPUTS",
    "TRAIN_PY",
    "LegacyHyperparameters",
    "LegacyJob",
    "LegacyJobError",
    "check_state_dict",
    "coerce_hyperparameters",
    "open_job",
    "read_hyperparameters",
    "read_percentile_table",
    "read_score_file",
    "read_tag_file",
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


def _load_json_object(path: Path) -> dict[str, Any]:
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
        raw, where = _load_json_object(Path(source)), where or str(source)
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


# ---------------------------------------------------------------------------------- legacy outputs
LEGACY_OUTPUTS = ("score_file.csv", "tag_file.csv", "cali_score_file.csv", "cali_tag_file.csv", "percentile_score.pkl")
HPARAMS_NAME = "hyperparameters.json"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_column(path: Path, dtype, expected: str, expected_columns: str) -> np.ndarray:
    """One value per line -> 1-d array; unreadable text or several columns is a one-line LegacyJobError."""
    try:
        values = np.loadtxt(path, dtype=dtype, ndmin=1, comments=None)
    except (ValueError, OSError) as e:
        raise LegacyJobError(f"{path}: {_first_line(e)}; expected {expected}") from None
    if values.ndim != 1:
        raise LegacyJobError(f"{path}: {values.shape[1]} columns; expected {expected_columns}")
    return values


def read_score_file(path: str | os.PathLike) -> np.ndarray:
    """A legacy ``*score_file.csv``: one ``str(np.float32(v))`` per line -> float32 array (NaN kept)."""
    return _read_column(Path(path), np.float32, "one score per line", "one score per line")


def read_tag_file(path: str | os.PathLike) -> np.ndarray:
    """A legacy ``*tag_file.csv``: one integer label per line -> int64 array."""
    path = Path(path)
    values = _read_column(path, np.float64, "one integer label per line", "one label per line")
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        line = int(np.flatnonzero(bad)[0])
        raise LegacyJobError(f"{path}: line {line + 1} holds {values[line]!r}; expected an integer label")
    return values.astype(np.int64)


def _numpy_scalar_constructor() -> Any:
    core = getattr(np, "_core", None)
    if core is not None:
        return core.multiarray.scalar
    return np.core.multiarray.scalar  # pragma: no cover - numpy < 2


class _PercentileUnpickler(pickle.Unpickler):
    """Rebuilds only plain containers, numbers and numpy scalars (``numpy.dtype`` + ``multiarray.scalar``;
    ``_codecs.encode`` carries their bytes in protocol-2 pickles). Anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "scalar" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_scalar_constructor()
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_percentile_table(path: str | os.PathLike, rows: int = 1000) -> np.ndarray:
    """``percentile_score.pkl`` -> float64 array (rows, 2) of ``[percentile value, k / rows]``.

    Read with a restricted unpickler (numpy scalars only, never code). Refused in one line: a pickle
    asking for any other global, or a table that is not ``rows`` pairs of numbers."""
    path = Path(path)
    try:
        data = path.read_bytes()
        table = _PercentileUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise LegacyJobError(f"{path}: refused: {_first_line(e)} (a percentile table holds only numbers; the "
                             "file was not unpickled further)") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise LegacyJobError(f"{path}: damaged or not a pickle ({type(e).__name__}: {_first_line(e)})") from None
    try:
        arr = np.asarray([[float(a), float(b)] for a, b in table], dtype=np.float64)
    except (TypeError, ValueError):
        raise LegacyJobError(f"{path}: expected a list of [percentile value, fraction] pairs of numbers") from None
    if arr.shape != (rows, 2):
        raise LegacyJobError(f"{path}: {len(arr)} rows; expected {rows} ([np.percentile(cali, 100 k / {rows}), "
                             f"k / {rows}] for k = 0..{rows - 1})")
    if not np.allclose(arr[:, 1], np.arange(rows) / rows, rtol=0, atol=1e-12):
        raise LegacyJobError(f"{path}: the fractions are not k / {rows} for k = 0..{rows - 1}")
    return arr


# ------------------------------------------------------------------------------------ the SOURCE
@dataclass
class LegacyJob:
    """What SOURCE holds. Paths point into SOURCE (folder, file) or into the private extraction
    folder of a tarball, which exists until :func:`open_job`'s context ends."""

    source: str
    source_kind: str  # "tarball", "folder" or "file"
    model: Path
    model_name: str  # the name inside SOURCE (tar member, file name)
    hparams: Path | None
    hparams_where: str  # "--hparams", "inside SOURCE", "beside SOURCE", "" (none)
    outputs: dict[str, Path] = field(default_factory=dict)  # LEGACY_OUTPUTS found, by name
    extras: list[str] = field(default_factory=list)  # other files seen (e.g. the training curve PNG)
    notes: list[str] = field(default_factory=list)


def _is_tarball(path: Path) -> bool:
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return True
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _member_parts(m: tarfile.TarInfo, source: str) -> tuple[str, ...]:
    """Normalised path components of a tar member; hostile members are refused (one line)."""
    name = m.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise LegacyJobError(f"{source}: refused: member {name!r} has an absolute path; a tarball with absolute "
                             "paths, '..', links or devices is not extracted")
    parts = tuple(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", "."))
    if ".." in parts:
        raise LegacyJobError(f"{source}: refused: member {name!r} climbs out with '..'; a tarball with absolute "
                             "paths, '..', links or devices is not extracted")
    if m.issym() or m.islnk():
        what = "a symbolic link" if m.issym() else "a hard link"
        raise LegacyJobError(f"{source}: refused: member {name!r} is {what} (to {m.linkname!r}); a tarball with "
                             "links, devices, absolute paths or '..' is not extracted")
    if m.ischr() or m.isblk() or m.isfifo():
        what = "a fifo" if m.isfifo() else "a device"
        raise LegacyJobError(f"{source}: refused: member {name!r} is {what}; a tarball with devices, fifos, "
                             "links, absolute paths or '..' is not extracted")
    if not (m.isfile() or m.isdir()):
        raise LegacyJobError(f"{source}: refused: member {name!r} is not a plain file or folder (tar type "
                             f"{m.type!r})")
    return parts


def _pick_model(names: list[str], test_name: str | None, source: str) -> tuple[str, list[str]]:
    """The model file among candidate names: ``{test_name}.pt`` when known and present; else the single
    plain state_dict by legacy naming (§14: ``*_checkpoint.pt`` and ``checkpoint.pt`` are training /
    early-stopping files); else the single candidate of any format."""
    notes: list[str] = []
    cands = sorted(n for n in names if n.endswith((".pt", ".pth")))
    if not cands:
        raise LegacyJobError(f"{source}: no model file (*.pt) in it; expected {{test_name}}.pt, the legacy state_dict")
    if test_name:
        want = f"{test_name}.pt"
        if want in cands:
            return want, notes
        notes.append(f"test_name {test_name!r}: no {want} in SOURCE")
    plain = [n for n in cands if not (n == "checkpoint.pt" or n.endswith("_checkpoint.pt"))]
    if len(plain) == 1:
        return plain[0], notes
    if not plain and len(cands) == 1:
        return cands[0], notes
    listed = ", ".join(plain or cands)
    raise LegacyJobError(f"{source}: several candidate models ({listed}); name one with --test-name (the job's "
                         "test_name, file {test_name}.pt) or give the .pt file as SOURCE")


def _copy_member(tar: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, source: str) -> Path:
    fh = tar.extractfile(m)
    if fh is None:  # pragma: no cover - only files are extracted
        raise LegacyJobError(f"{source}: member {m.name!r} cannot be read")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with fh, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(fh, out, 1 << 20)
    return dest


@contextlib.contextmanager
def open_job(source: str | os.PathLike, hparams: str | os.PathLike | None = None,
             test_name: str | None = None) -> Iterator[LegacyJob]:
    """Open SOURCE (``model.tar.gz``, a model folder or a model file) as a :class:`LegacyJob`.

    ``hyperparameters.json``: ``hparams`` when given, else inside SOURCE (tarball, folder), else beside
    it (the folder holding the tarball or file, or the parent of the folder). The model file:
    ``{test_name}.pt`` (``test_name`` given, or read from that hyperparameters file), else the single
    plain state_dict (see :func:`_pick_model`). The legacy outputs (:data:`LEGACY_OUTPUTS`) are taken
    from a tarball or folder, not from beside a single file.
    """
    path = Path(source)
    src = str(source)
    if not path.exists():
        raise LegacyJobError(f"{src}: no such file or folder; expected model.tar.gz, a model folder or a .pt file")
    tmp: str | None = None
    try:
        hp_given = Path(hparams) if hparams is not None else None
        if hp_given is not None and not hp_given.is_file():
            raise LegacyJobError(f"{hp_given}: no such hyperparameter file")

        def beside(folder: Path) -> Path | None:
            cand = folder / HPARAMS_NAME
            return cand if cand.is_file() else None

        def resolve_test_name(hp_path: Path | None) -> str | None:
            if test_name or hp_path is None:
                return test_name
            with contextlib.suppress(LegacyJobError):
                raw = _load_json_object(hp_path).get("test_name")
                if raw is not None:
                    return _parse("test_name", raw, str, str(hp_path))
            return None

        if path.is_dir():
            names = sorted(p.name for p in path.iterdir() if p.is_file())
            hp_in = path / HPARAMS_NAME if HPARAMS_NAME in names else None
            hp_path, where = _hparams_choice(hp_given, hp_in, beside(path.resolve().parent))
            model_name, notes = _pick_model(names, resolve_test_name(hp_path), src)
            outputs = {n: path / n for n in LEGACY_OUTPUTS if n in names}
            extras = [n for n in names if n not in outputs and n != model_name and n != HPARAMS_NAME]
            yield LegacyJob(src, "folder", path / model_name, model_name, hp_path, where, outputs, extras, notes)
            return
        if _is_tarball(path):
            try:
                tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the with block below
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise LegacyJobError(f"{src}: not a readable tar archive ({_first_line(e)})") from None
            with tar:
                try:
                    members = tar.getmembers()
                except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                    raise LegacyJobError(f"{src}: the tar archive is damaged ({_first_line(e)})") from None
                index: dict[str, list[tarfile.TarInfo]] = {}
                for m in members:
                    parts = _member_parts(m, src)  # every member is checked, needed or not
                    if m.isfile() and parts:
                        index.setdefault(parts[-1], []).append(m)
                dup = sorted(n for n, ms in index.items() if len(ms) > 1)
                tmp = tempfile.mkdtemp(prefix="tsa-legacy-job-")  # private (mode 0700), removed below
                folder = Path(tmp)

                def take(name: str) -> Path:
                    if name in dup:
                        raise LegacyJobError(f"{src}: {name} is in the archive more than once "
                                             f"({', '.join(m.name for m in index[name])})")
                    return _copy_member(tar, index[name][0], folder / name, src)

                try:
                    hp_in = take(HPARAMS_NAME) if HPARAMS_NAME in index else None
                    hp_path, where = _hparams_choice(hp_given, hp_in, beside(path.resolve().parent))
                    model_name, notes = _pick_model(list(index), resolve_test_name(hp_path), src)
                    model = take(model_name)
                    outputs = {n: take(n) for n in LEGACY_OUTPUTS if n in index}
                except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                    raise LegacyJobError(f"{src}: the tar archive is damaged ({_first_line(e)})") from None
                extras = sorted(n for n in index if n not in outputs and n != model_name and n != HPARAMS_NAME)
            yield LegacyJob(src, "tarball", model, model_name, hp_path, where, outputs, extras, notes)
            return
        hp_path, where = _hparams_choice(hp_given, None, beside(path.resolve().parent))
        yield LegacyJob(src, "file", path, path.name, hp_path, where, {}, [], [])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _hparams_choice(given: Path | None, inside: Path | None, beside: Path | None) -> tuple[Path | None, str]:
    if given is not None:
        return given, "--hparams"
    if inside is not None:
        return inside, "inside SOURCE"
    if beside is not None:
        return beside, "beside SOURCE"
    return None, ""
