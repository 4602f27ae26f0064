"""Every setting of a training run, as one frozen dataclass, and the recipes that preset them.

A `Config` is plain data: it is resolved once (`resolve`), written into every sidecar and
resume state it produces, and read back from there (`from_dict`) on `--resume`. The
command line's flags are generated from its fields (train.py), so a new setting is one
field here, with its help text.
"""

import dataclasses
from typing import Any

from mnist_flax.errors import brief

# Facts of the data set and of the original pipeline's input normalisation
# (torchvision's MNIST mean and std).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)  # NHWC, one channel
MNIST_NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
NUM_TRAIN_EXAMPLES = MNIST_NUM_EXAMPLES["train"]

OPTIMIZERS = ("adam", "nadam")
MAX_STEPS_PER_CALL = 64  # a call's batches are gathered at once, and Ctrl-C waits for the call to end
SCHEDULES = ("constant", "onecycle")
# Which form of the network's blocks trains (model.py): "auto" picks by backend (ops.py).
OPS = ("auto", "fused", "plain")


def _field(default, help: str, choices: tuple[str, ...] | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. The defaults are the PyTorch original's recipe."""

    recipe: str = _field("original", "the preset the other fields start from (see RECIPES)")
    seed: int = _field(0, "PRNG seed: initialisation, data order and dropout")
    epochs: int = _field(1, "passes over the training set")
    batch_size: int = _field(128, "examples per step; the epoch's last batch is padded and masked")
    train_examples: int = _field(0, "train on the first N examples only, for quick checks (0: all 60,000)")
    optimizer: str = _field("adam", "adam, or nadam (Adam with Nesterov momentum)", OPTIMIZERS)
    learning_rate: float = _field(0.01, "the rate of a constant schedule; the peak of a onecycle one")
    schedule: str = _field("constant", "constant, or onecycle: linear warm-up, then linear decay", SCHEDULES)
    warmup_fraction: float = _field(0.25, "onecycle: fraction of the run spent warming up")
    initial_div: float = _field(25.0, "onecycle: the first step's rate is the peak divided by this")
    final_div: float = _field(1000.0, "onecycle: the last step's rate is the peak divided by this")
    label_smoothing: float = _field(0.0, "share of each target spread over all classes (0: plain cross-entropy)")
    steps_per_call: int = _field(4, "training steps per compiled call (see step.multi_step)")
    ops: str = _field("auto", "auto (fused on CPU, plain elsewhere), fused or plain", OPS)

    def steps_per_epoch(self) -> int:
        return num_batches(self.train_examples or NUM_TRAIN_EXAMPLES, self.batch_size)

    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets: the fields each recipe changes from Config's defaults.
RECIPES: dict[str, dict[str, Any]] = {
    # Adam at a constant 0.01, plain cross-entropy: the PyTorch original.
    "original": {},
    # NAdam, a one-cycle schedule peaking at 4x the original's rate, 10% label smoothing (which keeps
    # the last layer from chasing overconfident logits in the high-rate phase). Chosen on a
    # validation split: docs/recipes.md.
    "onecycle": {"optimizer": "nadam", "schedule": "onecycle", "learning_rate": 0.04, "label_smoothing": 0.1},
}


def num_batches(num_examples: int, batch_size: int) -> int:
    """Steps in an epoch: the last partial batch is padded, not dropped."""
    return -(-num_examples // batch_size)


def resolve(recipe: str = "original", **overrides) -> Config:
    """The recipe's preset with `overrides` on top, validated; ValueError names a bad field."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {brief(recipe)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    return validate(Config(**{**RECIPES[recipe], **overrides, "recipe": recipe}))


def from_dict(raw: Any) -> Config:
    """A Config from what `to_dict` wrote (a resume state, a sidecar); ValueError if it is not one."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise ValueError(f"a config must have exactly the fields {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        value = raw[name]
        if f.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[name] = value
    return validate(Config(**values))


def validate(config: Config) -> Config:
    """Returns `config`, or raises ValueError naming its first bad field."""
    def whole(name, low, high=None):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            bound = f"from {low:,} to {high:,}" if high else f">= {low}"
            raise ValueError(f"{name.replace('_', ' ')} must be a whole number {bound}, got {brief(value)}")

    def number(name, low, high, low_open=True):
        value = getattr(config, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (low < value if low_open else low <= value) and value < high
        if not ok:
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high != float("inf") else "")
            raise ValueError(f"{name.replace('_', ' ')} must be a finite number {bound}, got {brief(value)}")

    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not -2**63 <= config.seed < 2**63:
        raise ValueError(f"seed must be a whole number from -2**63 to 2**63 - 1, got {brief(config.seed)}")  # int64 keys
    whole("epochs", 1)
    whole("batch_size", 1, NUM_TRAIN_EXAMPLES)
    whole("steps_per_call", 1, MAX_STEPS_PER_CALL)
    whole("train_examples", 0)
    number("learning_rate", 0, float("inf"))
    number("warmup_fraction", 0, 1, low_open=False)
    number("initial_div", 0, float("inf"))
    number("final_div", 0, float("inf"))
    number("label_smoothing", 0, 1, low_open=False)
    for f in dataclasses.fields(Config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ValueError(f"{f.name.replace('_', ' ')} must be one of {', '.join(choices)}, "
                             f"got {brief(getattr(config, f.name))}")
    if config.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {brief(config.recipe)}")
    return config
