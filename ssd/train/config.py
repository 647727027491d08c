"""Settings of `ssd train-draft`; the CLI flags are derived from these fields."""
from __future__ import annotations

from dataclasses import dataclass

INIT_LAYERS = ("spread", "first")


@dataclass(frozen=True)
class TrainDraftConfig:
    target: str = "default"  # target model dir or "default" (SmolLM2-135M-Instruct)
    out: str = ""  # draft directory to write (train_state/ inside it is the resumable checkpoint)
    layers: int = 2  # draft decoder layers
    head_vocab: int = 8192  # Vh: tokens the draft's output head scores
    init_layers: str = "spread"  # spread: evenly spaced target layers incl. first and last | first: the first L
    num_prompts: int = 512  # generated prompts (train + eval)
    eval_prompts: int = 32  # of which held out for evaluation
    gen_tokens: int = 128  # target greedy continuation length per prompt
    gen_batch: int = 16  # sequences per batched target decode step while generating
    teacher_topk: int = 64  # target probabilities kept per position (top-k over the head vocab)
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per step
    seq_len: int = 256  # tokens per sequence (prompt + continuation, truncated)
    lr: float = 1e-3  # peak AdamW learning rate (cosine to lr/10 after a linear warmup)
    warmup_steps: int = 30
    weight_decay: float = 0.0
    ce_weight: float = 0.5  # weight of cross-entropy on the target's top-1 token next to KL(target || draft)
    threads: int = 2  # torch intra-op threads
    eval_every: int = 100  # steps between held-out evaluations (and checkpoints)
    resume: bool = False  # continue from OUT/train_state
    seed: int = 0
    time_budget_min: float = 0.0  # stop training cleanly (and save) after this many minutes; 0 = none
    save_dtype: str = "float16"  # dtype of the shipped weights (float16 | bfloat16 | float32)

    def __post_init__(self):
        if self.layers < 1:
            raise ValueError("layers must be >= 1")
        if self.head_vocab < 2:
            raise ValueError("head_vocab must be >= 2")
        if self.init_layers not in INIT_LAYERS:
            raise ValueError(f"init_layers must be one of {INIT_LAYERS}")
        if not 1 <= self.eval_prompts < self.num_prompts:
            raise ValueError("need 1 <= eval_prompts < num_prompts")
        if min(self.gen_tokens, self.gen_batch, self.teacher_topk, self.steps, self.batch_size,
               self.eval_every, self.threads) < 1:
            raise ValueError("gen_tokens, gen_batch, teacher_topk, steps, batch_size, eval_every, threads must be >= 1")
        if self.seq_len < 8:
            raise ValueError("seq_len must be >= 8")
        if self.save_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError("save_dtype must be float16, bfloat16 or float32")
