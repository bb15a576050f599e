"""The command line as a whole: one dispatcher for every command; the library's first-run work (compiling
and timing the kernels) is said on stderr; `prepare` does it ahead of time."""

from __future__ import annotations

from linear_transformers import commands
from linear_transformers.cli import main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in commands.COMMANDS:
        assert name in out


def test_prepare_builds_and_times_every_kernel(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LINEAR_TRANSFORMERS_CACHE", str(tmp_path / "cache"))  # a fresh machine's cache
    from linear_transformers import native

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_verdicts", {})
    monkeypatch.setenv("LINEAR_TRANSFORMERS_AUTO_KERNELS", "measure")
    assert main(["prepare", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "ready in" in captured.out
    for name in native.registered():
        assert f"{name}:" in captured.out
    # what took the time was said as it happened, one line each, on stderr
    assert "linear-transformers: compiling the C library causal_linear" in captured.err
    assert "linear-transformers: timing the compiled attention kernel" in captured.err
    assert main(["prepare", "--threads", "1"]) == 0  # the second time: nothing to compile or time
    assert "compiling" not in capsys.readouterr().err
