"""ONNX export (``lightning_port.export``) and scoring (``lightning_port.serve``).

Every recorded case (shipped and ``TSA_LEGACY_FIXTURES`` held-out ones) is exported and run in ONNX
Runtime at batch 1, 3 and 3x the fixture batch plus a batch of identical rows (capacity binds),
against the eager port under the same deterministic MoE policy. The fast TorchScript exporter
covers every case; the default dynamo exporter covers the dual case and (via the CLI test) a single one, and the
production shape under the ``slow`` mark (each dynamo export takes 10-60 s on 2 cores).
"""

from __future__ import annotations

import json
import pickle

import lightning as L
import numpy as np
import onnx
import pytest
import torch

from lightning_port import export as ex
from lightning_port import serve
from lightning_port.module import DualSequenceTSA, TemporalSelfAttentionClassification
from lightning_port.nn.moe import CAPACITY_FACTOR_EVAL, expert_capacity
from lightning_port.nn.networks import EMPTY_CARD_MASK_SUM, GATE_KEEP_THRESHOLD
from lightning_port.weight_map import legacy_to_port
from parity.fixtures import LEGACY_DIR, LegacyCase, all_cases

# required by the issue: atol 1e-4 / rtol 1e-3; the export holds to fp32 rounding, so check tighter
ATOL, RTOL = 1e-5, 1e-4
POLICY = ex.DEFAULT_POLICY
DYNAMO_CASES = ("dual_small",)  # single_small runs through the dynamo CLI test
DYNAMO_SLOW_CASES = ("single_production",)


def module_for(case: LegacyCase, **overrides) -> torch.nn.Module:
    cls = DualSequenceTSA if case.kind == "dual" else TemporalSelfAttentionClassification
    m = cls(**{**case.kwargs, "moe_eval_policy": POLICY, **overrides})
    m.network.load_state_dict(legacy_to_port(case.state_dict, m.config, case.kind))
    return m.eval()


def case_exporter_params() -> list:
    params = []
    for case in all_cases():
        params.append(pytest.param(case, "torchscript", id=f"{case.name}-torchscript"))
        if case.name in DYNAMO_CASES:
            params.append(pytest.param(case, "dynamo", id=f"{case.name}-dynamo"))
        if case.name in DYNAMO_SLOW_CASES:
            params.append(pytest.param(case, "dynamo", id=f"{case.name}-dynamo", marks=pytest.mark.slow))
    return params


def save_checkpoint(module: torch.nn.Module, path) -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


@pytest.mark.parametrize(("case", "exporter"), case_exporter_params())
def test_fixture_case_matches_eager_at_other_batch_sizes(case, exporter, tmp_path):
    m = module_for(case)
    path, policy = ex.export_onnx(m, tmp_path / "m.onnx", exporter=exporter)
    assert policy == POLICY
    B = case.batch_size
    report = ex.verify(path, m, batch_sizes=(1, 3, 3 * B), inputs=case.inputs, atol=ATOL, rtol=RTOL)
    assert [c.batch for c in report.comparisons] == [1, 3, 3 * B, ex.REPLICATED_BATCH]
    probe = ex.probe_inputs(m.config, case.kind, 3 * B, seed=7)  # synthetic rows, also for held-out cases
    report.comparisons += ex.verify(path, m, batch_sizes=(3 * B,), inputs=probe, atol=ATOL, rtol=RTOL,
                                    replicated=0).comparisons
    failed = [c.line() for c in report.comparisons if not c.passed]
    assert not failed, f"{case.name} ({exporter}):\n" + "\n".join(failed)
    if case.kind == "dual":  # rows with empty card histories and rows whose card stack runs were scored
        empty, kept = [], []
        for x in (case.inputs, probe):
            empty.append(x["key_padding_mask_ccid"].sum(1) == EMPTY_CARD_MASK_SUM)
            ex.eager_outputs(m, x)
            kept.append(m.network.last_gate[:, 1] > GATE_KEEP_THRESHOLD)
        empty, kept = torch.cat(empty), torch.cat(kept)
        assert empty.any(), "no row with an empty card history"
        assert (~empty).any(), "no row with a card history"
        assert kept.any(), "no row ran the card stack"
        assert (~kept).any(), "every row ran the card stack"


def capacity_binds(num_experts: int, n: int = ex.REPLICATED_BATCH) -> bool:
    """Whether eval expert capacity drops tokens in a batch of ``n`` identical rows (legacy §3).

    Identical rows all pick the same top-1 expert and the same top-2 expert, so each of those two experts
    receives n tokens, at positions 0..n-1 (the second choices start after the second expert's first-choice
    count, 0). A token is dropped iff its position reaches the capacity max(min(n, int(n·2.0/e)), 4), i.e.
    iff that capacity is below n: int(2n/e) < n, which holds exactly when e >= 3 (e = 2 gives n, e = 1
    gives min(n, 2n) = n)."""
    return expert_capacity(n, CAPACITY_FACTOR_EVAL, num_experts) < n


def _capacity_params() -> list:
    params = [pytest.param(c, id=c.name) for c in all_cases() if c.kwargs.get("use_moe", True) and not c.full_size]
    # the same small configuration with 2 experts (capacity = group size: never binds) and 3 (binds), random
    # weights: both sides of the precondition are exercised whatever recordings are present
    small = next(c for c in all_cases() if c.name == "single_small")
    params += [pytest.param((small, e), id=f"single_small-{e}-experts") for e in (2, 3)]
    return params


def test_capacity_precondition_by_hand():
    n = ex.REPLICATED_BATCH  # 24
    assert ex.REPLICATED_BATCH == 24
    # e = 1: max(min(24, 48), 4) = 24; e = 2: max(min(24, 24), 4) = 24; e = 3: int(48 / 3) = 16;
    # e = 5: int(9.6) = 9; e = 16: max(int(3), 4) = 4
    assert [expert_capacity(n, CAPACITY_FACTOR_EVAL, e) for e in (1, 2, 3, 5, 16)] == [24, 24, 16, 9, 4]
    assert [capacity_binds(e) for e in (1, 2, 3, 5, 16)] == [False, False, True, True, True]
    # the shipped recordings include a case where it binds, so verify()'s replicated probe tests capacity
    assert any(capacity_binds(c.kwargs["num_experts"]) for c in all_cases()
               if c.kwargs.get("use_moe", True) and c.path.parent == LEGACY_DIR)


@pytest.mark.parametrize("case", _capacity_params())
def test_replicated_batch_makes_capacity_bind(case):
    """The replicated-row probe decides some rows' outputs by expert capacity exactly when the capacity
    formula says it binds (issue 13 item 5: with 2 experts in eval the capacity equals the group size)."""
    if isinstance(case, tuple):
        base, experts = case
        torch.manual_seed(experts)
        cls = DualSequenceTSA if base.kind == "dual" else TemporalSelfAttentionClassification
        m = cls(**{**base.kwargs, "num_experts": experts, "moe_eval_policy": POLICY}).eval()
        inputs = base.inputs
    else:
        m, inputs, experts = module_for(case), case.inputs, case.kwargs["num_experts"]
    x = ex.take_rows(inputs, [0] * ex.REPLICATED_BATCH)
    scores = ex.eager_outputs(m, x)["scores"]
    if capacity_binds(experts):
        assert not np.allclose(scores, scores[:1], atol=1e-6), "capacity should bind but identical rows scored alike"
    else:  # nothing dropped: identical rows go through identical computations
        np.testing.assert_allclose(scores, np.broadcast_to(scores[:1], scores.shape), rtol=0, atol=1e-6)


def test_verify_reports_a_planted_mismatch(tmp_path):
    case = next(c for c in all_cases() if c.name == "single_small")
    m = module_for(case)
    path, _ = ex.export_onnx(m, tmp_path / "m.onnx", exporter="torchscript")
    report = ex.verify(path, m, policy="none", batch_sizes=(3,), inputs=case.inputs, replicated=0)
    (c,) = report.comparisons
    assert not c.passed
    assert c.max_abs_err > 1e-3
    assert c.worst.startswith(("scores[", "probs["))
    assert "FAIL" in c.line()


def test_names_dynamic_batch_and_metadata(tmp_path):
    cases = {c.name: c for c in all_cases()}
    for name, engineered in (("single_small", True), ("single_production", False), ("dual_small", True)):
        case = cases[name]
        m = module_for(case)
        path, _ = ex.export_onnx(m, tmp_path / f"{name}.onnx", exporter="torchscript")
        model = onnx.load(str(path))
        inputs = [i.name for i in model.graph.input]
        expected = list(ex.SINGLE_INPUTS if case.kind == "single" else ex.DUAL_INPUTS)
        if not engineered:
            expected.remove("x_engineered")
        assert inputs == expected
        assert [o.name for o in model.graph.output] == ["scores", "probs"]
        for v in (*model.graph.input, *model.graph.output):
            dim0 = v.type.tensor_type.shape.dim[0]
            assert dim0.dim_param, f"{v.name}: batch axis is static"
            assert not dim0.HasField("dim_value"), f"{v.name}: batch axis is static"
        meta = ex.read_metadata(path)
        assert meta["moe_eval_policy"] == POLICY
        assert meta["kind"] == case.kind
        assert meta["port_version"]
        assert meta["port_version"] != "unknown"
        hp = json.loads(meta["hyperparameters"])
        assert hp["moe_eval_policy"] == POLICY
        for k, v in case.kwargs.items():
            assert hp[k] == v, k


def test_random_policy_is_refused_and_default_replaces_it(tmp_path):
    case = next(c for c in all_cases() if c.name == "single_small")
    m = module_for(case, moe_eval_policy="random")
    with pytest.raises(ex.ExportError, match="'random' flips coins"):
        ex.export_onnx(m, tmp_path / "m.onnx", moe_eval_policy="random")
    assert ex.resolve_policy(None, "random") == ex.DEFAULT_POLICY
    assert ex.resolve_policy(None, "threshold") == "threshold"
    assert ex.resolve_policy("all", "threshold") == "all"


def test_cli_exports_verifies_and_fails_beyond_tolerance(tmp_path, capsys):
    case = next(c for c in all_cases() if c.name == "single_small")
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(module_for(case, moe_eval_policy="random"), ckpt)  # the legacy default policy
    out = tmp_path / "m.onnx"
    assert ex.main([str(ckpt), "--output", str(out)]) == 0  # default exporter: dynamo
    text = capsys.readouterr().out
    assert "moe_eval_policy=expected (checkpoint policy 'random' is not exportable)" in text
    assert "verification passed" in text
    assert "batch   1" in text
    assert ex.read_metadata(out)["moe_eval_policy"] == "expected"
    # a zero tolerance cannot hold across runtimes: non-zero exit and a FAIL line
    rc = ex.main([str(ckpt), "--output", str(out), "--exporter", "torchscript", "--atol", "0", "--rtol", "0"])
    assert rc == 1
    assert "verification FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["missing.ckpt"], "does not exist"),
    (["{ckpt}", "--moe-eval-policy", "random"], "'random' flips coins in eval and cannot be exported"),
    (["{ckpt}", "--moe-eval-policy", "sometimes"], "unknown moe_eval_policy 'sometimes'"),
    (["{legacy}"], "not a Lightning checkpoint of the TSA port"),
])
def test_cli_user_errors_are_one_line(argv, message, tmp_path, capsys):
    case = next(c for c in all_cases() if c.name == "single_small")
    ckpt = tmp_path / "m.ckpt"
    if "{ckpt}" in argv:
        save_checkpoint(module_for(case), ckpt)
    argv = [a.format(ckpt=ckpt, legacy=case.file("model.pt")) for a in argv]
    assert ex.main([*argv, "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kind", ["single", "dual"])
def test_score_split_with_onnx_and_eager_writes_legacy_files(kind, tmp_path, capsys):
    from lightning_port.synth import SynthConfig, write_dataset

    cfg = SynthConfig(kind=kind, rows=8, eval_rows=20, seed=3)
    write_dataset(tmp_path / "data", cfg)
    cls = DualSequenceTSA if kind == "dual" else TemporalSelfAttentionClassification
    torch.manual_seed(0)
    m = cls(n_cat_features=cfg.n_cat, n_num_features=cfg.n_num, n_embedding=cfg.n_embedding, seq_len=cfg.seq_len,
            n_engineered_num_features=cfg.n_eng, dim_embedding_table=8, dim_attn_feedforward=16, num_heads=2,
            n_layers_order=1, n_layers_feature=1, num_experts=3, moe_eval_policy="threshold").eval()
    onnx_path, _ = ex.export_onnx(m, tmp_path / "m.onnx", exporter="torchscript")
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(m, ckpt)
    data = str(tmp_path / "data")
    assert serve.main([str(onnx_path), "--data-dir", data, "--split", "vali", "--out", str(tmp_path / "o"),
                       "--batch-size", "7"]) == 0
    assert serve.main([str(ckpt), "--data-dir", data, "--split", "vali", "--out", str(tmp_path / "e"),
                       "--batch-size", "7"]) == 0
    assert serve.main([str(onnx_path), "--data-dir", data, "--split", "cali", "--out", str(tmp_path / "o")]) == 0
    assert "scored 20 rows of vali" in capsys.readouterr().out
    y = np.load(tmp_path / "data" / "vali_Y_v0.npy").reshape(-1)
    onnx_lines = (tmp_path / "o" / "score_file.csv").read_text().splitlines()
    eager_lines = (tmp_path / "e" / "score_file.csv").read_text().splitlines()
    assert len(onnx_lines) == len(y) == 20
    assert all(line == str(np.float32(line)) for line in onnx_lines)  # legacy str(np.float32(v)) format
    np.testing.assert_allclose(np.float32(onnx_lines), np.float32(eager_lines), atol=1e-6, rtol=0)
    assert (tmp_path / "o" / "tag_file.csv").read_text() == "".join(f"{int(v)}\n" for v in y)
    with open(tmp_path / "o" / "percentile_score.pkl", "rb") as f:
        table = pickle.load(f)
    assert len(table) == 1000
    assert table[0][1] == 0.0
    assert (tmp_path / "o" / "cali_score_file.csv").is_file()


def test_score_cli_user_errors(tmp_path, capsys):
    assert serve.main(["nope.onnx", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- offline optimisation and int8 (issue 13) -------------------------------------------------------------
def _ort_plain(model, feed):
    """ONNX Runtime with every optimisation off: runs exactly the nodes of ``model``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@pytest.mark.parametrize("table_as", ["transpose node", "initializer"])
def test_gather_rewrite_is_bit_identical(table_as):
    from onnx import TensorProto, helper, numpy_helper

    from lightning_port import onnx_optimize as oo

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 8)).astype(np.float32)  # (N, D)
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["m"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [8, "m"])
    if table_as == "transpose node":
        nodes = [helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
                 helper.make_node("Gather", ["tt", "idx"], ["out"], axis=1)]
        inits = [numpy_helper.from_array(table, "table")]
    else:  # what constant folding leaves: the transposed table stored as such
        nodes = [helper.make_node("Gather", ["tt", "idx"], ["out"], axis=1)]
        inits = [numpy_helper.from_array(table.T.copy(), "tt")]
    model = helper.make_model(helper.make_graph(nodes, "g", [idx], [out], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    rewritten = _copy(model)
    assert oo.rewrite_gather_of_transpose(rewritten) == 1
    onnx.checker.check_model(rewritten)
    assert [(n.op_type, _axis(n)) for n in rewritten.graph.node] == [("Gather", 0), ("Transpose", None)]
    codes = rng.integers(0, 50, size=(301,)).astype(np.int64)
    (want,), (got,) = _ort_plain(model, {"idx": codes}), _ort_plain(rewritten, {"idx": codes})
    np.testing.assert_array_equal(got, want)  # data movement only
    np.testing.assert_array_equal(got, table[codes].T)


def _axis(node):
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def test_matmul_bias_rewrite_is_bit_identical():
    from onnx import TensorProto, helper, numpy_helper

    from lightning_port import onnx_optimize as oo

    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 7, 37])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7, 29])
    inits = [numpy_helper.from_array(rng.normal(size=(37, 29)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(29,)).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"), helper.make_node("Add", ["xw", "b"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    rewritten = _copy(model)
    assert oo.rewrite_matmul_bias_to_gemm(rewritten) == 1
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["Reshape", "Gemm", "Reshape"]
    for batch in (1, 5, 64):
        feed = {"x": rng.normal(size=(batch, 7, 37)).astype(np.float32)}
        # the same dot products with the bias added after them: equal bits (MLAS SGEMM on both sides)
        np.testing.assert_array_equal(_ort_plain(rewritten, feed)[0], _ort_plain(model, feed)[0])
    # two symbolic dimensions: the reshape back could not be written with constants, so no rewrite
    two = _copy(model)
    two.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "len"
    assert oo.rewrite_matmul_bias_to_gemm(two) == 0


def test_optimized_export_metadata_and_session(tmp_path):
    import onnxruntime as ort

    case = next(c for c in all_cases() if c.name == "single_small")
    m = module_for(case)
    opt, _ = ex.export_onnx(m, tmp_path / "opt.onnx", exporter="torchscript")
    plain, _ = ex.export_onnx(m, tmp_path / "plain.onnx", exporter="torchscript", optimize="none")
    meta = ex.read_metadata(opt)
    assert meta["ort_optimization"] == "extended"
    assert meta["onnxruntime_version"] == ort.__version__
    assert meta["quantization"] == "none"
    # the feature-first lookup gathers table rows already: nothing left for the column-gather rewrite, and
    # every lookup in an embedding table of the saved graph is a row gather (axis 0)
    assert json.loads(meta["graph_rewrites"])["gather_rows"] == 0
    g = onnx.load(str(opt)).graph
    tables = {i.name for i in g.initializer if len(i.dims) == 2}
    lookups = [n for n in g.node if n.op_type == "Gather" and n.input[0] in tables]
    assert lookups
    assert all(a.i == 0 for n in lookups for a in n.attribute if a.name == "axis")
    assert meta["moe_eval_policy"] == POLICY and meta["kind"] == "single"  # the export's own keys survive
    assert "ort_optimization" not in ex.read_metadata(plain)
    assert {n.domain for n in onnx.load(str(plain)).graph.node} <= {"", "ai.onnx"}  # any ONNX runtime
    assert "com.microsoft" in {n.domain for n in onnx.load(str(opt)).graph.node}  # ORT's fused kernels
    # an optimised file loads with optimisations off (they ran at export); a plain one with ORT's default
    level = lambda p: ex.ort_session(p).get_session_options().graph_optimization_level  # noqa: E731
    assert level(opt) == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert level(plain) == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for path in (opt, plain):
        report = ex.verify(path, m, inputs=case.inputs)
        assert report.passed, [c.line() for c in report.comparisons]
        assert report.atol == ex.DEFAULT_ATOL and report.outputs == ex.OUTPUT_NAMES


def _quantized_scales(path):
    model = onnx.load(str(path))
    return model, [i for i in model.graph.initializer if i.name.endswith("_scale")]


@pytest.mark.parametrize("name", ["single_plain", "dual_small"])
def test_int8_export_measures_its_deviation_and_verifies(name, tmp_path):
    """int8 is offered for models without MoE (docs/onnx.md): single_plain's recorded weights, and the
    dual_small configuration with MoE off (seeded weights)."""
    case = next(c for c in all_cases() if c.name == name)
    if case.kwargs.get("use_moe", True):
        torch.manual_seed(0)
        cls = DualSequenceTSA if case.kind == "dual" else TemporalSelfAttentionClassification
        m = cls(**{**case.kwargs, "use_moe": False}).eval()
    else:
        m = module_for(case)
    # width 16: the tiny configurations have few matmuls as wide as the default 32
    path, _ = ex.export_onnx(m, tmp_path / "m.onnx", exporter="torchscript", quantize="int8", int8_min_width=16,
                             deviation_rows=600)
    meta = ex.read_metadata(path)
    assert meta["quantization"] == "int8"
    assert int(meta["int8_quantized_matmuls"]) > 0
    model, scales = _quantized_scales(path)
    assert scales, "no quantization scales in the int8 file"
    assert any(n.op_type == "DynamicQuantizeMatMul" for n in model.graph.node)
    assert meta["int8_deviation_rows"] == "600"
    dmax, p999 = float(meta["int8_max_abs_dev"]), float(meta["int8_p999_abs_dev"])
    assert 0 < p999 <= dmax < ex.INT8_ATOL
    # int8 is held to its own tolerance on probs; the fp32 one would fail (the quantization is real)
    report = ex.verify(path, m, inputs=case.inputs)
    assert report.passed, [c.line() for c in report.comparisons]
    assert (report.atol, report.rtol, report.outputs) == (ex.INT8_ATOL, ex.INT8_RTOL, ("probs",))
    assert not ex.verify(path, m, inputs=case.inputs, atol=ex.DEFAULT_ATOL, rtol=ex.DEFAULT_RTOL).passed


def test_int8_tolerance_catches_a_wrong_scale(tmp_path):
    """A quantization error of the kind the int8 tolerance is there for (here: every weight scale 4x too
    large, as a mis-scaled or saturating kernel would give) fails verification."""
    case = next(c for c in all_cases() if c.name == "single_plain")
    m = module_for(case)
    path, _ = ex.export_onnx(m, tmp_path / "m.onnx", exporter="torchscript", quantize="int8", int8_min_width=16,
                             deviation_rows=100)
    model, scales = _quantized_scales(path)
    from onnx import numpy_helper

    for s in scales:  # weight scales (activation scales are computed at run time, not stored)
        s.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(s) * 4, s.name))
    onnx.save_model(model, str(tmp_path / "broken.onnx"))
    report = ex.verify(tmp_path / "broken.onnx", m, inputs=case.inputs)
    assert not report.passed
    assert report.worst.max_abs_err > ex.INT8_ATOL


def test_cli_int8_prints_deviation(tmp_path, capsys):
    case = next(c for c in all_cases() if c.name == "single_plain")
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(module_for(case), ckpt)
    out = tmp_path / "m.onnx"
    assert ex.main([str(ckpt), "--output", str(out), "--exporter", "torchscript", "--quantize", "int8",
                    "--int8-min-width", "16", "--deviation-rows", "300"]) == 0
    text = capsys.readouterr().out
    assert "ORT extended, int8 (" in text
    assert "int8 deviation from the fp32 port over 300 probe rows: max |Δscore|" in text
    assert f"tolerance atol {ex.INT8_ATOL:g} + rtol 0 on probs" in text
    assert "verification passed" in text
    assert "warning" not in text  # no MoE, deviation within the int8 tolerance
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit 2
        ex.main([str(ckpt), "--output", str(out), "--quantize", "int4"])
    assert exc.value.code == 2


def test_reshape_pairs_between_gemms_are_folded_bit_identically():
    from onnx import TensorProto, helper, numpy_helper

    from lightning_port import onnx_optimize as oo

    rng = np.random.default_rng(2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [52, "batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [52, "batch", 16])
    arr = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(arr(16, 32), "w1"), numpy_helper.from_array(arr(32), "b1"),
             numpy_helper.from_array(arr(32, 16), "w2"), numpy_helper.from_array(arr(16), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"), helper.make_node("Add", ["o", "b2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "ff", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    rewritten = _copy(model)
    assert oo.rewrite_matmul_bias_to_gemm(rewritten) == 2
    assert oo.fold_reshapes_around_unary(rewritten) == 1
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["Reshape", "Gemm", "Relu", "Gemm", "Reshape"]
    feed = {"x": arr(52, 3, 16)}
    np.testing.assert_array_equal(_ort_plain(rewritten, feed)[0], _ort_plain(model, feed)[0])


def test_cli_int8_warns_for_moe(tmp_path, capsys):
    case = next(c for c in all_cases() if c.name == "single_small")  # MoE
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(module_for(case), ckpt)
    rc = ex.main([str(ckpt), "--output", str(tmp_path / "m.onnx"), "--exporter", "torchscript", "--quantize", "int8",
                  "--int8-min-width", "16", "--deviation-rows", "100", "--no-verify"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "warning: MoE model: int8 noise changes the experts of some rows" in out
