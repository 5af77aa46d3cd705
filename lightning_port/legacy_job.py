"""What a legacy SageMaker training job left behind, opened safely (legacy-tsa.md §12-§15).

:func:`open_job`: SOURCE = ``model.tar.gz``, a model folder or a model file -> a :class:`LegacyJob`
(the model file, ``hyperparameters.json`` inside or beside, the legacy output files). Tar members
with absolute paths, ``..``, links, devices or fifos are refused; only the needed members are
extracted, into a private ``tempfile.mkdtemp()`` folder removed on exit. Shared by ``tsa-convert``
and ``tsa-verify``.

What the job's files hold is read elsewhere, and re-exported here under the names this module has always
had: the hyperparameters by :mod:`lightning_port.legacy_hparams` (:func:`read_hyperparameters`,
:func:`coerce_hyperparameters`, :func:`check_state_dict`), the score, tag and percentile files by
:mod:`lightning_port.legacy_files` (:func:`read_score_file`, :func:`read_tag_file`,
:func:`read_percentile_table`).

Every user-facing failure is a :class:`LegacyJobError`: one line, no traceback (the CLIs exit 2).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .legacy_files import LEGACY_OUTPUTS, read_percentile_table, read_score_file, read_tag_file
from .legacy_hparams import (
    MODELNAMES,
    TRAIN_PY,
    LegacyHyperparameters,
    LegacyJobError,
    _parse,
    check_state_dict,
    coerce_hyperparameters,
    load_json_object,
    read_hyperparameters,
    state_dict_dims,
)

__all__ = [
    "LEGACY_OUTPUTS",
    "MODELNAMES",
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

HPARAMS_NAME = "hyperparameters.json"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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
                raw = load_json_object(hp_path).get("test_name")
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
