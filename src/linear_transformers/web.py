"""`linear-transformers web`: serve the in-browser demo (web/) on localhost.

The checkpoint's recurrent step is exported to ONNX (verified against PyTorch, see export.py) into
the cache (~/.cache/linear_transformers/web/, once per set of weights and version of the export
code: a later start reuses it) and served at /model/; the page (web/index.html, web/demo.js) runs
it with onnxruntime-web, which `make web` installs from the npm registry and copies into
web/vendor/. Without --checkpoint the model shipped in web/checkpoint/ is served. The page draws
image models; `?autostart` (with `&digit=3&temperature=0.8&seed=1`) generates on load.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from .options import add_options, from_args, option

WEB_DIR = Path(__file__).resolve().parents[2] / "web"  # the repository's web/ (an editable install)
VENDOR_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm")


@dataclass
class WebConfig:
    checkpoint: str = option("", "run or checkpoint folder to serve (default: the model shipped in web/checkpoint)")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on (0: any free port)")
    web_dir: str = option("", "the page's folder (default: web/ of this repository)")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"web: --port must be in [0, 65535] (0: any free port), got {self.port}")


class _Handler(SimpleHTTPRequestHandler):
    """Static files of web/, with /model/ mapped to the exported model's folder. No directory
    listings, and only requests addressed to this server by name (Host: localhost, 127.0.0.1, [::1]
    or the listening address, with its port): a page elsewhere cannot reach it through DNS rebinding."""

    extensions_map: ClassVar[dict[str, str]] = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
        ".onnx": "application/octet-stream",
        ".json": "application/json",
    }

    def __init__(self, *args, model_dir: Path, **kwargs) -> None:
        self.model_dir = model_dir
        super().__init__(*args, **kwargs)

    def _host_allowed(self) -> bool:
        host, port = self.server.server_address[:2]
        names = {"localhost", "127.0.0.1", "[::1]", str(host), f"[{host}]"}
        return self.headers.get("Host", "") in {f"{name}:{port}" for name in names}

    def do_GET(self) -> None:
        if not self._host_allowed():
            self.send_error(403, "unexpected Host header")
            return
        super().do_GET()

    def do_HEAD(self) -> None:
        if not self._host_allowed():
            self.send_error(403, "unexpected Host header")
            return
        super().do_HEAD()

    def list_directory(self, path):
        self.send_error(404, "no directory listings")
        return None

    def translate_path(self, path: str) -> str:
        """The file for a URL path: inside web/ (or the model folder) and reached without a symbolic
        link, which could point anywhere on the machine; anything else maps to a file that is not there."""
        name = path.split("?", 1)[0].split("#", 1)[0]
        if name.startswith("/model/"):
            root = self.model_dir
            target = root / Path(name[len("/model/") :]).name  # one file name, no folders
        else:
            root, target = Path(self.directory), Path(super().translate_path(path))
        missing = str(root / ".not-served" / "404")
        try:
            inside = Path(os.path.normpath(target)).relative_to(os.path.normpath(root))
        except ValueError:
            return missing
        probe = root
        for part in inside.parts:
            probe = probe / part
            if probe.is_symlink():
                return missing
        return str(probe)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        pass


def check_web_dir(web_dir: Path) -> None:
    if not (web_dir / "index.html").is_file():
        raise FileNotFoundError(f"web: {web_dir} has no index.html; pass --web-dir, the repository's web/ folder")
    missing = [f for f in VENDOR_FILES if not (web_dir / "vendor" / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"web: onnxruntime-web is not built into {web_dir / 'vendor'} (missing {', '.join(missing)}); "
            f"run `make web` (or `npm ci && npm run build` in {web_dir})"
        )


def export_for_web(checkpoint: str | Path) -> tuple[Path, dict, bool]:
    """The checkpoint's step as model.onnx + model.json (what the page loads) in the cache ->
    (their folder, the sidecar, whether an earlier export was reused). Exported and verified once
    per set of weights and version of the package's code; an image model only (one-line error)."""
    from . import export as export_module
    from .checkpoint import load_model
    from .native.build import cache_dir

    model, config = load_model(checkpoint)
    data = config.get("data") or {}
    if data.get("alphabet") or not data.get("image_shape"):
        kind = "a text model" if data.get("alphabet") else "not an image model"
        raise ValueError(
            f"web: this page draws image models; {checkpoint} is {kind} (`linear-transformers sample` "
            "generates from it, `export --onnx` writes its step for another runtime)"
        )
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.rglob("*.py")):  # the code that makes the graph, all of it
        digest.update(source.read_bytes())
    digest.update(json.dumps([config.get("model"), data], sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    folder = cache_dir() / "web" / digest.hexdigest()[:20]
    if (folder / "model.onnx").is_file() and (folder / "model.json").is_file():
        return folder, json.loads((folder / "model.json").read_text()), True
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        sidecar = export_module.export(model, tmp / "model.onnx", data=data)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model.onnx").is_file():  # (else another process finished the same export first)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, sidecar, False


def make_server(web_dir: Path, model_dir: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    check_web_dir(web_dir)
    handler = functools.partial(_Handler, directory=str(web_dir), model_dir=model_dir)
    return ThreadingHTTPServer((host, port), handler)


class DemoServer:
    """The demo served from a background thread: `with DemoServer(...) as url:` (the command, the tests)."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        web_dir: str | Path | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.web_dir = Path(web_dir) if web_dir else WEB_DIR
        self.checkpoint = Path(checkpoint) if checkpoint else self.web_dir / "checkpoint"
        self.host, self.port = host, port

    def __enter__(self) -> str:
        check_web_dir(self.web_dir)
        self.model_dir, self.export, self.reused = export_for_web(self.checkpoint)
        try:
            self._server = make_server(self.web_dir, self.model_dir, self.host, self.port)
        except OSError as e:  # (a port in use or not ours to take, an address this machine lacks)
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"web: cannot listen on {self.host}:{self.port} ({e.strerror or e})") from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def run_web(cfg: WebConfig) -> None:
    server = DemoServer(cfg.checkpoint or None, cfg.web_dir or None, cfg.port, cfg.host)
    with server as url:
        steps = server.export["verified"]["steps"]
        how = "reused the export of" if server.reused else "exported"
        print(f"{how} {server.checkpoint} (checked with onnxruntime over {steps} steps; {server.model_dir})")
        print(f"serving the demo at {url} (Ctrl-C stops; {url}?autostart generates on load)")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, WebConfig)


def main(args: argparse.Namespace) -> int:
    run_web(from_args(WebConfig, args))
    return 0
