"""The web app behind `python -m mnist_flax.serve`: the drawing page and the JSON API.

  GET  /              the page (page.html): draw with mouse or touch, or upload an image
  POST /api/predict   a PNG/JPEG body (image/png, image/jpeg) or a multipart/form-data upload
                      with a `file` field -> {"digit", "probabilities", "inverted", "image"}
  GET  /api/model     the checkpoint's metadata
  GET  /healthz       {"status": "ok"}; the app exists only once the model is compiled
  GET  /docs          the OpenAPI schema, browsable (/openapi.json raw)

Every image goes through `predict.prepare`, the preprocessing of `mnist_flax.predict`, and
the jit-compiled eval function, compiled in `create_app` before the app serves. `image` in
the answer is the 28x28 the network saw. Bad input of any kind is a 4xx JSON `{"error": ...}`
with a message, never a 500: a body over MAX_BODY_BYTES, a wrong content type, malformed
multipart, and anything `predict.prepare` refuses (not an image, truncated, 0 pixels, too
many pixels, blank). Requests never name files: nothing a request holds reaches the file system.
"""
import base64
import io
import sys
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mnist_flax import model, page, predict, sidecar, step
from mnist_flax.config import NUM_CLASSES
from mnist_flax.errors import ImageError

MAX_BODY_BYTES = 2**20  # 1 MiB: a digit photo needs far less; more is refused before it is decoded
IMAGE_TYPES = ("image/png", "image/jpeg")
MULTIPART, FILE_FIELD = "multipart/form-data", "file"
UPLOAD_NAME = "the uploaded image"  # how errors name an upload: requests carry no file names


class Prediction(BaseModel):
    digit: int = Field(ge=0, lt=NUM_CLASSES, description="the most probable digit")
    probabilities: Annotated[list[float], Field(min_length=NUM_CLASSES, max_length=NUM_CLASSES,
                                                description="softmax over the digits 0-9, summing to 1")]
    inverted: bool = Field(description="the image was dark ink on a light background, and was inverted")
    image: str = Field(description="the 28x28 uint8 image the network saw, white on black, as a base64 PNG")


class ModelInfo(BaseModel):
    checkpoint: str
    sha256: str
    test_accuracy: float | None
    parameters: int
    created: str | None
    max_body_bytes: int
    accepts: list[str]


class Health(BaseModel):
    status: Literal["ok"]


class Error(BaseModel):
    error: str = Field(description="what was wrong with the request, and what to send instead")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


ERRORS = {400: "not an image with a digit, or malformed multipart", 413: f"body over {MAX_BODY_BYTES:,} bytes",
          415: "a content type other than PNG, JPEG or multipart"}
PREDICT_BODY = {"required": True, "content": {
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
    MULTIPART: {"schema": {"type": "object", "required": [FILE_FIELD], "additionalProperties": False,
                           "properties": {FILE_FIELD: {"type": "string", "format": "binary"}}}},
}}


class Classifier:
    """The checkpoint's eval function, in its run's form, compiled for one image at construction."""

    def __init__(self, variables: dict, network: model.CNN):
        self.variables, self.network = variables, network
        self(np.zeros((predict.SIDE, predict.SIDE), np.uint8))  # compile now, not on the first request

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return step.predict_probabilities(self.variables, image[None, :, :, None], batch_size=1, model=self.network)[0]


def png_base64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def classify(classifier: Classifier, data: bytes) -> Prediction:
    if not data:
        raise ApiError(400, f"{UPLOAD_NAME}: it is empty (0 bytes); send a PNG or JPEG image of one digit")
    try:
        prepared = predict.prepare(io.BytesIO(data), UPLOAD_NAME)
    except ImageError as e:
        raise ApiError(400, str(e)) from None
    probs = classifier(prepared.image)
    return Prediction(digit=int(np.argmax(probs)), probabilities=[float(p) for p in probs],
                      inverted=prepared.inverted, image=png_base64(prepared.image))


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes MAX_BODY_BYTES (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the body is over {MAX_BODY_BYTES:,} bytes; send a smaller image "
                              "(a digit needs a few kilobytes)")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def uploaded_file(request: Request, body: bytes) -> bytes:
    """The `file` field of a multipart body already read (and size-checked) as `body`."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=1, max_fields=10)
    except Exception as e:  # Starlette's 400 and python-multipart's errors for bad boundaries, headers, parts
        reason = str(getattr(e, "detail", None) or e)[:120]
        raise ApiError(400, f"malformed multipart body ({reason}); send a multipart/form-data upload "
                            f"with one '{FILE_FIELD}' field") from None
    upload = form.get(FILE_FIELD)
    if upload is None or isinstance(upload, str):
        raise ApiError(400, f"the multipart body has no file in a '{FILE_FIELD}' field; send the image there")
    others = sorted(set(form.keys()) - {FILE_FIELD})
    if others:  # the schema allows no other field: what one would mean is anybody's guess
        raise ApiError(400, f"the multipart body has fields other than '{FILE_FIELD}' ({', '.join(others)[:80]}); "
                            f"send only the image, in '{FILE_FIELD}'")
    return await upload.read()


def describe(path: Path, record: dict | None, variables: dict) -> ModelInfo:
    """What /api/model says of the checkpoint at `path` (its sidecar is `record`)."""
    record = record or {}
    return ModelInfo(checkpoint=path.name, sha256=sidecar.sha256_hex(path.read_bytes()),
                     test_accuracy=record.get("test_accuracy"), parameters=model.count_params(variables["params"]),
                     created=record.get("created"), max_body_bytes=MAX_BODY_BYTES, accepts=[*IMAGE_TYPES, MULTIPART])


def create_app(variables: dict, info: ModelInfo, network: model.CNN) -> FastAPI:
    """The app for one checkpoint, applied as `network`; its eval function is compiled here, before it serves."""
    classifier = Classifier(variables, network)
    html, policy = page.page_html(page.SERVER)
    app = FastAPI(title="mnist-flax", version=info.sha256[:12],
                  description="Classify a handwritten digit with the checkpoint " + info.checkpoint)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # 404 and 405 from routing, as JSON too
        hint = {404: "; the page is at /, the API at /api/predict (see /docs)",
                405: "; see /docs for each path's methods"}.get(exc.status_code, "")
        return error(exc.status_code, f"{exc.detail}{hint}", exc.headers)  # a 405's Allow, as RFC 9110 wants

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(422, f"invalid request: {exc.errors()[0].get('msg', 'see /docs')}"[:200])

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # a bug: say so, without a traceback to the client
        print(f"mnist_flax.serve: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return error(500, "internal error in mnist_flax.serve; the server log has the details")

    @app.get("/", response_class=HTMLResponse, summary="The drawing page")
    def drawing_page():
        return HTMLResponse(html, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"})

    @app.post("/api/predict", response_model=Prediction, summary="Classify one digit image",
              openapi_extra={"requestBody": PREDICT_BODY},
              responses={status: {"model": Error, "description": text} for status, text in ERRORS.items()})
    async def predict_digit(request: Request) -> Prediction:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in (*IMAGE_TYPES, MULTIPART):
            raise ApiError(415, f"content type {media_type or '(none)'!r:.60} is not accepted; send the image "
                                f"as {' or '.join(IMAGE_TYPES)}, or as {MULTIPART} with a '{FILE_FIELD}' field")
        body = await read_body(request)
        data = await uploaded_file(request, body) if media_type == MULTIPART else body
        return await run_in_threadpool(classify, classifier, data)  # decoding and XLA off the event loop

    @app.get("/api/model", response_model=ModelInfo, summary="The checkpoint being served")
    def model_info() -> ModelInfo:
        return info

    @app.get("/healthz", response_model=Health, summary="Ready to classify")
    def health() -> Health:
        return Health(status="ok")

    return app


