"""`python run.py`: sample text from Grok-1 (or the embedded demo model when no checkpoint is
present). Prints the continuation (streamed on a terminal) or, with --json, one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_CHECKPOINT = "checkpoints"
DEFAULT_TOKENIZER = "tokenizer.model"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="directory holding ckpt-0/")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (tokenizer.model)")
    p.add_argument("--prompt", default=None, help="prompt text (default: read stdin if piped)")
    p.add_argument("--prompt-tokens", default=None, help="prompt as token ids: 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy (default; the demo model samples at 0.8)",
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass (default 1; demo 0.95)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="never stop at EOS, as the release (default off; on for the demo, whose "
        "EOS only separates paragraphs)",
    )
    p.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. data=1,model=8")
    p.add_argument(
        "--expert-parallel",
        action="store_true",
        help="split whole experts over the model axis (throughput at large batches)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rounding", default="release", choices=["release", "strict", "fast"],
                   help="bf16 roundings: the release's (default), every one written in its "
                   "source, or the release's with int8 weights unrounded (faster on CPU; not "
                   "the release's numerics)")  # fmt: skip
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they come (default: on a terminal)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dry-run", action="store_true", help="memory plan only, no weights")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true", help="detect a TPU pod / SLURM cluster")
    return p.parse_args(argv)


def parse_mesh(text: str | None) -> dict | None:
    if not text:
        return None
    mesh = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"--mesh: expected NAME=SIZE[,NAME=SIZE], got {text!r}")
        mesh[name.strip()] = int(value)
    return mesh


def resolve_model(args) -> tuple[str, str | None, bool]:
    """(checkpoint dir, tokenizer path or None, is_demo)."""
    from grok1.checkpoint import directory

    if args.checkpoint != DEFAULT_CHECKPOINT or directory.is_checkpoint(args.checkpoint):
        try:
            directory.find_format(args.checkpoint)  # release ckpt-0/ or converted safetensors
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        tok = args.tokenizer or (DEFAULT_TOKENIZER if os.path.exists(DEFAULT_TOKENIZER) else None)
        return args.checkpoint, tok, False
    from grok1 import demo

    return demo.demo_path(), args.tokenizer or demo.tokenizer_path(), True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.distributed or args.coordinator or os.environ.get("GROK1_COORDINATOR"):
        from grok1 import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import grok1
    from grok1 import distributed

    path, tok_path, is_demo = resolve_model(args)
    if args.dry_run:
        return dry_run(args, path, is_demo)
    if is_demo and not args.json:
        print("[grok1] no checkpoint under checkpoints/: running the small embedded demo model. "
              "For Grok-1, put the release's ckpt-0/ under checkpoints/ and tokenizer.model at "
              "the top level (see README).", file=sys.stderr)  # fmt: skip
    t0 = time.time()
    model = grok1.load(
        path,
        mesh=parse_mesh(args.mesh),
        expert_parallel=args.expert_parallel,
        dtype=args.dtype,
        rounding=args.rounding,
        tokenizer=tok_path,
        progress=sys.stderr.isatty() and not args.json,
    )
    load_s = time.time() - t0
    prompt = read_prompt(args, model, is_demo)
    if distributed.is_primary() is False:
        prompt = None
    prompt = distributed.broadcast_prompts(prompt)
    defaults = (0.8, 0.95, True) if is_demo else (0.0, 1.0, False)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    kw = dict(
        temperature=pick(args.temperature, defaults[0]),
        top_p=pick(args.top_p, defaults[1]),
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=pick(args.ignore_eos, defaults[2]),
    )
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    primary = distributed.is_primary()
    if primary and sys.stderr.isatty() and not args.json:
        print(f"[grok1] loaded in {load_s:.1f}s; compiling the prefill and decode steps...",
              file=sys.stderr)  # fmt: skip
    t1 = time.time()
    if stream and not args.json:
        new = []
        for piece in model.stream(prompt, args.max_new_tokens, **kw):
            new.append(piece)
            if primary:
                print(piece if isinstance(piece, str) else f"{piece} ", end="", flush=True)
        if primary:
            print()
        n_new = len(new) if not isinstance(prompt, str) else None
    else:
        result = model.generate([prompt], args.max_new_tokens, return_results=True, **kw)[0]
        n_new = len(result.tokens)
        text = model.tokenizer.decode(result.tokens) if model.tokenizer else None
        gen_s = time.time() - t1
        if primary and args.json:
            print(json.dumps({"tokens": result.tokens, "text": text,
                              "finish_reason": result.finish_reason, "load_s": round(load_s, 3),
                              "generate_s": round(gen_s, 3), "demo": is_demo}))  # fmt: skip
        elif primary:
            print(text if text is not None else " ".join(map(str, result.tokens)))
    if primary and not args.json and n_new:
        dt = time.time() - t1
        print(f"[grok1] {n_new} tokens in {dt:.2f}s ({n_new / dt:.1f} tok/s, compile included)",
              file=sys.stderr)  # fmt: skip
    return 0


def read_prompt(args, model, is_demo=False):
    if args.prompt_tokens:
        try:
            ids = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
        except ValueError:
            raise SystemExit(f"--prompt-tokens: expected ids like 1,2,3, got "
                             f"{args.prompt_tokens!r}") from None  # fmt: skip
        if not ids:
            raise SystemExit("error: empty prompt")
        return ids
    text = args.prompt
    if text is None and not sys.stdin.isatty():
        text = sys.stdin.read() or None  # piped text; nothing piped: as on a terminal
    if text is None:
        if not is_demo:
            raise SystemExit(
                "error: no prompt: give --prompt TEXT, pipe text in, or use --prompt-tokens IDS"
            )
        from grok1 import demo

        text = demo.PROMPT
    if not text.strip():
        raise SystemExit("error: empty prompt: give --prompt TEXT or --prompt-tokens IDS")
    if model.tokenizer is None:
        raise SystemExit("error: a text prompt needs a tokenizer: put tokenizer.model at the top "
                         "level or pass --tokenizer PATH (or use --prompt-tokens)")  # fmt: skip
    return text


def dry_run(args, path, is_demo) -> int:
    """Compiles the model's programs on the mesh without weights and prints the memory plan.

    Without a checkpoint it plans the Grok-1 release config. A mesh larger than the devices that
    JAX sees here is planned on as many virtual CPU devices, in a child process."""
    import jax

    from grok1 import plan
    from grok1.sharding import ShardingError

    if is_demo:
        print("[grok1] no checkpoint under checkpoints/: planning the Grok-1 release config",
              file=sys.stderr)  # fmt: skip
    source = "grok1" if is_demo else path
    config = plan.config_from(source)
    mesh = parse_mesh(args.mesh) or {"data": 1, "model": 1}
    unknown = set(mesh) - {"data", "model"}
    if unknown:
        raise SystemExit(f"--mesh: unknown axes {sorted(unknown)}; the axes are data and model")
    data, model = mesh.get("data", 1), mesh.get("model", -1)
    n = jax.device_count()
    if data == -1 and model == -1:
        raise SystemExit("--mesh: give the size of at least one axis")
    if model == -1:  # an axis left out (or -1) gets the remaining devices, as in `load`
        model = n // data
    elif data == -1:
        data = n // model
    mesh = {"data": data, "model": model}
    if min(mesh.values()) < 1:
        raise SystemExit(f"--mesh: cannot fill {args.mesh!r} with the {n} devices here")
    kw = dict(batch=1, context=config.sequence_len, dtype=args.dtype,
              expert_parallel=args.expert_parallel)  # fmt: skip
    try:
        if n >= mesh["data"] * mesh["model"]:
            report = plan.dry_run(config, mesh, **kw)
        else:
            report = plan.dry_run_subprocess(source, mesh, **kw)
    except (ShardingError, plan.DryRunError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(report, default=str, indent=1) if args.json else plan.summary(report))
    return 0
