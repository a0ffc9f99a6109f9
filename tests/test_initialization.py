"""networks.initialization.jit_init: the variables of a plain jax.jit (to float32 rounding of
the normal draws' erf⁻¹, compiled without LLVM's optimisation), and usable inside other
transformations (where compiler options are not allowed)."""
import jax
import numpy as np

from reta3d.networks.generator import GeneratorConfig, RETA3DGenerator, init_networks


def test_generator_init_equals_plain_jit_and_works_under_eval_shape():
    gen = RETA3DGenerator.create(GeneratorConfig.small())
    key = jax.random.PRNGKey(3)
    fast = gen.init(key)
    shapes = jax.eval_shape(gen.init, key)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(fast)
    assert jax.tree_util.tree_map(lambda x: x.shape, shapes) == jax.tree_util.tree_map(
        lambda x: x.shape, fast)
    # The plain jax.jit of the same draws, for two of the networks only: a plain jit of the
    # whole init is the 75 s compilation jit_init avoids (XLA drops the other draws here).
    # Inside that jit, gen.init runs as the plain function (a compiler option would raise).
    subtrees = ("mapping", "blend")
    plain = jax.jit(lambda k: {name: init_networks(gen.networks, k)["params"][name]
                               for name in subtrees})(key)
    nested = jax.jit(lambda k: {name: gen.init(k)["params"][name] for name in subtrees})(key)
    for name in subtrees:
        leaves = jax.tree_util.tree_leaves(fast["params"][name])
        assert leaves and jax.tree_util.tree_structure(plain[name]) == \
            jax.tree_util.tree_structure(fast["params"][name])
        for other in (plain[name], nested[name]):
            for a, b in zip(leaves, jax.tree_util.tree_leaves(other)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
