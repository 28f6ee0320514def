"""A tiny random GPT-2 guided by a tiny random BERT, with the Hugging Face Trainer (nothing downloaded).

    python examples/hf_causal_lm.py                  # a few minutes on a CPU
    python examples/hf_causal_lm.py --tiny           # seconds (a smoke test)
    python examples/hf_causal_lm.py --no-guidance    # the baseline

Both models are built from configs with random weights. The data is a synthetic "language": sequences
from a fixed random bigram model, of varying length and right-padded, so the batches carry an
attention mask. The guidance loss pairs GPT-2's block outputs with BERT's (``layers="auto"``), with one
example per real token (``tokens="samples"``; the Trainer passes the attention mask, so padding is not
an example), and is added in ``GuidedTrainer.compute_loss``; the schedule counts optimizer steps under
``gradient_accumulation_steps``. Evaluation reports ``eval_cka/<gpt2 block>-><bert block>``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, TrainingArguments

import fastguide
from fastguide.integrations.hf import GuidedTrainer


class BigramText(Dataset):
    """Sequences sampled from a fixed random bigram model, right-padded to ``length``."""

    def __init__(self, n: int, length: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        probs = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)), -1)
        self.ids = torch.zeros(n, length, dtype=torch.long)
        self.mask = torch.zeros(n, length, dtype=torch.long)
        for i in range(n):
            t = int(torch.randint(length // 2, length + 1, (), generator=g))
            tok = int(torch.randint(1, vocab, (), generator=g))
            for j in range(t):
                self.ids[i, j] = tok
                tok = int(torch.multinomial(probs[tok], 1, generator=g))
            self.mask[i, :t] = 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)  # no loss on padding
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--accumulate", type=int, default=2, help="gradient_accumulation_steps")
    p.add_argument("--until", type=int, default=None, help="guide only the first UNTIL optimizer steps")
    p.add_argument("--no-guidance", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a few steps of tiny models (a smoke test)")
    p.add_argument("--out", default=None, help="Trainer output_dir (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps = 3
    vocab, length = 32, (12 if args.tiny else 32)
    d, layers = (16, 2) if args.tiny else (64, 4)

    torch.manual_seed(0)
    target = GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_positions=length, n_embd=d, n_layer=layers, n_head=2)
    )
    guide = BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=layers + 2,
            num_attention_heads=2,
            intermediate_size=4 * d,
            max_position_embeddings=length,
        )
    )
    train = BigramText(64 if args.tiny else 2048, length, vocab, seed=1)
    val = BigramText(16 if args.tiny else 256, length, vocab, seed=2)
    guidance = fastguide.Guidance(target, guide, tokens="samples", estimator="biased", until=args.until)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=args.out or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=16,
            gradient_accumulation_steps=args.accumulate,
            learning_rate=1e-3,
            logging_steps=max(1, args.steps // 10),
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        if args.no_guidance:
            guidance.close()
            from transformers import Trainer

            trainer = Trainer(model=target, args=targs, train_dataset=train, eval_dataset=val)
        else:
            trainer = GuidedTrainer(
                model=target, args=targs, train_dataset=train, eval_dataset=val, guidance=guidance
            )
        trainer.train()
        metrics = trainer.evaluate()
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    if not args.no_guidance:
        step = trainer.state.global_step
        print(f"pairs: {guidance.pairs}; guidance step {guidance.step} = global step {step}")
    return {"metrics": metrics, "step": trainer.state.global_step, "guidance_step": guidance.step}


if __name__ == "__main__":
    main()
