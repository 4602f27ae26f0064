"""The drawing page (page.html), as the server serves it and as the static site ships it.

One page, two backends: served by `mnist_flax.serve`, it posts each drawing to /api/predict,
which prepares it with predict.py and runs the Flax model; built by `mnist_flax.site`, it
prepares the drawing itself with prepare.js (predict.py's steps and constants) and runs the
exported ONNX model in onnxruntime-web. Either way it loads nothing from another origin: its
Content-Security-Policy allows only its own inline code and, for the static site, the files
beside it.
"""

import base64
import hashlib
import re
from importlib import resources

SERVER, ONNX = "server", "onnx"
BACKEND_MARK = '<body data-backend="server">'


def source(name: str) -> str:
    return resources.files("mnist_flax").joinpath(name).read_text(encoding="utf-8")


def inline_hashes(html: str, tag: str) -> str:
    """CSP source expressions for the bodies of `html`'s attribute-less <tag> elements."""
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))


def page_html(backend: str = SERVER) -> tuple[str, str]:
    """The page for `backend`, and the Content-Security-Policy it runs under.

    The static page also carries its policy in a <meta> tag, since a static host sends no headers
    of its own: its scripts may come from its own folder too, and compile WebAssembly there.
    """
    html = source("page.html")
    if html.count(BACKEND_MARK) != 1:
        raise RuntimeError(f"page.html must hold {BACKEND_MARK} exactly once")
    scripts = inline_hashes(html, "script")
    if backend == ONNX:
        scripts = f"'self' 'wasm-unsafe-eval' {scripts}"
    policy = (f"default-src 'none'; script-src {scripts}; style-src {inline_hashes(html, 'style')}; "
              "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'")
    if backend == SERVER:
        return html, policy + "; frame-ancestors 'none'"  # a header-only directive: not allowed in <meta>
    meta = f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
    html = html.replace("<head>\n", f"<head>\n{meta}\n", 1).replace(BACKEND_MARK, f'<body data-backend="{ONNX}">')
    return html, policy
