"""Lightning integration: a ``Callback`` that runs :class:`fastguide.Guidance` with the trainer.

Either the LightningModule holds the Guidance (its state then travels in the model's checkpoint)::

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.guide = make_target(), make_guide()
            self.guidance = fastguide.Guidance(self.net, self.guide, estimator="biased", until=300)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y) + self.guidance.loss(x)

    trainer = L.Trainer(callbacks=[GuidanceCallback()], accumulate_grad_batches=2)

or the callback builds it at setup from a guide, and the module reads it as ``self.guidance``::

    trainer = L.Trainer(callbacks=[GuidanceCallback(guide=make_guide(), target="net", until=300)])

The callback registers the hooks at ``setup`` and removes them at ``teardown`` (the model carries no
hooks outside ``fit``/``validate``/``test``), counts the schedule in optimizer steps (it follows
``trainer.global_step``, so ``accumulate_grad_batches`` and resuming from a checkpoint are handled),
moves a guide that the module does not own to the module's device, and logs the per-pair CKA of every
training step (``cka/<target>-><guide>``) and the epoch mean of validation/test calls
(``val_cka/...``, ``test_cka/...``) whenever ``guidance.loss`` ran in that batch. A Guidance the
callback built is checkpointed in the callback's state.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..guidance import Guidance

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["GuidanceCallback"]


class GuidanceCallback(pl.Callback):
    """Run :class:`fastguide.Guidance` objects with a Lightning ``Trainer``.

    Args:
        guidance: a Guidance (or a list) to manage. Default: every Guidance the LightningModule holds
            as a submodule, or the one built from ``guide``.
        guide: build a Guidance at setup with this guide (frozen, moved to the module's device) and
            ``guidance_kwargs`` (``layers``, ``weight``, ``until``, ...); it is set as the plain
            attribute ``pl_module.<attribute>`` (not a submodule: the model's state dict is unchanged).
        target: the name of the guided submodule of the LightningModule (default: the module itself).
        attribute: the attribute name for a built Guidance (default ``"guidance"``).
        log_cka: log per-pair CKA (default True).
    """

    def __init__(
        self,
        guidance: Guidance | list[Guidance] | None = None,
        *,
        guide: nn.Module | None = None,
        target: str | None = None,
        attribute: str = "guidance",
        log_cka: bool = True,
        **guidance_kwargs: Any,
    ):
        if guidance is not None and guide is not None:
            raise ValueError("pass either guidance= or guide= (to build one), not both")
        if guidance_kwargs and guide is None:
            raise ValueError(f"Guidance options {sorted(guidance_kwargs)} need guide= (to build a Guidance)")
        given = [] if guidance is None else [guidance] if isinstance(guidance, Guidance) else list(guidance)
        if not all(isinstance(g, Guidance) for g in given):
            raise TypeError("guidance must be a fastguide.Guidance or a list of them")
        self._given = given
        self._guide, self._target, self._attribute, self._kwargs = guide, target, attribute, guidance_kwargs
        self.log_cka = log_cka
        self.built: Guidance | None = None
        self._pending: dict | None = None
        self._guidances: list[Guidance] = list(given)
        self._seen: dict[int, Any] = {}

    # ------------------------------------------------------------------ which Guidance objects

    def _collect(self, pl_module: nn.Module) -> list[Guidance]:
        if self._guide is not None:
            if self.built is None:
                target = pl_module if self._target is None else pl_module.get_submodule(self._target)
                self.built = Guidance(target, self._guide, **self._kwargs)
                if self._pending is not None:
                    self.built.load_state_dict(self._pending)
                    self._pending = None
            # A plain attribute, not a submodule: the LightningModule's state dict stays as it is.
            object.__setattr__(pl_module, self._attribute, self.built)
            return [self.built]
        if self._given:
            return list(self._given)
        found = [m for m in pl_module.modules() if isinstance(m, Guidance)]
        if not found:
            raise RuntimeError(
                "GuidanceCallback found no fastguide.Guidance in the LightningModule: hold one as an "
                "attribute (self.guidance = Guidance(...)), pass guidance=, or pass guide= to build one"
            )
        return found

    # ------------------------------------------------------------------ lifetime

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._guidances = self._collect(pl_module)
        for g in self._guidances:
            g.register_hooks()
            g.step_on = "optimizer"  # the trainer's global step drives the schedule

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for g in self._guidances:
            g.remove_hooks()

    def _place_guides(self, pl_module: pl.LightningModule) -> None:
        owned = {id(m) for m in pl_module.modules()}
        for g in self._guidances:
            if g.guide_device is None and id(g.guide) not in owned:
                g.guide.to(pl_module.device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place_guides(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place_guides(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place_guides(pl_module)

    # ------------------------------------------------------------------ schedule and logging

    def _sync(self, trainer: pl.Trainer) -> None:
        for g in self._guidances:
            if g.step != trainer.global_step:
                g.step = trainer.global_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ):
        self._sync(trainer)
        for g in self._guidances:
            self._seen[id(g)] = g.last_cka

    def _log(self, pl_module: pl.LightningModule, prefix: str, on_step: bool) -> None:
        if not self.log_cka:
            return
        for k, g in enumerate(self._guidances):
            cka = g.last_cka
            if cka is None or cka is self._seen.get(id(g)):
                continue  # guidance.loss did not run in this batch
            self._seen[id(g)] = cka
            tag = "" if len(self._guidances) == 1 else f"{k}/"
            values = {f"{prefix}/{tag}{t}->{gn}": cka[i] for i, (t, gn) in enumerate(g.pairs)}
            # batch_size=1: the epoch value is the mean over batches of the per-batch CKA.
            pl_module.log_dict(values, on_step=on_step, on_epoch=not on_step, batch_size=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._log(pl_module, "cka", on_step=True)
        self._sync(trainer)  # after this batch's optimizer step, if it took one

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        for g in self._guidances:
            self._seen[id(g)] = g.last_cka

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._log(pl_module, "val_cka", on_step=False)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        for g in self._guidances:
            self._seen[id(g)] = g.last_cka

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(pl_module, "test_cka", on_step=False)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        # A Guidance held by the LightningModule is in the model's state dict already.
        if self.built is not None:
            return {"guidance": self.built.state_dict()}
        return {"guidance": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("guidance")
        if state is None:
            return
        if self.built is not None:
            self.built.load_state_dict(state)
        else:
            self._pending = state
