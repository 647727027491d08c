"""What a trained draft directory says about itself: the model card (README.md, with the rows of
every earlier run it continues) and the curves drawn in acceptance.png."""
from __future__ import annotations

import json
from pathlib import Path


from ssd.train.config import TrainDraftConfig
from ssd.train.draft_model import grown_sources



def grown_note(old_layers: int, layers: int, tcfg) -> str:
    if old_layers == layers:
        return ""
    return (f", grown from {old_layers} to {layers} layers: target layers "
            f"{grown_sources(tcfg.num_layers, layers - old_layers)} inserted before its last, output projections zero")


def earlier_training(draft_dir: str) -> list[list[str]]:
    """The data and training rows of a continued draft's model card (and the rows it carried
    from its own predecessors), so the new card keeps the whole history."""
    card = Path(draft_dir) / "README.md"
    rows = []
    for line in (card.read_text().splitlines() if card.exists() else []):
        cells = [c.strip() for c in line.strip().strip("|").split("|", 1)]
        if len(cells) == 2 and cells[0] in ("data", "training", "earlier data", "earlier training"):
            rows.append(["earlier " + cells[0].removeprefix("earlier "), cells[1]])
    return rows or [["earlier training", f"`{draft_dir}` (no model card found)"]]


def plot_curves(path: Path, info: dict, log_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    init = "at init (the draft continued)" if info.get("earlier_training") else "at init (target layers)"
    plot_alpha_curves(a, [(init, info["acceptance_curve_init"]), ("trained", info["acceptance_curve"])],
                      "trained", "n-alpha curve, held-out ShareGPT")
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    steps = [r for r in log if "eval" in r]
    b.plot([r["step"] for r in steps], [r["eval"]["agreement"] for r in steps], marker=".")
    b.set_xlabel("step")
    b.set_ylabel("held-out top-1 agreement")
    b.set_title("training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alpha_curves(a, curves: list[tuple[str, dict]], annotated: str, title: str) -> None:
    """n-alpha curves on axes a; the curve named `annotated` labels each point with the number of
    proposals it rests on (the later points rest on few)."""
    for name, c in curves:
        a.plot(range(len(c["alpha"])), c["alpha"], marker="o", label=f"{name}: {c['mean_accepted']:.2f} tokens/round")
        if name == annotated:
            for n, (y, cnt) in enumerate(zip(c["alpha"], c["counts"])):
                if cnt:
                    a.annotate(str(cnt), (n, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    a.set_xlabel("n (self-fed draft tokens before this one); labels: proposals counted")
    a.set_ylabel("acceptance (greedy, held-out)")
    a.set_ylim(0, 1)
    a.legend(fontsize=7)
    a.set_title(title)


def _shards_note(info: dict) -> str:
    """Which shards of the fixed prompt order the data holds, and its seed when not the default
    (the seed picks which answers are sampled and draws their tokens, so a second pass over the
    same prompts with another seed is other data)."""
    shards = info.get("shards")
    if shards:
        contiguous = shards == list(range(shards[0], shards[-1] + 1))
        where = (f", shards {shards[0]}–{shards[-1]}" if contiguous and len(shards) > 1 else
                 f", shard {shards[0]}" if len(shards) == 1 else f", {len(shards)} shards") + " of the fixed prompt order"
    else:  # a summary written before shards were recorded
        where = f", from shard {info['first_shard']} of the fixed prompt order" if info.get("first_shard") else ""
    return where + (f", seed {info['data_seed']}" if info.get("data_seed") else "")


def _data_row(src: dict, mixed: bool) -> str:
    """One model-card row per --data directory (a summary from before several directories were
    allowed keeps its one source's keys at the top level, as `src` here)."""
    return ((f"| data | `ssd make-data --answers dataset`: ShareGPT's own replies in conversations 0-14,999 (first "
             f"turns and multi-turn contexts), scored by the target ({src['data_dtype']}) position by position"
             if src.get("answers") == "dataset" else
             f"| data | `ssd make-data`: the target's own answers ({src['data_dtype']}) to ShareGPT conversations "
             f"0-14,999 (first turns and multi-turn contexts) and generated code/math/chat prompts")
            + _shards_note(src)
            + (f", answers cut at {src['answer_cap']} tokens" if src.get("answer_cap") else "")
            + f"; {src['train_sequences']} sequences, {src['train_answer_tokens']} answer tokens, made at "
            f"{src['data_tokens_per_s']} tok/s" + ("; mixed and shuffled with the other data rows" if mixed else "") + " |")


def data_model_card(cfg: TrainDraftConfig, info: dict) -> str:
    ev, ev0, c, c0 = info["eval"], info.get("eval_step0") or {}, info["acceptance_curve"], info["acceptance_curve_init"]
    sources = info.get("sources") or [info]
    alpha = " / ".join(f"{x:.2f}" for x in c["alpha"])
    lines = [
        f"# Draft for {info['target']} (distilled by `ssd train-draft --data`)",
        "",
        f"A {cfg.layers}-layer Llama-style draft for speculative decoding of `{info['target']}`. It shares the target's",
        "tokenizer and reads the target's (frozen) embedding at load time; this directory holds only its own layers,",
        f"final norm and a reduced-vocabulary head of {info['head_vocab']} tokens (`head_token_ids`).",
        "",
        "| | |",
        "|---|---|",
        f"| held-out top-1 agreement with the target | **{ev['agreement']:.3f}**"
        + (f" (at init: {ev0['agreement']:.3f})" if ev0 else "") + " |",
        f"| held-out n-alpha (greedy, n = 0..{len(c['alpha']) - 1} self-fed tokens) | {alpha} |",
        f"| expected accepted draft tokens per round of {len(c['alpha'])} | {c['mean_accepted']:.2f} (at init: {c0['mean_accepted']:.2f}) |",
        f"| held-out KL(target ‖ draft) over the head, nats/token | {ev['kl']:.3f} |",
        f"| head vocabulary | {info['head_vocab']} tokens; covers {ev['head_coverage']:.3f} of the held-out target tokens |",
        f"| layers | {cfg.layers}, initialised from {info['init_layers']} |",
        *[f"| {k} | {v} |" for k, v in info.get("earlier_training", [])],
        *[_data_row(src, mixed=len(sources) > 1) for src in sources],
        f"| held-out data | ShareGPT conversations 15,000 onward, answered by the target itself"
        f"{' (as the training data)' if all(x.get('answers', 'target') == 'target' for x in sources) else ''}: "
        f"{info['eval_sequences']} sequences; never trained on |",
        f"| training | {info['steps']} steps of {cfg.batch_size} sequences x <= {cfg.seq_len} tokens, AdamW lr {cfg.lr} "
        f"(warmup, cosine), {info['matmuls']} matmuls, loss KL(top-k target over head || draft) + {cfg.ce_weight} x CE(target top-1)"
        + (", stopped early by the time budget" if info["stopped_early"] else "") + " |",
        f"| wall time | training {info['train_wall_s']:.0f} s, whole run {info['wall_s_this_run']:.0f} s |",
        f"| hardware | {info['cpu_count']} CPU cores, {info['torch_threads']} torch threads, torch {info['torch']}, no GPU |",
        f"| file | model.safetensors, {info['file_bytes'] / 1e6:.1f} MB ({info['save_dtype']}) |",
        "",
        "![held-out acceptance and training curve](acceptance.png)",
        "",
        f"Command: `{info.get('command_line') or 'ssd train-draft --data ...'}`",
        "",
    ]
    return "\n".join(lines)


def model_card(cfg: TrainDraftConfig, info: dict) -> str:
    ev, ev0 = info["eval"], info.get("eval_step0") or {}
    cats = info.get("categories")
    lines = [
        f"# Draft for {info['target']} (distilled by `ssd train-draft`)",
        "",
        f"A {cfg.layers}-layer Llama-style draft for greedy speculative decoding of `{info['target']}`. It shares the",
        "target's tokenizer and reads the target's (frozen) embedding at load time; this directory holds only its",
        f"own layers, final norm and a reduced-vocabulary head of {info['head_vocab']} tokens (`head_token_ids`).",
        "Load with `ssd.models.draft.load_draft({\"path\": <this dir>, \"target_path\": <target dir>})`.",
        "",
        "| | |",
        "|---|---|",
        f"| held-out top-1 agreement with the target (per-token greedy acceptance proxy) | **{ev['agreement']:.3f}**"
        + (f" (at init: {ev0['agreement']:.3f})" if ev0 else "") + " |",
        f"| held-out KL(target ‖ draft) over the head, nats/token | {ev['kl']:.3f}" + (f" (at init: {ev0['kl']:.3f})" if ev0 else "") + " |",
        f"| held-out positions evaluated | {ev['positions']} |",
        f"| head vocabulary | {info['head_vocab']} tokens; covers {ev['head_coverage']:.3f} of the held-out target tokens |",
        f"| layers | {cfg.layers}, initialised from {info['init_layers']} |",
        f"| data | {info['train_prompts']} train + {info['eval_prompts']} held-out generated prompts"
        + (f" ({cats})" if cats else "") + f"; the target's greedy continuations, up to {cfg.gen_tokens} tokens each,"
        f" {info['gen_tokens_total']} generated tokens in {info['gen_seconds']} s; none of ssd/data/bench_prompts.jsonl |",
        f"| training | {info['steps']} steps of {cfg.batch_size} sequences x <= {cfg.seq_len} tokens, AdamW lr {cfg.lr} "
        f"(warmup, cosine), loss KL(top-{cfg.teacher_topk} target over head || draft) + {cfg.ce_weight} x CE(target top-1)"
        + (", stopped early by the time budget" if info["stopped_early"] else "") + " |",
        f"| wall time | training {info['train_wall_s']:.0f} s, whole run {info['wall_s_this_run']:.0f} s |",
        f"| hardware | {info['cpu_count']} CPU cores, {info['torch_threads']} torch threads, torch {info['torch']}, no GPU |",
        f"| file | model.safetensors, {info['file_bytes'] / 1e6:.1f} MB ({info['save_dtype']}) |",
        "",
        f"Command: `{info.get('command_line', 'ssd train-draft ...')}`",
        "",
    ]
    return "\n".join(lines)
