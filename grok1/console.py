"""How a command-line run ends: one `error:` line for a user's mistake, a quick and clean exit
on Ctrl-C or SIGTERM, and a stdout that holds only what the command prints.

    def main(argv=None) -> int:
        return console.run(lambda: command(argv), debug=console.debug_requested(argv))

Exit statuses:
  0    success
  1    an error found while running: a checkpoint, tokenizer or config file, the devices, their
       memory, the distributed job (the exception types of `USER_ERRORS`)
  2    a usage error: a flag, its value or the prompt (`UsageError`, argparse's errors)
  130  interrupted by SIGINT (Ctrl-C);  143  ended by SIGTERM (128 + the signal's number)
  141  stdout was closed by its reader (a pipe into `head`), silently

A user's mistake prints no traceback unless `--debug` is given or GROK1_DEBUG=1; anything else is
a bug and prints its traceback, then the `error:` line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEBUG_ENV = "GROK1_DEBUG"


class UsageError(Exception):
    """A mistake in the command line (a flag, its value, the prompt): exit status 2."""


# The library's exception types for users' mistakes: (module, class, exit status). A type is
# looked up only when its module is already imported (an exception cannot come from a module
# that never ran), so classifying an error imports nothing.
USER_ERRORS = (
    ("grok1.console", "UsageError", 2),
    ("grok1.checkpoint.release", "CheckpointError", 1),  # bad or damaged checkpoint files
    ("grok1.sharding", "ShardingError", 1),  # a mesh the devices or the model cannot use
    ("grok1.distributed", "DistributedError", 1),  # the job could not start
    ("grok1.sharding", "InsufficientMemoryError", 1),  # the devices cannot hold the model
    ("grok1.plan", "DryRunError", 1),  # the dry run's child process refused the plan
    ("builtins", "OSError", 1),  # a missing or unreadable file
    ("builtins", "MemoryError", 1),  # the host ran out of memory
)


def debug_requested(argv) -> bool:
    return "--debug" in (argv or ()) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run(command: Callable[[], int | None], debug: bool = False) -> int:
    """Runs `command` and returns the process's exit status (see the module docstring)."""
    try:
        with clean_stdout(), _terminate_as_interrupt():
            return command() or 0
    except SystemExit as e:  # argparse's --help, or a subcommand's own exit
        if isinstance(e.code, str):
            message = e.code.removeprefix("error:").strip()
            print(f"error: {message}", file=sys.stderr)
            return 1
        return 0 if e.code is None else e.code
    except BrokenPipeError:  # stdout's reader went away (`run.py | head -1`): nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:  # where no `Interrupts` watcher runs (a subcommand)
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        status, message = classify(e)
        if status is None or debug:
            traceback.print_exc()
        if status is None:
            message = f"unexpected {type(e).__name__}: {message} (a bug: the traceback shows where)"
        print(f"error: {message}", file=sys.stderr)
        return 1 if status is None else status


def classify(e: BaseException) -> tuple[int | None, str]:
    """(exit status, or None for a bug; the message on one line)."""
    text = str(e).strip() or type(e).__name__
    for module, name, status in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return status, one_line(text)
    if type(e).__name__ == "JaxRuntimeError":  # the runtime's errors while running a program
        if "RESOURCE_EXHAUSTED" in text:
            return 1, one_line(f"out of device memory: {text}; use a larger model axis (--mesh)")
        if "closed by peer" in text or "reset by peer" in text:
            return 1, one_line(f"another process of the job stopped ({text})")
    if isinstance(e, ValueError) and _raised_in_package(e):
        return 1, one_line(text)  # the library's own checks (context, vocabulary, config.json)
    return None, one_line(text)


def _raised_in_package(e: BaseException) -> bool:
    """Whether the innermost frame of `e`'s traceback is grok1's code (not NumPy's or JAX's)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(
        PACKAGE_DIR + os.sep
    )


def one_line(text: str) -> str:
    """`text` on one line. A text of a few lines (a problem and what to do) is joined; a longer
    one (another process's output) is printed as it is and its last line kept."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 3:
        print("\n".join(lines[:-1]), file=sys.stderr)
        return lines[-1].removeprefix("error:").strip()
    return " ".join(lines)


@contextlib.contextmanager
def clean_stdout():
    """Points file descriptor 1 at stderr for the run and `sys.stdout` at a copy of the original
    stdout: what native libraries write to descriptor 1 (gloo's "[Gloo] Rank 0 is connected"
    lines in a multi-process run) goes to stderr, and stdout holds only the command's output.
    Does nothing where stdout is not descriptor 1 (captured in tests)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd != 1:
        yield
        return
    old = sys.stdout
    old.flush()
    saved = os.dup(1)
    os.dup2(sys.stderr.fileno(), 1)
    sys.stdout = open(  # noqa: SIM115 (closed below)
        saved,
        "w",
        buffering=1 if os.isatty(saved) else -1,
        encoding=old.encoding,
        errors=old.errors,
    )
    try:
        yield
    finally:
        try:
            sys.stdout.flush()
        finally:
            os.dup2(saved, 1)
            with contextlib.suppress(OSError):
                sys.stdout.close()
            sys.stdout = old


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises `Terminated` (so `finally` blocks run, as for Ctrl-C) instead of ending
    the process on the spot."""

    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupts:
    """Ends the process on SIGINT or SIGTERM within milliseconds, however busy the main thread.

    Python runs signal handlers only in the main thread and only between bytecodes, so a main
    thread compiling or waiting inside XLA would notice Ctrl-C late, and a KeyboardInterrupt
    unwinding through JAX, followed by interpreter teardown while XLA's threads run, can crash
    the process. Instead, the signal's C-level handler writes its number to a pipe
    (`signal.set_wakeup_fd`) that a watcher thread reads; the watcher takes `lock` (the command
    holds it while printing, so nothing is cut mid-write), calls `on_interrupt(signum)` to print
    what the run has to show, flushes stdout and stderr and leaves with `os._exit(128 + signum)`.
    The main thread's Python-level handler does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_interrupt: Callable[[int], None]):
        self.on_interrupt = on_interrupt
        self.lock = threading.RLock()
        self._saved: dict = {}

    def __enter__(self) -> Interrupts:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._saved_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self.install()
        threading.Thread(target=self._watch, name="grok1-interrupts", daemon=True).start()
        return self

    def install(self) -> None:
        """(Re)installs the handlers, e.g. after a library replaced one."""
        for sig in self.SIGNALS:
            previous = signal.signal(sig, _ignore)
            self._saved.setdefault(sig, previous)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)
        signal.set_wakeup_fd(self._saved_fd)
        os.close(self._write)  # the watcher reads end-of-file and returns

    def _watch(self) -> None:
        with os.fdopen(self._read, "rb", buffering=0) as pipe:
            while data := pipe.read(64):
                for signum in data:
                    if signum in self.SIGNALS:
                        self._exit(signum)

    def _exit(self, signum: int) -> None:
        locked = self.lock.acquire(timeout=2)  # a print stuck on a full pipe: exit anyway
        try:
            if locked:
                self.on_interrupt(signum)
        except Exception:  # exiting matters more than what is left to print
            pass
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for pid in children_of(os.getpid()):  # e.g. the dry run's planner, which would go on
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        os._exit(128 + signum)


def children_of(pid: int) -> list[int]:
    """The ids of `pid`'s child processes (from /proc; none where there is no /proc)."""
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (command name)"
            if int(fields[1]) == pid:
                out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _ignore(signum, frame) -> None:
    """The main thread's handler: the `Interrupts` watcher acts on the signal."""
