"""Converts a release checkpoint into sharded safetensors, once.

    python -m grok1.convert checkpoints checkpoints-st        # or: grok1-convert SRC DST
    python run.py --checkpoint checkpoints-st ...             # grok1.load reads it too

SRC holds the release's `ckpt-0/` (and `config.json`, else the Grok-1 preset applies); DST must
not exist yet. Every release file is validated before anything is written, the conversion shows
GB done, GB/s and ETA on a terminal, and DST appears only once it is complete (see
`grok1.checkpoint.safetensors_format`). Mistakes end with one `error: ...` line and status 1;
Ctrl-C or SIGTERM removes the partial output and exits with status 130.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from grok1.checkpoint import directory, safetensors_format
from grok1.progress import Progress


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="grok1-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="release checkpoint directory (holding ckpt-0/)")
    p.add_argument("dst", help="new directory for the converted checkpoint")
    p.add_argument(
        "--shard-gb", type=float, default=safetensors_format.SHARD_BYTES / 2**30,
        help="size of each safetensors file in GiB (default %(default)g)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if not args.shard_gb > 0:
        p.error(f"--shard-gb must be positive, got {args.shard_gb}")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # clean up on SIGTERM as on Ctrl-C
        previous = signal.signal(signal.SIGTERM, _interrupt)
    start = time.perf_counter()
    try:
        config = directory.check(args.src)  # the same one-line errors as grok1.load
        with Progress(label="converting") as progress:
            out = safetensors_format.convert(
                args.src, args.dst, config, shard_bytes=int(args.shard_gb * 2**30),
                progress=progress,
            )  # fmt: skip
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.dst}", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(
        f"converted {args.src} into {out}: {progress.done / 1e9:.2f} GB in "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
