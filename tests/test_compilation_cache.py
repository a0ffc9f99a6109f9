"""The persistent compilation cache: where it goes, how it is turned off, and that it is used."""
import subprocess
import sys
import textwrap

import jax

from reta3d import compilation_cache


def test_directory_and_off_switch(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.delenv(compilation_cache.ENV, raising=False)
        assert compilation_cache.default_directory() == tmp_path / "xdg" / "reta3d" / "jax"
        assert compilation_cache.enable() == tmp_path / "xdg" / "reta3d" / "jax"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "reta3d" / "jax")
        monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "elsewhere"))
        assert compilation_cache.enable() == tmp_path / "elsewhere"
        monkeypatch.setenv(compilation_cache.ENV, "off")
        assert compilation_cache.enable() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_compiled_programs_are_written_to_the_cache(tmp_path):
    """A jitted program compiled by two processes in turn lands in the cache directory."""
    script = textwrap.dedent(f"""
        import os
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp
        from reta3d import compilation_cache
        compilation_cache.enable({str(tmp_path / "cache")!r})
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny program
        def f(x):
            for _ in range(30):
                x = jnp.sin(x) @ x.T
            return x
        jax.jit(f)(jnp.ones((64, 64))).block_until_ready()
    """)
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], check=True, timeout=300,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    entries = list((tmp_path / "cache").iterdir())
    assert entries, "nothing was written to the persistent cache"
