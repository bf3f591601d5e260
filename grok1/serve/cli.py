"""`python -m grok1.serve`: load Grok-1 (or the embedded demo model) and serve the OpenAI API.

The port opens at once and `/health` answers 503 while the model loads and compiles; when the
warm-up is done one line with the URL goes to stdout. On a multi-host job process 0 serves HTTP
and every other process follows its scheduling decisions (`engine.follow()`) and opens no port.
The model and multi-host flags are run.py's (`grok1.cli`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

from grok1 import cli, console
from grok1.console import UsageError

ENV_API_KEY = "GROK1_API_KEY"
DEMO_NAME, RELEASE_NAME = "grok1-demo", "grok-1"

EPILOG = """\
exit status: 0 stopped by SIGINT or SIGTERM after serving, 1 an error while loading (a file, the
devices, their memory, the distributed job) or the engine died in a multi-host job, 2 a usage
error (a flag or its value), 130 / 143 interrupted while loading. See docs/serving.md."""


def parse_args(argv=None) -> argparse.Namespace:
    p = cli._Parser(prog="python -m grok1.serve", description=__doc__, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    cli._model_flags(p.add_argument_group("model"))
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    g.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    g.add_argument(
        "--api-key",
        default=os.environ.get(ENV_API_KEY) or None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default ${ENV_API_KEY})",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help=f"the model name clients send (default {RELEASE_NAME}, or {DEMO_NAME})",
    )
    g.add_argument("--max-slots", type=int, default=None, help="requests decoded together")
    g.add_argument("--horizon", type=int, default=None, help="decode steps between admissions")
    g.add_argument("--max-queue", type=int, default=None, help="waiting requests before 503")
    g.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (413)")
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template; enables /v1/chat/completions",
    )
    g.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR",
        help="JAX persistent compilation cache (default $GROK1_COMPILATION_CACHE or "
        "~/.cache/grok1/jax)",
    )
    g.add_argument("--no-compilation-cache", action="store_true")
    cli._distributed_flags(p.add_argument_group("multi-host"))
    args = p.parse_args(argv)
    args.multi_process = cli._check_distributed(args)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    status = console.run(lambda: _main(argv), console.debug_requested(argv))
    distributed = sys.modules.get("grok1.distributed")
    if status and distributed is not None and distributed.joined():
        sys.stdout.flush()  # leave without the runtime's shutdown, which waits for the others
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv) -> int:
    args = parse_args(argv)
    check_flags(args)
    plan = model_plan(args)
    if args.multi_process:
        from grok1 import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               timeout_s=args.init_timeout,
                               heartbeat_timeout_s=args.heartbeat_timeout)  # fmt: skip
        if not distributed.is_primary():
            return follow(plan)
    return serve(args, plan)


def check_flags(args) -> None:
    for flag in ("max_slots", "horizon", "max_queue", "max_body_bytes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must lie in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key or leave the flag out")
    if args.compilation_cache and args.no_compilation_cache:
        raise UsageError("give --compilation-cache DIR or --no-compilation-cache, not both")


def model_plan(args) -> dict:
    """What to load: checkpoint, tokenizer, mesh and engine settings (checked before loading)."""
    path, tokenizer, is_demo = cli.resolve_model(args)
    template = None
    if args.chat_template is not None:
        from grok1.serve.chat import ChatTemplate

        try:
            template = ChatTemplate.load(args.chat_template)
        except ValueError as e:
            raise UsageError(f"--chat-template: {e}") from None
    kw = dict(mesh=args.mesh, expert_parallel=args.expert_parallel, dtype=args.dtype,
              rounding=args.rounding, tokenizer=tokenizer)  # fmt: skip
    for flag in ("max_slots", "horizon", "max_queue"):
        if getattr(args, flag) is not None:
            kw[flag] = getattr(args, flag)
    if args.no_compilation_cache:
        kw["compilation_cache"] = None
    elif args.compilation_cache:
        kw["compilation_cache"] = args.compilation_cache
    name = args.served_model_name or (DEMO_NAME if is_demo else RELEASE_NAME)
    return {"path": path, "is_demo": is_demo, "load": kw, "name": name, "template": template}


def load(plan: dict, warm_up: bool = True):
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


def follow(plan) -> int:
    """Processes other than 0: run the steps process 0 decides until it closes its engine."""
    import jax

    model = load(plan, warm_up=False)  # process 0's warm-up reaches this process's engine too
    say(f"process {jax.process_index()}: following process 0")
    model.engine.follow()
    return 0


def serve(args, plan: dict) -> int:
    import uvicorn

    from grok1.serve.app import DEFAULT_MAX_BODY_BYTES, ServerState, create_app

    sock = listen(args.host, args.port)
    state = ServerState(plan["name"], api_key=args.api_key, chat_template=plan["template"],
                        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)  # fmt: skip
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    say(f"listening on {url} (503 until the model is ready)")
    starter = _Starter(plan, state, server, url, args.multi_process)
    starter.start()
    # uvicorn handles SIGINT/SIGTERM while it runs (a graceful stop), then raises them again to
    # the handlers it found; these note them, so that the engine is closed below
    stops: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stops.append(signum))
    server.run(sockets=[sock])
    if starter.model is not None:
        starter.model.close()  # followers return from follow()
    if starter.error is not None:
        raise starter.error  # console.run prints it (one line for a user's mistake)
    if starter.is_alive():  # stopped while loading: the load cannot be interrupted
        say("stopped while loading")
        sys.stdout.flush()
        os._exit(128 + (stops[0] if stops else signal.SIGINT))
    if starter.dead:
        print("error: the engine has stopped: a process of the job failed (see above)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                         "(0 picks a free one) or --host") from None  # fmt: skip
    sock.listen(2048)
    return sock


class _Starter(threading.Thread):
    """Loads, warms up and reports ready while the port already answers; then, on a multi-host
    job, watches the engine and stops the server when it dies."""

    def __init__(self, plan, state, server, url: str, multi: bool):
        super().__init__(name="grok1-load", daemon=True)
        self.plan, self.state, self.server, self.url, self.multi = plan, state, server, url, multi
        self.model = None
        self.error: BaseException | None = None
        self.dead = False

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.model = load(self.plan)
        except BaseException as e:  # re-raised in the main thread once the server has stopped
            self.error = e
            self.server.should_exit = True
            return
        self.state.set_ready(self.model.engine, self.model.tokenizer)
        print(f"grok1 serving {self.state.served_model_name} at {self.url}/v1 (ready in "
              f"{time.monotonic() - t0:.1f} s)", flush=True)  # fmt: skip
        while self.multi and not self.server.should_exit:
            if not self.model.engine.alive:
                say("the engine has died (a peer process failed?): stopping")
                self.dead = True
                self.server.should_exit = True
            time.sleep(0.5)
