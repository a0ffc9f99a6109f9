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
    plain = jax.jit(lambda k: init_networks(gen.networks, k))(key)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert jax.tree_util.tree_structure(fast) == jax.tree_util.tree_structure(plain)
    shapes = jax.eval_shape(gen.init, key)
    assert jax.tree_util.tree_map(lambda x: x.shape, shapes) == jax.tree_util.tree_map(
        lambda x: x.shape, fast)
    # Nested in a jit (a compiler option there would raise): the outer jit compiles it.
    nested = jax.jit(lambda k: gen.init(k)["params"]["mapping"])(key)
    for a, b in zip(jax.tree_util.tree_leaves(nested),
                    jax.tree_util.tree_leaves(fast["params"]["mapping"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

