"""Sends every kind of bad request to the serving API and prints a Markdown table: input, status, message.

    python scripts/api_error_table.py CHECKPOINT_OR_DIR > docs/api_errors.md

Each case goes through the real app (mnist_flax.api, in this process, over FastAPI's
TestClient) with the checkpoint given. tests/test_serve.py sends the same cases and checks
each: its 4xx status, a JSON {"error": ...} body, and a phrase that says what to send instead.
"""

import dataclasses
import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnist_flax import api  # noqa: E402


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_with_header(width: int, height: int, idat: bytes = zlib.compress(b"")) -> bytes:
    """A grayscale PNG whose header says width x height, with `idat` as its compressed pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def huge_png(side: int = 10_000) -> bytes:
    """A side x side black PNG: about 100 KB, 100 megapixels decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # each row: its filter byte, then the pixels
    return png_with_header(side, side, b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush())


def zero_height_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    at = data.find(b"\xff\xc0")  # the frame header: marker, length, precision, then height
    data[at + 5:at + 7] = b"\x00\x00"
    return bytes(data)


def digit() -> bytes:
    """A white 7-ish stroke on black: a valid image, for cases that break the envelope around it."""
    a = np.zeros((56, 56), np.uint8)
    a[10:14, 12:44] = 255
    a[14:48, 38:42] = 255
    return png(a)


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "mnistflaxboundary") -> bytes:
    parts = []
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


@dataclasses.dataclass(frozen=True)
class Case:
    what: str
    content_type: str | None
    body: bytes
    status: int
    phrase: str  # part of the message: what it says was wrong, or what to send


MULTIPART = "multipart/form-data; boundary=mnistflaxboundary"
CASES = [
    Case("a body over 1 MiB", "image/png", digit() + b"\x00" * api.MAX_BODY_BYTES, 413, "send a smaller image"),
    Case("no body", "image/png", b"", 400, "it is empty (0 bytes)"),
    Case("text, not an image", "image/png", b"hello, this is not a PNG", 400, "not a readable PNG or JPEG"),
    Case("a GIF", "image/png", b"GIF89a" + bytes(40), 400, "not a readable PNG or JPEG"),
    Case("a truncated PNG", "image/png", digit()[:60], 400, "not a readable PNG or JPEG"),
    Case("a PNG of 0x0 pixels", "image/png", png_with_header(0, 0), 400, "not a readable PNG or JPEG"),
    Case("a JPEG 0 pixels high", "image/jpeg", zero_height_jpeg(), 400, "not a readable PNG or JPEG"),
    Case("a PNG of 10,000 x 10,000 pixels", "image/png", huge_png(), 400, "too large for a digit image"),
    Case("a blank image", "image/png", png(np.zeros((64, 64), np.uint8)), 400, "no digit found"),
    Case("content type text/plain", "text/plain", digit(), 415, "is not accepted"),
    Case("no content type", None, digit(), 415, "is not accepted"),
    Case("content type application/json", "application/json", b'{"image": "7"}', 415, "is not accepted"),
    Case("malformed multipart", MULTIPART, b"--mnistflaxboundary\r\nnot a header\r\n\r\nxx", 400,
         "malformed multipart"),
    Case("multipart without a boundary", "multipart/form-data", multipart([("file", "a.png", digit())]), 400,
         "malformed multipart"),
    Case("multipart without a file field", MULTIPART, multipart([("other", "a.png", digit())]), 400,
         "no file in a 'file' field"),
    Case("multipart with text in the file field", MULTIPART, multipart([("file", None, b"seven")]), 400,
         "no file in a 'file' field"),
    Case("multipart with two files", MULTIPART,
         multipart([("file", "a.png", digit()), ("file", "b.png", digit())]), 400, "malformed multipart"),
    Case("multipart with another field beside the file", MULTIPART,
         multipart([("file", "a.png", digit()), ("note", None, b"seven")]), 400, "fields other than 'file'"),
    Case("multipart holding a text file", MULTIPART, multipart([("file", "a.txt", b"seven")]), 400,
         "not a readable PNG or JPEG"),
]


def send(client, case: Case):
    headers = {"content-type": case.content_type} if case.content_type else {}
    return client.post("/api/predict", content=case.body, headers=headers)


def table(client) -> str:
    lines = ["# The serving API's errors", "",
             "Every bad request to `POST /api/predict` gets a 4xx and a JSON `{\"error\": ...}` with a message; "
             "never a 500. Generated by `python scripts/api_error_table.py CHECKPOINT > docs/api_errors.md`; "
             "tests/test_serve.py sends the same requests.", "",
             "| input | status | message |", "|---|---|---|"]
    for case in CASES:
        response = send(client, case)
        message = response.json()["error"].replace("|", "\\|")
        lines.append(f"| {case.what} | {response.status_code} | {message} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from fastapi.testclient import TestClient

    from mnist_flax import checkpoint, runtime
    runtime.add_xla_flags()
    path = checkpoint.find(sys.argv[1])
    variables, record = checkpoint.load_checkpoint(path)
    app = api.create_app(variables, api.describe(path, record, variables), checkpoint.network_for(record))
    with TestClient(app) as client:
        sys.stdout.write(table(client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
