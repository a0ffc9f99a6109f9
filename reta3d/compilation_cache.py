"""JAX's persistent compilation cache, so that a second run or a resume does not compile again.

The demo's three train steps, the sampler and the SWD generator take about a minute to compile
on a 2-core CPU; with the cache a relaunch loads them in seconds. The cache lives under the
user's cache directory (`$XDG_CACHE_HOME/reta3d/jax`, default `~/.cache/reta3d/jax`);
`RETA3D_COMPILATION_CACHE=/some/dir` moves it and `RETA3D_COMPILATION_CACHE=off` turns it off.
Entries are keyed by JAX on the program, the jax/jaxlib version and the device, so a stale
entry is never reused.
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

ENV = "RETA3D_COMPILATION_CACHE"


def default_directory() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "reta3d" / "jax"


def enable(directory: Optional[str] = None) -> Optional[pathlib.Path]:
    """Turns the persistent cache on (before the first compilation); returns its directory,
    or None when RETA3D_COMPILATION_CACHE=off. `directory` overrides the environment."""
    import jax
    choice = directory or os.environ.get(ENV)
    if choice and choice.lower() in ("off", "0", "false", "none"):
        return None
    path = pathlib.Path(choice) if choice else default_directory()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program that took a noticeable time to compile, whatever its size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
