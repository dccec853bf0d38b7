"""What the hardware allows: GEMM peaks per precision, measured in the same run, and model FLOPs.

"% of roofline" is only comparable between rows when each row is held against
the peak of the precision it computed in: an int8 row against the int8 GEMM
peak (ONNX Runtime's MLAS u8s8 kernels: VNNI/AMX where the CPU has them),
a bf16 row against OpenVINO's bf16 GEMM peak (where the CPU computes bf16),
an fp32 row against sgemm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vit_pipeline.benchmark.scenario import measure

GEMM_N = 1536


def _matmul_model(op: str, a_type: int, b_type: int, out_type: int, n: int):
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", a_type, [n, n]), helper.make_tensor_value_info("b", b_type, [n, n])],
        [helper.make_tensor_value_info("c", out_type, [n, n])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _best_gflops(run, n: int, seconds: float) -> tuple[float, int]:
    samples = measure(run, warmup=2, min_runs=3, min_seconds=seconds)
    return 2 * n**3 / min(samples) / 1e9, len(samples)


def sgemm_roofline(n: int = GEMM_N, seconds: float = 2.0) -> dict[str, Any]:
    """Dense fp32 matmul throughput of ONNX Runtime's MLAS here."""
    import onnxruntime as ort
    from onnx import TensorProto

    model = _matmul_model("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, n)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    gflops, runs = _best_gflops(lambda: session.run(None, {"a": a, "b": a}), n, seconds)
    return {"gflops": gflops, "method": f"ONNX Runtime MatMul {n}x{n}x{n} fp32, best of {runs}"}


def igemm_roofline(n: int = GEMM_N, seconds: float = 2.0) -> dict[str, Any]:
    """u8 x s8 -> int32 matmul throughput (the kernels int8 QDQ graphs run on), in GOP/s."""
    import onnxruntime as ort
    from onnx import TensorProto

    model = _matmul_model("MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, n)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (n, n), dtype=np.uint8)
    b = rng.integers(-127, 127, (n, n), dtype=np.int8)
    gflops, runs = _best_gflops(lambda: session.run(None, {"a": a, "b": b}), n, seconds)
    return {"gflops": gflops, "method": f"ONNX Runtime MatMulInteger u8s8 {n}x{n}x{n}, best of {runs}"}


def bf16_roofline(n: int = GEMM_N, seconds: float = 2.0) -> dict[str, Any] | None:
    """OpenVINO's MatMul with a bf16 inference precision; None where the CPU does not compute bf16."""
    try:
        import openvino as ov
        from openvino import opset13 as ops
    except ImportError:
        return None
    # Asked for bf16, OpenVINO says bf16 even where it emulates it (8 GFLOP/s on an Intel Xeon without AMX or
    # AVX512-BF16, a "roofline" 35x under fp32's): the CPU's own capabilities say whether it computes bf16.
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return None
    a = ops.parameter([n, n], np.float32, name="a")
    b = ops.constant(np.random.default_rng(0).random((n, n), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a], "gemm")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    from vit_consumer.engines import type_name

    if type_name(compiled.get_property("INFERENCE_PRECISION_HINT")).lower() != "bf16":
        return None
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).random((n, n), dtype=np.float32)
    gflops, runs = _best_gflops(lambda: request.infer({0: x}), n, seconds)
    return {"gflops": gflops, "method": f"OpenVINO MatMul {n}x{n}x{n} bf16, best of {runs}"}


def rooflines(seconds: float = 2.0) -> dict[str, dict[str, Any]]:
    """Precision -> measured GEMM peak."""
    out = {"fp32": sgemm_roofline(seconds=seconds), "int8": igemm_roofline(seconds=seconds)}
    if bf16 := bf16_roofline(seconds=seconds):
        out["bf16"] = bf16
    return out


def count_gflop_per_image(path: str | Path) -> float:
    """GFLOP of one image's forward pass: MatMul, Gemm and Conv, from shape inference."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    flops = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
            if a and b and out and all(out) and a[-1]:
                k = a[-2] if node.op_type == "Gemm" and _attr(node, "transA") else a[-1]
                flops += 2 * int(np.prod(out)) * k
        elif node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and out and all(out):
                flops += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return flops / 1e9


def _attr(node, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
