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


def test_the_command_line_puts_large_tensors_on_huge_pages(tmp_path):
    """The command owns its process: large tensors go on transparent huge pages (PyTorch's
    THP_MEM_ALLOC_ENABLE, read at the first large allocation), unless the user set the variable;
    the library alone never sets it. Measured as page faults of 32 MB allocations, in fresh processes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel gives no transparent huge pages (/sys/kernel/mm/transparent_hugepage/enabled)")
    probe = (
        "import resource, sys, torch\n"
        "from linear_transformers import cli\n"
        "if sys.argv[1] == 'cli': cli._own_process_settings()\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"
        "    x = torch.empty(8 * 1024 * 1024); x.fill_(1.0); del x\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def faults(mode, **extra):
        out = subprocess.run([sys.executable, "-c", probe, mode], env={**env, **extra}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    library_only, command = faults("library"), faults("cli")
    assert command < library_only / 3  # huge pages: a fault per 2 MB instead of per 4 kB (where the kernel allows)
    assert faults("cli", THP_MEM_ALLOC_ENABLE="0") > command * 3  # the user's own setting is kept


def test_a_programs_own_exit_message_is_said(capsys, monkeypatch):
    """A benchmark that stops with SystemExit("verification failed: ...") says so and returns 1, as
    Python itself would (the message is not swallowed with argparse's exit status 2)."""
    from linear_transformers.bench import threads

    def fails(args):
        raise SystemExit("verification failed: the kernel differs")

    monkeypatch.setattr(threads, "main", fails)
    assert main(["bench", "threads"]) == 1
    assert capsys.readouterr().err.strip() == "linear-transformers bench: verification failed: the kernel differs"
