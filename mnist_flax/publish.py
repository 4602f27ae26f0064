"""Command line: what a model release publishes, checked, as the workflow's release step takes it.

    python -m mnist_flax.publish DIR --commit SHA

Prints two lines for $GITHUB_OUTPUT: `tag=` the release's tag (release.tag_for, today's UTC
date and the commit) and `files=` the assets, space-separated: the newest checkpoint in DIR,
its sidecar, its safetensors and ONNX exports, MODEL_CARD.md and the four plots. It fails,
with what to run, if one is missing, if the checkpoint does not match its sidecar, or if the
model card lists another sha256 for a file than the file has (a card older than its files).
"""

import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path

from mnist_flax import checkpoint, cli, model_card, plots, release, sidecar
from mnist_flax.errors import MnistFlaxError

EXPORTS = {".safetensors": "python -m mnist_flax.export DIR --format safetensors",
           ".onnx": "python -m mnist_flax.export DIR --format onnx"}


def release_files(directory: Path) -> list[Path]:
    """The files a release of `directory`'s newest checkpoint publishes, each one checked."""
    path = checkpoint.find(directory)
    sidecar.verify(path, path.read_bytes(), sidecar.read(path), required=True)
    wanted = {path: "python -m mnist_flax.train", sidecar.path_for(path): "python -m mnist_flax.train"}
    wanted |= {path.with_suffix(suffix): command for suffix, command in EXPORTS.items()}
    wanted[directory / model_card.FILE_NAME] = "python -m mnist_flax.model_card DIR"
    wanted |= {directory / name: "python -m mnist_flax.report DIR" for name in plots.PLOT_FILES}
    missing = [f"{p.name} (`{command.replace('DIR', str(directory))}`)" for p, command in wanted.items()
               if not p.is_file()]
    if missing:
        raise MnistFlaxError(f"{directory}: a release needs {', '.join(missing)}")
    listed = model_card.listed_sha256((directory / model_card.FILE_NAME).read_text(encoding="utf-8"))
    for p in wanted:
        if p.name in listed and listed[p.name] != sidecar.sha256_hex(p.read_bytes()):
            raise MnistFlaxError(f"{directory / model_card.FILE_NAME} lists another sha256 for {p.name} than "
                                 f"the file has; write the card again: python -m mnist_flax.model_card {directory}")
    unlisted = [p.name for p in wanted if p.name != model_card.FILE_NAME and p.name not in listed]
    if unlisted:
        raise MnistFlaxError(f"{directory / model_card.FILE_NAME} does not list {', '.join(unlisted)}; write the "
                             f"card again: python -m mnist_flax.model_card {directory}")
    return list(wanted)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.publish", description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path, metavar="DIR", help="the training run's output directory")
    p.add_argument("--commit", required=True, help="the commit the model was trained from (its full sha)")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{7,40}", args.commit):
        raise cli.UsageError(f"--commit must be a commit's hex sha, got {args.commit!r}")
    files = release_files(args.directory)
    print(f"tag={release.tag_for(dt.datetime.now(dt.timezone.utc), args.commit)}")
    print("files=" + " ".join(str(f) for f in files))
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
