import numpy as np
import pytest

from lgcn_jax import metrics
from lgcn_jax.config import apply_overrides, config_from_dict, config_to_dict, get_config


def test_presets_and_overrides():
    c = apply_overrides(get_config("paper"), ["model.num_filters=64", "train.lr_decay_steps=1,2", "train.lr_decay_factors=0.5,0.5", "data.flip=false"])
    assert c.model.num_filters == 64 and c.train.lr_decay_steps == (1, 2) and c.data.flip is False
    assert config_from_dict(config_to_dict(c)) == c


@pytest.mark.parametrize(
    "override, msg",
    [
        ("model.num_filter=3", "unknown config key"),
        ("modl.num_filters=3", "unknown config key"),
        ("model.num_filters=abc", "cannot read 'abc' as int"),
        ("model.num_filters", "section.field=value"),
        ("train.optimizer=lbfgs", "momentum"),
        ("model.kernel_size=44", "odd"),
        ("postprocess.peak_fit_radius=0", "peak_fit_radius must be an integer >= 1"),
        ("postprocess.peak_fit_radius=2.5", "cannot read '2.5' as int"),
    ],
)
def test_bad_overrides(override, msg):
    with pytest.raises(ValueError, match=msg):
        apply_overrides(get_config("quick"), [override])


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")


def _face():
    gt = np.zeros((68, 2))
    gt[36] = [0.0, 0.0]
    gt[45] = [10.0, 0.0]
    return gt


def test_nme_by_hand():
    gt = _face()[None]
    pred = gt.copy()
    pred[0, 0] += [3.0, 4.0]  # one point off by 5 px
    assert metrics.nme(pred, gt)[0] == pytest.approx(5.0 / 68 / 10.0)
    # Pupils are the eye-contour means: here 36-41 at 0 except 36 ... all zeros, 42-47 zero except 45=10.
    ip = np.linalg.norm(gt[0, 36:42].mean(0) - gt[0, 42:48].mean(0))
    assert metrics.nme(pred, gt, "inter_pupil")[0] == pytest.approx(5.0 / 68 / ip)


def test_auc_and_failure_by_hand():
    errors = np.array([0.0, 0.02, 0.04, 0.1])
    auc, fail = metrics.auc_and_failure(errors, 0.08)
    # Area of the CED step function on [0, 0.08] divided by 0.08.
    assert auc == pytest.approx((0.08 + 0.06 + 0.04 + 0.0) / 4 / 0.08)
    assert fail == pytest.approx(0.25)
    x, y = metrics.ced_curve(errors, 0.08, 2001)
    assert np.trapezoid(y, x) / 0.08 == pytest.approx(auc, abs=2e-3)


def test_metric_errors():
    with pytest.raises(ValueError, match=r"\[N, 68, 2\]"):
        metrics.nme(np.zeros((1, 5, 2)), np.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="differs"):
        metrics.nme(np.zeros((2, 68, 2)), np.zeros((1, 68, 2)))
    with pytest.raises(ValueError, match="norm"):
        metrics.normaliser(np.zeros((1, 68, 2)), "bbox")
