"""`python -m grok1.serve`: load Grok-1 (or the embedded demo model) and serve the OpenAI API.

The port opens at once and `/health` answers 503 while the model loads and compiles; when the
warm-up is done one line with the URL goes to stdout. On a multi-host job process 0 serves HTTP
and every other process follows its scheduling decisions (`engine.follow()`) and opens no port.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
import traceback

ENV_API_KEY = "GROK1_API_KEY"
DEMO_NAME, RELEASE_NAME = "grok1-demo", "grok-1"


class UserError(Exception):
    """A mistake in the flags or the files they name: one `error:` line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m grok1.serve", description=__doc__)
    p.add_argument("--checkpoint", default="checkpoints", help="directory holding ckpt-0/")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (tokenizer.model)")
    p.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. data=1,model=8")
    p.add_argument(
        "--expert-parallel", action="store_true", help="split whole experts over the model axis"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rounding", default="release", choices=["release", "strict", "fast"])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument(
        "--api-key",
        default=os.environ.get(ENV_API_KEY) or None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default ${ENV_API_KEY})",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help=f"the model name clients send (default {RELEASE_NAME}, or {DEMO_NAME})",
    )
    p.add_argument("--max-slots", type=int, default=None, help="requests decoded together")
    p.add_argument("--horizon", type=int, default=None, help="decode steps between admissions")
    p.add_argument("--max-queue", type=int, default=None, help="waiting requests before 503")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (413)")
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template; enables /v1/chat/completions",
    )
    p.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR",
        help="JAX persistent compilation cache (default $GROK1_COMPILATION_CACHE or "
        "~/.cache/grok1/jax)",
    )
    p.add_argument("--no-compilation-cache", action="store_true")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        metavar="S",
        help="multi-host: a peer silent this long ends every process",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_flags(args)
        plan = model_plan(args)
        multi = join_job(args)
        from grok1 import distributed

        if multi and not distributed.is_primary():
            return follow(args, plan)
        return serve(args, plan, multi)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_flags(args) -> None:
    for flag in ("max_slots", "horizon", "max_queue", "max_body_bytes", "heartbeat_timeout"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must lie in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the flag out")
    if args.compilation_cache and args.no_compilation_cache:
        raise UserError("give --compilation-cache DIR or --no-compilation-cache, not both")


def join_job(args) -> bool:
    """Joins the multi-host job when one is configured; True if there is one."""
    from grok1 import distributed

    if not (args.coordinator or os.environ.get(distributed.ENV_COORDINATOR)):
        if args.num_processes is not None or args.process_id is not None:
            raise UserError("--num-processes and --process-id need --coordinator HOST:PORT")
        return False
    try:
        distributed.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            heartbeat_timeout_s=args.heartbeat_timeout,
        )
    except distributed.DistributedError as e:
        raise UserError(str(e)) from None
    return True


def model_plan(args) -> dict:
    """What to load: checkpoint, tokenizer, mesh and engine settings (checked before loading)."""
    from grok1 import cli

    try:
        path, tokenizer, is_demo = cli.resolve_model(args)
        mesh = cli.parse_mesh(args.mesh)
    except SystemExit as e:  # grok1.cli's messages for the same flags
        raise UserError(str(e.code).removeprefix("error: ")) from None
    template = None
    if args.chat_template is not None:
        from grok1.serve.chat import ChatTemplate

        try:
            template = ChatTemplate.load(args.chat_template)
        except ValueError as e:
            raise UserError(f"--chat-template: {e}") from None
    kw = dict(
        mesh=mesh,
        expert_parallel=args.expert_parallel,
        dtype=args.dtype,
        rounding=args.rounding,
        tokenizer=tokenizer,
    )
    for flag in ("max_slots", "horizon", "max_queue"):
        if getattr(args, flag) is not None:
            kw[flag] = getattr(args, flag)
    if args.no_compilation_cache:
        kw["compilation_cache"] = None
    elif args.compilation_cache:
        kw["compilation_cache"] = args.compilation_cache
    name = args.served_model_name or (DEMO_NAME if is_demo else RELEASE_NAME)
    return {"path": path, "is_demo": is_demo, "load": kw, "name": name, "template": template}


def load(plan: dict, say, warm_up: bool = True) -> object:
    import grok1

    if plan["is_demo"]:
        say("no checkpoint under checkpoints/: serving the small embedded demo model")
    t0 = time.monotonic()
    model = grok1.load(plan["path"], **plan["load"])
    if warm_up:
        say(f"loaded in {time.monotonic() - t0:.1f} s; warming up")
        model.engine.warmup(progress=lambda what: say(f"warm-up: {what}"))
    return model


def say(message: str) -> None:
    print(f"[grok1] {message}", file=sys.stderr, flush=True)


def follow(args, plan) -> int:
    """Processes other than 0: run the steps process 0 decides until it closes its engine."""
    import jax

    model = load(plan, lambda m: None, warm_up=False)  # process 0's warm-up runs here too
    say(f"process {jax.process_index()}: following process 0")
    model.engine.follow()
    return 0


def serve(args, plan: dict, multi: bool) -> int:
    import uvicorn

    from grok1.serve.app import DEFAULT_MAX_BODY_BYTES, ServerState, create_app

    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    state = ServerState(
        plan["name"],
        api_key=args.api_key,
        chat_template=plan["template"],
        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    )
    config = uvicorn.Config(
        create_app(state),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    say(f"listening on http://{host}:{port} (503 until the model is ready)")
    outcome: dict = {}
    starter = threading.Thread(
        target=_start,
        args=(plan, state, server, outcome, f"http://{host}:{port}", multi),
        daemon=True,
        name="grok1-load",
    )
    starter.start()
    # uvicorn handles SIGINT/SIGTERM while it runs and re-raises them to the handlers found
    # before it; these only note them, so that the engine is closed (followers return) below
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    model = outcome.get("model")
    if model is not None:
        model.engine.close()  # followers return from follow()
    if "error" in outcome:
        print(f"error: {outcome['error']}", file=sys.stderr, flush=True)
        return 1
    if starter.is_alive():  # stopped while loading: the load cannot be interrupted
        sys.stdout.flush()
        os._exit(1)
    return 1 if outcome.get("dead") else 0


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
            "(0 picks a free one) or --host"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _start(plan, state, server, outcome: dict, url: str, multi: bool) -> None:
    """On a thread while the port already answers: load, warm up, report ready; then, on a
    multi-host job, watch the engine and stop the server when it dies."""
    t0 = time.monotonic()
    try:
        model = load(plan, say)
    except (OSError, ValueError) as e:  # the checkpoint or tokenizer files, the mesh
        outcome["error"] = f"{type(e).__name__}: {e}"
        server.should_exit = True
        return
    except BaseException as e:
        traceback.print_exc()
        outcome["error"] = f"loading failed: {type(e).__name__}: {e}"
        server.should_exit = True
        return
    outcome["model"] = model
    state.set_ready(model.engine, model.tokenizer)
    print(
        f"grok1 serving {state.served_model_name} at {url}/v1 (ready in "
        f"{time.monotonic() - t0:.1f} s)",
        flush=True,
    )
    while multi and not server.should_exit:
        if not model.engine.alive:
            say("the engine has died (a peer process failed?): stopping")
            outcome["dead"] = True
            server.should_exit = True
        time.sleep(0.5)
