"""The eval-mode network as an ONNX graph, translated from the jaxpr of `step.predict_logits`.

The graph is not a second definition of the network: it is read off the function that
`mnist_flax.evaluate` runs, traced with a symbolic batch size, one JAX primitive at a time.
It is traced in the model's plain form (`CNN()`), whose conv1 is one Conv node that ONNX
runtimes optimise; evaluation on CPU computes conv1 as the fused form's nine shifted
products, the same sum in another order (model.py).
Whatever depends only on the weights (BatchNorm's 1/sqrt(var + eps), a bias reshaped for
broadcasting) is computed here, once, and stored as an initializer; the rest becomes ONNX
nodes in the jaxpr's order, so onnxruntime does the plain form's float operations.

Layout: the graph takes what the Flax model takes, uint8 pixels (N, 28, 28, 1) NHWC, and
normalises them inside (the jaxpr starts with CNN's `normalize`). ONNX convolutions are NCHW,
so 4-D activations are kept NCHW from the first convolution until something needs the
logical NHWC order back (the flatten before `fc`); elementwise operands are permuted to match.
That costs two Transposes in the whole graph.

Why not jax2onnx (0.17.1, judged against this model): it converts by monkeypatching Flax's
functions, and its max_pool patch rejects the standard call `nn.max_pool(y, (2, 2), strides=...)`
with a TypeError; it also installs about 60 packages (equinox, orbax, huggingface-hub, netron)
for what this ~150-line translator does with `onnx` alone.

A primitive the translator does not know is an error naming it, not a silent guess: a change
to the model that needs a new translation fails the export (and tests/test_onnx.py).
"""

import functools
from dataclasses import dataclass

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mnist_flax import step
from mnist_flax.config import IMAGE_SHAPE, NUM_CLASSES
from mnist_flax.model import CNN

OPSET = 17  # the newest opset that onnxruntime-web, mobile and the C#/Java builds all load
IR_VERSION = 8  # the IR version that goes with opset 17; newer ones lock out older runtimes
INPUT, OUTPUT, BATCH = "images", "logits", "N"
TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max"}
SHAPE_ONLY = ("reshape", "broadcast_in_dim")  # left out of a computed constant's name
CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # where jit / custom_jvp / custom_vjp keep their body


class UnsupportedPrimitive(NotImplementedError):
    """The network uses a JAX operation that the translator has no ONNX form for."""


@dataclass(frozen=True)
class Const:
    value: np.ndarray
    name: str = "const"  # the variable's path ("conv1.kernel"), or what it was computed from


@dataclass(frozen=True)
class Tensor:
    name: str
    nchw: bool  # stored transposed by TO_NCHW relative to the jaxpr's (NHWC) value


class Graph:
    """Nodes and initializers being built; names are made unique here."""

    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.fresh(hint)  # unique even when a weight is used twice
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def layout(self, t: Tensor, nchw: bool) -> str:
        if t.nchw == nchw:
            return t.name
        return self.node("Transpose", [t.name], perm=list(TO_NCHW if nchw else TO_NHWC))


def _operand(g: Graph, value, like: Tensor) -> str:
    """A name for an elementwise operand, in `like`'s layout."""
    if isinstance(value, Tensor):
        return g.layout(value, like.nchw)
    array = value.value
    if array.ndim == 4 and like.nchw:
        array = array.transpose(TO_NCHW)
    return g.const(array, value.name)


def _elementwise(g: Graph, eqn, args) -> Tensor:
    a, b = args
    like = a if isinstance(a, Tensor) else b
    if eqn.primitive.name == "max" and isinstance(b, Const) and not np.any(b.value):
        return Tensor(g.node("Relu", [like.name]), like.nchw)  # relu is max(x, 0)
    return Tensor(g.node(ELEMENTWISE[eqn.primitive.name], [_operand(g, a, like), _operand(g, b, like)]), like.nchw)


def _conv(g: Graph, eqn, args) -> Tensor:
    x, kernel = args
    p = eqn.params
    dims = p["dimension_numbers"]
    if (tuple(dims.lhs_spec), tuple(dims.out_spec)) != (TO_NCHW, TO_NCHW) or not isinstance(kernel, Const) \
            or p["feature_group_count"] != 1 or p["batch_group_count"] != 1 or set(p["lhs_dilation"]) != {1}:
        raise UnsupportedPrimitive(f"conv_general_dilated with {p}")
    (top, bottom), (left, right) = p["padding"]
    out = g.node("Conv", [g.layout(x, True), g.const(kernel.value.transpose(dims.rhs_spec), kernel.name)],
                 strides=list(p["window_strides"]), dilations=list(p["rhs_dilation"]),
                 pads=[top, left, bottom, right])
    return Tensor(out, True)


def _max_pool(g: Graph, eqn, args) -> Tensor:
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    if window[0] != 1 or window[3] != 1 or strides[0] != 1 or strides[3] != 1 or padding[0] != (0, 0) \
            or padding[3] != (0, 0) or set(p["base_dilation"]) | set(p["window_dilation"]) != {1}:
        raise UnsupportedPrimitive(f"reduce_window_max over batch or channels: {p}")
    (top, bottom), (left, right) = padding[1:3]
    out = g.node("MaxPool", [g.layout(args[0], True)], kernel_shape=list(window[1:3]),
                 strides=list(strides[1:3]), pads=[top, left, bottom, right])
    return Tensor(out, True)


def _reshape(g: Graph, eqn, args) -> Tensor:
    sizes = [d if isinstance(d, int) else -1 for d in eqn.params["new_sizes"]]  # the batch is symbolic
    if sizes.count(-1) > 1 or eqn.params.get("dimensions") is not None:
        raise UnsupportedPrimitive(f"reshape to {eqn.params['new_sizes']}")
    return Tensor(g.node("Reshape", [g.layout(args[0], False), g.const(np.array(sizes, np.int64), "shape")]), False)


def _dot(g: Graph, eqn, args) -> Tensor:
    x, w = args
    (contract, batch) = eqn.params["dimension_numbers"]
    if contract != ((1,), (0,)) or batch != ((), ()) or not isinstance(w, Const):
        raise UnsupportedPrimitive(f"dot_general with dimension_numbers {eqn.params['dimension_numbers']}")
    return Tensor(g.node("MatMul", [g.layout(x, False), g.const(w.value, w.name)]), False)


def _cast(g: Graph, eqn, args) -> Tensor:
    to = helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params["new_dtype"]))
    return Tensor(g.node("Cast", [args[0].name], to=to), args[0].nchw)


TRANSLATIONS = {**{name: _elementwise for name in ELEMENTWISE}, "conv_general_dilated": _conv,
                "reduce_window_max": _max_pool, "reshape": _reshape, "dot_general": _dot,
                "convert_element_type": _cast}


def _read(env: dict, var):
    if isinstance(var, jex.core.Literal):
        return Const(np.asarray(var.val, var.aval.dtype))
    return env[var]


def _translate(g: Graph, jaxpr, args: list) -> list:
    env = dict(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [_read(env, v) for v in eqn.invars]
        body = next((eqn.params[k] for k in CALLS if k in eqn.params), None)
        if all(isinstance(v, Const) for v in ins):  # weights only: computed now, stored as a constant
            outs = eqn.primitive.bind(*[v.value for v in ins], **eqn.params)
            name = next((v.name for v in ins if v.name != "const"), "const")
            if eqn.primitive.name not in SHAPE_ONLY:
                name = f"{name}.{eqn.primitive.name}"
            outs = [Const(np.asarray(o), name) for o in (outs if eqn.primitive.multiple_results else [outs])]
        elif body is not None:  # jit(relu) and friends: translate the body in place
            outs = _translate(g, getattr(body, "jaxpr", body), ins)
        elif eqn.primitive.name in TRANSLATIONS:
            outs = [TRANSLATIONS[eqn.primitive.name](g, eqn, ins)]
        else:
            raise UnsupportedPrimitive(f"no ONNX translation for the JAX primitive {eqn.primitive.name!r}")
        env.update(zip(eqn.outvars, outs))
    return [_read(env, v) for v in jaxpr.outvars]


def eval_jaxpr(variables: dict) -> jex.core.ClosedJaxpr:
    """The jaxpr of eval-mode inference, weights as inputs, batch size symbolic."""
    shape = jax.export.symbolic_shape(", ".join([BATCH, *map(str, IMAGE_SHAPE)]))
    images = jax.ShapeDtypeStruct(shape, jnp.uint8)
    return jax.make_jaxpr(functools.partial(step.predict_logits, model=CNN()))(variables, images)


def to_onnx(variables: dict, metadata: dict[str, str]) -> onnx.ModelProto:
    """The network with these weights as an ONNX model: uint8 NHWC images in, logits out."""
    closed = eval_jaxpr(variables)
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    g = Graph()
    args = [Const(np.asarray(v), ".".join(str(k.key) for k in path[1:])) for path, v in leaves]
    args.append(Tensor(INPUT, False))
    (logits,) = _translate(g, closed.jaxpr, args)
    g.nodes.append(helper.make_node("Identity", [g.layout(logits, False)], [OUTPUT], name=OUTPUT))
    graph = helper.make_graph(
        g.nodes, "mnist_flax",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, [BATCH, *IMAGE_SHAPE])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, NUM_CLASSES])],
        initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="mnist_flax", doc_string=metadata.get("layout", ""))
    helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    return model
