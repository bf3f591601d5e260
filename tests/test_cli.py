"""run.py: the golden checkpoint through the command line, interrupts, the prompt's encoding,
status lines and subcommands. The errors of bad inputs are tests/test_cli_errors.py's."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from grok1 import cli
from tests.conftest import case_file, case_path, prompts_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "run.py")
CASE = "case1_gqa6to1_1dev_bs1"
SMALL = ["--checkpoint", case_path(CASE), "--prompt-tokens", "5,6", "--max-new-tokens", "4"]


def run_py(*flags: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """run.py with `flags` and no stdin, to its end; asserts it succeeded."""
    proc = subprocess.run([sys.executable, RUN_PY, *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_run_py_json_returns_the_release_greedy_tokens():
    ids = ",".join(map(str, prompts_of(CASE)[0]))
    proc = run_py("--checkpoint", case_path(CASE), "--prompt-tokens", ids, "--max-new-tokens", "8",
                  "--ignore-eos", "--json")  # fmt: skip
    out = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert out["tokens"] == case_file(CASE, "greedy_runner.npy")[0].tolist()
    assert out["finish_reason"] == "length" and out["demo"] is False
    assert "[grok1] compiling the prefill and decode programs" in proc.stderr


def test_run_py_without_a_checkpoint_prints_demo_text(tmp_path):
    proc = run_py("--max-new-tokens", "24", "--no-stream", cwd=tmp_path)
    assert "embedded demo model" in proc.stderr
    assert "[grok1] 24 tokens" in proc.stderr
    words = proc.stdout.split()
    assert len(words) >= 5 and sum(w.isalpha() for w in words) >= 3, proc.stdout


@pytest.mark.slow
def test_two_processes_print_exactly_one_json_object():
    """Process 0's stdout is the one JSON object (the collective library's connection lines go
    to stderr), process 1's is empty, and the tokens are the single-process golden ones."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ids = ",".join(map(str, prompts_of(CASE)[0]))
    flags = ["--checkpoint", case_path(CASE), "--prompt-tokens", ids, "--max-new-tokens", "8",
             "--ignore-eos", "--json", "--mesh", "data=1,model=2", "--coordinator",
             f"127.0.0.1:{port}", "--num-processes", "2", "--heartbeat-timeout", "20"]  # fmt: skip
    # one CPU device per process; unoptimised machine code (compiling is most of the time)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    procs = [
        subprocess.Popen([sys.executable, RUN_PY, *flags, "--process-id", str(i)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(outs[0][0])
    assert result["tokens"] == case_file(CASE, "greedy_runner.npy")[0].tolist()
    assert outs[1][0] == ""


# -- interrupts ---------------------------------------------------------------------------------
# run.py with every decode call (one horizon of tokens) at least 0.2 s long: on the golden cases
# a whole generation otherwise takes milliseconds, less than a signal needs to arrive
THROTTLED = f"""
import runpy, sys, time
from grok1.engine import Engine
decode_once = Engine._decode_once
def slowed(self):
    time.sleep(0.2)
    decode_once(self)
Engine._decode_once = slowed
sys.argv[0] = {RUN_PY!r}
runpy.run_path({RUN_PY!r}, run_name="__main__")
"""


class Running:
    """run.py in the background, its stdout and stderr read as they come."""

    def __init__(self, *args, throttled: bool = False):
        command = ["-c", THROTTLED] if throttled else [RUN_PY]
        self.proc = subprocess.Popen(
            [sys.executable, *command, *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out, self.err = bytearray(), bytearray()
        self.readers = [
            threading.Thread(target=self._read, args=(s, b), daemon=True)
            for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for r in self.readers:
            r.start()

    @staticmethod
    def _read(stream, into: bytearray) -> None:
        while chunk := stream.read1(4096):
            into += chunk

    def wait_for(self, what: str, buffer: bytearray, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while what.encode() not in buffer:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"{what!r} did not come; stderr:\n{self.err.decode()[-2000:]}")
            time.sleep(0.05)

    def stop(self, signum: int, timeout: float = 30) -> float:
        """Sends `signum`; returns the seconds until the process ended."""
        t0 = time.monotonic()
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for r in self.readers:
            r.join(10)
        return time.monotonic() - t0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_generating_prints_the_tokens_so_far(signum):
    """Ctrl-C exits 130, SIGTERM 143; the greedy tokens streamed so far stay on stdout."""
    ids = ",".join(map(str, prompts_of(CASE)[0]))
    run = Running(
        "--checkpoint",
        case_path(CASE),
        "--prompt-tokens",
        ids,
        "--stream",
        "--max-new-tokens",
        "50",
        "--ignore-eos",
        throttled=True,
    )
    run.wait_for(" ", run.out, 240)  # the first token streamed
    seen = bytes(run.out)
    elapsed = run.stop(signum)
    stderr = run.err.decode()
    assert run.proc.returncode == 128 + signum, stderr[-2000:]  # not negative: not a crash
    assert elapsed < 5, elapsed
    assert "Traceback" not in stderr
    assert run.out.startswith(seen) and run.out.endswith(b"\n")
    printed = [int(t) for t in run.out.split()]
    greedy = case_file(CASE, "greedy_runner.npy")[0].tolist()
    assert printed[: len(greedy)] == greedy[: len(printed)]
    last = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last == f"interrupted ({name}) while generating; {len(printed)} tokens generated"


def test_sigterm_while_compiling_exits_143_with_nothing_on_stdout():
    """The main thread is inside XLA's compiler, where Python's own signal handling would wait
    for it; --json leaves stdout empty."""
    run = Running(
        "--checkpoint", case_path(CASE), "--prompt-tokens", "5,6", "--json", "--max-new-tokens", "8"
    )
    run.wait_for("[grok1] compiling", run.err, 120)
    time.sleep(0.5)
    elapsed = run.stop(signal.SIGTERM)
    stderr = run.err.decode()
    assert run.proc.returncode == 143, stderr[-2000:]
    assert elapsed < 5, elapsed
    assert "Traceback" not in stderr and not run.out
    assert stderr.strip().splitlines()[-1].startswith("interrupted (SIGTERM) while compiling")


def test_sigterm_during_a_dry_run_ends_its_planner_too():
    from grok1.console import children_of

    run = Running("--checkpoint", case_path(CASE), "--dry-run", "--mesh", "data=1,model=2")
    run.wait_for("virtual CPU devices", run.err, 120)
    deadline = time.monotonic() + 30
    while not (planner := children_of(run.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)  # the planner starts right after the line
    assert len(planner) == 1
    assert run.stop(signal.SIGTERM) < 5 and run.proc.returncode == 143
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{planner[0]}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{planner[0]}")


# -- in-process -----------------------------------------------------------------------------------
def test_invalid_utf8_on_stdin_is_replaced_with_one_warning(monkeypatch, capsys):
    from grok1 import demo
    from grok1.tokenizer import Tokenizer

    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 and \xff\xfe more"))
    stdin.isatty = lambda: False
    monkeypatch.setattr(sys, "stdin", stdin)
    tok = Tokenizer.load(demo.tokenizer_path())
    ids = cli.read_prompt(cli.parse_args([]), tok)
    assert tok.decode(ids) == "caf\ufffd and \ufffd\ufffd more"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "stdin is not valid UTF-8 (byte 0xe9 at offset 3)" in err


def test_not_enough_device_memory_is_caught_before_loading(monkeypatch, capsys):
    from grok1 import sharding
    from grok1.checkpoint import loader

    monkeypatch.setattr(sharding, "device_memory_limit", lambda device: 10_000)
    read = lambda *a, **k: pytest.fail("weights read")  # noqa: E731
    monkeypatch.setattr(loader._LeafReader, "_read_one", read)  # noqa: SLF001
    assert cli.main(SMALL) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: needs ") and "GB per device, this mesh has 1e-05 GB" in last


def test_a_bug_prints_its_traceback(monkeypatch, capsys):
    import grok1

    def load(path, **kw):
        raise KeyError("boom")

    monkeypatch.setattr(grok1, "load", load)
    assert cli.main(SMALL) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: unexpected KeyError: 'boom' (a bug")


def test_flags_reach_the_model(monkeypatch):
    import grok1

    seen = {}

    class Stop(Exception):
        pass

    def load(path, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(grok1, "load", load)
    for rounding in ("fast", None):
        flags = ["--rounding", rounding] if rounding else []
        with pytest.raises(Stop):
            cli.generate([*SMALL, "--mesh", "model=1", *flags])
        assert seen["rounding"] == (rounding or "release")
        assert seen["mesh"] == {"model": 1}
    with pytest.raises(cli.UsageError, match="invalid choice: 'loose'"):
        cli.parse_args(["--rounding", "loose"])


def test_subcommands_dispatch_and_leave_the_flags_alone(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(argv) or 7)
    monkeypatch.setitem(sys.modules, "grok1.convert", fake)
    assert cli.main(["convert", "src", "dst", "--debug"]) == 7
    assert calls == [["src", "dst"]]
    args = cli.parse_args(["--prompt", "convert"])  # a prompt, not a command
    assert args.prompt == "convert"


def test_the_closing_line_reports_decode_speed_apart():
    gen = cli.Generated(
        tokens=list(range(11)),
        finish_reason="length",
        total_s=3.0,
        first_token_s=1.0,
        compile_s=None,
    )
    assert cli.speed_line(gen) == (
        "11 tokens: the first after 1.00 s (compile + prefill), then 10 in 2.00 s (5.0 tok/s)"
    )
    gen.compile_s = 5.0  # compiled beforehand: the first token is prefill alone
    assert "(prefill), then" in cli.speed_line(gen)


def test_an_engine_with_a_scheduler_thread_streams_its_events(capsys):
    """The engine of /work/wt/engine_api.md (submit -> a handle of events, a result with time
    stamps), imitated: each event's tokens are printed as they come, its warmup is reported, and
    the closing line takes the result's stamps."""
    from grok1.sampling import SamplingParams

    ev = lambda tokens, reason=None: types.SimpleNamespace(tokens=tokens, finish_reason=reason)  # noqa: E731
    stamps = dict(submitted_at=10.0, first_token_at=10.5, finished_at=11.5)
    result = types.SimpleNamespace(tokens=[5, 6, 7], finish_reason="length", error=None, **stamps)

    class Handle:
        def __iter__(self):
            return iter([ev([5, 6]), ev([]), ev([7], "length")])

        def result(self):
            return result

    class Engine:
        def warmup(self, progress, prompt_len, max_len):
            self.warmed = (prompt_len, max_len)
            progress("compiling the decode program")

        def submit(self, request):
            self.request = request
            return Handle()

    out = cli.Output(json_mode=False)
    out.lock = threading.RLock()
    out.configure(None, stream=True)
    model = types.SimpleNamespace(engine=Engine())
    gen = cli.run_generation(model, [1, 2], 3, SamplingParams(), False, out)
    captured = capsys.readouterr()
    assert captured.out == "5 6 7 " and "[grok1] compiling the decode program" in captured.err
    assert model.engine.request.prompt == (1, 2) and model.engine.request.max_new_tokens == 3
    assert model.engine.warmed == (2, 5)  # compiled for this prompt and its new tokens only
    assert cli.speed_line(gen) == (
        "3 tokens: the first after 0.50 s (prefill), then 2 in 1.00 s (2.0 tok/s)"
    )


# -- the dry run ----------------------------------------------------------------------------------
def test_dry_run_of_a_mesh_larger_than_the_devices_here():
    """`run.py --dry-run` plans a 2-device mesh on this 1-device host (virtual devices in a
    child process) for the checkpoint's own config, with whole experts split over the model axis
    as asked, without reading its weights, and says what it waits for."""
    proc = run_py("--checkpoint", case_path(CASE), "--dry-run", "--mesh", "data=1,model=2",
                  "--expert-parallel", "--json")  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["mesh"] == {"data": 1, "model": 2} and report["context"] == 64
    assert report["expert_parallel"] is True
    assert report["needed_bytes_per_device"] >= report["param_bytes_per_device"] > 0
    assert "on 2 virtual CPU devices" in proc.stderr


def test_dry_run_error_of_the_child_process_is_one_line(capsys):
    """Checked in the child process that plans 3 devices: its message, not its traceback."""
    argv = [
        "--checkpoint",
        case_path(CASE),
        "--dry-run",
        "--mesh",
        "data=1,model=3",
        "--expert-parallel",
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "the 8 experts over the mesh's model axis (3)" in err.strip().splitlines()[-1]
