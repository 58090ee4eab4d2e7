"""lgcn_jax.xla_options: the package's programs compile with its CPU options at top level, run inside a caller's
traces without them, and leave out what XLA_FLAGS sets or this XLA does not know."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgcn_jax
from lgcn_jax import network, xla_options
from lgcn_jax.config import get_config


@pytest.fixture(scope="module")
def params():
    return lgcn_jax.init(jax.random.key(0), get_config("quick"))


@pytest.fixture
def fresh_options(monkeypatch):
    xla_options.compiler_options.cache_clear()
    yield monkeypatch
    xla_options.compiler_options.cache_clear()


def test_cpu_options_reach_the_network_program(params):
    assert jax.default_backend() == "cpu"
    assert xla_options.compiler_options() == xla_options.CPU_OPTIONS  # this jaxlib knows them
    x = jnp.zeros((2, 32, 32, 1))
    tuned = network._apply.lower(params, x).compile().as_text()
    plain = jax.jit(network._apply.__wrapped__).lower(params, x).compile().as_text()
    assert "ynn" not in tuned.lower()
    if "ynn" not in plain.lower():
        pytest.skip("this XLA does not hand the network to YNNPACK by default: nothing to compare")


def test_inside_a_callers_traces(params):
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
    ref = lgcn_jax.apply(params, x)
    np.testing.assert_allclose(jax.jit(lgcn_jax.apply)(params, x), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda: lgcn_jax.apply(params, x))(), ref, rtol=1e-5, atol=1e-6)  # no traced argument
    np.testing.assert_allclose(jax.vmap(lambda xi: lgcn_jax.apply(params, xi[None])[0])(x), ref, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda x: lgcn_jax.apply(params, x).sum())(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_xla_flags_win(fresh_options):
    fresh_options.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert xla_options.compiler_options() == {}


def test_unknown_options_are_left_out(fresh_options):
    fresh_options.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_no_such_option_of_any_xla": "1"})
    assert xla_options.compiler_options() == {}
    f = xla_options.jit(lambda x: x * 2)
    assert float(f(jnp.float32(3))) == 6.0
