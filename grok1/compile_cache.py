"""JAX's persistent compilation cache for grok1's entry points (run.py, the server, the API).

Compiling the engine's programs takes seconds (the demo) to minutes (Grok-1 on many devices);
with the cache, a second process that compiles the same programs reads them from disk instead.
`grok1.load` enables it, in `$GROK1_COMPILATION_CACHE` if set (an empty value disables it), else
in `~/.cache/grok1/jax` (`$XDG_CACHE_HOME/grok1/jax`).
"""

from __future__ import annotations

import os

ENV = "GROK1_COMPILATION_CACHE"
DEFAULT = "default"  # sentinel: the environment variable, else the default directory


def default_dir() -> str | None:
    """The directory `DEFAULT` stands for, or None when the environment disables the cache."""
    if ENV in os.environ:
        return os.environ[ENV] or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "grok1", "jax")


def enable(directory: str | None = DEFAULT) -> str | None:
    """Points JAX's persistent compilation cache at `directory` (`DEFAULT`: see the module
    docstring; None or "": left as it is). Returns the directory in use, or None."""
    import jax

    if directory == DEFAULT:
        directory = default_dir()
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    # every program is worth keeping: the engine compiles many small ones
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return os.fspath(directory)
