"""Hugging Face integration: a ``Trainer`` that adds the guidance loss in ``compute_loss``.

::

    model = GPT2LMHeadModel(GPT2Config(...))                 # the target
    guidance = fastguide.Guidance(model, guide, tokens="samples", estimator="biased", until=300)
    trainer = GuidedTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=4),
                            train_dataset=ds, guidance=guidance)
    trainer.train()

Training steps add ``guidance.loss`` to the model's loss; the schedule follows ``state.global_step``
(optimizer steps, restored when training resumes from a checkpoint), and the guidance term is scaled
for gradient accumulation the way the Trainer scales the task loss (divided by the accumulation steps
unless the Trainer leaves the loss alone because it was already normalised over the accumulated
batch). With ``tokens="samples"`` the batch's ``attention_mask`` selects the tokens (padding is not an
example). Evaluation (``trainer.evaluate()``, run without grad) measures the alignment of every batch
and reports the mean per pair as ``eval_cka/<target>-><guide>``; training logs add the last step's
``cka/<target>-><guide>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..guidance import Guidance

__all__ = ["GuidedTrainer", "default_guide_inputs"]

_NOT_INPUTS = ("labels", "label", "label_ids", "num_items_in_batch", "return_loss")


def default_guide_inputs(batch: dict) -> dict:
    """The guide's input: the batch without its labels (a Hugging Face guide takes it as keywords)."""
    return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}


class _FollowGlobalStep(TrainerCallback):
    """Keeps ``guidance.step`` equal to ``state.global_step`` after every optimizer step."""

    def __init__(self, guidance: Guidance):
        self.guidance = guidance

    def on_step_end(self, args, state, control, **kwargs):
        if self.guidance.step != state.global_step:
            self.guidance.step = state.global_step


class GuidedTrainer(Trainer):
    """``transformers.Trainer`` with representational guidance.

    Args:
        guidance: a :class:`fastguide.Guidance` whose target is the trained model (it is switched to
            ``step_on="optimizer"``; the Trainer's global step drives it).
        guide_inputs: ``batch -> guide input`` (default :func:`default_guide_inputs`; e.g.
            ``lambda b: b["input_ids"]`` for a guide that takes token ids positionally).
        *args, **kwargs: the ``Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        guidance: Guidance,
        guide_inputs: Callable[[dict], Any] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be a fastguide.Guidance; got {type(guidance).__name__}")
        super().__init__(*args, **kwargs)
        self.guidance = guidance
        self.guide_inputs = guide_inputs if guide_inputs is not None else default_guide_inputs
        guidance.step_on = "optimizer"
        self.add_callback(_FollowGlobalStep(guidance))
        if guidance.guide_device is None and self.model is not None:
            owned = {id(m) for m in self.model.modules()}
            if id(guidance.guide) not in owned:
                guidance.guide.to(self.args.device)
        self._eval_cka: list[torch.Tensor] = []
        self._train_cka: torch.Tensor | None = None

    def _scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves this step's loss undivided by the accumulation steps (the same
        decision as ``Trainer.training_step``)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        g_in = self.guide_inputs(inputs)
        mask = inputs.get("attention_mask") if self.guidance.tokens == "samples" else None
        train = model.training and torch.is_grad_enabled()
        if train and self.guidance.step != self.state.global_step:
            self.guidance.step = self.state.global_step  # before the forward: its hooks read the schedule
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if train:
            g = self.guidance.loss(g_in, mask=mask)
            if self._scaled_for_accumulation(num_items_in_batch):
                # The task loss is already normalised over the accumulated batch: scale ours the same.
                g = g / getattr(
                    self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
                )
            loss = loss + g.to(loss.device)
            self._train_cka = self.guidance.last_cka
        else:
            with torch.no_grad():
                self.guidance.loss(g_in, mask=mask)
            self._eval_cka.append(self.guidance.last_cka)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        prefixes = [
            k[: -len("_loss")] for k in logs if k.endswith("_loss") and k not in ("loss", "train_loss")
        ]
        if prefixes and self._eval_cka:
            # Evaluation metrics: the mean per-pair CKA over the evaluated batches (one host copy).
            mean = torch.stack([c.to(self._eval_cka[0].device) for c in self._eval_cka]).mean(0).cpu()
            for i, (t, g) in enumerate(self.guidance.pairs):
                logs[f"{prefixes[0]}_cka/{t}->{g}"] = float(mean[i])
            self._eval_cka = []
        elif "loss" in logs and self._train_cka is not None:
            cka = self._train_cka.cpu()
            for i, (t, g) in enumerate(self.guidance.pairs):
                logs[f"cka/{t}->{g}"] = float(cka[i])
        super().log(logs, *args, **kwargs)
