"""Draft distillation on a tiny random target: the training module equals the inference model,
training lowers KL and raises held-out agreement, resume is exact, and the saved draft serves in
the SD engine with output identical to AR greedy."""
import dataclasses
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, SDEngine
from ssd.kv_cache import append_batch
from ssd.models.draft import DraftDescription, load_draft
from ssd.models.loader import load_model
from ssd.train.config import TrainDraftConfig
from ssd.train.distill import distill
from ssd.train.examples import Example, select_head, teacher_targets
from ssd.train.loop import train
from ssd.models.draft_dir import load_draft_dir
from ssd.train.draft_io import load_trainable, save_draft
from ssd.train.draft_model import draft_from_target
from ssd.train.prompts import bench_prompts, build_prompts, split_eval

VOCAB, EOS = 96, 95


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_target")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=5000.0, bos_token_id=0, eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)  # sharper next-token distributions, like a real LM
    hf.save_pretrained(d)
    return d


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(1, EOS) for _ in range(rng.randint(4, 10))] for _ in range(n)]


def _teacher_examples(target, prompts):
    """The target's greedy continuations (12 tokens) of prompts with their teacher rows -> (examples, head)."""
    eng = AREngine(EngineConfig(mode="ar", max_batch=8, max_model_len=64), target, (EOS,))
    outs = [s.output_ids for s in eng.generate(prompts, SamplingParams(max_tokens=12))]
    ex = [Example(p + o, len(p)) for p, o in zip(prompts, outs)]
    head = select_head(outs, VOCAB, 48, (EOS,))
    teacher_targets(target, ex, head, 16)
    return ex, head


def _cfg(out, **kw):
    base = dict(out=str(out), layers=2, head_vocab=48, num_prompts=40, eval_prompts=8, gen_tokens=16, gen_batch=8,
                teacher_topk=16, steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=4, eval_every=20,
                threads=1, save_dtype="float32")
    return TrainDraftConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def distilled(target_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("draft")
    cfg = _cfg(out)
    info = distill(cfg, target_dir, str(target_dir), _prompts(32, 1), _prompts(8, 2), always_ids=(0,))
    return out, cfg, info


def test_training_module_matches_inference_model(target_dir, tmp_path):
    head = torch.tensor(sorted(random.Random(0).sample(range(VOCAB - 1), 40) + [EOS]))
    draft = draft_from_target(target_dir, 2, head)
    with torch.no_grad():  # move away from the target's weights so the check is not trivial
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_draft(tmp_path, draft, target_dir, str(target_dir), dtype=torch.float32)
    model = load_draft_dir(tmp_path, target_dir)
    assert torch.equal(model.head_ids, head) and model.lm_head.weight.shape == (head.numel(), 64)
    ids = torch.tensor([_prompts(1, 3)[0] * 3])  # [1, n]
    n = ids.shape[1]
    with torch.no_grad():
        ref = draft(ids)  # [1, n, Vh]
    got = model(ids, append_batch([0], [0], n), model.new_cache(1, n))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    back = load_trainable(tmp_path, target_dir)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ref, atol=1e-5, rtol=0)


def test_fp16_draft_is_small_and_close(target_dir, tmp_path):
    draft = draft_from_target(target_dir, 2, torch.arange(VOCAB))
    save_draft(tmp_path, draft, target_dir, str(target_dir), dtype=torch.float16)
    names = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "model.safetensors")))
    assert "model.embed_tokens.weight" not in names and "head_token_ids" in names
    ids = torch.tensor([_prompts(1, 4)[0]])
    model = load_draft_dir(tmp_path, target_dir)
    with torch.no_grad():
        ref = draft(ids)
    got = model(ids, append_batch([0], [0], ids.shape[1]), model.new_cache(1, ids.shape[1]))
    torch.testing.assert_close(got, ref, atol=0.05 * float(ref.abs().max()), rtol=0)


def test_training_lowers_kl_and_raises_agreement(distilled):
    _, _, info = distilled
    assert info["steps"] == 40
    assert info["eval"]["kl"] < info["eval_step0"]["kl"]
    assert info["eval"]["agreement"] > info["eval_step0"]["agreement"]


def test_resume_equals_uninterrupted(target_dir, distilled, tmp_path):
    # reuse the fixture's data: examples rebuilt from its train_state
    _, _, _ = distilled
    target, _ = load_model(target_dir)
    prompts = _prompts(16, 5)
    ex, head = _teacher_examples(target, prompts)
    n = 6
    cfg = _cfg(tmp_path, steps=2 * n, eval_every=4, batch_size=4)

    def fresh():
        torch.manual_seed(0)
        return draft_from_target(target_dir, 2, head)

    full = fresh()
    train(full, ex[:12], ex[12:], cfg, tmp_path / "a")
    part = fresh()
    train(part, ex[:12], ex[12:], cfg, tmp_path / "b", stop_after=n)
    resumed = fresh()
    train(resumed, ex[:12], ex[12:], dataclasses.replace(cfg, resume=True), tmp_path / "b")
    for (k, a), (_, b) in zip(full.own_state_dict().items(), resumed.own_state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    assert not torch.equal(part.own_state_dict()["lm_head.weight"], full.own_state_dict()["lm_head.weight"])


def test_head_always_has_eos_and_ties_by_lowest_id():
    head = select_head([[5, 5, 7, 9, 9, 3]], VOCAB, 4, always=(EOS,))
    assert head.tolist() == [3, 5, 9, EOS]  # 5 and 9 twice; then 3 beats 7 (lowest id); EOS forced
    assert select_head([], VOCAB, 3, always=(EOS,)).tolist() == [0, 1, EOS]


def test_prompts_exclude_bench_and_split_holds_out():
    prompts = build_prompts(2000, seed=0)
    texts = [p["prompt"] for p in prompts]
    assert len(set(texts)) == len(texts)
    assert not set(texts) & bench_prompts()
    train_p, eval_p = split_eval(prompts, 50)
    assert len(eval_p) == 50 and len(train_p) == 1950
    assert not {p["prompt"] for p in train_p} & {p["prompt"] for p in eval_p}
    assert build_prompts(100, seed=3) == build_prompts(100, seed=3)


def test_saved_draft_serves_sd_greedy_identical_to_ar(target_dir, distilled):
    out, _, _ = distilled
    assert (out / "README.md").exists() and (out / "config.json").exists()
    target, _ = load_model(target_dir)
    draft = load_draft(DraftDescription(str(out), str(target_dir)))
    assert draft.head_ids is not None and EOS in draft.head_ids.tolist()
    prompts = _prompts(4, 7)
    params = SamplingParams(max_tokens=24)
    ar = AREngine(EngineConfig(mode="ar", max_batch=4, max_model_len=64), target, (EOS,))
    ref = [s.output_ids for s in ar.generate(prompts, params)]
    sd_cfg = EngineConfig(mode="sd", max_batch=4, max_model_len=64, speculation=SpeculationConfig(num_speculative_tokens=4))
    sd = SDEngine(sd_cfg, target, draft, (EOS,))
    assert [s.output_ids for s in sd.generate(prompts, params)] == ref
    assert sd.stats.num_drafts > 0


def test_acceptance_curve_is_one_for_the_target_itself_and_lower_for_a_draft(target_dir):
    from ssd.train.evaluate import acceptance_curve

    target, _ = load_model(target_dir)
    prompts = _prompts(12, 7)
    eng = AREngine(EngineConfig(mode="ar", max_batch=8, max_model_len=64), target, (EOS,))
    outs = [s.output_ids for s in eng.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))]
    ex = [Example(p + o, len(p)) for p, o in zip(prompts, outs)]
    same = draft_from_target(target_dir, 4, torch.arange(VOCAB), "first")  # every target layer: the target
    c = acceptance_curve(same, ex, k=4, positions=40)
    assert c["alpha"] == [1.0] * 4 and c["counts"][0] == 40 and c["mean_accepted"] == 4.0
    weak = draft_from_target(target_dir, 1, torch.arange(VOCAB))
    w = acceptance_curve(weak, ex, k=4, positions=40)
    assert w["alpha"][0] < 1.0 and w["mean_accepted"] < 4.0 and w["counts"][1] < 40


def test_autocast_setting_is_honoured(monkeypatch):
    import ssd.models.precision as precision
    from ssd.train.loop import train_bf16

    assert train_bf16("bfloat16") and not train_bf16("off")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert not train_bf16("auto")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    assert train_bf16("auto")
    with pytest.raises(ValueError):
        _cfg("x", autocast="fp8")


def test_bf16_autocast_really_changes_the_arithmetic(target_dir, tmp_path):
    target, _ = load_model(target_dir)
    prompts = _prompts(8, 9)
    ex, head = _teacher_examples(target, prompts)
    heads = {}
    for mode in ("off", "bfloat16"):
        torch.manual_seed(0)
        draft = draft_from_target(target_dir, 2, head)
        info = train(draft, ex[:6], ex[6:], _cfg(tmp_path, steps=3, eval_every=3, batch_size=4, autocast=mode), tmp_path / mode)
        assert info["matmuls"] == ("fp32" if mode == "off" else "bf16 autocast")
        heads[mode] = draft.own_state_dict()["lm_head.weight"]
        assert torch.isfinite(heads[mode]).all()
    assert not torch.equal(heads["off"], heads["bfloat16"])



def test_agreement_by_answer_position_bins():
    """evaluate() splits agreement by position in the answer (1 = its first token). A fake draft
    that is right exactly on answer positions 1..20 and wrong after: bin 1-16 all right, 17-64
    right on 4 of its positions, 65+ never."""
    from ssd.train.evaluate import evaluate

    V, prompt_len, answer = 8, 5, 70
    ids = [1] * prompt_len + [(i % 5) + 2 for i in range(answer)]

    class Fake(torch.nn.Module):
        head_token_ids = torch.arange(V)

        def forward(self, x):
            logits = torch.zeros(x.shape[0], x.shape[1], V)
            for t in range(x.shape[1] - 1):
                pos = t - prompt_len + 2  # the answer position that position t predicts
                right = x[0, t + 1] if 1 <= pos <= 20 else (x[0, t + 1] + 1) % V
                logits[:, t, right] = 1.0
            return logits

    n = len(ids)
    e = Example(ids=ids, prompt_len=prompt_len, teacher_logits=torch.zeros(n, 2, dtype=torch.float16),
                teacher_idx=torch.zeros(n, 2, dtype=torch.int32))
    out = evaluate(Fake(), [e])
    bins = out["agreement_by_answer_position"]
    assert {k: v["positions"] for k, v in bins.items()} == {"1-16": 16, "17-64": 48, "65+": answer - 64}
    assert bins["1-16"]["agreement"] == 1.0 and bins["17-64"]["agreement"] == pytest.approx(4 / 48)
    assert bins["65+"]["agreement"] == 0.0 and out["agreement"] == pytest.approx(20 / answer)


def test_grown_draft_predicts_exactly_what_it_grew_from(target_dir):
    from ssd.train.draft_model import grow_draft, grown_sources

    small = draft_from_target(target_dir, 2, torch.arange(0, VOCAB, 3))
    with torch.no_grad():  # a draft that is not the target's layers, so a misplaced layer shows
        for p in small.net.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    big = grow_draft(small, target_dir, 4)
    assert big.cfg.num_layers == 4 and grown_sources(4, 2) == [1, 2] and grown_sources(30, 1) == [14]
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        assert torch.equal(big(ids), small(ids))
    sd_small, sd_big = small.own_state_dict(), big.own_state_dict()
    assert torch.equal(sd_big["model.layers.3.self_attn.q_proj.weight"], sd_small["model.layers.1.self_attn.q_proj.weight"])
    assert not sd_big["model.layers.1.mlp.up_proj.weight"].eq(0).all()  # new layers: target weights ...
    assert sd_big["model.layers.2.mlp.down_proj.weight"].eq(0).all()  # ... with zero output projections
    assert sd_big["model.layers.1.self_attn.o_proj.weight"].eq(0).all()
    with pytest.raises(ValueError, match="more layers"):
        grow_draft(big, target_dir, 4)
