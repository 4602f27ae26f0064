"""Training configuration as plain, immutable data."""

import dataclasses
import os

# Normalisation of the original pipeline: torchvision's MNIST mean and std.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)  # NHWC, one channel
NUM_TRAIN_EXAMPLES = 60_000
# "seed": the original's constant-rate Adam. "onecycle": see training.make_optimizer.
RECIPES = ("seed", "onecycle")

# XLA:CPU runs small convolutions' weight gradients (a 24x24-window convolution for conv2)
# much faster through Eigen than through YNNPACK, its default: docs/performance.md.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def add_xla_flags() -> None:
    """Adds the project's XLA flags to $XLA_FLAGS unless it names them already.

    Every command sets them before JAX starts, so that training, evaluation and
    prediction run the same kernels and agree on every prediction.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run; defaults are the original's."""

    seed: int = 0
    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 0.01
    recipe: str = "seed"
    train_examples: int = 0  # use only the first N training examples (quick checks); 0: all

    def validate(self) -> "TrainConfig":
        """Returns self, or raises ValueError naming the bad field."""
        if not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**63:  # JAX's PRNG keys take int64
            raise ValueError(f"seed must be a whole number from -2**63 to 2**63 - 1, got {self.seed!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a whole number >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a whole number >= 1, got {self.batch_size!r}")
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or not (0 < lr < float("inf")):
            raise ValueError(f"learning rate must be a finite number > 0, got {lr!r}")
        if not isinstance(self.train_examples, int) or self.train_examples < 0:
            raise ValueError(f"train examples must be a whole number >= 0, got {self.train_examples!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        return self

    def steps_per_epoch(self) -> int:
        examples = self.train_examples or NUM_TRAIN_EXAMPLES
        return -(-examples // self.batch_size)  # the last partial batch is padded, not dropped
