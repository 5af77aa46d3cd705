"""Offline optimisation of an exported TSA graph for ONNX Runtime, and opt-in dynamic int8 quantization.

``tsa-export-onnx`` (:func:`lightning_port.serving.export.export_onnx`) runs these steps on the graph torch
exported, in this order, and saves the result, so that serving sessions start without optimising
anything (:func:`lightning_port.serving.runtime.ort_session` loads such a file with ORT's optimisations off):

1. exact graph rewrites ONNX Runtime does not do itself (see each function): a gather of a transposed
   table becomes a row gather followed by a transpose, an N-d ``MatMul`` + bias ``Add`` becomes a 2-d
   ``Gemm`` between reshapes, and the reshape pairs that leaves around an elementwise activation
   between two Gemms are folded away. They compute the same numbers in the same order (pure data
   movement, or the same dot products with the bias added last).
2. int8 only (:func:`quantize_int8`): ``onnxruntime.quantization.quantize_dynamic`` on the weight
   matmuls at least :data:`INT8_MIN_WIDTH` wide on both sides (int8 weights per tensor, uint8
   activations quantized at run time per tensor).
3. :func:`ort_optimize`: ONNX Runtime's own graph optimisations at ``level`` (default
   :data:`DEFAULT_LEVEL`, ``extended``) on the CPU execution provider, saved through
   ``SessionOptions.optimized_model_filepath``; fusions in :data:`DISABLED_OPTIMIZERS` are left out.

Why ``extended`` and not ``all``: ``all`` adds layout transformations (NCHWc) chosen for the CPU that
runs the export; ONNX Runtime's documentation recommends ``extended`` or lower for models optimised
offline that may run on other hardware. This model has no convolutions, so ``all`` would add nothing
here anyway. The saved graph holds ONNX Runtime contrib operators (``com.microsoft`` domain:
``FusedMatMul``, ``FusedGemm``, ``DynamicQuantizeMatMul``), so it runs on ONNX Runtime's CPU execution
provider (the version that wrote it or newer), not on other ONNX runtimes; ``--optimize none`` keeps the
plain graph for those. docs/onnx.md has the measurements behind each choice.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LEVEL",
    "DISABLED_OPTIMIZERS",
    "ELEMENTWISE_UNARY",
    "INT8_MIN_WIDTH",
    "OPT_LEVELS",
    "fold_reshapes_around_unary",
    "gemm_to_matmul",
    "int8_candidates",
    "optimize_file",
    "ort_optimize",
    "quantize_int8",
    "rewrite_gather_of_transpose",
    "rewrite_matmul_bias_to_gemm",
]

OPT_LEVELS = ("none", "basic", "extended", "all")
DEFAULT_LEVEL = "extended"
# SkipLayerNormalization (Add + LayerNormalization fused) measured slower than the two unfused kernels
# at this model's shapes in ONNX Runtime 1.32 on CPU (batch 1, one thread: ~47 us vs ~12 us per residual
# block at (52, 1, 128); docs/onnx.md), so that one fusion is left out.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# int8 pays only where a matmul is wide: the dynamic quantization of the activations (a min/max pass and
# a rounding pass over the input) costs more than the int8 product saves on the narrow FeatureAggregation
# layers (n -> n/2 -> ... -> 1) and on (.., 1024) -> 2 (measured per node, docs/onnx.md).
INT8_MIN_WIDTH = 32


def _level(name: str) -> Any:
    import onnxruntime as ort

    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if name not in levels:
        raise ValueError(f"unknown optimization level {name!r}; choose one of {', '.join(OPT_LEVELS)}.")
    return levels[name]


# --- exact rewrites ---------------------------------------------------------------------------------
def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _static_shapes(model: Any) -> dict[str, list[int | None]]:
    """Shapes of every value ONNX shape inference can name (``None`` for a symbolic dimension)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out: dict[str, list[int | None]] = {}
    for v in (*g.value_info, *g.input, *g.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def rewrite_gather_of_transpose(model: Any) -> int:
    """``Gather(Tᵀ, idx, axis=1)`` -> ``Transpose(Gather(T, idx, axis=0))`` for 1-d ``idx`` and a 2-d table
    given as ``Transpose(T, perm=[1, 0])`` or as an initializer (then stored transposed once); returns how
    many were rewritten.

    The port's categorical lookup used to gather columns of the transposed embedding table
    (``table.t().contiguous().index_select(1, codes)``); since the feature-first lookup it gathers rows and
    this rewrite finds nothing in the port's own graphs (kept as a guard for such graphs). ONNX Runtime's
    Gather along axis 1 copies one element at a time (0.7 ms for the production model's 2703 codes at
    batch 1); gathering whole rows and transposing the result moves the same values (bit-identical)
    with contiguous copies.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    shapes = _static_shapes(model)
    untransposed: dict[str, str] = {}
    nodes, count = [], 0
    for n in g.node:
        if n.op_type != "Gather" or _attr(n, "axis", 0) != 1 or len(shapes.get(n.input[1], [0, 0])) != 1:
            nodes.append(n)
            continue
        data, t = n.input[0], producer.get(n.input[0])
        if t is not None and t.op_type == "Transpose" and list(_attr(t, "perm", [])) == [1, 0]:
            table = t.input[0]
        elif data in inits and len(inits[data].dims) == 2:
            if data not in untransposed:
                untransposed[data] = f"{data}__rows_first"
                g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[data]).T.copy(),
                                                             untransposed[data]))
            table = untransposed[data]
        else:
            nodes.append(n)
            continue
        rows = f"{n.output[0]}__rows"
        nodes.append(helper.make_node("Gather", [table, n.input[1]], [rows], name=f"{n.name}__rows", axis=0))
        nodes.append(helper.make_node("Transpose", [rows], [n.output[0]], name=f"{n.name}__t", perm=[1, 0]))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    _drop_dead(model)
    return count


def rewrite_matmul_bias_to_gemm(model: Any) -> int:
    """``Add(MatMul(X, W), b)`` with ``W`` a 2-d initializer (K, N), ``b`` a (N,) initializer and ``X`` of
    rank >= 3 with at most one symbolic dimension -> ``Reshape(Gemm(Reshape(X, [-1, K]), W, b), shape)``;
    returns how many were rewritten.

    ``nn.Linear`` on a 3-d or 4-d tensor exports as MatMul + Add, and ONNX Runtime's broadcasting Add
    walks the output in spans of N: for the numerical FeatureAggregation chain (output (B, 51, 64, n)
    with n = 23, 11, 5, 2, 1) that is one call per 1..23 values, ~50 us per layer at batch 1. Gemm adds
    the bias inside the product kernel. The dot products and the bias addition are the same.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    shapes = _static_shapes(model)
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    replace: dict[int, list[Any]] = {}
    drop: set[int] = set()
    for n in g.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or n.output[0] in graph_outputs:
            continue
        w = inits[n.input[1]]
        users = consumers.get(n.output[0], [])
        if len(w.dims) != 2 or len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = add.input[1] if add.input[0] == n.output[0] else add.input[0]
        x_shape = shapes.get(n.input[0])
        if (0 in w.dims or bias not in inits or list(inits[bias].dims) != [w.dims[1]] or x_shape is None or len(x_shape) < 3
                or sum(d is None for d in x_shape) > 1 or shapes.get(add.output[0]) != [*x_shape[:-1], w.dims[1]]):
            continue
        K, N = w.dims
        to_2d, to_nd = f"{n.name}__shape2d", f"{n.name}__shapend"
        g.initializer.append(numpy_helper.from_array(np.array([-1, K], np.int64), to_2d))
        g.initializer.append(numpy_helper.from_array(
            np.array([-1 if d is None else d for d in x_shape[:-1]] + [N], np.int64), to_nd))
        x2d, y2d = f"{n.output[0]}__x2d", f"{n.output[0]}__y2d"
        replace[id(add)] = [
            helper.make_node("Reshape", [n.input[0], to_2d], [x2d], name=f"{n.name}__to2d"),
            helper.make_node("Gemm", [x2d, n.input[1], bias], [y2d], name=f"{n.name}__gemm"),
            helper.make_node("Reshape", [y2d, to_nd], [add.output[0]], name=f"{n.name}__tond"),
        ]
        drop.add(id(n))
    nodes = []
    for n in g.node:
        if id(n) not in drop:
            nodes.extend(replace.get(id(n), [n]))
    del g.node[:]
    g.node.extend(nodes)
    return len(drop)


ELEMENTWISE_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Identity")


def fold_reshapes_around_unary(model: Any) -> int:
    """``Reshape(U(Reshape(Y, nd)), [-1, K])`` -> ``U(Y)`` for an elementwise unary ``U`` and a 2-d ``Y`` of
    width K (the pairs :func:`rewrite_matmul_bias_to_gemm` leaves between two Gemms: Gemm -> Relu ->
    Gemm in every feed-forward, Gemm -> LeakyReLU -> Gemm in the aggregation chains); returns how many
    pairs were removed. Elementwise ops do not care about the shape: the values are the same."""
    from onnx import numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in g.initializer}
    shapes = _static_shapes(model)
    graph_outputs = {o.name for o in g.output}
    drop: set[int] = set()
    for r2 in g.node:
        if r2.op_type != "Reshape" or r2.input[1] not in inits:
            continue
        u = producer.get(r2.input[0])
        r1 = producer.get(u.input[0]) if u is not None and u.op_type in ELEMENTWISE_UNARY else None
        if r1 is None or r1.op_type != "Reshape" or id(r1) in drop:
            continue
        y = shapes.get(r1.input[0])
        target = list(numpy_helper.to_array(inits[r2.input[1]]))
        if (y is None or len(y) != 2 or y[1] is None or target != [-1, y[1]]
                or len(consumers.get(r1.output[0], [])) != 1 or len(consumers.get(u.output[0], [])) != 1
                or {r1.output[0], u.output[0]} & graph_outputs):
            continue
        u.input[0] = r1.input[0]
        u.output[0] = r2.output[0]
        drop.update((id(r1), id(r2)))
    nodes = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    _drop_dead(model)
    return len(drop) // 2


def gemm_to_matmul(model: Any) -> int:
    """``Gemm(A, B, C)`` (alpha = beta = 1, no transA) -> ``Add(MatMul(A, B'), C)`` with ``B'`` = B or its
    transpose (one transposed copy, or one Transpose node, per shared weight); the MatMul keeps the Gemm's
    name. Returns how many were rewritten.

    Run before dynamic quantization only: ``quantize_dynamic`` itself turns every Gemm into MatMul + Add,
    renaming the nodes and, for a weight shared by two Gemms with ``transB`` (the dual model's gate
    stack runs twice), writing its transposed copy twice (an invalid model).
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    transposed: dict[str, str] = {}
    nodes, count = [], 0
    for n in g.node:
        ok = (n.op_type == "Gemm" and _attr(n, "alpha", 1.0) == 1.0 and _attr(n, "beta", 1.0) == 1.0
              and not _attr(n, "transA", 0))
        if not ok:
            nodes.append(n)
            continue
        w = n.input[1]
        if _attr(n, "transB", 0):
            if w not in transposed:
                transposed[w] = f"{w}__T"
                if w in inits:
                    g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[w]).T.copy(),
                                                                 transposed[w]))
                else:  # computed (e.g. an empty weight of a zero-width layer): transpose it once, here
                    nodes.append(helper.make_node("Transpose", [w], [transposed[w]], name=f"{w}__T", perm=[1, 0]))
            w = transposed[w]
        has_bias = len(n.input) > 2 and n.input[2] != ""
        product = f"{n.output[0]}__mm" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], w], [product], name=n.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=f"{n.name}__bias"))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    return count


def _names_read(graph: Any) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs (If / Loop bodies)."""
    from onnx import AttributeProto

    names = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                names |= _names_read(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    names |= _names_read(sub)
    return names


def _drop_dead(model: Any) -> None:
    """Remove nodes whose outputs nobody reads and initializers nobody reads (e.g. the Transpose or the
    transposed table a rewrite left behind)."""
    g = model.graph
    while True:
        used = _names_read(g) | {o.name for o in g.output}
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    kept = [i for i in g.initializer if i.name in used]
    if len(kept) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(kept)




# --- ONNX Runtime offline optimisation ---------------------------------------------------------------
@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def ort_optimize(source: str | Path, output: str | Path, level: str = DEFAULT_LEVEL) -> None:
    """Optimise ``source`` with ONNX Runtime (CPU provider) at ``level`` and save it to ``output``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = _level(level)
    opts.optimized_model_filepath = str(output)
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    ort.InferenceSession(str(source), sess_options=opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_OPTIMIZERS))


def int8_candidates(model: Any, min_width: int = INT8_MIN_WIDTH) -> list[str]:
    """Names of the ``MatMul`` nodes whose weight is a 2-d initializer with both sides at least
    ``min_width`` (the ones int8 is asked to quantize; run :func:`gemm_to_matmul` first)."""
    inits = {i.name: i for i in model.graph.initializer}
    names = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        dims = list(inits[n.input[1]].dims)
        if len(dims) == 2 and min(dims) >= min_width:
            names.append(n.name)
    return names


def quantize_int8(model: Any, output: str | Path, min_width: int = INT8_MIN_WIDTH) -> list[str]:
    """Dynamic int8 quantization (``onnxruntime.quantization.quantize_dynamic``: int8 weights, per tensor,
    symmetric; uint8 activations quantized per tensor at run time) of the weight matmuls chosen by
    :func:`int8_candidates`, written to ``output``; returns their names (none wide enough: an unchanged
    copy). ``model`` is changed in place (:func:`gemm_to_matmul`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    gemm_to_matmul(model)
    names = int8_candidates(model, min_width)
    if not names:
        onnx.save_model(model, str(output))
        return names
    with _quiet_root_logger():
        quantize_dynamic(model, str(output), op_types_to_quantize=["MatMul"], nodes_to_quantize=names,
                         per_channel=False, reduce_range=False, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
    return names


def optimize_file(source: str | Path, output: str | Path, *, level: str = DEFAULT_LEVEL,
                  quantize: str | None = None, int8_min_width: int = INT8_MIN_WIDTH) -> dict[str, Any]:
    """The whole offline pipeline on the exported file ``source`` -> ``output`` (see the module docstring);
    returns what was done: ``rewrites`` (counts), ``quantized`` (node names), ``level``."""
    import onnx

    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; the only one is int8.")
    _level(level)
    model = onnx.load(str(source))
    counts: dict[str, int] = {}
    if level != "none":
        counts["gather_rows"] = rewrite_gather_of_transpose(model)
    with tempfile.TemporaryDirectory(prefix="tsa-onnx-opt-") as tmp:
        quantized: list[str] = []
        if quantize == "int8":
            q = Path(tmp) / "int8.onnx"
            quantized = quantize_int8(model, q, int8_min_width)
            model = onnx.load(str(q))
        if level != "none":  # after quantization: the quantizer turns every Gemm back into MatMul + Add
            counts["matmul_bias_gemm"] = rewrite_matmul_bias_to_gemm(model)
            counts["reshapes_folded"] = fold_reshapes_around_unary(model)
        stage = Path(tmp) / "rewritten.onnx"
        onnx.save_model(model, str(stage))
        if level == "none":
            onnx.save_model(model, str(output))
        else:
            ort_optimize(stage, output, level)
    return {"rewrites": counts, "quantized": quantized, "level": level}
