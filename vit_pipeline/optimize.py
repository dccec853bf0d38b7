"""Graph rewrites that let ONNX Runtime's fast kernels fire on a tf2onnx ViT export.

tf2onnx decomposes the ViT into patterns that ONNX Runtime's own fusions do not
recognise (measured: 0 fusions by ``onnxruntime.transformers.optimizer`` and
onnxscript's rewriter on this graph):

* LayerNorm arrives as GlobalAveragePool, Sub, Mul, GlobalAveragePool, Add,
  Sqrt, Reciprocal, Mul, Neg, Mul, Add, Add. It becomes one ONNX
  ``LayerNormalization`` (opset 17).
* The erf GELU arrives as Mul(1/sqrt 2), Erf, Add(1), Mul(0.5), Mul. It becomes
  ``com.microsoft.Gelu`` (an ONNX Runtime contrib op).
* Each Dense on a sequence arrives as TensorFlow's Tensordot (Reshape, MatMul,
  Reshape plus run-time shape arithmetic); a 3-D MatMul does the same.
* Attention scores arrive transposed, ``K·Qᵀ`` with the Softmax over axis 2 and a
  Transpose of the 144x144 probabilities afterwards; a non-last-axis Softmax
  costs ONNX Runtime two hidden transposes. Computing ``Q·Kᵀ`` instead puts the
  Softmax on the last axis and drops the big Transpose (the same numbers).

Each rewrite checks the exact pattern and leaves anything else untouched; the
result is checked by ``onnx.checker`` and, in the pipeline, by the parity gate.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclass
class FusionReport:
    """How many patterns each rewrite replaced."""

    counts: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, int]:
        return dict(self.counts)


class _Graph:
    """Producer/consumer indexes over an ONNX graph, and constant lookup."""

    def __init__(self, model):
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.reindex()
        self.removed: set[int] = set()
        self.counter = 0

    def reindex(self) -> None:
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in dict.fromkeys(node.input):  # Mul(d, d) consumes d once
                self.consumers[inp].append(node)

    def const(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only(self, name: str, op_type: str):
        """The single consumer of ``name`` if it has that op type, else None."""
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type:
            return users[0]
        return None

    def prod(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def other_input(self, node, name: str) -> str | None:
        ins = list(node.input)
        if len(ins) != 2 or name not in ins:
            return None
        return ins[1] if ins[0] == name else ins[0]

    def add_init(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        self.counter += 1
        name = f"vitopt_{hint}_{self.counter}"
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def remove(self, *nodes) -> None:
        self.removed.update(id(n) for n in nodes)

    def commit(self, new_nodes: list) -> None:
        """Drops removed nodes, appends new ones, and restores topological order."""
        kept = [n for n in self.graph.node if id(n) not in self.removed]
        kept.extend(new_nodes)
        ordered = _toposort(kept, {i.name for i in self.graph.input} | set(self.inits))
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        self.removed.clear()
        self.reindex()


def _toposort(nodes: list, available: set[str]) -> list:
    ready = set(available) | {""}
    pending, out = list(nodes), []
    while pending:
        progress = []
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                progress.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if not progress:
            raise ValueError("graph has a cycle or a missing input after rewriting")
        out.extend(progress)
        pending = rest
    return out


def _scalar(g: _Graph, name: str) -> float | None:
    value = g.const(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(-1)[0])


def fuse_layernorm(g: _Graph) -> int:
    """GlobalAveragePool-based LayerNorm subgraphs -> ``LayerNormalization``."""
    from onnx import helper

    new_nodes, count = [], 0
    for mean in [n for n in g.graph.node if n.op_type == "GlobalAveragePool"]:
        x = mean.input[0]
        users = g.consumers[mean.output[0]]
        sub = next((u for u in users if u.op_type == "Sub" and list(u.input) == [x, mean.output[0]]), None)
        neg = next((u for u in users if u.op_type == "Neg"), None)
        if sub is None or neg is None or len(users) != 2:
            continue
        sq = g.only(sub.output[0], "Mul")
        if sq is None or list(sq.input) != [sub.output[0], sub.output[0]]:
            continue
        var = g.only(sq.output[0], "GlobalAveragePool")
        add_eps = var and g.only(var.output[0], "Add")
        eps = add_eps and _scalar(g, g.other_input(add_eps, var.output[0]))
        sqrt = add_eps and g.only(add_eps.output[0], "Sqrt")
        recip = sqrt and g.only(sqrt.output[0], "Reciprocal")
        if recip is None or eps is None:
            continue
        # Optional gamma: Mul(reciprocal, gamma).
        scale_out, chain, gamma = recip.output[0], [], None
        gmul = g.only(recip.output[0], "Mul")
        if gmul is not None and g.const(g.other_input(gmul, recip.output[0])) is not None:
            gamma = g.const(g.other_input(gmul, recip.output[0]))
            scale_out, chain = gmul.output[0], [gmul]
        muls = g.consumers[scale_out]
        if len(muls) != 2 or any(m.op_type != "Mul" for m in muls):
            continue
        mul_x = next((m for m in muls if x in m.input), None)
        mul_n = next((m for m in muls if neg.output[0] in m.input), None)
        if mul_x is None or mul_n is None:
            continue
        # Optional beta: Add(Mul(-mean, scale), beta), then Add(Mul(x, scale), that).
        shift_out, beta, tail = mul_n.output[0], None, []
        badd = g.only(mul_n.output[0], "Add")
        if badd is not None and g.const(g.other_input(badd, mul_n.output[0])) is not None:
            beta = g.const(g.other_input(badd, mul_n.output[0]))
            shift_out, tail = badd.output[0], [badd]
        final = g.only(shift_out, "Add")
        if final is None or sorted(final.input) != sorted([mul_x.output[0], shift_out]):
            continue
        if g.consumers[mul_x.output[0]] != [final]:
            continue
        channels = None
        for arr in (gamma, beta):
            if arr is not None:
                channels = arr.size
        if channels is None:
            continue  # unknown width: leave it alone
        gamma_name = g.add_init(
            (np.ones(channels) if gamma is None else gamma).reshape(-1).astype(np.float32), "ln_gamma"
        )
        beta_name = g.add_init(
            (np.zeros(channels) if beta is None else beta).reshape(-1).astype(np.float32), "ln_beta"
        )
        new_nodes.append(
            helper.make_node(
                "LayerNormalization", [x, gamma_name, beta_name], [final.output[0]],
                name=f"{mean.name}/LayerNormalization", axis=-1, epsilon=float(eps),
            )
        )  # fmt: skip
        g.remove(mean, sub, neg, sq, var, add_eps, sqrt, recip, *chain, mul_x, mul_n, *tail, final)
        count += 1
    g.commit(new_nodes)
    return count


def fuse_gelu(g: _Graph) -> int:
    """``0.5 * x * (1 + erf(x / sqrt 2))`` -> ``com.microsoft.Gelu``."""
    from onnx import helper

    new_nodes, count = [], 0
    for erf in [n for n in g.graph.node if n.op_type == "Erf"]:
        scale = g.prod(erf.input[0], "Mul") or g.prod(erf.input[0], "Div")
        if scale is None:
            continue
        x = next((i for i in scale.input if g.const(i) is None), None)
        c = _scalar(g, g.other_input(scale, x)) if x else None
        if c is None:
            continue
        expected = 1 / np.sqrt(2) if scale.op_type == "Mul" else np.sqrt(2)
        if abs(c - expected) > 1e-5:
            continue
        add1 = g.only(erf.output[0], "Add")
        if add1 is None or _scalar(g, g.other_input(add1, erf.output[0])) != 1.0:
            continue
        # 0.5 * x, then (0.5 * x) * (1 + erf)
        half = next((u for u in g.consumers[x] if u.op_type == "Mul" and u is not scale
                     and _scalar(g, g.other_input(u, x)) == 0.5), None)  # fmt: skip
        if half is None:
            continue
        final = g.only(add1.output[0], "Mul")
        if final is None or sorted(final.input) != sorted([half.output[0], add1.output[0]]):
            continue
        if g.consumers[half.output[0]] != [final] or g.consumers[scale.output[0]] != [erf]:
            continue
        new_nodes.append(
            helper.make_node("Gelu", [x], [final.output[0]], name=f"{erf.name}/Gelu", domain=MS_DOMAIN)
        )
        g.remove(scale, erf, add1, half, final)
        count += 1
    g.commit(new_nodes)
    if count:
        _ensure_opset(g.model, MS_DOMAIN, 1)
    return count


def _perm(node) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _projection(g: _Graph, name: str, seq: int, heads: int):
    """Walks ``[Add(bias)] <- Reshape([-1, T, h, d]) <- MatMul(x, W)`` up from ``name``.

    Returns ``(x, W, bias or None, nodes)`` or None.
    """
    nodes, bias = [], None
    add = g.prod(name, "Add")
    if add is not None:
        data_in = next((i for i in add.input if g.const(i) is None), None)
        bias = g.const(g.other_input(add, data_in)) if data_in else None
        if bias is None:
            return None
        nodes.append(add)
        name = data_in
    reshape = g.prod(name, "Reshape")
    shape = reshape is not None and g.const(reshape.input[1])
    if shape is None or shape is False or shape.tolist()[:3] != [-1, seq, heads]:
        return None
    mm = g.prod(reshape.input[0], "MatMul")
    weight = mm is not None and g.const(mm.input[1])
    if weight is None or weight is False or weight.ndim != 2:
        return None
    if len(g.consumers[reshape.input[0]]) != 1 or len(g.consumers[reshape.output[0]]) != 1:
        return None
    nodes += [reshape, mm]
    return mm.input[0], weight, bias, nodes


def fuse_attention(g: _Graph) -> int:
    """Keras MultiHeadAttention's exported pattern -> one ``com.microsoft.Attention``.

    Matches Q, K, V projections of one input (with optional biases), the
    query scaling, ``Softmax(K·Qᵀ, axis=2)``, the product with V and the output
    reshape, and replaces them with a fused Attention node whose packed QKV
    weights make one GEMM instead of three, with no transposes in between.
    """
    from onnx import helper

    new_nodes, count = [], 0
    for sm in [n for n in g.graph.node if n.op_type == "Softmax"]:
        if next((a.i for a in sm.attribute if a.name == "axis"), -1) != 2:
            continue
        scores = g.prod(sm.input[0], "MatMul")
        post = g.only(sm.output[0], "Transpose")
        pv = post and g.only(post.output[0], "MatMul")
        t_k = scores and g.prod(scores.input[0], "Transpose")
        t_q = scores and g.prod(scores.input[1], "Transpose")
        t_v = pv and g.prod(pv.input[1], "Transpose")
        t_out = pv and g.only(pv.output[0], "Transpose")
        out_r = t_out and g.only(t_out.output[0], "Reshape")
        if not all((scores, post, pv, t_k, t_q, t_v, t_out, out_r)):
            continue
        perms = [_perm(n) for n in (post, t_k, t_q, t_v, t_out)]
        if perms != [[0, 1, 3, 2], [0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3], [0, 2, 1, 3]]:
            continue
        scale_mul = g.prod(t_q.input[0], "Mul")
        q_data = scale_mul and next((i for i in scale_mul.input if g.const(i) is None), None)
        scale = q_data and _scalar(g, g.other_input(scale_mul, q_data))
        if scale is None:
            continue
        # Sequence length and heads come from the query's Reshape target.
        q_reshape = (
            g.prod(g.prod(q_data, "Add").input[0], "Reshape")
            if g.prod(q_data, "Add")
            else g.prod(q_data, "Reshape")
        )
        target = q_reshape is not None and g.const(q_reshape.input[1])
        if target is None or target is False or len(target) != 4:
            continue
        _, seq, heads, head_size = (int(v) for v in target.tolist())
        parts = [_projection(g, n, seq, heads) for n in (q_data, t_k.input[0], t_v.input[0])]
        if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
            continue
        out_shape = g.const(out_r.input[1])
        if out_shape is None or out_shape.tolist() != [-1, seq, heads * head_size]:
            continue
        x = parts[0][0]
        hidden = heads * head_size
        weights = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32)
        biases = np.concatenate(
            [(np.zeros(hidden) if p[2] is None else p[2]).reshape(-1) for p in parts]
        ).astype(np.float32)
        if weights.shape[1] != 3 * hidden:
            continue
        w_name = g.add_init(weights, "qkv_weight")
        b_name = g.add_init(biases, "qkv_bias")
        # Measured here: faster than a packed MatMul + Split + MultiHeadAttention.
        new_nodes.append(
            helper.make_node(
                "Attention", [x, w_name, b_name], [out_r.output[0]], name=f"{sm.name}/Attention",
                # No qkv_hidden_sizes (all three are equal): QAttention, which int8
                # quantisation produces, does not support that attribute.
                domain=MS_DOMAIN, num_heads=heads, scale=float(scale),
            )
        )  # fmt: skip
        g.remove(
            sm, scores, post, pv, t_k, t_q, t_v, t_out, out_r, scale_mul, *[n for p in parts for n in p[3]]
        )
        count += 1
    g.commit(new_nodes)
    if count:
        _ensure_opset(g.model, MS_DOMAIN, 1)
    return count


def fix_attention_softmax(g: _Graph) -> int:
    """``Transpose(Softmax(K·Qᵀ, axis=2))·V`` -> ``Softmax(Q·Kᵀ, axis=-1)·V``."""
    from onnx import helper

    new_nodes, count = [], 0
    for sm in [n for n in g.graph.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
        if axis != 2:
            continue
        scores = g.prod(sm.input[0], "MatMul")
        post = g.only(sm.output[0], "Transpose")
        if scores is None or post is None or _perm(post) != [0, 1, 3, 2]:
            continue
        t_k = g.prod(scores.input[0], "Transpose")  # K as [B, h, Tk, d]
        t_q = g.prod(scores.input[1], "Transpose")  # Q as [B, h, d, Tq]
        if t_k is None or t_q is None or _perm(t_k) != [0, 2, 1, 3] or _perm(t_q) != [0, 2, 3, 1]:
            continue
        if g.consumers[scores.output[0]] != [sm] or len(g.consumers[t_k.output[0]]) != 1:
            continue
        if len(g.consumers[t_q.output[0]]) != 1:
            continue
        q4, k4 = t_q.input[0], t_k.input[0]  # both [B, T, h, d]
        base = sm.name
        q_t = helper.make_node(
            "Transpose", [q4], [f"{base}/q_bhtd"], perm=[0, 2, 1, 3], name=f"{base}/q_bhtd"
        )
        k_t = helper.make_node(
            "Transpose", [k4], [f"{base}/k_bhdt"], perm=[0, 2, 3, 1], name=f"{base}/k_bhdt"
        )
        mm = helper.make_node(
            "MatMul", [q_t.output[0], k_t.output[0]], [f"{base}/scores"], name=f"{base}/scores"
        )
        soft = helper.make_node("Softmax", [mm.output[0]], [post.output[0]], axis=-1, name=f"{base}/softmax")
        new_nodes += [q_t, k_t, mm, soft]
        g.remove(sm, scores, post, t_k, t_q)
        count += 1
    g.commit(new_nodes)
    return count


def _drop_unused_initializers(model) -> None:
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _shape_source(g: _Graph, name: str, depth: int = 6) -> str | None:
    """The tensor whose ``Shape`` a shape computation starts from, if unique."""
    node = g.producer.get(name)
    if node is None or depth == 0:
        return None
    if node.op_type == "Shape":
        return node.input[0]
    sources = {_shape_source(g, i, depth - 1) for i in node.input if g.const(i) is None}
    sources.discard(None)
    return sources.pop() if len(sources) == 1 else None


def fold_tensordot(g: _Graph) -> int:
    """``Reshape(x, [-1, K]) · W`` then ``Reshape(back to x's leading dims)`` -> ``x · W``.

    Keras' Dense on a 3-D tensor exports as TensorFlow's Tensordot: a flattening
    Reshape, a 2-D MatMul and a Reshape whose shape is computed at run time from
    ``Shape(x)`` (six small ops per layer). ONNX MatMul broadcasts over leading
    dimensions, so a single 3-D MatMul gives the same result.
    """
    from onnx import helper

    new_nodes, count = [], 0
    for mm in [n for n in g.graph.node if n.op_type == "MatMul"]:
        flat = g.prod(mm.input[0], "Reshape")
        weight = g.const(mm.input[1])
        if flat is None or weight is None or weight.ndim != 2:
            continue
        target = g.const(flat.input[1])
        if target is None or target.tolist() != [-1, weight.shape[0]]:
            continue
        unflat = g.only(mm.output[0], "Reshape")
        if unflat is None or len(g.consumers[flat.output[0]]) != 1:
            continue
        x = flat.input[0]
        if _shape_source(g, unflat.input[1]) != x:
            continue
        new_nodes.append(
            helper.make_node("MatMul", [x, mm.input[1]], [unflat.output[0]], name=f"{mm.name}/3d")
        )
        g.remove(flat, mm, unflat)
        count += 1
    g.commit(new_nodes)
    return count


def drop_dead_nodes(g: _Graph) -> int:
    """Removes nodes whose outputs nothing uses (e.g. orphaned shape arithmetic)."""
    outputs = {o.name for o in g.graph.output}
    removed = 0
    while True:
        dead = [n for n in g.graph.node if not any(o in outputs or g.consumers.get(o) for o in n.output)]
        if not dead:
            return removed
        g.remove(*dead)
        g.commit([])
        removed += len(dead)


def _ensure_opset(model, domain: str, version: int) -> None:
    if not any(op.domain == domain for op in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(domain, version))


def optimize(model) -> tuple[object, FusionReport]:
    """Applies every rewrite to a copy of ``model``; returns it with the counts."""
    import onnx

    optimized = onnx.ModelProto()
    optimized.CopyFrom(model)
    g = _Graph(optimized)
    report = FusionReport()
    report.counts["LayerNormalization"] = fuse_layernorm(g)
    report.counts["Gelu"] = fuse_gelu(g)
    report.counts["Attention"] = fuse_attention(g)
    report.counts["AttentionSoftmaxLastAxis"] = fix_attention_softmax(g)
    report.counts["TensordotToMatMul"] = fold_tensordot(g)
    report.counts["DeadNodesRemoved"] = drop_dead_nodes(g)
    _drop_unused_initializers(optimized)
    onnx.checker.check_model(optimized)
    log.info("ONNX rewrites: %s", report.to_dict())
    return optimized, report
