"""linear_probe against CoOp's lpclip (KaiyangZhou/CoOp lpclip/linear_probe.py), whose search is written out again
here from the reference, line for line: its C grid, np.argmax over the grid, the 8 bisection steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression  # loads the BLAS libraries that threadpool_limits then limits
from threadpoolctl import threadpool_limits

from clipadapt.engine import predict
from clipadapt.features import FeatureSet
from clipadapt.methods import FewShotTask, build_method
from clipadapt.methods.linear_probe import lpclip_search


@pytest.fixture(autouse=True)
def one_blas_thread():
    """sklearn's solver on 20 rows: BLAS threads only contend (10x slower on 2 busy cores)."""
    with threadpool_limits(limits=1):
        yield


def lpclip_reference(val_accuracy, num_step: int = 8):
    """lpclip's search for one seed and shot count, with `val_accuracy(C)` in place of its fit-and-score lines.
    Returns the C of its final classifier (`c_final` of the last step), that classifier's val accuracy, and every C
    it scored in order."""
    scored = []

    def acc_of(c_weight):
        scored.append(c_weight)
        return val_accuracy(c_weight)

    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    acc_list = []
    for c_weight in search_list:
        acc_val = acc_of(c_weight)
        acc_list.append(acc_val)

    peak_idx = np.argmax(acc_list)
    c_peak = search_list[peak_idx]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak

    def binary_search(c_left, c_right):
        acc_left = acc_of(c_left)
        acc_right = acc_of(c_right)
        if acc_left < acc_right:
            c_final, acc_final = c_right, acc_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            c_final, acc_final = c_left, acc_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        return np.power(10, c_left), np.power(10, c_right), c_final, acc_final

    for _ in range(num_step):
        c_left, c_right, c_final, acc_final = binary_search(c_left, c_right)
    return c_final, acc_final, scored


def plateaus(seed: int):
    """A val accuracy of log10(C) with wide ties (4 val images per class on 10 classes: 40 steps of 1/40)."""
    rng = np.random.default_rng(seed)
    knots, levels = np.sort(rng.uniform(-7, 7, 6)), rng.integers(0, 5, 7) / 40
    return lambda c: float(levels[np.searchsorted(knots, np.log10(c))])


@pytest.mark.parametrize("seed", range(40))
def test_search_matches_lpclip_on_tied_accuracies(seed):
    accuracy = plateaus(seed)
    ours_scored = []
    ours = lpclip_search(lambda c: ours_scored.append(c) or accuracy(c), [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6], 8)
    c_final, acc_final, scored = lpclip_reference(accuracy)
    assert ours == (c_final, acc_final)  # the same floats, not approximately
    assert ours_scored == scored  # the same 7 + 2 x 8 candidates, in the same order


def raw_features(rng, centres, labels, views: int = 1) -> np.ndarray:
    """Clustered features with norms from 0.5 to 20, as raw CLIP features vary: unit rows would classify otherwise."""
    x = centres[labels][:, None] + 0.9 * rng.standard_normal((len(labels), views, centres.shape[1]))
    return (x * rng.uniform(0.5, 20, (len(labels), 1, 1))).astype(np.float32)


def test_linear_probe_is_lpclip_on_raw_plain_view_features():
    rng = np.random.default_rng(0)
    classes, dim = 5, 8
    centres = rng.standard_normal((classes, dim))
    train_labels, val_labels = np.repeat(np.arange(classes), 4), np.repeat(np.arange(classes), 4)
    test_labels = np.repeat(np.arange(classes), 6)
    train = raw_features(rng, centres, train_labels, views=3)
    train[:, 1:] = rng.standard_normal(train[:, 1:].shape)  # augmented views: lpclip fits the plain view only
    val, test = raw_features(rng, centres, val_labels), raw_features(rng, centres, test_labels)
    task = FewShotTask(classnames=[f"c{k}" for k in range(classes)], templates=["{}"],
                       text=torch.nn.functional.normalize(torch.randn(classes, dim), dim=-1),
                       train=FeatureSet(train, train_labels), val=FeatureSet(val, val_labels),
                       device=torch.device("cpu"))
    probe = build_method(OmegaConf.create({"name": "linear_probe"}), task)
    chosen = probe.tune(task.val)

    # lpclip's features are float64 lists of clip_model.visual's raw output; its penalty="l2" is sklearn's default
    x_train, x_val, x_test = (np.asarray(a[:, 0], dtype=np.float64) for a in (train, val, test))

    def lpclip_fit(c_weight):
        return LogisticRegression(solver="lbfgs", max_iter=1000, C=c_weight).fit(x_train, train_labels)

    def lpclip_val_accuracy(c_weight):
        pred = lpclip_fit(c_weight).predict(x_val)
        return sum(pred == val_labels) / len(val_labels)

    c_final, acc_final, _ = lpclip_reference(lpclip_val_accuracy)
    assert chosen["c"] == c_final and chosen["val_acc"] == pytest.approx(100 * acc_final)  # val_acc in percent
    clf_final = lpclip_fit(c_final)
    logits = predict(probe, FeatureSet(test, test_labels))  # through the evaluator, which must not normalise them
    torch.testing.assert_close(logits, torch.as_tensor(clf_final.decision_function(x_test), dtype=torch.float32),
                               rtol=1e-5, atol=1e-4)
    assert np.array_equal(logits.argmax(1).numpy(), clf_final.predict(x_test))


def test_without_val_the_configured_c_is_used_and_said():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 2)
    task = FewShotTask(classnames=["a", "b", "c"], templates=["{}"], text=torch.eye(3, 4),
                       train=FeatureSet(raw_features(rng, rng.standard_normal((3, 4)), labels), labels), val=None,
                       device=torch.device("cpu"))
    probe = build_method(OmegaConf.create({"name": "linear_probe", "c": 0.5}), task)
    assert probe.tune(None) == {"c": 0.5, "search": "not run: no val draw"}
    assert probe.linear.weight.abs().sum() > 0  # fitted with that C
