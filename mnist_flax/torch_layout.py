"""The Flax model's variables in the PyTorch original's layout, and back: pure conversions.

The exported keys are exactly the state_dict of the PyTorch original
(pytorch_original/model.py in the repository), so `load_state_dict(..., strict=True)`
accepts them and the network gives the same logits in eval mode. Inputs stay as in the
original: NCHW float32, normalised outside the model as (x / 255 - 0.1307) / 0.3081.

Layout differences the conversion undoes, layer by layer in the model's own order:
  conv kernels   Flax HWIO -> PyTorch OIHW
  dense kernel   Flax (in, out) -> PyTorch (out, in); the layer after the flatten also has
                 its inputs reordered: Flax flattens NHWC activations as (h, w, c), PyTorch
                 flattens NCHW as (c, h, w). The (h, w, c) shape is read off the model.
  BatchNorm      scale/bias -> weight/bias; mean/var -> running_mean/running_var;
                 plus `num_batches_tracked`, which Flax does not keep (it only matters
                 to PyTorch when momentum=None, which the original doesn't use).
"""

import functools
import math
from typing import TYPE_CHECKING

import numpy as np

from mnist_flax import checkpoint
from mnist_flax.errors import CheckpointError

if TYPE_CHECKING:
    import jax

# JAX and the model are imported where weights are converted: the files' and the commands'
# checks that need neither answer without them.

LAYOUT_NOTE = ("PyTorch state_dict of OriginalNet (pytorch_original/model.py): conv weights OIHW; fc.weight "
               "(out, in) with inputs in torch.flatten order of NCHW (c, h, w); inputs NCHW float32 "
               "normalised as (x/255 - 0.1307)/0.3081; eval mode uses running BatchNorm statistics")


@functools.cache
def fc_input_hwc() -> tuple[int, int, int]:
    """(H, W, C) of the activation the model flattens into its dense layer, from an abstract run."""
    import jax

    from mnist_flax.model import CNN, example_images

    _, state = jax.eval_shape(lambda v: CNN().apply(v, example_images(), train=False, mutable=["intermediates"]),
                              checkpoint.model_template())
    return tuple(state["intermediates"]["fc_input"][0].shape[1:])


def fc_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax (h*w*c, out) -> PyTorch (out, c*h*w): torch[o, (c*H + h)*W + w] = flax[(h*W + w)*C + c, o]."""
    h, w, c = fc_input_hwc()
    return kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, h * w * c)


def fc_weight_to_flax(weight: np.ndarray) -> np.ndarray:
    """The inverse of fc_kernel_to_torch."""
    h, w, c = fc_input_hwc()
    return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    if kernel.ndim == 4:  # conv: HWIO -> OIHW
        return kernel.transpose(3, 2, 0, 1)
    return fc_kernel_to_torch(kernel) if kernel.shape[0] == math.prod(fc_input_hwc()) else kernel.T


def _weight_to_flax(weight: np.ndarray) -> np.ndarray:
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    return fc_weight_to_flax(weight) if weight.shape[1] == math.prod(fc_input_hwc()) else weight.T


def flax_to_torch_state(variables: dict, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """{'params', 'batch_stats'} -> the original network's state_dict, as numpy arrays."""
    import jax

    from mnist_flax.model import layer_order

    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    state = {}
    for name in layer_order():
        layer = params[name]
        if name in stats:  # BatchNorm
            state[f"{name}.weight"], state[f"{name}.bias"] = layer["scale"], layer["bias"]
            state[f"{name}.running_mean"], state[f"{name}.running_var"] = stats[name]["mean"], stats[name]["var"]
            state[f"{name}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
        else:  # conv or dense
            state[f"{name}.weight"], state[f"{name}.bias"] = _kernel_to_torch(layer["kernel"]), layer["bias"]
    # safetensors and torch want contiguous buffers; the transposes above are views.
    # (Not np.ascontiguousarray: it turns the 0-d num_batches_tracked into shape (1,).)
    return {k: np.array(v, order="C") for k, v in state.items()}


def torch_state_to_flax(state: dict[str, np.ndarray]) -> dict:
    """The inverse of flax_to_torch_state (num_batches_tracked is dropped). Assumes a checked state."""
    from mnist_flax.model import layer_order

    params, stats = {}, {}
    template = checkpoint.model_template()
    for name in layer_order():
        if name in template["batch_stats"]:
            params[name] = {"scale": np.array(state[f"{name}.weight"]), "bias": np.array(state[f"{name}.bias"])}
            stats[name] = {"mean": np.array(state[f"{name}.running_mean"]),
                           "var": np.array(state[f"{name}.running_var"])}
        else:
            params[name] = {"kernel": np.array(_weight_to_flax(state[f"{name}.weight"]), order="C"),
                            "bias": np.array(state[f"{name}.bias"])}
    return {"params": params, "batch_stats": stats}


def torch_template() -> "dict[str, jax.ShapeDtypeStruct]":
    """Key -> shape and dtype of the original state_dict, derived from the Flax model itself."""
    import jax

    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), checkpoint.model_template())
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flax_to_torch_state(zeros).items()}


def check_torch_state(state: dict, source: str) -> None:
    """Raises CheckpointError unless `state` has exactly the original's keys, shapes, dtypes; all finite."""
    template = torch_template()
    missing, extra = sorted(set(template) - set(state)), sorted(set(state) - set(template))
    if missing or extra:
        raise CheckpointError(f"{source}: not a state_dict of the original network: "
                              f"missing {missing or 'nothing'}, unexpected {extra[:10] or 'nothing'}")
    for key, want in template.items():
        got = state[key]
        if not isinstance(got, np.ndarray):
            raise CheckpointError(f"{source}: {key} is a {type(got).__name__}, not an array")
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{source}: {key} is {got.dtype}{list(got.shape)}, "
                                  f"the model needs {want.dtype}{list(want.shape)}")
        if not np.all(np.isfinite(got)):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values")
        if key.endswith("num_batches_tracked") and got < 0:
            raise CheckpointError(f"{source}: {key} is negative ({int(got)})")
