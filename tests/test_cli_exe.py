"""The installed ``ipshield`` executable: usage errors, Ctrl-C and internal errors end with a short
message and the documented exit status (2 usage, 130 interrupted, 1 internal), never a
traceback, whatever click typer runs on (the ``click`` package or its vendored ``typer._click``).

Also here: the CLIP adapter's text path emits no deprecation warning of transformers, and the
two CLIP backend modules import without a circle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "ipshield"

needs_exe = pytest.mark.skipif(not EXE.is_file(), reason=f"the ipshield executable is not installed ({EXE}); "
                                                         "run `make setup` (pip install -e .)")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("IPSHIELD_DEBUG", None)
    env.setdefault("IPSHIELD_CACHE", str(tmp_path / "cache"))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "120"
    return env


def _run(args: list[str], tmp_path: Path, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    e = _env(tmp_path)
    e.update(env)
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=e)


def _no_traceback(r) -> None:
    assert "Traceback" not in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr


# --------------------------------------------------------------------------- usage errors
@needs_exe
def test_missing_required_option_is_a_usage_error(tmp_path):
    r = _run(["protect", "coop", "--authorized", "clean"], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--out" in r.stderr and "missing" in r.stderr.lower()
    _no_traceback(r)


@needs_exe
def test_unknown_option_is_a_usage_error(tmp_path):
    r = _run(["zero-shot", "--bogus"], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--bogus" in r.stderr
    _no_traceback(r)


@needs_exe
def test_help_exits_zero(tmp_path):
    r = _run(["--help"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "protect" in r.stdout
    _no_traceback(r)


# --------------------------------------------------------------------------- Ctrl-C
@needs_exe
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_of_a_running_command_exits_130(tmp_path):
    out = tmp_path / "run"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # a long pretraining of the quick preset (synthetic data only): it runs until interrupted
    args = [str(EXE), "pretrain", "--out", str(out), "--preset", "test", "--no-eval", "steps=1000000"]
    with stdout.open("w") as fo, stderr.open("w") as fe:
        # a shell without job control starts background jobs with SIGINT ignored, and Python keeps an
        # ignored SIGINT ignored: give the child the default disposition whatever runs the tests
        proc = subprocess.Popen(args, stdout=fo, stderr=fe, cwd=tmp_path, env=_env(tmp_path),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 90
            # started: the run folder exists (the command body runs) or the progress bar shows
            while time.monotonic() < deadline and proc.poll() is None:
                if out.is_dir() or stderr.stat().st_size > 0:
                    break
                time.sleep(0.1)
            assert proc.poll() is None, f"the command ended before the interrupt: {stderr.read_text()}"
            assert out.is_dir() or stderr.stat().st_size > 0, "the command did not start within 90 s"
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    err, outtxt = stderr.read_text(), stdout.read_text()
    assert rc == 130, outtxt + err
    assert "interrupted" in err
    assert "Traceback" not in err and "Traceback" not in outtxt, outtxt + err


# --------------------------------------------------------------------------- other exits
_SCRIPT = """
import sys
import typer
import ipshield.cli as cli

@cli.app.command("boom-test")
def boom():
    raise RuntimeError("kaput\\nsecond line")

@cli.app.command("exit-test")
def exit3():
    raise typer.Exit(3)

cli.main(sys.argv[1:])
"""


def _run_script(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    e = _env(tmp_path)
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=e)


def test_internal_error_is_one_line_and_exit_code_of_typer_exit_is_kept(tmp_path):
    r = _run_script(["boom-test"], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "internal error: RuntimeError: kaput second line" in r.stderr
    assert "IPSHIELD_DEBUG=1" in r.stderr
    _no_traceback(r)
    r = _run_script(["exit-test"], tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    _no_traceback(r)
    r = _run_script(["boom-test"], tmp_path, IPSHIELD_DEBUG="1")
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: kaput" in r.stderr


# --------------------------------------------------------------------------- models
def test_text_encoding_emits_no_deprecation_warning(tmp_path):
    import torch

    from ipshield.models.clip import load_clip
    from ipshield.models.testing import make_random_clip

    d = make_random_clip(tmp_path / "clip", vision_layers=1, vision_width=32, vision_heads=2, patch=8, image_size=16,
                         text_layers=2, text_width=32, text_heads=2, embed_dim=16, context_length=16, seed=0)
    clip = load_clip(d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            ids = clip.tokenize(["a photo of the digit zero.", "nine"])
            clip.encode_text(ids)
            clip.encode_text_embeddings(clip.token_embedding(ids), clip.eos_positions(ids))
    bad = [f"{w.category.__name__}: {w.message}" for w in caught
           if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    assert not bad, bad


def test_clip_backends_import_without_a_circle():
    code = ("import sys; import ipshield.models.openclip_adapter as o; "
            "assert 'ipshield.models.clip' not in sys.modules, 'openclip_adapter imported clip'; "
            "import ipshield.models.clip as c, ipshield.models.common as m; "
            "assert c.CLIPAdapter is m.CLIPAdapter and issubclass(o.OpenCLIPAdapter, c.CLIPAdapter); "
            "assert c.load_openclip is o.load_openclip and c._l2 is m.l2_normalise; "
            "assert c.OPENAI_MEAN == m.OPENAI_MEAN and c.OPENAI_STD == m.OPENAI_STD")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
