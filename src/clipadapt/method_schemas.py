"""Every method's options: the `Config` dataclass of each registered method, with its defaults, choices and bounds.

Torch-free on purpose: Hydra reads each schema as a config named after its class (the `clipadapt-schema` config
source, on the search path in conf/config.yaml), and conf/method/<name>.yaml extends it through its defaults list
(`- /CoOpSchema@_here_`), so that
`python -m clipadapt.train method=coop --cfg job` shows every option, `method.train.epochs=5` needs no `+`, and a
misspelt key fails when Hydra composes the config, without importing the methods (torch) to print a config.
The method modules import their schema from here (`Config = CoOpSchema`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Optional

from omegaconf import MISSING

from clipadapt.config import above, at_least, one_of

# Names the methods' code maps to objects: engine.OPTIMIZERS and ship_generator.ACTIVATIONS hold one entry per name
# (tests/test_discoverable.py checks that they agree).
OPTIMIZERS = ("adamw", "sgd")
GENERATOR_ACTIVATIONS = ("relu", "leaky_relu")  # leaky: the ImageNet script
SCHEDULE_UNITS = ("step", "epoch")
WARMUP_TYPES = ("constant", "linear")
PRECISIONS = ("fp32", "bf16")


# ---------------------- Every method: its training recipe (the loop in engine.py) and the keys all methods share


@dataclass
class TrainSchema:
    epochs: int = at_least(0, 0)  # 0: training-free
    batch_size: int = at_least(256, 1)
    optimizer: str = one_of("adamw", *OPTIMIZERS)
    lr: float = above(1e-3, 0)
    weight_decay: float = at_least(0.0, 0)
    momentum: float = 0.9  # sgd
    eps: float = 1e-8  # adamw
    schedule: str = one_of("cosine", "cosine", "constant")
    schedule_unit: str = one_of("step", *SCHEDULE_UNITS)  # step: every step | epoch: after each epoch (Dassl's)
    warmup_epochs: int = at_least(0, 0)
    warmup_type: str = one_of("constant", *WARMUP_TYPES)  # constant: at warmup_lr (Dassl's) | linear: up to lr
    warmup_lr: float = 1e-5
    drop_last: bool = False  # leave out the last partial batch when the draw holds a full one (Dassl's train loader)
    views: str = one_of("augment", "augment", "plain")  # the cached train views the loop samples from


@dataclass
class MethodSchema:
    name: str = MISSING
    fidelity: str = "as published"  # "reconstructed" where the paper's text or code was not available
    # the class prompts: null = the dataset's default (CoOp's single template); a name picks dataset.template_sets[name]
    # (conf/dataset_method/imagenet_tip_adapter.yaml: ensemble, as Tip-Adapter's and CALIP's ImageNet code)
    template_set: Optional[str] = None
    train: TrainSchema = field(default_factory=TrainSchema)


# ----------------------------------------------------------- tip_adapter, tip_adapter_f (methods/tip_adapter.py)


@dataclass
class TipSearchSchema:
    enabled: bool = True
    beta_max: float = 7.0  # search_scale[0]; the grid stops one step short of it
    alpha_max: float = 3.0  # search_scale[1]
    beta_steps: int = at_least(200, 1)  # search_step
    alpha_steps: int = at_least(20, 1)


@dataclass
class TipAdapterSchema(MethodSchema):
    alpha: float = 1.0  # init_alpha: Tip-Adapter-F trains with it; the value used where the search does not run
    beta: float = 1.0  # init_beta
    search: TipSearchSchema = field(default_factory=TipSearchSchema)


@dataclass
class TipAdapterFSchema(TipAdapterSchema):
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=20, batch_size=256, optimizer="adamw", lr=1e-3, eps=1e-4, schedule="cosine"))


# ---------------------------------------------------------------------------------------- coop (methods/coop.py)


@dataclass
class CoOpTrainSchema(TrainSchema):
    epochs: Optional[int] = None  # None: epochs_by_shots at the draw's shots (ImageNet: set 50)
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    schedule_unit: str = "epoch"  # Dassl steps the lr after each epoch
    warmup_epochs: int = 1  # constant warm-up at warmup_lr, as CoOp's
    warmup_lr: float = 1e-5
    drop_last: bool = True  # Dassl's train loader


@dataclass
class CoOpSchema(MethodSchema):
    n_ctx: int = 16
    ctx_init: str = ""  # "": random context; words (e.g. "a photo of a"): their embeddings, and n_ctx = their tokens
    init_std: float = 0.02
    epochs_by_shots: dict[int, int] = field(default_factory=lambda: {1: 50, 2: 100, 4: 100, 8: 200, 16: 200})
    precision: str = one_of("bf16", *PRECISIONS)  # text tower under bf16 autocast on CUDA (fp32 master weights); CPU always runs fp32
    train: CoOpTrainSchema = field(default_factory=CoOpTrainSchema)


# ------------------------------------------------------------------------ clip_adapter (methods/clip_adapter.py)


@dataclass
class ClipAdapterSchema(MethodSchema):
    reduction: int = at_least(4, 1)
    ratio: float = 0.2  # share of the adapted feature in the blend
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=200, batch_size=32, optimizer="sgd", lr=2e-3, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        schedule_unit="epoch", warmup_epochs=1, warmup_type="constant", warmup_lr=1e-5, drop_last=True))


# ------------------------------------------------------------------------ linear_probe (methods/linear_probe.py)

LPCLIP_GRID = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]  # lpclip's search_list, in its order (ties: the first)


@dataclass
class LinearProbeSchema(MethodSchema):
    c_grid: list[float] = field(default_factory=lambda: list(LPCLIP_GRID))
    c_refine_steps: int = 8  # lpclip's --num_step: bisection steps after the grid
    c: float = 0.316  # used when there is no val draw to search on
    max_iter: int = 1000


# ---------------------------------------------------------------------------- calip, calip_fs (methods/calip.py)

POOLS = ("mean+max", "mean", "max")
BETA_SOURCES = ("search", "paper")
PROJ_TYPES = ("linear_identity", "mlp_bottleneck128")


@dataclass
class CalipSearchSchema:
    # The spec's cheap grid (41 x 41 over [0, 7] x [0, 0.2], zero-shot CLIP included); the official grid is 200 x 200
    # over [0.001, beta_max) with per-dataset maxima (ImageNet: 2.0, 0.1).
    beta2_max: float = 7.0
    beta3_max: float = 0.2
    steps: int = at_least(41, 1)


@dataclass
class CalipSchema(MethodSchema):
    beta2: float = 1.12  # f.T~ weight; the paper's per-dataset values come from conf/dataset_method (ImageNet's here)
    beta3: float = 0.02  # v.T weight (v sums two averages of text vectors: hence ~100x smaller)
    # search: (beta2, beta3) searched where the protocol allows | paper: as configured
    beta_source: str = one_of("search", *BETA_SOURCES)
    # the configured beta2/beta3 are the paper's (searched on test by its authors: runs using them are flagged leaky);
    # false when you configure betas of your own
    betas_test_tuned: bool = True
    attn_scale_text: float = 2.0  # tau of the softmax over locations (visual-guided texts); official: times 2
    attn_scale_visual: float = 2.0  # tau of the softmax over classes (text-blended locations)
    pool: str = one_of("mean+max", *POOLS)  # mean+max (official: the two summed) | mean | max
    renorm: bool = False  # re-normalise T~ and v before the logits (SuS-X's variant; not the official code)
    chunk_size: int = at_least(0, 0)  # images per chunk of the attention; 0: each [chunk, M, max(K, D)] tensor under 2^24 floats
    search: CalipSearchSchema = field(default_factory=CalipSearchSchema)


@dataclass
class CalipFSSchema(CalipSchema):
    fidelity: str = "reconstructed"
    beta_source: str = "paper"  # trained with fixed betas: the dataset's zero-shot values
    # linear_identity (our reading) | mlp_bottleneck128 (the unofficial reimplementation)
    proj_type: str = one_of("linear_identity", *PROJ_TYPES)
    shared_proj: bool = True  # one phi for both modalities (false: one per modality)
    # The unofficial reimplementation's recipe ("stick to paper", a Dassl trainer on CoOp's config): SGD lr 2e-3 with
    # Dassl's momentum 0.9 and weight decay 5e-4, 200 epochs, batch 32, one constant warm-up epoch, cosine stepped
    # per epoch, the last partial batch dropped.
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=200, batch_size=32, optimizer="sgd", lr=2e-3, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        schedule_unit="epoch", warmup_epochs=1, warmup_type="constant", warmup_lr=1e-5, drop_last=True))


# ---------------------------------------------------------------------------------- vt_clip (methods/vt_clip.py)

RESIDUAL_MODES = ("convex", "additive")
NORMS = ("post", "pre")


@dataclass
class VTClipSearchSchema:
    enabled: bool = True  # choose alpha on the few-shot val draw after training (ties keep the trained alpha)
    alphas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])


@dataclass
class VTClipSchema(MethodSchema):
    fidelity: str = "reconstructed"
    alpha: float = 0.5  # residual ratio: the share of the visual-guided text in the blend
    residual_mode: str = one_of("convex", *RESIDUAL_MODES)  # convex: (1 - alpha) t + alpha s^ | additive: t + alpha s^
    alpha_learnable: bool = False
    heads: int = 8
    layers: int = at_least(1, 1)
    ffn_ratio: int = 4  # 1 saves memory on ImageNet
    dropout: float = 0.1
    norm: str = one_of("post", *NORMS)  # post (the original Transformer's Add & Norm) | pre
    include_global: bool = False  # the global feature as one more key/value token
    zs_logit_weight: float = 0.0  # lambda: adds lambda * 100 <g, t_k> to the logits
    chunk_size: int = at_least(0, 0)  # images per forward chunk; 0: the FFN's [chunk, K, ratio * D] activations under 2^24 floats
    search: VTClipSearchSchema = field(default_factory=VTClipSearchSchema)
    # The spec's recipe (section 3): AdamW 1e-4, weight decay 1e-4, batch 64, 50 epochs, one warm-up epoch rising
    # linearly from warmup_lr to lr step by step, then cosine to 0 over the remaining steps.
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=50, batch_size=64, optimizer="adamw", lr=1e-4, weight_decay=1e-4, schedule="cosine",
        schedule_unit="step", warmup_epochs=1, warmup_type="linear", warmup_lr=1e-5))


# ---------------------------------------------------------------------------------------- ccli (methods/ccli.py)


@dataclass
class ConceptSchema:
    file: Optional[str] = None  # null: the packaged clipadapt/vocab/visual_attributes.txt
    templates: list[str] = field(default_factory=lambda: ["a photo of {}."])  # several: features averaged
    num: int = 2000  # M (fewer when the list is shorter)
    seed: int = 0  # the permutation that draws M entries from a longer list
    exclude_targets: bool = True


@dataclass
class CCLISearchSchema:
    enabled: bool = True
    alpha_min: float = 0.0
    alpha_max: float = 5.0
    alpha_steps: int = 20
    beta_min: float = 0.1
    beta_max: float = 10.0
    beta_steps: int = 20  # log-spaced
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0])


@dataclass
class CCLISchema(MethodSchema):
    fidelity: str = "reconstructed"
    concepts: ConceptSchema = field(default_factory=ConceptSchema)
    # global: one averaged feature per train image | views: every augmented view
    concept_pool: str = one_of("global", "global", "views")
    # softmax: over concepts per pool item (distinctiveness) | raw: affinity
    selection_score: str = one_of("softmax", "softmax", "raw")
    topk: Optional[int] = None  # K; null: 8 at >= 4 shots, else the shots (x views with concept_pool=views)
    # weighted | mean: one key per concept (variant A) | none: one key per item (B)
    aggregate: str = one_of("weighted", "weighted", "mean", "none")
    dedup: bool = True  # drop concepts whose support set repeats an earlier one
    keep_top_concepts: Optional[int] = None  # keep only the most distinctive M_keep concepts
    use_text_concepts: bool = True
    text_init: str = one_of("zero", "zero", "class_similarity")  # class_similarity: 0.1 T W^T
    head: str = one_of("linear", "linear", "mlp")
    mlp_hidden: int = 512
    dropout: float = 0.5
    freeze_concepts: bool = False  # keep the visual-concept keys V at their learned-from-images values
    use_tip_cache: bool = False  # add Tip-Adapter's plain cache term (an ablation, off by default)
    tip_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    label_smoothing: float = 0.0
    l1_text_weights: float = 0.0  # L1 on U (sum over entries), for sparse concept->class evidence
    search: CCLISearchSchema = field(default_factory=CCLISearchSchema)
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=20, batch_size=256, optimizer="adamw", lr=1e-3, eps=1e-4, weight_decay=0.0, schedule="cosine"))


# ------------------------------------------------------------------------------- rtos, rtos_zs (methods/rtos.py)


@dataclass
class AnchorSchema:
    sources: list[str] = field(default_factory=lambda: ["cross_dataset", "words"])  # cross_dataset | words
    words_file: Optional[str] = None  # null: the packaged clipadapt/vocab/open_concepts.txt
    datasets: Optional[list[str]] = None  # cross_dataset: whose shipped class lists; null: all 11 benchmarks
    num: int = 1000  # M (fewer when the pool is smaller)
    seed: int = 0  # the permutation that draws M names from the pool
    # names: the words' token embeddings | random: one N(0, init_std^2) token per anchor
    init: str = one_of("names", "names", "random")
    init_std: float = 0.02
    template: str = "a photo of a {}."
    learnable: bool = True
    lr: float = 2e-3  # the anchor tokens' learning rate (train.lr is the RTM's)
    exclude_targets: bool = True  # keep every class of the evaluated datasets out (false: an ablation, leaky)


@dataclass
class RelationSchema:
    # softmax_anchor: softmax over anchors of cos / tau_r | raw_cosine
    mode: str = one_of("softmax_anchor", "softmax_anchor", "raw_cosine")
    tau_r: float = 0.01


@dataclass
class RTMSchema:
    heads: int = 1
    d_h: Optional[int] = None  # null: the embedding width D
    init: str = one_of("identity", "identity", "xavier")
    learnable: bool = True  # false: W_q, W_k stay at their initialisation
    tau_a: float = 0.01
    layernorm: bool = False
    output: str = one_of("scaled", "scaled", "log")  # scaled: s_rt * O | log: log(O + 1e-8)
    s_rt: float = 100.0


@dataclass
class AlphaSearchSchema:
    enabled: bool = True
    alpha_min: float = 0.0  # 0 lets the val draw fall back to zero-shot CLIP
    alpha_max: float = 4.0
    steps: int = 41


@dataclass
class RTOSSchema(MethodSchema):
    fidelity: str = "reconstructed"
    alpha: float = 1.0  # fusion weight of the relation-transition logits
    anchors: AnchorSchema = field(default_factory=AnchorSchema)
    relation: RelationSchema = field(default_factory=RelationSchema)
    rtm: RTMSchema = field(default_factory=RTMSchema)
    search: AlphaSearchSchema = field(default_factory=AlphaSearchSchema)
    # the text tower under bf16 autocast on CUDA (fp32 master weights); CPU always runs fp32
    precision: str = one_of("bf16", *PRECISIONS)
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=20, batch_size=256, optimizer="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine"))


@dataclass
class RTOSZeroShotSchema(RTOSSchema):
    anchors: AnchorSchema = field(default_factory=lambda: AnchorSchema(learnable=False))
    rtm: RTMSchema = field(default_factory=lambda: RTMSchema(learnable=False))
    train: TrainSchema = field(default_factory=lambda: TrainSchema(epochs=0))


# ------------------------- ship: its stage-1 generator (methods/ship_generator.py) and stage 2 (methods/ship.py)


@dataclass
class GeneratorSchema:
    name: str = "ship_generator"
    n_ctx: int = 4
    latent_dim: Optional[int] = None  # None: the text tower's token width (the paper); 512 for ViT-B/16
    enc_hidden: int = 2048  # the released 10-dataset script; ImageNet script and paper: 4096
    mlp_hidden: int = 4096
    activation: str = one_of("relu", *GENERATOR_ACTIVATIONS)  # the bias MLP's (leaky_relu: the ImageNet script)
    kl_weight: float = 1.0
    init_std: float = 0.02
    precision: str = one_of("bf16", *PRECISIONS)  # text tower under bf16 autocast on CUDA; CPU runs fp32
    # AdamW lr 1e-3 with PyTorch's defaults (weight decay 0.01), no schedule, batch 256; 50 epochs (ImageNet 10).
    # The generator used downstream is the last one; the official checkpoints at epochs 10..50 are runs with
    # train.epochs=10..50 (the lr is constant, so stopping early gives the same states).
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=50, batch_size=256, optimizer="adamw", lr=1e-3, weight_decay=0.01, schedule="constant"))


HOSTS = ("coop", "clip_adapter", "tip_adapter_f")  # stage 2

# method.train for SHIP: every key unset (None) takes the host's value, so `method.train.epochs=1` still works; a set
# key is checked against TrainSchema's choices and bounds.
StageTwoTrainSchema = make_dataclass(
    "StageTwoTrainSchema",
    [(f.name, Optional[typing.get_type_hints(TrainSchema)[f.name]], field(default=None, metadata=f.metadata))
     for f in fields(TrainSchema)],
)


@dataclass
class SynthSchema:
    ratio: float = 1.0  # synthesized new-class features per real feature in each stage-2 step (0: none)
    bank_per_class: Optional[int] = None  # 0: fresh every step (the code); None: 0 for coop, 128 for the adapters
    keys_per_class: Optional[int] = None  # tip_adapter_f: synthesized cache keys per new class; None: the draw's shots
    chunk: int = 1024  # prompts per text-tower pass when synthesizing many


@dataclass
class TransferSchema:
    per_class: int = 16  # synthesized features per target class to re-fit on (0: plain host transfer)
    views: int = 10  # draws per synthesized row: one is picked per epoch, as cached augmented views are


def _ship_coop() -> CoOpSchema:
    # main_coop_vae.py's own loop, not Dassl's: CosineAnnealingLR over epochs x iterations, stepped per iteration,
    # and its loader keeps the last partial batch (drop_last=False)
    return CoOpSchema(name="coop", n_ctx=4, ctx_init="a photo of a", train=CoOpTrainSchema(
        epochs=200, batch_size=256, optimizer="sgd", lr=2e-3, momentum=0.0, weight_decay=0.0, warmup_epochs=0,
        schedule_unit="step", drop_last=False))


@dataclass
class ShipSchema(MethodSchema):
    fidelity: str = "as published (stage2=coop, the released code); reconstructed (clip_adapter, tip_adapter_f)"
    stage2: str = one_of("coop", *HOSTS)  # the host method
    generator: GeneratorSchema = field(default_factory=GeneratorSchema)
    synth: SynthSchema = field(default_factory=SynthSchema)
    transfer: TransferSchema = field(default_factory=TransferSchema)
    coop: CoOpSchema = field(default_factory=_ship_coop)
    clip_adapter: ClipAdapterSchema = field(default_factory=lambda: ClipAdapterSchema(name="clip_adapter"))
    tip_adapter_f: TipAdapterFSchema = field(default_factory=lambda: TipAdapterFSchema(
        name="tip_adapter_f", search=TipSearchSchema(enabled=False)))
    train: StageTwoTrainSchema = field(default_factory=StageTwoTrainSchema)  # overrides of the host's train
