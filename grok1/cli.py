"""`python run.py`: sample text from Grok-1 (or the embedded demo model when no checkpoint is
present). Prints the continuation (streamed on a terminal) or, with --json, one JSON object."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import signal
import sys
import time

from grok1 import console
from grok1.console import UsageError

DEFAULT_CHECKPOINT = "checkpoints"
TOKENIZER_FILE = "tokenizer.model"
# `run.py NAME ARGS...` runs `main(ARGS)` of the module; any other first argument is a flag of
# the generation command
SUBCOMMANDS = {"convert": "grok1.convert"}

EPILOG = """\
commands:
  run.py convert SRC DST   convert a release checkpoint (run.py convert --help)

Text on stdin or in --prompt that is not valid UTF-8 is decoded with U+FFFD for the invalid
bytes, with a warning. In a multi-process run, process 0 reads the prompt and prints the
result; the other processes print nothing on stdout.

exit status: 0 done, 1 an error while running (a file, the devices, their memory, the
distributed job), 2 a usage error (a flag, its value, the prompt), 130 interrupted by Ctrl-C
(what was generated so far is printed; with --json nothing is), 143 ended by SIGTERM."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = console.debug_requested(argv)
    if argv and argv[0] in SUBCOMMANDS:
        rest = [a for a in argv[1:] if a != "--debug"]
        return console.run(lambda: _subcommand(argv[0], rest), debug)
    status = console.run(lambda: generate(argv), debug)
    distributed = sys.modules.get("grok1.distributed")
    if status and distributed is not None and distributed.joined():
        # a failed process of a job leaves without the runtime's shutdown, which would wait for
        # the other processes (or abort when the coordinator has gone)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _subcommand(name: str, argv: list[str]) -> int | None:
    try:
        module = importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name != SUBCOMMANDS[name]:
            raise
        raise UsageError(f"`run.py {name}` is not available in this version of grok1") from None
    return module.main(argv)


# -- the command line --------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _checked(kind, ok, expected: str):
    """An argparse type: `kind(text)` that must satisfy `ok`, else "expected ..., got ..."."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _mesh(text: str) -> dict:
    from grok1 import sharding

    try:
        return sharding.parse_mesh(text)
    except sharding.ShardingError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        prog="run.py",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_flags(p.add_argument_group("model"))
    _prompt_flags(p.add_argument_group("prompt and sampling"))
    _output_flags(p.add_argument_group("output"))
    _distributed_flags(p.add_argument_group("multi-host"))
    args = p.parse_args(argv)
    args.multi_process = _check_distributed(args)
    return args


def _model_flags(g) -> None:
    g.add_argument(
        "--checkpoint",
        help="directory holding ckpt-0/ (default: checkpoints/ when it holds one, else the "
        "embedded demo model)",
    )
    g.add_argument(
        "--tokenizer",
        help="SentencePiece model (default: tokenizer.model in the checkpoint directory, else "
        "in the current directory)",
    )
    g.add_argument(
        "--mesh",
        type=_mesh,
        help="mesh axis sizes, e.g. data=1,model=8 (-1 or an axis left out: the rest of the "
        "devices)",
    )
    g.add_argument(
        "--expert-parallel",
        action="store_true",
        help="split whole experts over the model axis (throughput at large batches)",
    )
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument(
        "--rounding",
        default="release",
        choices=["release", "strict", "fast"],
        help="bf16 roundings: the release's (default), every one written in its source, or the "
        "release's with int8 weights unrounded (faster on CPU; not the release's numerics)",
    )


def _prompt_flags(g) -> None:
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (default: stdin if piped)")
    prompt.add_argument("--prompt-tokens", help="prompt as token ids: 1,2,3")
    integer = lambda ok, expected: _checked(int, ok, f"an integer {expected}")  # noqa: E731
    g.add_argument("--max-new-tokens", type=integer(lambda n: n >= 1, ">= 1"), default=64)
    g.add_argument(
        "--temperature",
        type=_checked(float, lambda t: 0 <= t < math.inf, "a number >= 0 (0 is greedy)"),
        help="0 = greedy (default; the demo model samples at 0.8)",
    )
    g.add_argument(
        "--top-p",
        type=_checked(float, lambda x: 0 < x <= 1, "a number in (0, 1] (1 is off)"),
        help="nucleus mass (default 1; demo 0.95)",
    )
    g.add_argument("--top-k", type=integer(lambda k: k >= 0, ">= 0 (0 is off)"), default=0)
    g.add_argument("--seed", type=integer(lambda s: 0 <= s < 2**64, "in [0, 2**64)"), default=0)
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        help="never stop at EOS, as the release (default off; on for the demo, whose EOS only "
        "separates paragraphs)",
    )


def _output_flags(g) -> None:
    g.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="print tokens as they come (default: on a terminal)",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--dry-run", action="store_true", help="memory plan only, no weights")
    g.add_argument(
        "--debug", action="store_true", help="print the traceback of every error (or GROK1_DEBUG=1)"
    )


def _distributed_flags(g) -> None:
    seconds = _checked(int, lambda s: s >= 1, "a whole number of seconds >= 1")
    g.add_argument("--coordinator", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--distributed", action="store_true", help="detect a TPU pod / SLURM cluster")
    g.add_argument(
        "--init-timeout",
        type=seconds,
        default=60,
        help="seconds to wait for every process at start-up (default 60)",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=seconds,
        default=100,
        help="a process silent this many seconds is declared dead and every process ends "
        "(default 100)",
    )


def _check_distributed(args) -> bool:
    """Whether the run joins a multi-process job; incomplete settings are a usage error."""
    from grok1 import distributed

    given = (args.coordinator, args.num_processes, args.process_id)
    env = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)
    if not args.distributed and all(v is None for v in given) and not any(map(os.getenv, env)):
        return False
    try:
        distributed.resolve(*given)
    except distributed.DistributedError as e:
        raise UsageError(str(e)) from None
    return True


# -- the generation command --------------------------------------------------------------------
def generate(argv) -> int:
    args = parse_args(argv)
    out = Output(json_mode=args.json)
    with console.Interrupts(out.interrupted) as interrupts:
        out.lock = interrupts.lock
        if args.multi_process:
            from grok1 import distributed

            out.phase = "joining the distributed job"
            distributed.initialize(
                args.coordinator,
                args.num_processes,
                args.process_id,
                timeout_s=args.init_timeout,
                heartbeat_timeout_s=args.heartbeat_timeout,
            )
            interrupts.install()  # the runtime may have replaced the handlers
        return _generate(args, out)


def _generate(args, out: Output) -> int:
    import grok1
    from grok1 import distributed
    from grok1.config import ModelConfig

    out.primary = distributed.is_primary()
    path, tok_path, is_demo = resolve_model(args)
    if args.dry_run:
        return dry_run(args, path, is_demo, out)
    if is_demo:
        out.status(
            "no checkpoint under checkpoints/: running the small embedded demo model. For "
            "Grok-1, put the release's ckpt-0/ under checkpoints/ and tokenizer.model at "
            "the top level (see README)."
        )
    config = ModelConfig.load(path)
    tokenizer = None
    if tok_path is not None:
        from grok1.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tok_path)
        tokenizer.check_vocab(config.vocab_size)
    ids = shared_prompt(args, tokenizer, is_demo)
    check_prompt(ids, args.max_new_tokens, config)
    sampling, ignore_eos = sampling_of(args, is_demo)
    out.configure(tokenizer, stream=sys.stdout.isatty() if args.stream is None else args.stream)

    out.phase = "loading the checkpoint"
    out.status(f"loading {path} ...")
    t0 = time.monotonic()
    model = grok1.load(
        path,
        config=config,
        mesh=args.mesh,
        expert_parallel=args.expert_parallel,
        dtype=args.dtype,
        rounding=args.rounding,
        tokenizer=tokenizer,
        max_slots=1,  # one prompt: one row of KV cache
        progress=sys.stderr.isatty() and out.primary,
    )
    load_s = time.monotonic() - t0
    out.status(f"loaded in {load_s:.1f} s")
    try:
        gen = run_generation(model, ids, args.max_new_tokens, sampling, ignore_eos, out)
    finally:
        model.engine.close()  # on process 0, this also releases the processes that follow
    if gen is not None:
        out.finish(gen, load_s=load_s, demo=is_demo)
    return 0


def sampling_of(args, is_demo: bool):
    """(SamplingParams, ignore_eos) from the flags; the demo model's defaults sample."""
    from grok1.sampling import SamplingParams

    defaults = (0.8, 0.95, True) if is_demo else (0.0, 1.0, False)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    sampling = SamplingParams(
        temperature=pick(args.temperature, defaults[0]),
        top_p=pick(args.top_p, defaults[1]),
        top_k=args.top_k,
        seed=args.seed,
    )
    return sampling, pick(args.ignore_eos, defaults[2])


def resolve_model(args) -> tuple[str, str | None, bool]:
    """(checkpoint dir, tokenizer path or None, is_demo)."""
    path = args.checkpoint
    if path is None:
        entries = os.listdir(DEFAULT_CHECKPOINT) if os.path.isdir(DEFAULT_CHECKPOINT) else []
        if not [e for e in entries if not e.startswith(".") and e != "README.md"]:
            from grok1 import demo

            return demo.demo_path(), args.tokenizer or demo.tokenizer_path(), True
        path = DEFAULT_CHECKPOINT
    elif not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise UsageError(
            f"--checkpoint {path!r} {what}: give the directory that holds ckpt-0/ "
            "(the release's tensorNNNNN_000 files)"
        )
    tok = args.tokenizer
    for candidate in (os.path.join(path, TOKENIZER_FILE), TOKENIZER_FILE):
        if tok is None and os.path.isfile(candidate):
            tok = candidate
    return path, tok, False


# -- the prompt ---------------------------------------------------------------------------------
def shared_prompt(args, tokenizer, is_demo) -> list[int]:
    """The prompt's ids: process 0 reads them and the others receive them (a mistake in the
    prompt is raised on every process alike)."""
    from grok1 import distributed

    message = None
    if distributed.is_primary():
        try:
            message = {"ids": read_prompt(args, tokenizer, is_demo)}
        except UsageError as e:
            message = {"error": str(e)}
    message = distributed.broadcast_prompts(message)
    if "error" in message:
        raise UsageError(message["error"])
    return message["ids"]


def read_prompt(args, tokenizer, is_demo: bool = False) -> list[int]:
    if args.prompt_tokens is not None:
        return parse_token_ids(args.prompt_tokens)
    if args.prompt is not None:
        text = decode_utf8(os.fsencode(args.prompt), "--prompt")  # argv's undecodable bytes
    elif sys.stdin is not None and not sys.stdin.isatty():
        stdin = getattr(sys.stdin, "buffer", None)
        text = decode_utf8(stdin.read(), "stdin") if stdin else sys.stdin.read()
        text = text or None  # nothing piped: as on a terminal
    else:
        text = None
    if text is None:
        if not is_demo:
            raise UsageError(
                "no prompt: give --prompt TEXT, pipe text in, or use --prompt-tokens IDS"
            )
        from grok1 import demo

        text = demo.PROMPT
    if not text.strip():
        raise UsageError("empty prompt: give --prompt TEXT or --prompt-tokens IDS")
    if tokenizer is None:
        raise UsageError(
            "a text prompt needs a tokenizer: put tokenizer.model at the top level "
            "or pass --tokenizer PATH (or use --prompt-tokens)"
        )
    return tokenizer.encode(text)


def decode_utf8(data: bytes, where: str) -> str:
    """`data` as text; invalid UTF-8 becomes U+FFFD, with one warning naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        print(
            f"warning: {where} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}); invalid bytes are replaced by U+FFFD",
            file=sys.stderr,
        )
        return data.decode("utf-8", "replace")


def parse_token_ids(text: str) -> list[int]:
    parts = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not parts:
        raise UsageError("empty prompt: --prompt-tokens holds no ids (expected e.g. 1,2,3)")
    for t in parts:
        if not re.fullmatch(r"[+-]?\d+", t):
            raise UsageError(
                f"--prompt-tokens: {t!r} is not a token id; expected integers "
                "separated by commas, e.g. 1,2,3"
            )
    return [int(t) for t in parts]


def check_prompt(ids: list[int], max_new_tokens: int, config) -> None:
    """The prompt against the model's vocabulary and context, before any weight is read (the
    engine checks again when the request is submitted)."""
    vocab, context, n = config.vocab_size, config.sequence_len, len(ids)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(
            f"token id {bad[0]} is outside the model's vocabulary: ids lie in [0, {vocab})"
        )
    if n >= context:
        raise UsageError(
            f"the prompt has {n} tokens but the model's context holds {context}, "
            f"the new tokens included: shorten it to at most {context - 1} tokens"
        )
    if n + max_new_tokens > context:
        raise UsageError(
            f"--max-new-tokens {max_new_tokens}: the prompt's {n} tokens + {max_new_tokens} new "
            f"tokens exceed the model's context of {context} tokens; ask for at most "
            f"{context - n} new tokens, or shorten the prompt"
        )


# -- generating and printing --------------------------------------------------------------------
@dataclasses.dataclass
class Generated:
    tokens: list[int]
    finish_reason: str | None
    total_s: float  # from the request to the last token
    first_token_s: float | None = None  # from the request to the first token (None: unknown)
    compile_s: float | None = None  # compiled before the request (None: included above)


def run_generation(model, ids, max_new_tokens, sampling, ignore_eos, out) -> Generated | None:
    """Generates for one prompt, handing the tokens to `out` as they come. None on the
    processes of a multi-process run that follow process 0."""
    from grok1.engine import Request

    engine = model.engine
    if not out.primary:
        out.phase = "following process 0"
        engine.follow()
        return None
    out.phase = "compiling"
    out.status("compiling the prefill and decode programs ...")
    t0 = time.monotonic()
    engine.warmup(progress=out.status, prompt_len=len(ids), max_len=len(ids) + max_new_tokens)
    compile_s = time.monotonic() - t0
    out.status(f"compiled in {compile_s:.1f} s")
    out.phase = "generating"
    handle = engine.submit(Request(tuple(ids), max_new_tokens, sampling, ignore_eos=ignore_eos))
    for event in handle:  # the main thread waits here; a signal ends the process meanwhile
        out.add(event.tokens)
    r = handle.result()
    if r.finish_reason == "error" and r.error is not None:
        raise r.error
    first = None if r.first_token_at is None else r.first_token_at - r.submitted_at
    return Generated(r.tokens, r.finish_reason, r.finished_at - r.submitted_at, first, compile_s)


class Output:
    """What the run prints: status lines on stderr, and on stdout the continuation (streamed or
    at the end) or one JSON object. Only process 0 prints. `interrupted` prints what a run
    stopped by a signal has to show; the `lock` (the `console.Interrupts` lock) keeps it from
    interleaving with the main thread's printing."""

    def __init__(self, json_mode: bool):
        self.json_mode, self.stream, self.primary = json_mode, False, True
        self.lock = None  # set to the Interrupts' lock
        self.phase = "starting"
        self.tokens: list[int] = []
        self._tokenizer = self._decoder = None
        self._streamed = False
        self._finished = False  # the whole output is printed

    def configure(self, tokenizer, stream: bool) -> None:
        self._tokenizer = tokenizer
        self.stream = stream and not self.json_mode
        if self.stream and tokenizer is not None:
            self._decoder = tokenizer.stream_decoder()

    def status(self, message: str) -> None:
        if self.primary:
            print(f"[grok1] {message}", file=sys.stderr, flush=True)

    def add(self, tokens) -> None:
        with self.lock:
            self.tokens += tokens
            if not (self.stream and self.primary):
                return
            for token in tokens:
                piece = f"{token} " if self._decoder is None else self._decoder.feed(token)
                self._streamed = True
                sys.stdout.write(piece)
            sys.stdout.flush()

    def text(self, tokens) -> str:
        if self._tokenizer is None:
            return " ".join(map(str, tokens))
        return self._tokenizer.decode(tokens)

    def finish(self, gen: Generated, load_s: float, demo: bool) -> None:
        with self.lock:
            if not self.primary:
                return
            if self.json_mode:
                print(
                    json.dumps(
                        {
                            "tokens": gen.tokens,
                            "finish_reason": gen.finish_reason,
                            "text": self.text(gen.tokens) if self._tokenizer is not None else None,
                            "load_s": round(load_s, 3),
                            "compile_s": _round(gen.compile_s),
                            "first_token_s": _round(gen.first_token_s),
                            "generate_s": round(gen.total_s, 3),
                            "demo": demo,
                        }
                    )
                )
            elif self.stream:
                print(self._decoder.flush() if self._decoder is not None else "")
            else:
                print(self.text(gen.tokens))
            sys.stdout.flush()
            self._finished = True
        self.status(speed_line(gen))

    def interrupted(self, signum: int) -> None:
        """Called by the `console.Interrupts` watcher, holding the lock."""
        if self.primary and not self.json_mode and not self._finished:
            if self._streamed:
                print(self._decoder.flush() if self._decoder is not None else "")
            elif self.tokens:
                print(self.text(self.tokens))
        n = f"; {len(self.tokens)} tokens generated" if self.tokens else ""
        name = signal.Signals(signum).name
        print(f"interrupted ({name}) while {self.phase}{n}", file=sys.stderr)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def speed_line(gen: Generated) -> str:
    """How long the tokens took, decode speed apart from compiling and prefilling."""
    n = len(gen.tokens)
    if gen.first_token_s is None:
        return (
            f"{n} tokens in {gen.total_s:.2f} s (compile and prefill included; a streamed "
            "run reports the decode speed apart)"
        )
    before = "prefill" if gen.compile_s is not None else "compile + prefill"
    line = f"{n} tokens: the first after {gen.first_token_s:.2f} s ({before})"
    decode_s = gen.total_s - gen.first_token_s
    if n > 1 and decode_s > 0:
        line += f", then {n - 1} in {decode_s:.2f} s ({(n - 1) / decode_s:.1f} tok/s)"
    return line


# -- the dry run --------------------------------------------------------------------------------
def dry_run(args, path, is_demo, out: Output) -> int:
    """Compiles the model's programs on the mesh without weights and prints the memory plan.

    Without a checkpoint it plans the Grok-1 release config. A mesh larger than the devices that
    JAX sees here is planned on as many virtual CPU devices, in a child process."""
    import jax

    from grok1 import plan, sharding

    if is_demo:
        out.status("no checkpoint under checkpoints/: planning the Grok-1 release config")
    source = "grok1" if is_demo else path
    config = plan.config_from(source)
    n = jax.device_count()
    mesh = sharding.mesh_sizes(args.mesh, n)
    need = math.prod(mesh.values())
    kw = dict(
        batch=1, context=config.sequence_len, dtype=args.dtype, expert_parallel=args.expert_parallel
    )
    where = f"{need} virtual CPU devices" if need > n else f"{need} device(s)"
    out.phase = "compiling the dry run"
    out.status(
        f"compiling the prefill and decode programs for mesh {mesh} on {where}, without weights ..."
    )
    if need > n:
        report = plan.dry_run_subprocess(source, mesh, **kw)
    else:
        report = plan.dry_run(config, mesh, **kw)
    with out.lock:
        print(json.dumps(report, default=str, indent=1) if args.json else plan.summary(report))
    return 0
