"""Zero-shot CLIP: logits = 100 * image feature . class text features."""

from clipadapt.methods.base import Batch, Method, register_method


@register_method("zero_shot")
class ZeroShot(Method):
    uses_augmented_views = False
    def forward(self, batch: Batch):
        return self.zero_shot_logits(batch.image)
