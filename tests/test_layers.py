"""The project's layers, read from the source (ast; nothing is imported): imports only go downward, every
comparison names its tolerance from one of the two tables, and README's "Layout" table is the tree.

Layers, top to bottom: ``benchmarks`` / ``tests`` -> ``parity`` (the harness and ``tsa-verify``) ->
``lightning_port`` tools (CLIs, converter, serving, legacy files, trainer, data) -> the model core
(:data:`CORE`) -> nothing of the project. ``reference`` (the legacy model) stands alone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("reference", "lightning_port", "parity", "benchmarks", "tests")
# the model core: the networks, the LightningModules and what they are built from
CORE = {"lightning_port", "lightning_port.config", "lightning_port.module", "lightning_port.losses",
        "lightning_port.weight_map", "lightning_port.legacy_hparams", "lightning_port.tolerances"}
TABLES = {"lightning_port/tolerances.py", "parity/tolerances.py"}  # the two tolerance tables


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _is_core(module: str) -> bool:
    return module in CORE or module == "lightning_port.nn" or module.startswith("lightning_port.nn.")


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (inside functions too), relative imports resolved; ``from X import y``
    counts as ``X`` and, when ``X.y`` is a module of the project, as ``X.y``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or (ROOT / Path(*sub.split("."))).is_dir():
                    out.add(sub)
    return out


def _project_imports(path: Path) -> set[str]:
    return {m for m in imports(path) if m.split(".")[0] in PROJECT}


# ---- imports only downward --------------------------------------------------------------------------
def test_the_import_reader_sees_relative_lazy_and_from_imports():
    mods = imports(ROOT / "lightning_port" / "serving" / "score.py")
    assert {"lightning_port.legacy_files", "lightning_port.serving.calibration", "lightning_port.module",
            "lightning_port.data"} <= mods  # ``from ..module import key_padding_mask`` sits inside a function
    assert "parity.verify.job" in imports(ROOT / "parity" / "verify" / "__init__.py")


@pytest.mark.parametrize("path", _sources("lightning_port"), ids=lambda p: str(p.relative_to(ROOT)))
def test_lightning_port_imports_neither_the_harness_nor_the_benchmarks(path):
    bad = sorted(m for m in _project_imports(path) if m.split(".")[0] in ("parity", "benchmarks", "tests"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: lightning_port is below parity and benchmarks"


@pytest.mark.parametrize("path", [p for p in _sources("lightning_port") if _is_core(_module_name(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_model_core_imports_only_the_model_core(path):
    bad = sorted(m for m in _project_imports(path) if not _is_core(m))
    assert not bad, (f"{path.relative_to(ROOT)} (model core) imports {bad}: the core imports no tool module "
                     "(cli, convert, serving, legacy files, trainer, data, ...) and not reference/")


@pytest.mark.parametrize("path", _sources("reference"), ids=lambda p: str(p.relative_to(ROOT)))
def test_reference_imports_nothing_of_the_port_or_the_harness(path):
    bad = sorted(m for m in _project_imports(path) if m.split(".")[0] != "reference")
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: reference/ is the legacy model, on its own"


@pytest.mark.parametrize("path", _sources("parity"), ids=lambda p: str(p.relative_to(ROOT)))
def test_parity_imports_no_benchmarks_or_tests(path):
    bad = sorted(m for m in _project_imports(path) if m.split(".")[0] in ("benchmarks", "tests"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_core_list_names_real_modules():
    for m in CORE:
        p = ROOT / Path(*m.split("."))
        assert p.with_suffix(".py").is_file() or (p / "__init__.py").is_file(), m


def _toml_section(name: str) -> dict[str, str]:
    """``key = "value"`` lines of one section of pyproject.toml (tomllib is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text().split(f"\n[{name}]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]*)"', text, re.M))


def _setuptools_packages() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text().split("\n[tool.setuptools.packages.find]\n", 1)[1]
    return re.findall(r'"([\w*]+)"', text.split("\n[", 1)[0])


def test_console_scripts_point_at_their_modules():
    scripts = _toml_section("project.scripts")
    assert scripts["tsa-verify"] == "parity.verify.cli:main"
    for target in scripts.values():
        module, _, func = target.partition(":")
        tree = ast.parse((ROOT / Path(*module.split("."))).with_suffix(".py").read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), target


# ---- one tolerance source ------------------------------------------------------------------------------
def _product_sources() -> list[Path]:
    return [p for pkg in ("lightning_port", "parity") for p in _sources(pkg)
            if str(p.relative_to(ROOT)) not in TABLES]


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _is_text(node: ast.AST | None) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def tolerance_problems(path: Path) -> list[str]:
    """Comparisons of ``path`` that do not name their tolerance from a table."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name.rsplit(".", 1)[-1] == "Tolerance":
                reason = node.args[2] if len(node.args) > 2 else next(
                    (k.value for k in node.keywords if k.arg == "reason"), None)
                if reason is None or _is_text(reason):
                    out.append(f"line {node.lineno}: Tolerance(...) with its reason written here (or none): "
                               "name one from parity/tolerances.py or lightning_port/tolerances.py")
            if name.rsplit(".", 1)[-1] in ("allclose", "isclose", "assert_close", "assert_allclose"):
                out.append(f"line {node.lineno}: {name}(...) with its own tolerance: use the tables' rule "
                           "(lightning_port.tolerances.close / parity.compare)")
        if isinstance(node, ast.ClassDef) and node.name in ("Tol", "Tolerance"):
            out.append(f"line {node.lineno}: class {node.name}: a second tolerance type")
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("_REASON")
                                                for t in node.targets) and _is_text(node.value):
            out.append(f"line {node.lineno}: a tolerance reason defined outside the tables")
    return out


@pytest.mark.parametrize("path", _product_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_comparison_names_its_tolerance_from_a_table(path):
    problems = tolerance_problems(path)
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_tolerance_check_sees_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('from x import Tolerance\nimport numpy as np\nT = Tolerance(0.0, 1e-3, "because")\n'
                   'U = Tolerance(0.0, 1e-3)\nok = np.allclose(1, 1, atol=1e-3)\nX_REASON = "text"\n'
                   'V = Tolerance(0.0, 1e-3, X_REASON)\n')
    problems = tolerance_problems(bad)
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 6"]


def test_the_port_and_the_harness_share_one_tolerance_type():
    import lightning_port.tolerances as port
    import parity.tolerances as harness

    assert harness.Tolerance is port.Tolerance
    assert harness.tolerance_for("verify.legacy_model") is port.LEGACY_VS_PORT  # tsa-verify = tsa-convert --verify
    assert harness.tolerance_for("onnx.int8_probs") is port.ONNX_INT8


# ---- README "Layout" is the tree ------------------------------------------------------------------------
def layout_rows() -> dict[str, list[str]]:
    """README's "## Layout" table: ``{folder: [backticked names in its row]}``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`") and cells[0].endswith("/`"):
            rows[cells[0].strip("`").rstrip("/")] = re.findall(r"`([^`]+)`", " | ".join(cells[1:]))
    return rows


def _child(folder: Path, name: str) -> bool:
    """``name`` (``x``, ``x/``, ``x/y``) is a module, page, file or folder under ``folder``."""
    p = folder / name.rstrip("/")
    if name.endswith("/"):
        return p.is_dir()
    return any(p.with_suffix(s).is_file() for s in (".py", ".md", ".yaml")) or p.is_file()


def _listed_children(folder: Path) -> set[str]:
    if folder.name == "docs":
        return {p.stem for p in folder.glob("*.md")}
    mods = {p.stem for p in folder.glob("*.py") if not p.name.startswith("__")}  # not __init__, __main__
    return mods | {p.name + "/" for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}


def test_readme_layout_has_a_row_for_every_top_level_folder():
    rows = layout_rows()
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
               and any(p.rglob("*.*")) and p.name not in ("reports", "build", "dist", "runs", "lightning_logs")
               and not p.name.endswith(".egg-info")}
    assert set(rows) == folders, f"README Layout rows {sorted(rows)} vs the tree's folders {sorted(folders)}"


def test_readme_layout_names_only_what_exists_and_every_module_of_the_packages():
    rows = layout_rows()
    complete = {p.rstrip("*") for p in _setuptools_packages()} | {"docs"}
    assert complete >= {"reference", "lightning_port", "parity"}
    for folder, names in rows.items():
        missing = [n for n in names if not _child(ROOT / folder, n)]
        assert not missing, f"README Layout, {folder}/: {missing} do not exist"
        if folder in complete:
            listed = {n.split("/")[0] + "/" if "/" in n.rstrip("/") else n for n in names}
            unlisted = sorted(_listed_children(ROOT / folder) - listed)
            assert not unlisted, f"README Layout, {folder}/: {unlisted} are not listed"


# ---- the documented import paths keep working ---------------------------------------------------------------
# The public names of the modules as they were before serving/ and parity/verify/ (issue 20), by old path.
OLD_PATHS = {
    "lightning_port.export": (
        "Comparison DEFAULT_ATOL DEFAULT_OPSET DEFAULT_POLICY DEFAULT_RTOL DEVIATION_BATCH DEVIATION_ROWS DUAL_INPUTS "
        "Deviation EXPORTERS EXPORT_BATCH ExportError ExportWrapper INT8_ATOL INT8_RTOL OUTPUT_NAMES PROBE_TIME_MAX PROG "
        "QUANTIZATIONS REPLICATED_BATCH SINGLE_INPUTS VERIFY_BATCHES VerifyReport build_parser compare eager_outputs "
        "export_onnx export_wrapper input_names int8_deviation load_checkpoint main module_kind optimize_export "
        "ort_session probe_inputs read_metadata resolve_policy run_onnx take_rows tolerance_for verify with_overrides"),
    "lightning_port.serve": (
        "BSplineCalibration DEFAULT_BATCH ENDPOINT_COLUMNS LOGIT_CAP ModelInfo PERCENTILE_ROWS PROG PercentileTable "
        "Scorer batch_to_inputs build_parser eager_scorer load_calibration load_percentile_table main onnx_scorer "
        "output_names percentile_score probability_score score_split write_endpoint_file"),
    "lightning_port.onnx_optimize": (
        "DEFAULT_LEVEL DISABLED_OPTIMIZERS ELEMENTWISE_UNARY INT8_MIN_WIDTH OPT_LEVELS fold_reshapes_around_unary "
        "gemm_to_matmul int8_candidates optimize_file ort_optimize quantize_int8 rewrite_gather_of_transpose "
        "rewrite_matmul_bias_to_gemm"),
    "lightning_port.legacy_job": (
        "LEGACY_OUTPUTS TRAIN_PY LegacyHyperparameters LegacyJob LegacyJobError check_state_dict coerce_hyperparameters "
        "open_job read_hyperparameters read_percentile_table read_score_file read_tag_file state_dict_dims"),
    "lightning_port.scoring": (
        "PERCENTILE_ROWS ScoreWriter percentile_table read_score_file run_dir positive_scores roc_pr_figure save_figure "
        "score_distribution_figure write_percentile_table write_score_file write_tag_file"),
    "parity.verify": "FILE_TOL MODEL_TOL MoEJudgement Plan VerifyError ddp_order find_epochs judge_moe main make_plan run",
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_the_documented_import_paths_keep_their_names(path):
    import importlib

    module = importlib.import_module(path)
    missing = [n for n in OLD_PATHS[path].split() if not hasattr(module, n)]
    assert not missing, f"{path} lost {missing}"


def test_the_re_exports_are_the_new_homes_objects():
    from lightning_port import export, legacy_files, legacy_hparams, legacy_job, serve
    from lightning_port.serving import calibration, runtime, score
    from lightning_port.serving import export as new_export

    assert serve.percentile_score is calibration.percentile_score and serve.main is score.main
    assert export.verify is new_export.verify and export.ort_session is runtime.ort_session
    assert legacy_job.read_hyperparameters is legacy_hparams.read_hyperparameters
    assert legacy_job.read_score_file is legacy_files.read_score_file
    assert not (ROOT / "lightning_port" / "verify.py").exists()  # tsa-verify lives in parity/verify (imports parity)
