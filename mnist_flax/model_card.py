"""Command line: the model card of a trained checkpoint, MODEL_CARD.md, laid out as model hubs do.

    python -m mnist_flax.model_card CHECKPOINT_OR_DIR [-o FILE]

Every figure in it comes from the checkpoint's sidecar, from the files beside the checkpoint, or
from one measurement made as the card is written (what the network answers on images that hold
no digit). Nothing is typed by hand, so a card always describes the files it ships with.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnist_flax import checkpoint, cli, plots, sidecar
from mnist_flax.atomic import atomic_write_text
from mnist_flax.config import IMAGE_SHAPE
from mnist_flax.errors import CheckpointError
from mnist_flax.report import percent, table

FILE_NAME = "MODEL_CARD.md"
NOISE_IMAGES, NOISE_SEED = 1_000, 0  # the probe of what the network says where there is no digit
CONFIDENT = 0.9


FILE_ROW = re.compile(r"^\| `([^`]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|$", re.M)  # a row of the Files table


def listed_sha256(card: str) -> dict[str, str]:
    """The sha256 that a card's Files table lists for each file, by name."""
    return dict(FILE_ROW.findall(card))


def card_files(path: Path) -> list[Path]:
    """The checkpoint and what ships beside it: its sidecar, its exports and the four plots."""
    exports = [path.with_suffix(suffix) for suffix in (".safetensors", ".onnx")]
    beside = [path.parent / name for name in plots.PLOT_FILES]
    return [p for p in [path, sidecar.path_for(path), *exports, *beside] if p.is_file()]


def noise_probe(variables: dict, record: dict) -> np.ndarray:
    """The top probability the network gives each of NOISE_IMAGES images of uniform random pixels."""
    from mnist_flax import step
    images = np.random.default_rng(NOISE_SEED).integers(0, 256, (NOISE_IMAGES, *IMAGE_SHAPE), dtype=np.uint8)
    return step.predict_probabilities(variables, images, model=checkpoint.network_for(record)).max(axis=1)


def training_images(config: dict) -> str:
    from mnist_flax.config import NUM_TRAIN_EXAMPLES
    subset = config.get("train_examples")
    return f"its first {subset:,} images" if subset else f"all {NUM_TRAIN_EXAMPLES:,} images"


def front_matter(record: dict) -> list[str]:
    """The YAML header that model hubs read: licence, library, data and the evaluated metric."""
    return ["---", "license: mit", "library_name: flax", "pipeline_tag: image-classification",
            "tags: [mnist, jax, flax, onnx, safetensors]", "datasets: [mnist]", "metrics: [accuracy]",
            "model-index:", "- name: mnist-flax", "  results:", "  - task: {type: image-classification}",
            "    dataset: {name: MNIST, type: mnist, split: test}",
            f"    metrics: [{{type: accuracy, value: {record['test_accuracy']}}}]", "---", ""]


def usage(path: Path) -> list[str]:
    """How to load the shipped files in Flax, PyTorch and onnxruntime, each on its own."""
    from mnist_flax.onnx_graph import INPUT
    stem = path.stem
    return [
        "## How to use", "",
        "In Flax, with this project installed (`pip install -e .` in its repository):", "", "```python",
        "import numpy as np", "from mnist_flax import checkpoint, step", "",
        f'variables, record = checkpoint.load_checkpoint("{path.name}")  # checks the sha256 in the sidecar',
        "images = np.zeros((1, 28, 28, 1), np.uint8)  # uint8 pixels, a white digit on black",
        "print(step.predict_probabilities(variables, images, model=checkpoint.network_for(record)))", "```", "",
        "In PyTorch, into the original network (`pytorch_original/` in the repository):", "", "```python",
        "import torch", "from safetensors.torch import load_file", "from pytorch_original import OriginalNet, normalize",
        "", "model = OriginalNet()", f'model.load_state_dict(load_file("{stem}.safetensors"), strict=True)',
        "model.eval()", "images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)  # NCHW",
        "print(model(normalize(images)).softmax(1))", "```", "",
        "In onnxruntime, or anything else that runs ONNX (the pixels are normalised inside the graph):", "",
        "```python", "import numpy as np", "import onnxruntime as ort", "",
        f'session = ort.InferenceSession("{stem}.onnx")',
        f'print(session.run(None, {{"{INPUT}": np.zeros((1, 28, 28, 1), np.uint8)}})[0])  # logits', "```", ""]


def model_card(path: str | Path) -> str:
    """The Markdown card of the checkpoint at `path` (a .msgpack with its sidecar)."""
    from mnist_flax.model import parameter_table

    path = Path(path)
    variables, record = checkpoint.load_checkpoint(path)
    if record is None or "test_accuracy" not in record:
        raise CheckpointError(f"{path}: no sidecar with a test accuracy beside it; a model card is made "
                              "from the metadata that `python -m mnist_flax.train` writes there")
    config = record.get("config", {})
    matrix = np.array(record["confusion_matrix"]) if "confusion_matrix" in record else None
    params = parameter_table(variables["params"])
    top = noise_probe(variables, record)
    lines = front_matter(record) + [
        f"# mnist-flax `{path.stem}`", "",
        "A small convolutional network that reads handwritten digits: the classic PyTorch MNIST network "
        "(five 3x3 and 1x1 convolutions with BatchNorm and ReLU, one max-pool, one dense layer), "
        "reimplemented and trained in JAX/Flax, with weights in msgpack, safetensors (the PyTorch "
        "original's layout) and ONNX.", "",
        "## Model", ""]
    rows = [[name, "×".join(map(str, shape)), f"{count:,}"] for name, shape, count in params]
    lines += table(["layer/param", "shape", "count"], rows + [["**total**", "", f"**{sum(c for *_, c in params):,}**"]],
                   "llr")
    lines += ["", "Input: uint8 pixels (N, 28, 28, 1), a white digit on black, as MNIST's; output: ten logits.", "",
              "## Training data", "",
              f"MNIST's training split ({training_images(config)}), read from its IDX files (each checked "
              "against its sha256) through tensorflow-datasets.", "",
              "## Training procedure", ""]
    lines += table(["setting", "value"], [[k, f"`{v}`"] for k, v in sorted(config.items())] + [
        ["steps", f"{record.get('num_batches_tracked', 'n/a'):,}"],
        ["epoch time", ", ".join(f"{s:.1f} s" for s in record.get("epoch_seconds", [])) or "n/a"],
        ["versions", ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items()) or "n/a"],
        ["created", record.get("created", "n/a")]])
    counted = f" ({int(np.trace(matrix)):,} of {int(matrix.sum()):,} test images)" if matrix is not None else ""
    lines += ["", "## Evaluation", "",
              f"Test accuracy: **{percent(record['test_accuracy'])}**{counted}, on MNIST's test split.", ""]
    if "per_class_test_accuracy" in record:
        lines += table(["digit", "test accuracy"], [[d, percent(a)] for d, a in
                                                    enumerate(record["per_class_test_accuracy"])], "rr")
        lines.append("")
    lines += ["## Intended use", "",
              "Reading single handwritten digits, 0-9, prepared as MNIST's were (`mnist_flax.predict` does "
              "that for any PNG or JPEG), and teaching how a JAX/Flax model is trained, tested and shipped.", "",
              "## Limitations", "",
              "- It always names one of the ten digits: it has no answer for \"not a digit\". On "
              f"{NOISE_IMAGES:,} images of uniform random pixels (seed {NOISE_SEED}) its top probability "
              f"averaged {percent(float(top.mean()), 1)}, and exceeded {CONFIDENT:.0%} on "
              f"{percent(float((top > CONFIDENT).mean()), 1)} of them.",
              "- It learnt MNIST's digits only: centred by centre of mass in a 20x20 box, white on black, "
              "mostly North American handwriting. Digits that are not prepared that way, printed digits, "
              "letters and several digits in one image are outside what it was tested on.",
              "- The accuracy above is for MNIST's test split; it says nothing about other handwriting.", ""]
    lines += usage(path)
    lines += ["## Files", ""]
    lines += table(["file", "bytes", "sha256"], [[f"`{p.name}`", f"{p.stat().st_size:,}", f"`{sidecar.sha256_hex(p.read_bytes())}`"]
                                                 for p in card_files(path)], "lrl")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.model_card", description=__doc__.splitlines()[0])
    p.add_argument("path", metavar="CHECKPOINT_OR_DIR", help="a .msgpack, or a directory (its newest one is used)")
    p.add_argument("-o", "--output", type=Path, help=f"where to write it (default: {FILE_NAME} beside the checkpoint)")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    path = checkpoint.find(args.path)
    out = args.output or path.parent / FILE_NAME
    atomic_write_text(out, model_card(path))
    print(out)
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
