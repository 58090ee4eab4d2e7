import contextlib
import dataclasses
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals
import numpy as np
import pytest

import lgcn_jax
from lgcn_jax import network
from lgcn_jax.batch_norm import BNReLUDropout, bn_relu_dropout, fold_into_conv
from lgcn_jax.config import ExecutionConfig
from lgcn_jax.loss import heatmap_loss
from tests.conftest import all_eqns, tiny_config

EPS, SCALE, KEEP = 1e-5, 0.1, 0.9


def reference(x, scale, bias, keep):
    """The same function written plainly (centred two-pass variance), left to autodiff."""
    xf = x.astype(jnp.float32)
    mean = xf.mean((0, 1, 2))
    var = ((xf - mean) ** 2).mean((0, 1, 2))
    z = (xf - mean) / jnp.sqrt(var + EPS) * scale + bias
    y = jax.nn.relu(z) * SCALE
    if keep is not None:
        y = jnp.where(keep, y / KEEP, 0.0)
    return y.astype(x.dtype), mean, var


@pytest.fixture(scope="module")
def inputs():
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (3, 7, 5, 6)) * 2.0 + jnp.arange(6.0)  # channels with different means
    scale = 1.0 + 0.3 * jax.random.normal(k[1], (6,))
    bias = 0.5 * jax.random.normal(k[2], (6,))
    keep = jax.random.bernoulli(k[3], KEEP, x.shape)
    weights = jax.random.normal(k[4], x.shape)
    return x, scale, bias, keep, weights


def _op(x, scale, bias, keep):
    return bn_relu_dropout(x, scale, bias, keep, epsilon=EPS, activation_scale=SCALE, keep_prob=KEEP if keep is not None else 1.0)


@pytest.mark.parametrize("with_dropout", [True, False])
def test_values_and_gradients_equal_autodiff_of_the_plain_function(inputs, with_dropout):
    x, scale, bias, keep, weights = inputs
    keep = keep if with_dropout else None
    for got, want in zip(_op(x, scale, bias, keep), reference(x, scale, bias, keep)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # A loss that reads the statistics too: their cotangents (zero inside the network) must be honoured.
    def objective(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias, keep)
            return jnp.vdot(y, weights) + jnp.sum(mean * jnp.arange(6.0)) + jnp.sum(jnp.sqrt(var))
        return f

    got = jax.jit(jax.grad(objective(_op), argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.grad(objective(reference), argnums=(0, 1, 2))(x, scale, bias)
    for name, g, w in zip(("x", "scale", "bias"), got, want):
        assert float(jnp.abs(w).max()) > 1e-2, name  # the check has something to compare
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5 * float(jnp.abs(w).max()), err_msg=name)


def test_backward_keeps_only_the_input_and_the_dropout_mask(inputs):
    """The reason for the op: autodiff of the chain saves ~5 activation-sized arrays, this one the
    input (which its convolution wrote anyway) and a bool mask."""
    x, scale, bias, keep, weights = inputs
    shape = ",".join(map(str, x.shape))

    def big(fn):  # dtypes of the saved arrays of x's shape, as jax prints them ("f32[3,7,5,6] output of ...")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda x: jnp.vdot(fn(x, scale, bias, keep)[0], weights), x)
        return sorted(m.group(1) for m in re.finditer(rf"^(\w+)\[{shape}\]", out.getvalue(), re.M))

    assert big(_op) == ["bool", "f32"]
    assert len(big(reference)) >= 3  # what autodiff keeps: the comparison is not vacuous


def test_bf16_input_computes_statistics_in_f32(inputs):
    x, scale, bias, keep, weights = inputs
    y, mean, var = _op(x.astype(jnp.bfloat16), scale, bias, keep)
    assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    y32, mean32, _ = _op(x, scale, bias, keep)
    np.testing.assert_allclose(mean, mean32, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=2e-2, atol=2e-2)
    g = jax.grad(lambda x: jnp.vdot(_op(x, scale, bias, keep)[0].astype(jnp.float32), weights))(x.astype(jnp.bfloat16))
    g32 = jax.grad(lambda x: jnp.vdot(_op(x, scale, bias, keep)[0], weights))(x)
    assert g.dtype == jnp.bfloat16
    cosine = float(jnp.vdot(g.astype(jnp.float32), g32) / (jnp.linalg.norm(g.astype(jnp.float32)) * jnp.linalg.norm(g32)))
    assert cosine > 0.99, cosine


def test_mask_shape_is_checked(inputs):
    x, scale, bias, keep, _ = inputs
    with pytest.raises(ValueError, match=r"dropout mask of shape \(3, 7, 5, 1\) does not match x of shape \(3, 7, 5, 6\)"):
        _op(x, scale, bias, keep[..., :1])


def test_module_has_batchnorm_variables_and_matches_it(inputs):
    """Same variables as nn.BatchNorm (checkpoints stay interchangeable); same normalisation and running statistics."""
    x, scale, bias, _, _ = inputs
    mod = BNReLUDropout(momentum=0.75, epsilon=EPS, activation_scale=SCALE)
    bn = nn.BatchNorm(momentum=0.75, epsilon=EPS)
    v = mod.init(jax.random.key(0), x, train=False)
    v_bn = bn.init(jax.random.key(0), x, use_running_average=True)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), v) == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), v_bn)
    v = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": jnp.arange(6.0) * 0.5, "var": jnp.linspace(0.5, 3.0, 6)}}

    y, upd = mod.apply(v, x, train=True, mutable=["batch_stats"])
    y_bn, upd_bn = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, jax.nn.relu(y_bn) * SCALE, rtol=1e-5, atol=1e-6)
    for k in ("mean", "var"):
        np.testing.assert_allclose(upd["batch_stats"][k], upd_bn["batch_stats"][k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(mod.apply(v, x, train=False), jax.nn.relu(bn.apply(v, x, use_running_average=True)) * SCALE,
                               rtol=1e-6, atol=1e-7)


def test_module_dropout_rate_and_determinism():
    x = jnp.ones((4, 16, 16, 8)) + jnp.arange(8.0)
    mod = BNReLUDropout(momentum=0.0, epsilon=EPS, activation_scale=SCALE, dropout_rate=0.25)
    v = mod.init(jax.random.key(0), x, train=False)
    v = {**v, "params": {"scale": jnp.ones(8), "bias": jnp.ones(8)}}  # every pre-dropout value is 0.1
    run = lambda seed: mod.apply(v, x, train=True, rngs={"dropout": jax.random.key(seed)}, mutable=["batch_stats"])[0]
    y = run(1)
    np.testing.assert_array_equal(y, run(1))
    assert not np.array_equal(y, run(2))
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 0.1 / 0.75], rtol=1e-6)
    assert abs(float(jnp.mean(y == 0)) - 0.25) < 0.03
    v = {**v, "batch_stats": {"mean": 1.0 + jnp.arange(8.0), "var": jnp.ones(8)}}  # x's own mean: z = bias everywhere
    np.testing.assert_allclose(mod.apply(v, x, train=False), jnp.full(x.shape, 0.1), rtol=1e-6)  # no dropout at inference


class _PlainBlock(nn.Module):
    """BNReLUDropout's variables and dropout draws, the arithmetic left to autodiff."""

    momentum: float
    epsilon: float
    activation_scale: float
    dropout_rate: float = 0.0
    dtype: object = jnp.float32
    fused: bool = True  # taken and ignored

    @nn.compact
    def __call__(self, x, train):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        assert train and not self.is_initializing()
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        y = jax.nn.relu((x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias) * self.activation_scale
        if self.dropout_rate > 0:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, x.shape)
            y = jnp.where(keep, y / (1.0 - self.dropout_rate), 0.0)
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        return y


def test_network_loss_gradients_equal_the_plain_blocks(monkeypatch):
    """The whole network with dropout on: outputs, statistics and every gradient of the training loss, against
    plain blocks (same variables and dropout draws) and against execution.fused_batch_norm=False."""
    m = dataclasses.replace(tiny_config().model, dropout_rate=0.2, bn_momentum=0.5)
    net = lgcn_jax.init(jax.random.key(0), m)
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 1))
    landmarks = jax.random.uniform(jax.random.key(2), (3, m.num_landmarks, 2), minval=6.0, maxval=26.0)

    def run(net):
        def loss(params):
            o1, o2, stats = lgcn_jax.apply_train(net.replace(params=params), x, jax.random.key(3))
            return heatmap_loss(o1, o2, landmarks, network.model_kernel(m)).mean(), (o2, stats)
        return jax.value_and_grad(loss, has_aux=True)(net.params)

    fused = run(net)
    unfused = run(net.replace(execution=ExecutionConfig(fused_batch_norm=False)))
    monkeypatch.setattr(network, "BNReLUDropout", _PlainBlock)
    plain = run(net)

    for (value, (o2, stats)), grads in (fused, unfused):
        (value_ref, (o2_ref, stats_ref)), grads_ref = plain
        np.testing.assert_allclose(value, value_ref, rtol=1e-5)
        np.testing.assert_allclose(o2, o2_ref, rtol=1e-4, atol=1e-6 * float(jnp.abs(o2_ref).max()))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats, stats_ref)
        flat, flat_ref = jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(grads_ref)
        for (path, g), g_ref in zip(flat, flat_ref):
            name = jax.tree_util.keystr(path)
            if name.endswith("_conv']['bias']"):
                continue  # a bias before BatchNorm has zero gradient: both are rounding noise
            tol = 1e-4 * float(jnp.abs(g_ref).max())
            assert tol > 0, name
            np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=tol, err_msg=name)


def test_fold_into_conv_equals_conv_batch_norm_relu():
    """conv -> inference BatchNorm -> ReLU -> scale, against one convolution with the folded kernel and bias + ReLU."""
    k = jax.random.split(jax.random.key(7), 7)
    x = jax.random.normal(k[0], (2, 9, 8, 5))
    kernel, conv_bias = jax.random.normal(k[1], (3, 3, 5, 6)), jax.random.normal(k[2], (6,))
    scale, bias = 1.0 + 0.5 * jax.random.normal(k[3], (6,)), jax.random.normal(k[4], (6,))
    mean, var = jax.random.normal(k[5], (6,)), jnp.exp(jax.random.normal(k[6], (6,)))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = jax.nn.relu((conv(x, kernel) + conv_bias - mean) / jnp.sqrt(var + EPS) * scale + bias) * SCALE
    folded_kernel, folded_bias = fold_into_conv(kernel, conv_bias, scale, bias, mean, var, EPS, SCALE)
    got = jax.nn.relu(conv(x, folded_kernel) + folded_bias)
    assert float(jnp.mean(want > 0)) > 0.2 and float(jnp.mean(want == 0)) > 0.2  # both sides of the ReLU
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positive activation_scale"):
        fold_into_conv(kernel, conv_bias, scale, bias, mean, var, EPS, -0.1)


@pytest.mark.parametrize("overrides", [{}, {"dilation_as_phases": False}])
def test_network_inference_folds_batch_norm(overrides):
    """execution.fold_batch_norm: the same inference output as the unfolded blocks (the released weights'
    statistics, not init's identity ones), and no element-wise BatchNorm left on the maps; bf16 blocks are not folded."""
    m = tiny_config().model
    net = lgcn_jax.init(jax.random.key(0), m).replace(execution=ExecutionConfig(blur_features=False, **overrides))  # maps multiplied: BatchNorm's only
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 1))
    net = net.replace(batch_stats=network.batch_statistics(net, x))  # statistics far from mean 0, var 1
    net = net.replace(params=jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), v.shape)
        if jax.tree_util.keystr(p).endswith("['bias']") else v, net.params))  # non-zero conv and BatchNorm biases
    unfolded = net.replace(execution=dataclasses.replace(net.execution, fold_batch_norm=False))
    want = lgcn_jax.apply(unfolded, x)
    np.testing.assert_allclose(lgcn_jax.apply(net, x), want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))

    sides = {32, 32 // m.global_dilation}  # the maps' side, and the global subnet's sub-grids' side

    def map_multiplies(n):  # element-wise products over whole maps (not kernels) in the inference jaxpr
        eqns = all_eqns(jax.make_jaxpr(lambda x: network.LGCN(n.config, n.execution).apply(n.variables, x, train=False))(x).jaxpr)
        return sum(e.primitive.name == "mul" and e.outvars[0].aval.ndim == 4 and e.outvars[0].aval.shape[1] in sides for e in eqns)
    blocks = m.local_5x5_layers + m.local_3x3_layers + m.global_layers + 1
    assert map_multiplies(net) < 4 <= blocks <= map_multiplies(unfolded)
    bf16 = dataclasses.replace(net.execution, compute_dtype="bfloat16")
    np.testing.assert_array_equal(lgcn_jax.apply(net.replace(execution=bf16), x),
                                  lgcn_jax.apply(net.replace(execution=dataclasses.replace(bf16, fold_batch_norm=False)), x))
