"""Batched cells: several cells trained as one stacked model give each cell what it gets trained alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from clipadapt import batched
from clipadapt.batched import FitRequest, fit_cells, run_batch, run_cells, stack_padded
from clipadapt.engine import fit
from clipadapt.features import FeatureSet
from clipadapt.methods import FewShotTask, build_method
from clipadapt.features import Batch
from clipadapt.methods.base import Method, MethodSchema
from clipadapt.run import run

K, D, VIEWS = 6, 32, 3


@pytest.fixture(autouse=True)
def one_thread():
    """Problems this small run faster on one thread, and far faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_task(shots: int, seed: int) -> FewShotTask:
    """Random unit text features and noisy train features around them ([N, 1 + VIEWS, D], fp16 as cached)."""
    rng = np.random.default_rng(1000 * seed + shots)
    text = np.random.default_rng(0).standard_normal((K, D)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = np.repeat(np.arange(K), shots)
    image = 0.3 * text[labels][:, None] + rng.standard_normal((len(labels), 1 + VIEWS, D)).astype(np.float32) / 6
    train = FeatureSet(image=image.astype(np.float16), labels=labels)
    return FewShotTask(classnames=[f"c{k}" for k in range(K)], templates=[], text=torch.tensor(text), train=train,
                       val=None, device=torch.device("cpu"), seed=seed)


def build(name: str, shots: int, seed: int, **train) -> Method:
    torch.manual_seed(seed)  # as run() does before building the method
    node = OmegaConf.create({"name": name, "train": {"epochs": 3, "batch_size": 8, **train}})
    return build_method(node, make_task(shots, seed))


# Seeds, shots (different cache sizes and steps per epoch) and train hyperparameters in one batch.
CELLS = [dict(shots=1, seed=1), dict(shots=4, seed=1), dict(shots=4, seed=2), dict(shots=5, seed=3, lr=3e-3),
         dict(shots=2, seed=2, batch_size=5, epochs=2)]


def tensors(method) -> dict[str, torch.Tensor]:
    """The state_dict's tensors (not the JSON extra state of tuned attributes)."""
    return {k: v for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", ["tip_adapter_f", "clip_adapter"])
def test_stacked_cells_equal_cells_trained_alone(name, caplog):
    alone = []
    for cell in CELLS:
        method = build(name, **cell)
        history = fit(method, method.task.train, cell["seed"])
        alone.append((history, {k: v.clone() for k, v in tensors(method).items()}))

    methods = [build(name, **cell) for cell in CELLS]
    with caplog.at_level("INFO", logger="clipadapt.batched"):
        histories = fit_cells([FitRequest(m, m.task.train, cell["seed"]) for m, cell in zip(methods, CELLS)],
                              stack=True)
    assert "as one stacked model" in caplog.text and "not stacked" not in caplog.text

    for (history, state), batched_history, method in zip(alone, histories, methods):
        assert len(batched_history) == len(history)
        np.testing.assert_allclose(batched_history, history, rtol=1e-5, atol=1e-6)
        for key, value in tensors(method).items():
            torch.testing.assert_close(value, state[key], rtol=1e-5, atol=1e-6)
        assert any(not torch.equal(v, tensors(build(name, **CELLS[0]))[k]) for k, v in state.items())  # it trained


def test_stacked_cells_get_parameters_of_their_own_back():
    """Same-shape parameters live in one stacked leaf while training; afterwards each cell owns its storage again
    (a view into the stack would keep every cell's weights alive, and safetensors refuses shared storage)."""
    methods = [build("clip_adapter", **cell) for cell in CELLS[:3]]
    fit_cells([FitRequest(m, m.task.train, cell["seed"]) for m, cell in zip(methods, CELLS)], stack=True)
    weights = [m.adapter[0].weight for m in methods]
    assert len({w.untyped_storage().data_ptr() for w in weights}) == len(weights)
    assert all(w.untyped_storage().nbytes() == w.numel() * w.element_size() for w in weights)
    assert all(w.grad is None for w in weights)


def test_on_cpu_the_default_trains_cells_one_after_another_bit_for_bit(caplog):
    alone = []
    for cell in CELLS[:3]:
        method = build("clip_adapter", **cell)
        alone.append((fit(method, method.task.train, cell["seed"]), method.adapter[0].weight.detach().clone()))
    methods = [build("clip_adapter", **cell) for cell in CELLS[:3]]
    with caplog.at_level("INFO", logger="clipadapt.batched"):
        histories = fit_cells([FitRequest(m, m.task.train, cell["seed"]) for m, cell in zip(methods, CELLS)])
    assert "stacked" not in caplog.text  # stacking is slower than the cells' own steps on CPU
    for (history, weight), batched_history, method in zip(alone, histories, methods):
        assert batched_history == history and torch.equal(method.adapter[0].weight, weight)


class NoisyProbe(Method):
    """Dropout in the forward: vmap refuses its random ops, so cells of it must not stack."""

    Config = MethodSchema

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        self.head = nn.Linear(task.text.shape[1], task.num_classes)
        self.drop = nn.Dropout(0.5)

    def forward(self, batch: Batch):
        return self.head(self.drop(batch.image))


def test_a_method_that_does_not_stack_trains_alone_with_its_own_random_stream(caplog):
    cfg = OmegaConf.merge(OmegaConf.structured(MethodSchema), {"name": "noisy", "train": {"epochs": 2, "batch_size": 4}})

    def noisy(seed):
        torch.manual_seed(seed)
        return NoisyProbe(cfg, make_task(3, seed))

    alone = []
    for seed in (1, 2):
        method = noisy(seed)
        alone.append((fit(method, method.task.train, seed), method.head.weight.detach().clone()))

    def job(seed):
        method = noisy(seed)  # seeds the global RNG in its own cell, like run()
        history = fit(method, method.task.train, seed)
        return history, method.head.weight.detach().clone(), torch.rand(3)

    with caplog.at_level("WARNING", logger="clipadapt.batched"):
        outcomes = run_batch([lambda: job(1), lambda: job(2)], stack=True)
    assert "not stacked" in caplog.text
    for (history, weight), ((batched_history, batched_weight, after), error) in zip(alone, outcomes):
        assert error is None
        assert batched_history == history  # trained alone, in its own random stream: bit for bit
        assert torch.equal(batched_weight, weight)
    torch.manual_seed(2)
    noisy_weight = noisy(2)
    fit(noisy_weight, noisy_weight.task.train, 2)
    assert torch.equal(outcomes[1][0][2], torch.rand(3))  # the global RNG continues as the cell alone left it


def test_run_batch_isolates_failures_and_lets_cells_fit_twice():
    def two_fits(seed):
        first = build("clip_adapter", 2, seed)
        second = build("tip_adapter_f", 2, seed)
        return fit(first, first.task.train, seed), fit(second, second.task.train, seed)

    def broken():
        raise RuntimeError("bad cell")

    outcomes = run_batch([lambda: two_fits(1), broken, lambda: two_fits(2)], stack=True)
    assert isinstance(outcomes[1][1], RuntimeError) and outcomes[1][0] is None
    for seed, (result, error) in zip((1, 2), [outcomes[0], outcomes[2]]):
        assert error is None
        expected = two_fits(seed)
        for got, want in zip(result, expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_training_error_reaches_each_cell():
    def job(seed):
        method = build("tip_adapter_f", 2, seed, optimizer="nope")
        return fit(method, method.task.train, seed)

    outcomes = run_batch([lambda: job(1), lambda: job(2)])
    assert all(isinstance(error, ValueError) and "nope" in str(error) for _, error in outcomes)


def test_stack_padded_pads_at_the_end():
    stacked = stack_padded([torch.ones(2, 3), torch.ones(4, 1)])
    assert stacked.shape == (2, 4, 3)
    assert stacked[0, :2].eq(1).all() and stacked[0, 2:].eq(0).all() and stacked[1, :, 1:].eq(0).all()


def test_stack_groups_keep_padding_waste_bounded(monkeypatch):
    monkeypatch.setattr(batched, "SMALL_STACK", 0)
    from clipadapt.engine import CellTrainer

    cells = [CellTrainer(m, m.task.train, 1) for m in (build("tip_adapter_f", s, 1) for s in (16, 16, 8, 1))]
    groups = batched.stack_groups(cells)
    assert [[c.n for c in g] for g in groups] == [[96, 96, 48], [6]]  # 1-shot keys are not padded to 16 shots


def test_run_cells_write_the_metrics_of_solo_runs(tiny_config, tmp_path):
    cfgs = [tiny_config("method=tip_adapter_f", f"shots={shots}", f"seed={seed}", "method.train.epochs=2")
            for shots, seed in [(1, 1), (2, 1), (2, 2)]]
    solo = [run(cfg, tmp_path / f"solo{i}") for i, cfg in enumerate(cfgs)]
    together = run_cells(cfgs, [tmp_path / f"batch{i}" for i in range(len(cfgs))], stack=True)
    for one, other, i in zip(solo, together, range(len(cfgs))):
        written = json.loads((tmp_path / f"batch{i}" / "metrics.json").read_text())
        assert written["test/acc"] == other["test/acc"] == one["test/acc"]
        assert other["chosen"]["alpha"] == pytest.approx(one["chosen"]["alpha"])
        assert other["chosen"]["beta"] == pytest.approx(one["chosen"]["beta"])
        np.testing.assert_allclose(other["train/loss_history"], one["train/loss_history"], rtol=1e-5)
        assert other["draw"] == one["draw"]
