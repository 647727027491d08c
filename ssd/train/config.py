"""Settings of `ssd train-draft`; the CLI flags are derived from these fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

INIT_LAYERS = ("spread", "first")
DRAFT_KINDS = ("standalone", "feature")


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
    autocast: str = "auto"  # bf16 autocast of the training matmuls: auto (where the CPU has native bf16) | bfloat16 | off
    data: str = ""  # `ssd make-data` shard directories to train on, comma-separated (instead of generated prompts)
    eval_data: str = ""  # held-out shard directory (default: sharegpt-heldout beside --data)
    data_tokens: int = 0  # train on the first N answer tokens of --data, directories in order (0 = all): the data-size curve
    curve_positions: int = 256  # held-out positions of the n-alpha acceptance curve
    kind: str = "standalone"  # standalone: a small Llama | feature: one layer over the target's features (needs --data made with --features)
    ttt_steps: int = 8  # feature drafter: unrolled training-time-test steps (self-fed depth 0..N-1)
    ttt_decay: float = 0.85  # feature drafter: loss weight of step j is ttt_decay**j (normalised)
    feature_init_layer: int = -1  # feature drafter: the target layer its decoder layer starts from (-1 = last)
    head_from: str = ""  # take the head vocabulary (head_token_ids) of this draft directory instead of selecting one from --data
    init_from: str = ""  # continue training this standalone draft directory (its weights and head) on --data; a larger --layers grows it (new layers start as no-ops)

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
        if self.kind not in DRAFT_KINDS:
            raise ValueError(f"kind must be one of {DRAFT_KINDS}")
        if self.ttt_steps < 1 or not 0 < self.ttt_decay <= 1:
            raise ValueError("ttt_steps must be >= 1 and ttt_decay in (0, 1]")
        if self.kind == "feature" and not self.data:
            raise ValueError("--kind feature trains on `ssd make-data --features` shards: pass --data")
        if self.autocast not in ("auto", "bfloat16", "off"):
            raise ValueError("autocast must be auto, bfloat16 or off")
        dirs = self.data_dirs
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"--data names a directory twice: {self.data}")
        if self.kind == "feature" and len(dirs) > 1:
            raise ValueError("--kind feature trains on one `ssd make-data --features` directory")
        if self.init_from and (not self.data or self.kind != "standalone" or self.head_from):
            raise ValueError("--init-from continues a standalone draft on --data shards (its head is kept, so no --head-from)")

    @property
    def data_dirs(self) -> tuple[str, ...]:
        """--data as a list: one or more shard directories, comma-separated, trained on as one
        shuffled set (e.g. dataset replies mixed with the target's own answer openings)."""
        return tuple(d.strip() for d in self.data.split(",") if d.strip())


ANSWER_SOURCES = ("target", "dataset")


@dataclass(frozen=True)
class DataConfig:
    target: str = "default"  # target model dir or "default"
    out: str = ""  # shard directory (default: <cache>/data/<target>/sharegpt-<split>)
    split: str = "train"  # train (ShareGPT 0-14,999) | heldout (15,000 onward; evaluation only)
    max_tokens: int = 3_000_000  # stop once this many answer tokens are stored (a later run may raise it)
    gen_tokens: int = 256  # longest answer
    max_prompt_tokens: int = 768  # longer chat-templated prompts are skipped (counted in the manifest)
    gen_batch: int = 32  # sequences per batched decode step
    shard_prompts: int = 128  # prompts per shard (the unit of resumption)
    sampled_share: float = 0.25  # share of prompts answered by sampling (the rest greedy)
    temperature: float = 0.8  # of the sampled answers
    top_p: float = 0.95
    generated_share: float = 0.15  # train split: share of generated code/math/chat prompts mixed in
    teacher_topk: int = 16  # target distribution kept per answer position
    features: bool = False  # also store the target's hidden states (feature drafters)
    dtype: str = "auto"  # auto | bfloat16 | float32
    threads: int = 2
    seed: int = 0
    first_shard: int = 0  # start at this shard of the fixed prompt order (e.g. past the shards an earlier draft was trained on)
    # target: the target writes every answer (greedy or sampled); dataset: each ShareGPT prompt keeps
    # the conversation's own reply and the target only scores it (one forward per batch, no decoding)
    answers: str = "target"

    def __post_init__(self):
        from ssd.train.sharegpt import SPLITS

        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        if min(self.max_tokens, self.gen_tokens, self.max_prompt_tokens, self.gen_batch, self.shard_prompts,
               self.teacher_topk, self.threads) < 1:
            raise ValueError("max_tokens, gen_tokens, max_prompt_tokens, gen_batch, shard_prompts, teacher_topk "
                             "and threads must be >= 1")
        if not (0.0 <= self.sampled_share <= 1.0 and 0.0 <= self.generated_share < 1.0):
            raise ValueError("sampled_share must be in [0, 1] and generated_share in [0, 1)")
        if self.first_shard < 0:
            raise ValueError("first_shard must be >= 0")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if self.answers not in ANSWER_SOURCES:
            raise ValueError(f"answers must be one of {ANSWER_SOURCES}")
        if self.answers == "dataset" and (self.generated_share > 0 or self.sampled_share > 0):
            raise ValueError("--answers dataset keeps ShareGPT's own replies: generated prompts have none and "
                             "nothing is sampled; pass --generated-share 0 --sampled-share 0")

    def key(self) -> dict:
        """What must match for a directory to be continued (max_tokens may change)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("max_tokens", "out", "threads")}


def config_from_args(cls, ns):
    """cls built from the argparse namespace's matching fields, or None after printing why the
    values are invalid (the command then exits with status 2)."""
    try:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})
    except ValueError as e:
        print(f"error: {e}")
        return None

