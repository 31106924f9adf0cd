"""Weight perturbations for adapters: Flat-LoRA, LoRA-GGPO and LoRA-MGPO (``--perturbation``).

``stats`` has the row norms of ``W + s B A`` and of the gradient proxy without forming ``B A``; ``method``
the three transforms. The perturbed weight is formed inside ``ops.lora_linear`` (``gaussian_perturb``) or
added as a low-rank term: the base weight is never written.
"""

from finetune_ext.perturb.parts import GGPO, MGPO, FlatLoRA

__all__ = ["GGPO", "MGPO", "FlatLoRA"]
