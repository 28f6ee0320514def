"""Lightning, Hugging Face (Trainer, layers="auto" on HF models) and accelerate integrations, against the
real packages; each test skips cleanly when its package is absent. Models are tiny and random (built
from configs: nothing is downloaded)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, mlp, mlp_pair
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fastguide
from fastguide._capture import ModuleHook
from fastguide._mapping import auto_candidates, is_auto_module


def _live_hooks(model):
    return [
        h
        for m in model.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        if isinstance(h, ModuleHook)
    ]


# --------------------------------------------------------------------------- Lightning


def _lightning():
    pl = pytest.importorskip("lightning.pytorch")
    from fastguide.integrations.lightning import GuidanceCallback

    return pl, GuidanceCallback


def _loader(n=48, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g))
    return DataLoader(ds, batch_size=batch)


def _lit_class(pl):
    class Lit(pl.LightningModule):
        def __init__(self, until=3, hold=True):
            super().__init__()
            torch.manual_seed(0)
            self.net, self.guide = mlp_pair()
            if hold:
                self.guidance = fastguide.Guidance(self.net, self.guide, estimator="biased", until=until)
            self.guided: list[tuple[int, bool]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            g = self.guidance.loss(x)
            self.guided.append((self.trainer.global_step, bool(g.detach() != 0)))
            return F.cross_entropy(logits, y) + g

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y))
            self.guidance.loss(x)  # under no_grad: the alignment, for the callback's log

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.05)

    return Lit


def _trainer(pl, callbacks, max_steps, **kw):
    """A quiet one-CPU Lightning Trainer."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


def test_lightning_callback_accumulation_logging_and_hooks(tmp_path):
    pl, GuidanceCallback = _lightning()
    model = _lit_class(pl)(until=2)
    trainer = _trainer(
        pl,
        [GuidanceCallback()],
        max_steps=3,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        accumulate_grad_batches=2,
        enable_checkpointing=False,
        val_check_interval=2,
    )
    trainer.fit(model, _loader(), _loader(16, seed=1))
    # until=2 counts optimizer steps: both micro-batches of steps 0 and 1 are guided, step 2's are not.
    assert model.guided == [(0, True), (0, True), (1, True), (1, True), (2, False), (2, False)]
    assert trainer.global_step == 3 and model.guidance.step == 3
    metrics = trainer.callback_metrics
    assert any(k.startswith("cka/") for k in metrics) and any(k.startswith("val_cka/") for k in metrics)
    assert _live_hooks(model) == []  # hooks go with the fit ...
    trainer.validate(model, _loader(16, seed=1), verbose=False)  # ... and come back for validate
    assert _live_hooks(model) == []
    assert "guidance._extra_state" in model.state_dict()


def test_lightning_resume_continues_until(tmp_path):
    pl, GuidanceCallback = _lightning()
    Lit = _lit_class(pl)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    first = Lit(until=3)
    trainer = _trainer(pl, [GuidanceCallback(), ckpt_cb], max_steps=2, limit_val_batches=0)
    trainer.fit(first, _loader())
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    print(f"stopped: guidance.step={first.guidance.step}, global_step={trainer.global_step}")
    resumed = Lit(until=3)
    assert resumed.guidance.step == 0
    trainer = _trainer(pl, [GuidanceCallback()], max_steps=5, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(resumed, _loader(), ckpt_path=ckpt)
    print(f"resumed: first step {resumed.guided[0][0]}, guidance.step={resumed.guidance.step}")
    assert first.guided == [(0, True), (1, True)]
    assert resumed.guided == [(2, True), (3, False), (4, False)]  # until=3 over both runs together


def test_lightning_callback_builds_guidance_and_checkpoints_it(tmp_path):
    pl, GuidanceCallback = _lightning()
    Lit = _lit_class(pl)
    guide = mlp(width=20, depth=4)
    cb = GuidanceCallback(guide=guide, target="net", until=3, estimator="biased")
    model = Lit(hold=False)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = _trainer(pl, [cb, ckpt_cb], max_steps=2, limit_val_batches=0)
    trainer.fit(model, _loader())
    assert model.guidance is cb.built and "guidance._extra_state" not in model.state_dict()
    state = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if "GuidanceCallback" in k]
    assert saved["guidance"]["_extra_state"]["step"] == 2
    cb2 = GuidanceCallback(guide=guide, target="net", until=3, estimator="biased")
    resumed = Lit(hold=False)
    trainer = _trainer(pl, [cb2], max_steps=4, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(resumed, _loader(), ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert resumed.guided == [(2, True), (3, False)] and cb2.built.step == 4
    with pytest.raises(ValueError, match="need guide="):
        GuidanceCallback(until=3)


# --------------------------------------------------------------------------- Hugging Face models


def _gpt2(n_layer=2, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=16,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _bert(n_layer=3, seed=1):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=24,
        num_hidden_layers=n_layer,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(cfg)


def test_hf_auto_layers_are_block_outputs():
    gpt2, bert = _gpt2(), _bert()
    from transformers.pytorch_utils import Conv1D

    assert is_auto_module(Conv1D(4, 3)) and is_auto_module(nn.Linear(3, 4)) and not is_auto_module(nn.ReLU())
    assert auto_candidates(gpt2) == ["transformer.h.0", "transformer.h.1", "transformer.ln_f", "lm_head"]
    assert auto_candidates(bert) == [
        "embeddings.LayerNorm",
        "encoder.layer.0",
        "encoder.layer.1",
        "encoder.layer.2",
        "pooler.dense",
    ]
    ids = torch.randint(0, 50, (4, 10))
    with fastguide.Guidance(gpt2, bert, tokens="samples") as g:
        gpt2(input_ids=ids)
        g.loss({"input_ids": ids}).backward()
        # execution order, the last (lm_head / pooler.dense) dropped; 3 target layers over 4 guide layers
        assert g.pairs == [
            ("transformer.h.0", "embeddings.LayerNorm"),
            ("transformer.h.1", "encoder.layer.1"),
            ("transformer.ln_f", "encoder.layer.2"),
        ]
    assert gpt2.transformer.h[0].attn.c_attn.weight.grad is not None


@pytest.mark.parametrize(
    "layers", ["auto", {"transformer.h.0.mlp.c_fc": "encoder.layer.0"}], ids=["blocks", "inside"]
)
def test_hf_gradient_checkpointing(layers):
    model, guide = _gpt2(), _bert()
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 50, (4, 10))
    with fastguide.Guidance(model, guide, layers=layers, tokens="samples") as g:
        out = model(input_ids=ids, labels=ids)
        (out.loss + g.loss({"input_ids": ids})).backward()
        assert g._t_acts == {}  # the re-run forwards of the backward pass were not captured
        assert model.transformer.h[0].mlp.c_fc.weight.grad is not None


def _lm_dataset(n=24, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)

    class DS(Dataset):
        def __init__(self):
            self.ids = torch.randint(0, 50, (n, t), generator=g)
            self.mask = torch.ones(n, t, dtype=torch.long)
            self.mask[::3, 7:] = 0  # some padding

        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.ids[i]}

    return DS()


def _hf_args(tmp_path, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_hf_guided_trainer_accumulation_eval_and_scaling(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from fastguide.integrations.hf import GuidedTrainer

    model, guide = _gpt2(), _bert()
    guidance = fastguide.Guidance(model, guide, tokens="samples", until=2, estimator="biased")
    trainer = GuidedTrainer(
        model=model,
        args=_hf_args(tmp_path, gradient_accumulation_steps=2, max_steps=3),
        train_dataset=_lm_dataset(),
        eval_dataset=_lm_dataset(8, seed=1),
        guidance=guidance,
    )
    seen = []
    real = guidance.loss

    def spy(*a, **k):
        out = real(*a, **k)
        if torch.is_grad_enabled():
            seen.append((trainer.state.global_step, bool(out.detach() != 0)))
        return out

    guidance.loss = spy
    trainer.train()
    assert seen == [(0, True), (0, True), (1, True), (1, True), (2, False), (2, False)]
    assert guidance.step == 3 == trainer.state.global_step
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and any(k.startswith("cka/") for k in logged[0])
    metrics = trainer.evaluate()
    assert {f"eval_cka/{t}->{g}" for t, g in guidance.pairs} <= set(metrics)
    assert all(0.0 <= metrics[f"eval_cka/{t}->{g}"] <= 1.0 for t, g in guidance.pairs)
    assert guidance.step == 3  # evaluation does not advance the schedule
    del guidance.loss

    # GPT-2 takes num_items_in_batch: its loss is normalised over the accumulated batch, so the Trainer
    # does not divide it, and the guidance term is divided by the accumulation steps instead.
    trainer.state.global_step = 0  # a guided step (until=2)
    batch = trainer.data_collator([_lm_dataset()[i] for i in range(4)])
    model.train()
    total = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(80))
    term = guidance.last_cka.sub(1).neg().sum()
    with torch.no_grad():
        task = Trainer.compute_loss(trainer, model, batch, num_items_in_batch=torch.tensor(80))
    assert trainer._scaled_for_accumulation(torch.tensor(80))
    assert_close(total, task + term / 2, "loss", torch.float32, length=term.numel(), what="Trainer loss")


def test_hf_attention_mask_selects_tokens():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    model, guide = _gpt2(), _bert()
    ds = _lm_dataset(4)
    ids, mask = ds.ids, ds.mask
    keep = mask.reshape(-1).bool()
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        b = guide(input_ids=ids, attention_mask=mask).last_hidden_state
    with fastguide.Guidance(
        model, guide, layers={"transformer.h.0": "encoder.layer.2"}, tokens="samples"
    ) as g:
        model(input_ids=ids, attention_mask=mask)
        g.loss({"input_ids": ids, "attention_mask": mask}, mask=mask)
    want = fastguide.cka(h.reshape(-1, h.shape[-1])[keep], b.reshape(-1, b.shape[-1])[keep])
    assert_close(g.last_cka[0], want, "cka", torch.float32, what="masked tokens")


# --------------------------------------------------------------------------- accelerate


def test_accelerate_register_for_checkpointing(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    net, guide = mlp_pair()
    g = fastguide.Guidance(net, guide, until=5)
    acc = accelerate.Accelerator(cpu=True)
    acc.register_for_checkpointing(g)
    for _ in range(3):
        x = torch.randn(8, 12)
        net(x)
        g.loss(x)
    acc.save_state(str(tmp_path / "state"))
    g2 = fastguide.Guidance(net, guide, until=5)
    acc2 = accelerate.Accelerator(cpu=True)
    acc2.register_for_checkpointing(g2)
    acc2.load_state(str(tmp_path / "state"))
    assert g2.step == 3 and g2.pairs == g.pairs
    g.close()
    g2.close()
