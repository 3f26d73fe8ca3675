"""SHIP's stage 1: a VAE whose decoder is "bias MLP -> synthesized prompt -> frozen CLIP text tower".

As published (paper Eq. 2-3 and `mrflogs/SHIP:main_coop_vae.py`): the encoder sees the image feature only
(x -> ReLU hidden -> mu, log sigma^2); the bias MLP maps z to one local bias r in the token-embedding width, added
to every one of the n_ctx learnable global context tokens of "<SOS> p_1+r .. p_n+r <class name>. <EOT>"; the text
tower's normalised output reconstructs x. Loss per batch: sum over dimensions of (x_hat - x)^2 plus kl_weight x
the summed KL to N(0, I), both averaged over the batch. Linear weights N(0, 0.02^2), biases 0; global context
N(0, 0.02^2). The official three AdamW optimisers (encoder, MLP, context; same lr and defaults) equal one AdamW over
all three, as AdamW is per-parameter. Reconstructed: latent size = token-embedding width (the paper; the code's 512
is the same number for ViT-B/16), and the generator trains through `engine.fit` over cached augmented views.
"""

from __future__ import annotations


import torch
from omegaconf import DictConfig
from torch import nn

from clipadapt.methods.base import Batch, FewShotTask, Method
from clipadapt.methods.coop import ClassPrompts, encode_prompts

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2)}  # leaky: the ImageNet script


def _init_linear(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        nn.init.zeros_(module.bias)


class PromptGenerator(Method):
    """The stage-1 model, trained by the shared loop: `loss` is the VAE loss on (image feature, class) pairs.

    Classes are indexed as in `classnames` (SHIP: base classes first, then the label-only new classes).
    """

    def __init__(self, cfg: DictConfig, task: FewShotTask, encoder: nn.Module, classnames: list[str]):
        super().__init__(cfg, task)
        feature_dim, width = task.text.shape[1], encoder.width
        latent = cfg.latent_dim or width
        self.latent_dim = latent
        self.encoder_hidden = nn.Sequential(nn.Linear(feature_dim, cfg.enc_hidden), nn.ReLU())
        self.to_mu = nn.Linear(cfg.enc_hidden, latent)
        self.to_logvar = nn.Linear(cfg.enc_hidden, latent)
        self.bias_mlp = nn.Sequential(nn.Linear(latent, cfg.mlp_hidden), ACTIVATIONS[cfg.activation](),
                                      nn.Linear(cfg.mlp_hidden, width))
        self.apply(lambda m: _init_linear(m, cfg.init_std))
        self.ctx = nn.Parameter(torch.randn(cfg.n_ctx, width) * cfg.init_std)
        self.text_tower = encoder
        self.prompts = ClassPrompts(encoder, classnames, cfg.n_ctx)
        self.to(task.device)
        self.last_terms: dict[str, float] = {}

    def set_classes(self, classnames: list[str]) -> None:
        """Class prompts for another class set (cross-dataset synthesis); the learned parts are kept."""
        self.prompts = ClassPrompts(self.text_tower, classnames, self.cfg.n_ctx).to(self.ctx.device)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder_hidden(image)
        return self.to_mu(hidden), self.to_logvar(hidden)

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Unit-norm features [B, D]: the text tower on "p + r(z)" context tokens and each label's class name."""
        bias = self.bias_mlp(z)  # one local bias per sample, shared by all context tokens (paper Eq. 3)
        ctx = self.ctx[None] + bias[:, None]
        sequences = self.prompts.sequences(ctx, labels)
        return encode_prompts(self.text_tower, sequences, self.prompts.token_ids(labels), self.cfg.precision)

    def loss(self, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.encode(batch.image)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        reconstruction = (self.decode(z, labels) - batch.image).pow(2).sum(-1).mean()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(-1).mean()
        self.last_terms = {"rec": float(reconstruction.detach()), "kl": float(kl.detach())}
        return reconstruction + self.cfg.kl_weight * kl

    def forward(self, batch: Batch) -> torch.Tensor:
        raise TypeError("the SHIP generator is not a classifier: use loss() to train it and synthesize() to sample")

    @torch.no_grad()
    def synthesize(self, labels: torch.Tensor, generator: torch.Generator, chunk: int = 1024) -> torch.Tensor:
        """Features [N, D] for class indices `labels`, with z drawn from the prior N(0, I) (the encoder is unused)."""
        z = torch.randn(len(labels), self.latent_dim, generator=generator).to(self.ctx.device)
        labels = labels.to(self.ctx.device)
        parts = [self.decode(z[i : i + chunk], labels[i : i + chunk]) for i in range(0, len(labels), chunk)]
        return torch.cat(parts) if parts else z.new_empty(0, self.text.shape[1])
