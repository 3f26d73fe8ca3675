"""Tip-Adapter (training-free) and Tip-Adapter-F (learnable cache keys), with the official code's arithmetic.

As published (gaopengcuhk/Tip-Adapter, main.py and utils.py): the cache keys are the K-shot train features averaged
over the augmented views as CLIP outputs them, then L2-normalised (build_cache_model); the values their one-hot
labels; logits = 100 f . W + alpha * exp(-(beta - beta * f . keys)) . values. Tip-Adapter-F trains the keys (AdamW
lr 1e-3, eps 1e-4, batch 256, cosine per step) with the initial alpha and beta; both methods then search (beta, alpha)
over the official grid (search_hp). Per-dataset settings (initial alpha, search scale, epochs) are the official
configs/<dataset>.yaml, in conf/dataset_method/<dataset>_tip_adapter{,_f}.yaml.

Honest protocol: the search runs on the few-shot val draw (the official code: the full val split, on ImageNet the
test set), and Tip-Adapter-F is its last epoch (the official code keeps the epoch best on the test set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipadapt.features import unit_rows
from clipadapt.method_schemas import TipAdapterFSchema, TipAdapterSchema
from clipadapt.methods.base import Batch, Method, register_method

# Rounding allowances of the search's pruning bounds, far above float32's (~1e-7 relative): see `grid_correct`.
BOUND_MARGIN = 1e-3
SLACK = 1e-4
BETA_BLOCK = 8  # betas per tensor operation of the search


def search_grid(maximum: float, steps: int) -> list[float]:
    """search_hp's values: i * (maximum - 0.1) / steps + 0.1 for i in range(steps); `maximum` itself is excluded."""
    return [i * (maximum - 0.1) / steps + 0.1 for i in range(steps)]


def exp_affinity(affinity: torch.Tensor, beta: float) -> torch.Tensor:
    """The official cache activation, operation for operation: ((-1) * (beta - beta * affinity)).exp()."""
    return (-(beta - beta * affinity)).exp()


def key_slots(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's cache keys as a [K, S] index table (S: the most keys of a class; padding points at index NK,
    a column the caller fills with -inf, whose activation is exactly 0), and the keys per class [K]."""
    holds, classes = values.max(1)
    keys = torch.nonzero(holds > 0).flatten()
    classes = classes[keys]
    order = torch.argsort(classes, stable=True)  # within a class, the keys' own order
    keys, classes = keys[order], classes[order]
    shots = torch.bincount(classes, minlength=values.shape[1])
    starts = torch.cumsum(shots, 0) - shots
    slots = torch.full((values.shape[1], max(int(shots.max()), 1)), values.shape[0], dtype=torch.long,
                       device=values.device)
    slots[classes, torch.arange(len(keys), device=values.device) - starts[classes]] = keys
    return slots, shots


@torch.no_grad()
def grid_correct(image: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, text: torch.Tensor,
                 labels: torch.Tensor, betas: list[float], alphas: list[float], chunk: int = 1024) -> torch.Tensor:
    """[len(betas), len(alphas)]: how many of the (unit) `image` rows the argmax of clip_logits + cache_logits(beta)
    * alpha assigns to their label, for every pair of the grid, as the official double loop computes it in float32.

    Exact, without the loop's cost. For one image and beta, another class can take the argmax from the true class at
    some alpha only if an upper bound of its cache logit lets it: shots * exp(beta * (max affinity - 1)) bounds its
    sum of activations, and the logit gap is linear in alpha, so a class below the true one at both ends of the alpha
    grid (by a slack far above float32's rounding) is below it at every alpha. The classes left, a few per image, get
    their exact activation sums and logits with the official float operations, as the true class always does. Two
    things the official code leaves to its libraries are fixed here: a class's activations are summed in key order
    (the official `@ cache_values` sums in its BLAS's order, which moves the last bit), and ties between classes go
    to the first (torch.argmax; cls_acc's topk breaks them as its kernel does). Images go in chunks: counts add up.
    """
    if min(betas) <= 0 or min(alphas) < 0:
        raise ValueError("Tip-Adapter's search needs positive betas and alphas: set method.search.beta_max and "
                         "alpha_max above 0")
    slots, shots = key_slots(values)
    zero_shot = 100.0 * image @ text.t()  # clip_logits, for the whole set at once as the official code
    alpha_column = torch.tensor(alphas, dtype=image.dtype, device=image.device)[:, None]
    counts = [_chunk_correct(zero_shot[start : start + chunk], image[start : start + chunk] @ keys.t(),
                             labels[start : start + chunk], slots, shots, betas, alpha_column)
              for start in range(0, len(image), chunk)]
    return torch.stack(counts).sum(0)


def _chunk_correct(zero_shot, affinity, labels, slots, shots, betas, alpha_column) -> torch.Tensor:
    rows = torch.arange(len(labels), device=labels.device)
    padded = torch.cat([affinity, affinity.new_full((len(labels), 1), float("-inf"))], 1)
    by_class = padded[:, slots]  # [n, K, S]
    true_affinity = by_class[rows, labels]  # [n, S]
    true_zero_shot = zero_shot[rows, labels]
    # Classes by decreasing zero-shot logit, so that each beta reads only a prefix: those close enough to the true one
    gap, order = torch.sort(zero_shot - true_zero_shot[:, None], dim=1, descending=True)  # [n, K]
    rising_gap = -gap  # ascending, for searchsorted
    rival_gap = gap.masked_fill(order == labels[:, None], float("-inf"))  # the true class is no rival of its own
    nearest = (by_class.amax(-1) - 1).gather(1, order)  # beta * this bounds each activation's exponent (-inf: no keys)
    bound_shots = (shots.to(affinity.dtype) * (1 + BOUND_MARGIN))[order]
    most = float(shots.max()) * (1 + BOUND_MARGIN)
    highest, z_scale = nearest.amax(1), float(zero_shot.abs().max())
    alpha_low, alpha_high = float(alpha_column.min()), float(alpha_column.max())
    # A block of betas per tensor operation (the same float operations as one Python float at a time): few, large
    # operations, which also keeps torch's threads from waiting on each other on a busy machine.
    beta_column = torch.tensor(betas, dtype=affinity.dtype, device=affinity.device)[:, None]
    correct = []
    for block in beta_column.split(BETA_BLOCK):  # [b, 1]
        true_cache = exp_affinity(true_affinity, block[:, :, None]).sum(-1)  # [b, n]
        excess = torch.exp(highest * block).mul_(most).sub_(true_cache)  # per image: bound of max_k C_k - C_true
        slack = SLACK * (z_scale + alpha_high * (excess.amax(1, keepdim=True) + 2 * true_cache.amax(1, keepdim=True)))
        reach = torch.where(excess > 0, alpha_high * excess, alpha_low * excess) + slack  # gap >= -reach can threaten
        width = int(torch.searchsorted(rising_gap, reach.t().contiguous(), right=True).max())
        rise = torch.exp(nearest[:, :width] * block[:, :, None]).mul_(bound_shots[:, :width]).sub_(true_cache[:, :, None])
        # the gap is linear in alpha: its larger end decides
        closest = torch.maximum(torch.add(rival_gap[:, :width], rise, alpha=alpha_high),
                                torch.add(rival_gap[:, :width], rise, alpha=alpha_low))
        beta_index, image_index, column = (closest >= slack[:, :, None].neg()).nonzero(as_tuple=True)
        rival = order[image_index, column]
        rival_cache = exp_affinity(by_class[image_index, rival], block[beta_index]).sum(-1)  # [P]
        true_logits = true_zero_shot + true_cache[:, None, :] * alpha_column  # [b, A, n]: clip + cache * alpha
        rival_logits = zero_shot[image_index, rival] + rival_cache * alpha_column  # [A, P]
        target = true_logits[beta_index, :, image_index].t()  # [A, P]
        beaten = (rival_logits > target) | ((rival_logits == target) & (rival < labels[image_index]))
        wrong = torch.zeros(len(alpha_column), len(block) * len(labels), dtype=affinity.dtype, device=affinity.device)
        wrong.index_add_(1, beta_index * len(labels) + image_index, beaten.to(affinity.dtype))
        correct.append(len(labels) - (wrong.view(len(alpha_column), len(block), len(labels)) > 0).sum(-1).t())
    return torch.cat(correct)


def first_best(correct: torch.Tensor) -> tuple[int, int, int]:
    """(count, beta index, alpha index) as search_hp picks them: the first strictly better than its initial
    best_acc = 0 in beta-major, alpha-minor order; (0, -1, -1) when no pair gets any image right (the official
    best_beta = best_alpha = 0 then stay)."""
    index = int(torch.argmax(correct.flatten()))  # the first maximum
    count = int(correct.flatten()[index])
    if count == 0:
        return 0, -1, -1
    return count, index // correct.shape[1], index % correct.shape[1]


@register_method("tip_adapter")
class TipAdapter(Method):
    Config = TipAdapterSchema
    learnable_keys = False
    tuned = ("alpha", "beta")

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        augmented = task.train_tensor(slice(1, None)) if task.train.image.shape[1] > 1 else task.train_tensor()
        keys = F.normalize(augmented.mean(1), dim=-1)  # [NK, D]: the raw views' mean, normalised
        self.keys = nn.Parameter(keys, requires_grad=self.learnable_keys)
        labels = torch.as_tensor(task.train.labels, device=task.device)
        self.register_buffer("values", F.one_hot(labels, task.num_classes).float())
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)

    def cache_logits(self, image: torch.Tensor, beta: float) -> torch.Tensor:
        return exp_affinity(image @ self.keys.t(), beta) @ self.values

    def forward(self, batch: Batch):
        return self.zero_shot_logits(batch.image) + self.cache_logits(batch.image, self.beta) * self.alpha

    def retarget(self, classnames, text):
        """Other classes (base-to-new, cross-dataset): the cache holds no image of them, so its values are all zero
        and only the zero-shot term remains."""
        super().retarget(classnames, text)
        self.values = self.values.new_zeros(self.values.shape[0], len(classnames))

    @torch.no_grad()
    def tune(self, val):
        search = self.cfg.search
        kept = {"alpha": self.alpha, "beta": self.beta}
        if not search.enabled:
            return {**kept, "search": "not run: method.search.enabled=false"}
        if val is None or len(val) == 0:
            return {**kept, "search": "not run: no val draw"}
        image = unit_rows(val.image[:, 0], self.text.device)
        labels = torch.as_tensor(val.labels, device=self.text.device)
        betas = search_grid(search.beta_max, search.beta_steps)
        alphas = search_grid(search.alpha_max, search.alpha_steps)
        correct = grid_correct(image, self.keys.detach(), self.values, self.text, labels, betas, alphas)
        count, beta_index, alpha_index = first_best(correct)
        if count == 0:
            self.alpha = self.beta = 0.0
            return {"alpha": 0.0, "beta": 0.0, "val_acc": 0.0,
                    "search": f"ran on {len(labels)} images: no pair classified any correctly, so alpha = beta = 0 "
                              "(zero-shot) as the official search_hp leaves them"}
        self.alpha, self.beta = alphas[alpha_index], betas[beta_index]
        return {"alpha": self.alpha, "beta": self.beta, "val_acc": 100 * count / len(labels),
                "search": f"ran on {len(labels)} images, {len(betas)} x {len(alphas)} grid"}


@register_method("tip_adapter_f")
class TipAdapterF(TipAdapter):
    Config = TipAdapterFSchema
    learnable_keys = True
