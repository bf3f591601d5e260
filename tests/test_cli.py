"""run.py: the golden checkpoint through the command line, and the errors newcomers hit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grok1 import cli
from tests.conftest import case_file, case_path, prompts_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = "case1_gqa6to1_1dev_bs1"


def test_run_py_json_returns_the_release_greedy_tokens():
    ids = ",".join(map(str, prompts_of(CASE)[0]))
    proc = subprocess.run(
        [sys.executable, "run.py", "--checkpoint", case_path(CASE), "--prompt-tokens", ids,
         "--max-new-tokens", "8", "--ignore-eos", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tokens"] == case_file(CASE, "greedy_runner.npy")[0].tolist()


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return str(e.value)


def test_missing_checkpoint_says_where(capsys, tmp_path):
    msg = run_main(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt-tokens", "1,2")
    assert "no checkpoint" in msg and "ckpt-0" in msg


def test_empty_prompt(capsys):
    msg = run_main(capsys, "--checkpoint", case_path(CASE), "--prompt-tokens", ",")
    assert "empty prompt" in msg


def test_text_prompt_without_tokenizer(capsys):
    msg = run_main(capsys, "--checkpoint", case_path(CASE), "--prompt", "hello")
    assert "needs a tokenizer" in msg


def test_prompt_longer_than_context():
    ids = ",".join(["5"] * 70)  # the case's context is 64
    with pytest.raises(ValueError, match="exceeds the context of 64 tokens"):
        cli.main(["--checkpoint", case_path(CASE), "--prompt-tokens", ids, "--json"])


def test_mesh_that_does_not_fit_the_devices():
    with pytest.raises(ValueError, match="needs 8 devices but only 1"):
        cli.main(["--checkpoint", case_path(CASE), "--prompt-tokens", "5,6", "--mesh",
                  "data=1,model=8"])  # fmt: skip


def test_tokenizer_vocab_mismatch(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} of some words here" for i in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "t"), vocab_size=40,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="512"):
        cli.main(["--checkpoint", case_path(CASE), "--tokenizer", str(tmp_path / "t.model"),
                  "--prompt", "line 3"])  # fmt: skip


def test_run_py_without_a_checkpoint_prints_demo_text(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), "--max-new-tokens", "24", "--no-stream"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "embedded demo model" in proc.stderr
    words = proc.stdout.split()
    assert len(words) >= 5 and sum(w.isalpha() for w in words) >= 3, proc.stdout


def test_no_prompt_for_a_real_checkpoint(capsys):
    import io

    stdin, sys.stdin = sys.stdin, io.StringIO("")
    try:
        msg = run_main(capsys, "--checkpoint", case_path(CASE))
    finally:
        sys.stdin = stdin
    assert "no prompt" in msg


def test_not_enough_device_memory_is_caught_before_loading(monkeypatch):
    from grok1 import plan

    monkeypatch.setattr(plan, "device_memory_limit", lambda device: 10_000)
    with pytest.raises(
        plan.InsufficientMemoryError, match=r"needs [0-9.e-]+ GB per device, this mesh has 1e-05 GB"
    ):
        cli.main(["--checkpoint", case_path(CASE), "--prompt-tokens", "5,6"])


def test_dry_run_of_a_mesh_larger_than_the_devices_here():
    """`run.py --dry-run` plans a 2-device mesh on this 1-device host (virtual devices in a
    child process) for the checkpoint's own config, with whole experts split over the model axis
    as asked, without reading its weights."""
    proc = subprocess.run(
        [sys.executable, "run.py", "--checkpoint", case_path(CASE), "--dry-run", "--mesh",
         "data=1,model=2", "--expert-parallel", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["mesh"] == {"data": 1, "model": 2} and report["context"] == 64
    assert report["expert_parallel"] is True
    assert report["needed_bytes_per_device"] >= report["param_bytes_per_device"] > 0


@pytest.mark.parametrize(
    "mesh, extra, message",
    [("data=-1,model=-1", (), "at least one axis"), ("experts=2", (), "unknown axes"),
     ("data=4", (), "cannot fill"),
     # checked in the child process that plans 3 devices: its message, not its traceback
     ("data=1,model=3", ("--expert-parallel",), "the 8 experts over the mesh's model axis (3)")],
)  # fmt: skip
def test_dry_run_mesh_errors(capsys, mesh, extra, message):
    msg = run_main(capsys, "--checkpoint", case_path(CASE), "--dry-run", "--mesh", mesh, *extra)
    assert message in msg and "Traceback" not in msg


def test_rounding_flag_reaches_the_model(monkeypatch):
    import grok1

    seen = {}

    def load(path, **kw):
        seen.update(kw)
        raise SystemExit("stop after load")

    monkeypatch.setattr(grok1, "load", load)
    for rounding in ("fast", None):
        flags = ["--rounding", rounding] if rounding else []
        with pytest.raises(SystemExit, match="stop after load"):
            cli.main(["--checkpoint", case_path(CASE), "--prompt-tokens", "5,6", *flags])
        assert seen["rounding"] == (rounding or "release")
    with pytest.raises(SystemExit):
        cli.parse_args(["--rounding", "loose"])
