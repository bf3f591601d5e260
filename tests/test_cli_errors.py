"""run.py on a user's mistakes: each ends with one `error:` line naming the problem, a non-zero
exit status (2 for the command line, 1 for what is found while running) and no traceback.

Each case runs in its own process as run.py runs it, `cli.main(argv)`, forked by
tests/cli_forkrun.py after it imported JAX once (importing is most of a failing run's time), a
few at a time; no case compiles anything. The bad prompt's UTF-8 goes through the decoding and
the tokenizer before the context check stops it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import case_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = "case1_gqa6to1_1dev_bs1"  # context 64, vocabulary 512
DEMO_TOKENIZER = os.path.join(ROOT, "grok1", "demo", "tokenizer.model")  # 2048 pieces


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Damaged copies of the golden case and other bad files, by name."""
    tmp = tmp_path_factory.mktemp("bad")
    paths = {"nowhere": str(tmp / "nowhere"), "file": str(tmp / "afile")}
    (tmp / "afile").write_text("not a checkpoint")
    rng_bytes = bytes((i * 131 + 17) % 256 for i in range(4000))  # no valid pickle stream
    for name in ("random_bytes", "no_config", "bad_config", "empty_ckpt"):
        shutil.copytree(case_path(CASE), tmp / name)
        paths[name] = str(tmp / name)
    (tmp / "random_bytes" / "ckpt-0" / "tensor00003_000").write_bytes(rng_bytes)
    os.remove(tmp / "no_config" / "config.json")
    (tmp / "bad_config" / "config.json").write_text('{"vocab_size": 512,')
    shutil.rmtree(tmp / "empty_ckpt" / "ckpt-0")
    (tmp / "empty_ckpt" / "ckpt-0").mkdir()
    (tmp / "tok.model").write_bytes(rng_bytes)
    paths["not_sentencepiece"] = str(tmp / "tok.model")
    return paths


GOLDEN = ("--checkpoint", case_path(CASE))
IDS = ("--prompt-tokens", "5,6,7")
FEW = ("--max-new-tokens", "4")
BAD_UTF8 = b"caf\xe9 \xff".decode(errors="surrogateescape")  # as Python decodes such argv
JOB = ("--num-processes", "2")
UNREACHABLE = ("--coordinator", "127.0.0.1:1", "--process-id", "1", "--init-timeout", "2")

# (flags, exit status, what the error line must say); "{name}" is a path of the `bad` fixture
CASES = [
    (("--checkpoint", "{nowhere}", *IDS), 2, "does not exist"),
    (("--checkpoint", "{file}", *IDS), 2, "is a file, not a directory"),
    (("--checkpoint", "{empty_ckpt}", *IDS, *FEW), 1, "ckpt-0"),
    (("--checkpoint", "{random_bytes}", *IDS, *FEW), 1, "tensor00003_000"),
    (("--checkpoint", "{no_config}", *IDS, *FEW), 1, "ckpt-0"),
    (("--checkpoint", "{bad_config}", *IDS, *FEW), 1, "config.json: not valid JSON"),
    ((*GOLDEN, *IDS, "--mesh", "data=x"), 2, "is not an integer"),
    ((*GOLDEN, *IDS, "--mesh", "experts=2"), 2, "unknown axes ['experts']"),
    ((*GOLDEN, *IDS, "--mesh", "data=1,data=2"), 2, "given twice"),
    ((*GOLDEN, *IDS, "--mesh", "model"), 2, "is not AXIS=SIZE"),
    ((*GOLDEN, *IDS, "--mesh", "model=0"), 2, "must be >= 1"),
    ((*GOLDEN, *IDS, *FEW, "--mesh", "data=1,model=8"), 1, "needs 8 devices but only 1"),
    ((*GOLDEN, "--dry-run", "--mesh", "data=-1,model=-1"), 1, "all axes but one"),
    ((*GOLDEN, *IDS, "--temperature", "-1"), 2, "--temperature"),
    ((*GOLDEN, *IDS, "--top-p", "0"), 2, "--top-p"),
    ((*GOLDEN, *IDS, "--top-k", "-1"), 2, "--top-k"),
    ((*GOLDEN, *IDS, "--max-new-tokens", "0"), 2, "--max-new-tokens"),
    ((*GOLDEN, *IDS, "--seed", "-1"), 2, "--seed"),
    ((*GOLDEN, *IDS, "--seed", str(2**64)), 2, "--seed"),
    ((*GOLDEN, *FEW, "--prompt-tokens", "5,600,7"), 2, "token id 600 is outside"),
    ((*GOLDEN, *FEW, "--prompt-tokens", "5,-1"), 2, "token id -1 is outside"),
    ((*GOLDEN, *FEW, "--prompt-tokens", "5,x"), 2, "'x' is not a token id"),
    ((*GOLDEN, *FEW, "--prompt-tokens", "5,2.5"), 2, "'2.5' is not a token id"),
    ((*GOLDEN, *FEW, "--prompt-tokens", ","), 2, "empty prompt"),
    ((*GOLDEN, *IDS, "--max-new-tokens", "62"), 2, "ask for at most 61 new tokens"),
    ((*GOLDEN, *FEW, "--prompt-tokens", ",".join(["5"] * 70)), 2, "the prompt has 70 tokens"),
    ((*GOLDEN, "--prompt", "hello"), 2, "needs a tokenizer"),
    ((*GOLDEN,), 2, "no prompt"),
    ((*GOLDEN, *IDS, "--tokenizer", "{not_sentencepiece}"), 1, "not a SentencePiece model"),
    ((*GOLDEN, *IDS, "--tokenizer", "{nowhere}"), 1, "not found"),
    ((*GOLDEN, *IDS, "--tokenizer", DEMO_TOKENIZER), 1, "tokenizer does not match"),
    (("--prompt", BAD_UTF8, "--max-new-tokens", "300"), 2, "exceed the model's context"),
    ((*GOLDEN, *IDS, "--num-processes", "2"), 2, "distributed flags are incomplete"),
    ((*GOLDEN, *IDS, *JOB, "--coordinator", "nohost", "--process-id", "0"), 2, "HOST:PORT"),
    ((*GOLDEN, *IDS, *JOB, *UNREACHABLE), 1, "could not reach the coordinator 127.0.0.1:1"),
    ((*GOLDEN, *IDS, "--dtype", "float16"), 2, "--dtype"),
    ((*GOLDEN, *IDS, "--prompt", "x"), 2, "not allowed with argument"),
]  # fmt: skip


def run_all(cases: list[dict]) -> list[dict]:
    """Each case's {"status", "stdout", "stderr"}, run by tests/cli_forkrun.py."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("GROK1_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "cli_forkrun.py")],
        cwd=ROOT,
        env=env,
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_bad_input_ends_with_one_error_line(bad):
    """Every case of CASES; then one with --debug and one with GROK1_DEBUG=1, which show the
    traceback above the same line."""
    cases = [{"argv": [a.format(**bad) for a in args]} for args, _, _ in CASES]
    damaged = ["--checkpoint", bad["random_bytes"], *IDS, *FEW]
    cases += [{"argv": [*damaged, "--debug"]}, {"argv": damaged, "env": {"GROK1_DEBUG": "1"}}]
    results = run_all(cases)
    failures = []
    for (args, status, expected), r in zip(CASES, results, strict=False):
        last = r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else ""
        ok = (
            r["status"] == status
            and last.startswith("error: ")
            and expected in last
            and "Traceback" not in r["stderr"]
            and not r["stdout"]
        )
        if not ok:
            failures.append(f"{args}: exit {r['status']}, stderr:\n{r['stderr'][-1500:]}")
    assert not failures, "\n\n".join(failures)
    utf8 = results[[i for i, c in enumerate(CASES) if BAD_UTF8 in c[0]][0]]["stderr"]
    assert "--prompt is not valid UTF-8 (byte 0xe9 at offset 3)" in utf8
    for r in results[len(CASES) :]:
        assert r["status"] == 1 and "Traceback" in r["stderr"], r["stderr"][-2000:]
        assert r["stderr"].strip().splitlines()[-1].startswith("error: parameter ")
