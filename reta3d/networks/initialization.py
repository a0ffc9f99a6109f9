"""jax.jit for initialisation programs, which run once and are mostly random draws.

XLA expands every random draw of an initialiser into its own unrolled bit generator
(threefry: 20 rounds per draw), so a network's init is a large program that runs in
milliseconds but took LLVM most of its compile time to optimise (the small generator of the
tests: 75 s with threefry keys on a 2-core CPU, 12 s with LLVM's optimisation off). The
random bits are the same integer arithmetic either way; the float transforms of them (erf⁻¹
for normal draws) can round differently, by about one float32 ulp, from the same program
compiled with full optimisation.
"""
import functools

import jax

# XLA's CPU/GPU backend option: LLVM -O0 for this program only (the default is 2 or 3).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def jit_init(fn, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled with `INIT_COMPILER_OPTIONS`: for functions that
    initialise variables (Flax `init`), run once per model.

    Called on traced arguments (inside jax.jit, jax.eval_shape, ...) it runs `fn` itself:
    the enclosing transformation compiles it (JAX takes compiler options at the top level
    only)."""
    compiled = jax.jit(fn, compiler_options=INIT_COMPILER_OPTIONS, **jit_kwargs)

    @functools.wraps(fn)
    def init(*args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs))):
            return fn(*args, **kwargs)
        return compiled(*args, **kwargs)
    return init
