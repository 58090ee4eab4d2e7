import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgcn_jax
from lgcn_jax import network
from lgcn_jax.config import ExecutionConfig, ModelConfig, get_config
from lgcn_jax.loss import heatmap_loss
from tests.conftest import all_eqns, tiny_config


@pytest.fixture(scope="module")
def params():
    return lgcn_jax.init(jax.random.key(0), tiny_config())


@pytest.mark.parametrize("hw", [(32, 32), (24, 40), (96, 96), (45, 19)])
def test_output_shapes_any_size(params, hw):
    x = jax.random.uniform(jax.random.key(1), (2, *hw, 1))
    out = lgcn_jax.apply(params, x)
    assert out.shape == (2, *hw, 68) and out.dtype == jnp.float32
    o1, o2, stats = lgcn_jax.apply_train(params, x, jax.random.key(2))
    assert o1.shape == o2.shape == (2, *hw, 68)
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(params.batch_stats)


def test_paper_layer_counts():
    p = lgcn_jax.init(jax.random.key(0), get_config("paper64"))
    names = set(p.params)
    assert sum(n.startswith("local5_") and n.endswith("_conv") for n in names) == 5
    assert sum(n.startswith("local3_") and n.endswith("_conv") for n in names) == 10
    assert sum(n.startswith("global_") and n.endswith("_conv") for n in names) == 7
    assert p.params["local5_0_conv"]["kernel"].shape == (5, 5, 1, 64)
    assert p.params["global_0_conv"]["kernel"].shape == (3, 3, 136, 64)  # both blurred heads
    assert p.params["head_global"]["kernel"].shape == (1, 1, 64, 68)


def test_jit_and_vmap(params):
    x = jax.random.uniform(jax.random.key(3), (3, 2, 32, 32, 1))
    direct = jnp.stack([lgcn_jax.apply(params, xi) for xi in x])
    vm = jax.vmap(lgcn_jax.apply, in_axes=(None, 0))(params, x)
    jt = jax.jit(lambda p, xi: lgcn_jax.apply(p, xi))(params, x[0])
    np.testing.assert_allclose(vm, direct, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jt, direct[0], rtol=1e-5, atol=1e-7)


def test_uint8_input_equals_scaled_float(params):
    x = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 1), dtype=np.uint8)
    np.testing.assert_allclose(lgcn_jax.apply(params, x), lgcn_jax.apply(params, x.astype(np.float32) / 255), rtol=1e-5, atol=1e-7)


def test_batch_independence_in_inference(params):
    x = jax.random.uniform(jax.random.key(4), (4, 32, 32, 1))
    np.testing.assert_allclose(lgcn_jax.apply(params, x)[1:2], lgcn_jax.apply(params, x[1:2]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(32, 32), (1, 32, 32, 3), (1, 32, 32)])
def test_bad_image_shape(params, shape):
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
        lgcn_jax.apply(params, jnp.zeros(shape))


def test_init_deterministic_and_config_static():
    c = tiny_config()
    a, b = lgcn_jax.init(jax.random.key(7), c), lgcn_jax.init(jax.random.key(7), c)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: bool(jnp.array_equal(u, v)), a.params, b.params))
    assert a.config == c.model
    with pytest.raises(TypeError):
        lgcn_jax.init(jax.random.key(0), {"num_filters": 3})


def test_he_init_scale():
    m = dataclasses.replace(ModelConfig(), num_filters=64, local_5x5_layers=1, local_3x3_layers=1, global_layers=1)
    p = network.init(jax.random.key(0), m)
    w = np.asarray(p.params["local3_0_conv"]["kernel"])
    expected = m.init_scale * np.sqrt(2.0 / (3 * 3 * 64))
    assert abs(w.std() / expected - 1) < 0.05


def test_recalibrated_batch_stats_are_population_statistics():
    """First BatchNorm layer (its input does not depend on other BN layers): the statistics over K
    equal batches equal those of all pixels of their concatenation; the trained stats are replaced."""
    cfg = dataclasses.replace(tiny_config().model, dropout_rate=0.5)  # dropout must be off while measuring
    p = lgcn_jax.init(jax.random.key(0), cfg, image_size=16)
    batches = [np.asarray(jax.random.uniform(jax.random.key(i), (3, 16, 16, 1))) * (0.5 + i) for i in range(4)]
    new = network.recalibrate_batch_stats(p, iter(batches))
    x = (np.concatenate(batches) * (255.0 / 128.0) - 1.0) * 0.1
    k = np.asarray(p.params["local5_0_conv"]["kernel"], np.float64)
    conv = jax.lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    conv = np.asarray(conv, np.float64) + np.asarray(p.params["local5_0_conv"]["bias"])
    stats = new.batch_stats["local5_0_bn"]
    np.testing.assert_allclose(stats["mean"], conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], conv.var((0, 1, 2)), rtol=1e-3, atol=1e-7)
    # Deeper layers: the mean over batches of that layer's batch statistics (no dropout), not a single batch's.
    per_batch = [network.batch_statistics(p, b)["global_0_bn"]["mean"] for b in batches]
    np.testing.assert_allclose(new.batch_stats["global_0_bn"]["mean"], np.mean(per_batch, 0), rtol=1e-5, atol=1e-7)
    assert not np.allclose(new.batch_stats["global_0_bn"]["mean"], per_batch[-1])
    assert jax.tree_util.tree_structure(new.batch_stats) == jax.tree_util.tree_structure(p.batch_stats)
    with pytest.raises(ValueError, match="at least one batch"):
        network.recalibrate_batch_stats(p, iter([]))


def _dilated_convs(params, x) -> int:
    """How many convolutions with rhs dilation > 1 the training forward pass traces."""
    jaxpr = jax.make_jaxpr(lambda p, x: lgcn_jax.apply_train(p, x, jax.random.key(0)))(params, x)
    return str(jaxpr).count("rhs_dilation=(") - str(jaxpr).count("rhs_dilation=(1, 1)")


@pytest.mark.parametrize("dilation, hw, phased", [(4, (32, 32), True), (2, (24, 40), True), (4, (30, 32), False)])
def test_global_subnet_on_phases_equals_dilated_convolutions(dilation, hw, phased):
    """The global subnet run on interleaved sub-grids computes what dilated convolutions compute, with
    the same weights: inference output, training output, batch statistics and every gradient.  A map
    side that does not divide by the dilation runs the dilated convolutions."""
    m = dataclasses.replace(tiny_config().model, global_layers=2, global_dilation=dilation)
    on = lgcn_jax.init(jax.random.key(0), m)
    off = on.replace(execution=ExecutionConfig(dilation_as_phases=False))
    x = jax.random.uniform(jax.random.key(1), (2, *hw, 1))
    assert _dilated_convs(off, x) == 2 and _dilated_convs(on, x) == (0 if phased else 2)
    np.testing.assert_allclose(lgcn_jax.apply(on, x), lgcn_jax.apply(off, x), rtol=1e-5, atol=1e-6)
    train = jax.jit(lgcn_jax.apply_train)  # jitted: op by op, the dilated layout's backward pass takes many seconds
    for a, b in zip(jax.tree_util.tree_leaves(train(on, x, jax.random.key(2))),
                    jax.tree_util.tree_leaves(train(off, x, jax.random.key(2)))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    def loss(params, net):
        o1, o2, _ = lgcn_jax.apply_train(net.replace(params=params), x, jax.random.key(2))
        return jnp.sum(o2 * jnp.cos(jnp.arange(o2.size).reshape(o2.shape)))  # no symmetry to hide a permutation

    grad = jax.jit(jax.grad(loss))
    g_on, g_off = grad(on.params, on), grad(off.params, off)
    # Biases of convolutions that feed a BatchNorm are left out: BN cancels them, their gradient is round-off.
    for name, leaf in [("global_0_conv", "kernel"), ("global_1_conv", "kernel"), ("global_1_bn", "scale"),
                       ("head_global", "kernel"), ("head_global", "bias"), ("local5_0_conv", "kernel")]:
        a, b = np.asarray(g_on[name][leaf]), np.asarray(g_off[name][leaf])
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())


def test_phases_round_trip():
    x = jax.random.normal(jax.random.key(0), (2, 12, 8, 3))
    p = network.to_phases(x, 4)
    assert p.shape == (32, 3, 2, 3)
    np.testing.assert_array_equal(p[1 * 4 + 2], x[0, 1::4, 2::4])  # image 0, sub-grid (row 1, column 2)
    np.testing.assert_array_equal(network.from_phases(p, 4), x)


def test_network_blur_runs_at_default_matmul_precision(params):
    """The blur follows JAX's default precision like the convolutions (TF32 on GPUs); a full-f32 blur
    ran as slow SIMT GEMMs there (docs/architecture.md)."""
    # The blur's two matmuls; with blur_features also the main head's, after it, and the first global block's kernel
    # composed with the head's (inference with folded blocks).
    for blur_features, count in ((False, 2), (True, 4)):
        net = params.with_execution(ExecutionConfig(blur_features=blur_features))
        text = jax.jit(lgcn_jax.apply).lower(net, jnp.zeros((1, 32, 32, 1))).as_text()
        dots = [line for line in text.splitlines() if "dot_general" in line]
        assert len(dots) == count and not any("HIGHEST" in line for line in dots), dots


def test_blurring_the_features_equals_blurring_the_main_head(params):
    """execution.blur_features: with fewer features than landmarks the main head's 1x1 convolution runs after the
    blur (the bias through a blurred map of ones); the same outputs, statistics and gradients as the head before it."""
    assert params.config.num_filters + 1 < params.config.num_landmarks
    on, off = params, params.with_execution(ExecutionConfig(blur_features=False))
    unfolded = params.with_execution(ExecutionConfig(fold_batch_norm=False))
    # Inference with folded blocks also composes the first global block with the head; the global subnet runs on
    # sub-grids where the size allows (32) and dilated where it does not (33).
    for hw in (32, 33):
        x = jax.random.uniform(jax.random.key(1), (2, hw, hw, 1))
        ref = lgcn_jax.apply(off, x)
        np.testing.assert_allclose(lgcn_jax.apply(on, x), ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lgcn_jax.apply(unfolded, x), ref, rtol=1e-5, atol=1e-7)
    train = jax.jit(lgcn_jax.apply_train)
    for a, b in zip(jax.tree_util.tree_leaves(train(on, x, jax.random.key(2))), jax.tree_util.tree_leaves(train(off, x, jax.random.key(2)))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)

    def loss(p, net):
        o1, o2, _ = lgcn_jax.apply_train(net.replace(params=p), x, jax.random.key(2))
        return jnp.sum((o1 + o2) * jnp.cos(jnp.arange(o2.size).reshape(o2.shape)))

    grad = jax.jit(jax.grad(loss))
    g_on, g_off = grad(on.params, on), grad(off.params, off)
    for name in ("head_main", "head_side_conv", "local5_0_conv"):
        for leaf in ("kernel", "bias") if name == "head_main" else ("kernel",):
            b = np.asarray(g_off[name][leaf])
            np.testing.assert_allclose(np.asarray(g_on[name][leaf]), b, rtol=1e-3, atol=1e-4 * np.abs(b).max(), err_msg=name)


def _conv_input_dtypes(fn, *args) -> list[str]:
    """The dtype of the input of every convolution ``fn`` traces, in order."""
    return [str(e.invars[0].aval.dtype) for e in all_eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == "conv_general_dilated"]


def test_bf16_compute_runs_the_blocks_in_bf16_and_stays_close_to_f32():
    """execution.compute_dtype="bfloat16": every conv-BN-ReLU block computes in bf16, the three 1x1 heads
    (and the blur, the outputs) in f32; same weights, outputs and gradients within bf16 rounding."""
    m = dataclasses.replace(tiny_config().model, global_layers=2)
    f32 = lgcn_jax.init(jax.random.key(0), m).with_execution(ExecutionConfig(blur_features=False))  # three 1x1 head convolutions
    bf16 = f32.replace(execution=ExecutionConfig(compute_dtype="bfloat16", blur_features=False))
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
    blocks = m.local_5x5_layers + m.local_3x3_layers + m.global_layers
    assert _conv_input_dtypes(lambda p, x: lgcn_jax.apply_train(p, x, jax.random.key(0)), bf16, x) == \
        ["bfloat16"] * (m.local_5x5_layers + m.local_3x3_layers) + ["float32"] * 2 + ["bfloat16"] * m.global_layers + ["float32"]
    assert _conv_input_dtypes(lgcn_jax.apply, f32, x) == ["float32"] * (blocks + 3)

    ref, low = lgcn_jax.apply(f32, x), lgcn_jax.apply(bf16, x)
    assert low.dtype == jnp.float32 and not np.array_equal(low, ref)
    err = float(jnp.abs(low - ref).max() / jnp.abs(ref).max())
    assert err < 3e-2, err  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding

    train = jax.jit(lgcn_jax.apply_train)
    o1, o2, stats = train(bf16, x, jax.random.key(2))
    _, r2, ref_stats = train(f32, x, jax.random.key(2))
    assert o1.dtype == o2.dtype == jnp.float32
    assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(stats))
    np.testing.assert_allclose(stats["local3_0_bn"]["var"], ref_stats["local3_0_bn"]["var"], rtol=5e-2, atol=1e-6)
    assert float(jnp.abs(o2 - r2).max() / jnp.abs(r2).max()) < 3e-2

    # The training loss's gradients.  (A random cotangent would not do: its gradients are sums of terms of
    # random sign, mostly cancelling, so bf16 rounding is a large part of what is left.)
    landmarks = jax.random.uniform(jax.random.key(3), (2, m.num_landmarks, 2), minval=6.0, maxval=26.0)

    def loss(params, net):
        o1, o2, _ = lgcn_jax.apply_train(net.replace(params=params), x, jax.random.key(2))
        return heatmap_loss(o1, o2, landmarks, network.model_kernel(net.config)).mean()

    grad = jax.jit(jax.grad(loss))
    g_low, g_ref = grad(bf16.params, bf16), grad(f32.params, f32)
    for name in ("local5_0_conv", "local3_0_conv", "global_0_conv", "global_1_conv", "head_main", "head_global"):
        a, b = np.ravel(g_low[name]["kernel"]), np.ravel(g_ref[name]["kernel"])
        assert g_low[name]["kernel"].dtype == jnp.float32
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert 0.98 < cosine < 1.0 - 1e-7, (name, cosine)  # close, and not the f32 computation


def test_compute_dtype_is_checked():
    for key in ("execution.compute_dtype", "model.compute_dtype"):  # the second: the spelling before the execution section
        with pytest.raises(ValueError, match="execution.compute_dtype must be 'float32' or 'bfloat16', got 'float16'"):
            lgcn_jax.apply_overrides(get_config("quick"), [f"{key}=float16"])


def test_blur_batching_is_the_same_function(params):
    """execution.blur_batching: the blur's matmuls one image at a time (CPUs), once for the batch (GPUs, exports) or
    by platform; the same outputs and gradients."""
    x = jax.random.uniform(jax.random.key(3), (3, 32, 32, 1))
    nets = {b: params.with_execution(ExecutionConfig(blur_batching=b)) for b in ("auto", "image", "batch")}
    ref = lgcn_jax.apply(nets["batch"], x)

    def loss(p, net):
        o1, o2, _ = lgcn_jax.apply_train(net.replace(params=p), x, jax.random.key(2))
        return jnp.sum((o1 + o2) * jnp.cos(jnp.arange(o2.size).reshape(o2.shape)))

    grad = jax.jit(jax.grad(loss))
    g_ref = grad(nets["batch"].params, nets["batch"])
    for name in ("auto", "image"):
        np.testing.assert_allclose(lgcn_jax.apply(nets[name], x), ref, rtol=1e-5, atol=1e-7)
        g = grad(nets[name].params, nets[name])
        # A bias before BatchNorm has a gradient of zero up to round-off: the tolerance is the whole gradient's scale.
        scale = max(float(np.abs(b).max()) for b in jax.tree_util.tree_leaves(g_ref))
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_blur_batching_is_checked():
    with pytest.raises(ValueError, match="execution.blur_batching must be one of 'auto', 'image', 'batch', got 'rows'"):
        lgcn_jax.apply_overrides(get_config("quick"), ["execution.blur_batching=rows"])


def test_check_images_converts_numpy_on_the_host_and_jax_arrays_on_the_device(params):
    u8 = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 1), dtype=np.uint8)
    host = network.check_images(u8)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32  # no eager device op: nothing to compile
    np.testing.assert_array_equal(host, u8.astype(np.float32) / np.float32(255.0))
    dev = network.check_images(jnp.asarray(u8))
    assert isinstance(dev, jax.Array) and dev.dtype == jnp.float32
    np.testing.assert_allclose(dev, host, rtol=1e-6)
    traced = jax.jit(lambda x: network.check_images(x).sum())(u8)
    np.testing.assert_allclose(traced, host.sum(), rtol=1e-5)
    np.testing.assert_allclose(lgcn_jax.apply(params, u8), lgcn_jax.apply(params, jnp.asarray(host)), rtol=1e-5, atol=1e-6)
