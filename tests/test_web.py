"""The web demo: the server, and the page in headless Chromium against PyTorch.

The browser test needs Node.js, web/node_modules (`make web`: npm ci + build) and Chromium
(Debian's `chromium`; CI installs it); it is skipped, with the reason, where one is missing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from linear_transformers.checkpoint import load_model
from linear_transformers.data import levels_to_images
from linear_transformers.web import WEB_DIR, DemoServer, check_web_dir

pytest.importorskip("onnxruntime")

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _built() -> str | None:
    try:
        check_web_dir(WEB_DIR)
    except FileNotFoundError as e:
        return str(e)
    return None


needs_build = pytest.mark.skipif(_built() is not None, reason=f"{_built()}")


# ---- the page's sampler, in Python (web/demo.js: random and choose) ----------------------------------
def mulberry32(seed: int):
    """The page's seeded generator (mulberry32), bit for bit: uniforms in [0, 1)."""
    mask = 0xFFFFFFFF
    a = seed & mask

    def rand() -> float:
        nonlocal a
        a = (a + 0x6D2B79F5) & mask
        t = ((a ^ (a >> 15)) * (a | 1)) & mask
        t ^= (t + (((t ^ (t >> 7)) * (t | 61)) & mask)) & mask
        return ((t ^ (t >> 14)) & mask) / 4294967296

    return rand


def choose(log_probs: list[float], temperature: float, rand) -> int:
    best = max(range(len(log_probs)), key=lambda i: (log_probs[i], -i))  # the first maximum, as torch.argmax
    if temperature == 0:
        return best
    weights = [math.exp((x - log_probs[best]) / temperature) for x in log_probs]
    u = rand() * sum(weights)
    for i, w in enumerate(weights):
        u -= w
        if u < 0:
            return i
    return best


@torch.no_grad()
def pytorch_tokens(model, label: int, temperature: float, seed: int) -> list[int]:
    """What the page generates, computed by the PyTorch model (prefill + step) with the page's sampler."""
    rand = mulberry32(seed)
    labels = torch.tensor([label]) if model.cfg.n_classes else None
    params, state = model.prefill(torch.zeros(1, 0, dtype=torch.long), labels)
    tokens = []
    for t in range(model.cfg.max_len):
        tokens.append(choose(model.head.log_probs(params)[0].tolist(), temperature, rand))
        if t + 1 < model.cfg.max_len:
            params, state = model.step(torch.tensor([tokens[-1]]), state)
    return tokens


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_python_port_of_the_sampler_matches_the_page(tmp_path):
    """mulberry32 and choose, run by Node from web/sampling.js, against the Python port above."""
    g = torch.Generator().manual_seed(1)
    cases = [
        (seed, temperature, torch.log_softmax(3 * torch.randn(16, generator=g), 0).tolist())
        for seed in (0, 1, 7, 123456789, 2**32 - 1)
        for temperature in (0.0, 0.5, 1.0, 1.5)
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = (
        f"import {{ choose, random }} from {json.dumps((WEB_DIR / 'sampling.js').as_uri())};"
        "import { readFileSync } from 'node:fs';"
        f"const cases = JSON.parse(readFileSync({json.dumps(str(tmp_path / 'cases.json'))}, 'utf8'));"
        "console.log(JSON.stringify(cases.map(([seed, temperature, lp]) => {"
        "  const r = random(seed); const draws = [r(), r(), r()];"
        "  const rc = random(seed); return [draws, Array.from({length: 20}, () => choose(lp, temperature, rc))];"
        "})));"
    )
    out = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for (seed, temperature, lp), (draws, chosen) in zip(cases, json.loads(out.stdout), strict=True):
        r = mulberry32(seed)
        assert [r(), r(), r()] == draws
        rc = mulberry32(seed)
        assert [choose(lp, temperature, rc) for _ in range(20)] == chosen
    assert len({tuple(c) for _, c in json.loads(out.stdout)}) > 10  # the cases do differ


# ---- the server -----------------------------------------------------------------------------------
@needs_build
def test_server_serves_the_page_the_runtime_and_the_exported_model():
    with DemoServer() as url:
        page = urllib.request.urlopen(url).read().decode()
        assert "demo.js" in page
        with urllib.request.urlopen(url + "vendor/ort-wasm-simd-threaded.wasm") as r:
            assert r.headers["Content-Type"] == "application/wasm"
        with urllib.request.urlopen(url + "vendor/ort.wasm.bundle.min.mjs") as r:
            assert r.headers["Content-Type"] == "text/javascript"
        meta = json.loads(urllib.request.urlopen(url + "model/model.json").read())
        assert meta["format"] == "linear-transformers-step" and meta["verified"]["steps"] >= 300
        assert len(urllib.request.urlopen(url + "model/model.onnx").read()) > 1_000_000
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + "model/../../pyproject.toml")


@needs_build
def test_the_export_is_reused_and_a_text_model_is_refused(tmp_path, monkeypatch):
    """A second start with the same weights serves the first start's export (no re-export); a text
    model gets one line saying the page draws images, before anything is exported."""
    from linear_transformers import checkpoint as checkpoint_module
    from linear_transformers import web

    monkeypatch.setenv("LINEAR_TRANSFORMERS_CACHE", str(tmp_path / "cache"))
    with DemoServer() as url:
        first = json.loads(urllib.request.urlopen(url + "model/model.json").read())
    calls = []
    monkeypatch.setattr("linear_transformers.export.export", lambda *a, **k: calls.append(a))
    folder, sidecar, reused = web.export_for_web(WEB_DIR / "checkpoint")
    assert reused and calls == [] and sidecar == first and folder.parent == tmp_path / "cache" / "web"
    model, config = checkpoint_module.load_model(WEB_DIR / "checkpoint")
    text = {**config, "data": {"alphabet": "ab", "vocab_size": 2}}
    monkeypatch.setattr(checkpoint_module, "load_model", lambda path: (model, text))
    with pytest.raises(ValueError, match="this page draws image models; .* is a text model"):
        web.export_for_web("runs/mine")
    assert calls == []


def test_missing_runtime_is_a_clear_error(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    with pytest.raises(FileNotFoundError, match="make web"):
        check_web_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no index.html"):
        check_web_dir(tmp_path / "nowhere")


# ---- the page in a real browser -------------------------------------------------------------------
def _browser_missing() -> str | None:
    if shutil.which("node") is None:
        return "Node.js is not installed"
    if not (WEB_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in web/ (make web)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set CHROMIUM)"
    return _built()


def tiny_rgb_checkpoint(folder) -> str:
    """An unconditional 4x4 RGB model with the mixture-of-logistics head (random weights), saved as a checkpoint."""
    from safetensors.torch import save_file

    from linear_transformers.model import CausalTransformer, ModelConfig

    cfg = ModelConfig(vocab_size=256, max_len=48, d_model=32, n_layers=2, n_heads=2, d_ff=64, head="mol")
    model = CausalTransformer(cfg)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    data = {
        "name": "tiny",
        "vocab_size": 256,
        "seq_len": 48,
        "n_classes": 0,
        "image_shape": [4, 4, 3],
        "alphabet": None,
    }
    (folder / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "data": data, "step": 0}))
    return str(folder)


@pytest.mark.skipif(_browser_missing() is not None, reason=f"{_browser_missing()}")
@pytest.mark.parametrize("model_name", ["shipped", "tiny-rgb-mol"])
def test_page_in_chromium_draws_what_pytorch_generates(tmp_path, model_name):
    """Headless Chromium, driven by playwright-core, uses the form to generate three images; the canvas
    holds exactly the image the PyTorch model generates with the same digit, temperature and seed.
    Also for an unconditional colour model with the mixture-of-logistics head (the page is generic)."""
    if model_name == "shipped":
        checkpoint = WEB_DIR / "checkpoint"
        runs = [(3, 1.0, 7), (8, 0.8, 1), (5, 0.0, 0)]  # digit, temperature, seed; the last is greedy
    else:
        checkpoint = tiny_rgb_checkpoint(tmp_path / "tiny")
        runs = [(0, 1.0, 5), (0, 0.0, 0)]
    shot = tmp_path / "screenshot.png"
    with DemoServer(checkpoint) as url:
        proc = subprocess.run(
            [
                "node",
                "e2e.mjs",
                "--url",
                url,
                "--runs",
                ",".join(f"{d}:{t}:{s}" for d, t, s in runs),
                "--screenshot",
                str(shot),
                "--chromium",
                CHROMIUM,
                "--autostart",
                "{}:{}:{}".format(*runs[0]),
            ],
            cwd=WEB_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    model, config = load_model(checkpoint)
    shape, levels = tuple(config["data"]["image_shape"]), config["data"]["vocab_size"]
    # ?autostart generated the first run's image on load, without a click
    assert result["autostarted"]["state"] == "done", result["autostarted"]["status"]
    assert result["autostarted"]["last"]["tokens"] == pytorch_tokens(model, *runs[0])
    for (digit, temperature, seed), got in zip(runs, result["runs"], strict=True):
        assert got["state"] == "done", got["status"]
        assert got["last"]["label"] == digit and got["last"]["temperature"] == temperature
        want = pytorch_tokens(model, digit, temperature, seed)
        assert got["last"]["tokens"] == want, f"digit {digit}, temperature {temperature}, seed {seed}"
        rgba = np.array(got["rgba"], dtype=np.uint8).reshape(got["height"], got["width"], 4)
        image = levels_to_images(torch.tensor([want]), shape, levels)[0]
        rgb = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image  # grey levels fill R, G and B
        np.testing.assert_array_equal(rgba[..., :3], rgb)
        assert (rgba[..., 3] == 255).all()
        if temperature > 0:
            assert (image > 0).sum() > 10, "a sampled image is not blank"
        assert got["last"]["tokensPerSecond"] > 0


def test_server_lists_no_directories_and_answers_only_its_own_host(tmp_path):
    import http.client
    import threading

    from linear_transformers.web import VENDOR_FILES, make_server

    (tmp_path / "site" / "sub").mkdir(parents=True)
    (tmp_path / "site" / "index.html").write_text("<p>demo</p>")
    (tmp_path / "site" / "sub" / "secret.txt").write_text("x")
    (tmp_path / "outside.txt").write_text("not the site's")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "key.txt").write_text("private")
    (tmp_path / "site" / "link.txt").symlink_to(tmp_path / "outside.txt")  # links placed inside the web folder
    (tmp_path / "site" / "linkdir").symlink_to(tmp_path / "outside")
    (tmp_path / "model.onnx").write_text("m")
    (tmp_path / "site" / "vendor").mkdir()
    for name in VENDOR_FILES:  # stand-ins: make_server checks they exist
        (tmp_path / "site" / "vendor" / name).write_text("")
    server = make_server(tmp_path / "site", tmp_path, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]

    def get(path, host):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, body

    try:
        assert get("/", f"localhost:{port}") == (200, b"<p>demo</p>")
        assert get("/", f"127.0.0.1:{port}")[0] == 200
        assert get("/sub/", f"localhost:{port}")[0] == 404  # no listing of what the folder holds
        assert get("/sub/secret.txt", f"localhost:{port}")[0] == 200  # files are still served
        for path in ("/link.txt", "/linkdir/key.txt", "/sub/../link.txt"):
            assert get(path, f"localhost:{port}")[0] == 404, path  # a symbolic link is never followed
        assert get("/model/model.onnx", f"localhost:{port}") == (200, b"m")
        for host in ("evil.example", f"evil.example:{port}", "localhost:1", ""):
            assert get("/", host)[0] == 403, host
    finally:
        server.shutdown()
        server.server_close()
