"""ShareGPT's fixed split, `ssd make-data` shards (resumable, settings-checked, teacher rows that
match the target), training on them, and the offline n-alpha acceptance curve."""
import dataclasses
import json
import math

import pytest
import torch

from ssd.models.loader import default_target_path
from ssd.train import sharegpt
from ssd.train.config import DataConfig, TrainDraftConfig
from ssd.train.data import DataDir, feature_layers, load_shards, make_data


def test_sharegpt_split_is_fixed_and_disjoint():
    convs = sharegpt.conversations()
    assert len(convs) == 17_671  # complete conversations before the package's 125 MB cut
    train, held = sharegpt.prompts("train"), sharegpt.prompts("heldout")
    assert train and held
    assert max(p["conversation"] for p in train) < sharegpt.TRAIN_END <= min(p["conversation"] for p in held)
    assert {p["kind"] for p in train} == {"first", "multi"}
    multi = next(p for p in train if p["kind"] == "multi")
    assert [m["role"] for m in multi["messages"]][-3:] == ["user", "assistant", "user"]
    assert sharegpt.prompts("train") == train  # deterministic
    for kind in ("first", "multi"):
        p = next(p for p in train if p["kind"] == kind and p["answer"] is not None)
        conv = [m for m in convs[p["conversation"]]["messages"] if m["role"] != "system"]
        n = len(p["messages"])  # the reply is the conversation's next message, after the prompt's last user turn
        assert conv[:n] == p["messages"] and conv[n] == {"role": "assistant", "content": p["answer"]}
    with pytest.raises(ValueError):
        sharegpt.split("test")


def _cfg(out, split="train", **kw):
    base = dict(out=str(out), split=split, max_tokens=30, gen_tokens=10, shard_prompts=3, gen_batch=3,
                sampled_share=0.4, teacher_topk=4, threads=1, dtype="float32", generated_share=0.2)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    m = make_data(_cfg(root / "sharegpt-train", features=True, max_tokens=31), progress=False)
    held = make_data(_cfg(root / "sharegpt-heldout", split="heldout", max_tokens=20), progress=False)
    return root, m, held


def test_shards_hold_the_targets_own_answers_and_distributions(shards):
    from ssd.models.loader import load_model

    root, m, held = shards
    assert m["tokens"] >= 31 and len(m["shards"]) >= 2 and sum(s["tokens"] for s in m["shards"]) == m["tokens"]
    seqs = load_shards(root / "sharegpt-train")
    assert all(sq["source"] == "generated" or int(sq["source"].split(":")[1]) < sharegpt.TRAIN_END for sq in seqs)
    assert all(int(sq["source"].split(":")[1]) >= sharegpt.TRAIN_END for sq in load_shards(root / "sharegpt-heldout"))
    target, cfg = load_model(default_target_path(), dtype=torch.float32)
    layers = feature_layers(cfg.num_layers)
    assert layers == (2, 15, 27) and m["feature_layers"] == list(layers)
    agree = rows = 0
    for sq in seqs:
        n, p = len(sq["ids"]), sq["prompt_len"]
        assert sq["teacher_idx"].shape == (n - p, 4) and sq["features"].shape == (3, n, cfg.hidden_size)
        if not sq["sampled"]:  # greedy answer: the target's top-1 at each position is the next token
            agree += int((sq["teacher_idx"][:, 0].long() == sq["ids"][p:].long()).sum())
            rows += n - p
    assert rows and agree / rows >= 0.95
    # the features are the residual stream entering those layers, as Hugging Face numbers its hidden
    # states (hidden_states[i] is the input of layer i)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_target_path(), dtype=torch.float32).eval()
    sq = seqs[0]
    with torch.no_grad():
        hs = hf(sq["ids"][None].long(), output_hidden_states=True).hidden_states
    torch.testing.assert_close(sq["features"].float(), torch.stack([hs[i][0] for i in layers]), atol=0.05, rtol=0.02)


def test_make_data_resumes_and_refuses_other_settings(shards, tmp_path):
    out = tmp_path / "d"
    first = make_data(_cfg(out, max_tokens=12), progress=False)
    shard0 = DataDir(out).shard_path(0).read_bytes()
    more = make_data(_cfg(out, max_tokens=40), progress=False)  # continues: earlier shards kept as they are
    assert len(more["shards"]) > len(first["shards"]) and DataDir(out).shard_path(0).read_bytes() == shard0
    assert [s["index"] for s in more["shards"]] == list(range(len(more["shards"])))
    with pytest.raises(ValueError, match="other settings"):
        make_data(_cfg(out, max_tokens=60, teacher_topk=8), progress=False)
    # a directory made before a setting existed continues: the missing setting counts at its default
    m = json.loads(DataDir(out).manifest_path.read_text())
    del m["key"]["first_shard"]
    DataDir(out).write_manifest(m)
    assert len(make_data(_cfg(out, max_tokens=70), progress=False)["shards"]) > len(more["shards"])


def test_make_data_can_start_past_the_shards_an_earlier_run_made(shards, tmp_path):
    from ssd.train.data import prompt_list

    root, m, _ = shards
    cfg = _cfg(tmp_path / "later", first_shard=2, max_tokens=5)
    later = make_data(cfg, progress=False)
    assert [s["index"] for s in later["shards"]] == [2] and later["complete"]
    # shard 2 answers exactly the prompts a directory started at 0 reaches third, none before them
    order = [it["source"] for it in prompt_list(cfg)]
    assert {sq["source"] for sq in load_shards(tmp_path / "later")} <= set(order[6:9])
    earlier = {sq["source"] for sq in load_shards(root / "sharegpt-train")}
    assert earlier <= set(order[:6])
    with pytest.raises(ValueError, match="other settings"):  # one directory never mixes two starts
        make_data(_cfg(tmp_path / "later", max_tokens=40), progress=False)
    with pytest.raises(ValueError, match="past the last shard"):
        make_data(_cfg(tmp_path / "none", first_shard=10**6), progress=False)


def test_dataset_answers_are_the_conversations_own_replies_scored_by_the_target(tmp_path):
    from ssd.models.loader import load_model
    from ssd.tokenizer import Tokenizer
    from ssd.train.data import prompt_list
    from ssd.train.examples import examples_from_shards

    with pytest.raises(ValueError, match="generated-share 0"):  # generated prompts have no reply to keep
        _cfg(tmp_path / "x", answers="dataset", sampled_share=0)
    with pytest.raises(ValueError, match="answers must be"):
        _cfg(tmp_path / "x", answers="teacher")
    cfg = _cfg(tmp_path / "ds", answers="dataset", generated_share=0, sampled_share=0, max_tokens=40, gen_tokens=12)
    m = make_data(cfg, progress=False)
    assert m["tokens"] >= 40 and m["key"]["answers"] == "dataset"
    items = {it["source"]: it for it in prompt_list(cfg)}
    tok = Tokenizer(default_target_path())
    target, tcfg = load_model(default_target_path(), dtype=torch.float32)
    seqs = load_shards(tmp_path / "ds")
    for sq in seqs:
        item, p = items[sq["source"]], sq["prompt_len"]
        ids = sq["ids"].long()
        assert ids[:p].tolist() == tok.apply_chat_template(item["messages"])
        answer = ids[p:].tolist()
        assert 1 <= len(answer) <= 12
        # the reply itself, in the target's tokens, ended by its end-of-turn token when it fits
        text = tok.decode([t for t in answer if t not in tcfg.eos_token_ids])
        assert item["answer"].startswith(text.rstrip()) and text.strip()
        if len(answer) < 12:
            assert answer[-1] in tcfg.eos_token_ids
        # the teacher is the target's own distribution at every answer position
        with torch.no_grad():
            logits = target.forward_full(ids[None])[0, p - 1:len(ids) - 1]
        assert torch.equal(sq["teacher_idx"][:, 0].long(), logits.argmax(-1))
    # not the target's greedy text: kept out of the greedy n-alpha curve, still trained on
    ex = examples_from_shards(seqs, torch.arange(tcfg.vocab_size), tcfg.vocab_size, 64)
    assert ex and not any(e.greedy for e in ex)


def test_dataset_answer_falls_back_to_the_replys_own_ids():
    from ssd.train.data import dataset_answer

    class Tok:  # a template that does not extend the prompt's ids token for token
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return [9, 9] + [len(m["content"]) for m in messages]

        def encode(self, text):
            return [ord(c) for c in text]

    msgs = [{"role": "user", "content": "hi"}]
    assert dataset_answer(Tok(), msgs, "abc", [1, 2], (0, 5), cap=10) == [97, 98, 99, 0]
    assert dataset_answer(Tok(), msgs, "abc", [1, 2], (0, 5), cap=2) == [97, 98]

    class Extends(Tok):  # the usual case: the reply's ids, its end-of-turn token, nothing after it
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return [1, 2] + ([7, 8, 5, 6] if len(messages) > 1 else [])

    assert dataset_answer(Extends(), msgs, "abc", [1, 2], (0, 5), cap=10) == [7, 8, 5]


def test_examples_keep_only_head_tokens_of_the_teacher():
    from ssd.train.examples import collate, examples_from_shards

    seq = {"ids": torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32), "prompt_len": 2, "sampled": False,
           "teacher_idx": torch.tensor([[9, 3, 7], [8, 6, 4], [6, 5, 1]], dtype=torch.int32),
           "teacher_logits": torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]).half()}
    head = torch.tensor([3, 4, 5, 7])  # 9, 8, 6, 1 are outside
    (e,) = examples_from_shards([seq], head, 10, seq_len=16)
    assert e.teacher_from == 1 and e.teacher_valid.tolist() == [True, True, True]
    assert e.teacher_idx[0, :2].tolist() == [0, 3] and e.teacher_logits[0].tolist() == [2.0, 1.0, float("-inf")]
    assert e.teacher_idx[2, 0] == 2 and e.target_top1.tolist() == [9, 8, 6]
    seq["teacher_idx"][1] = torch.tensor([8, 6, 9])  # no head token at all: not trained on
    (e,) = examples_from_shards([seq], head, 10, seq_len=16)
    ids, tl, ti, mask = collate([e])
    assert mask[0].tolist() == [False, True, False, True, False]
    (e,) = examples_from_shards([seq], head, 10, seq_len=4)  # truncation drops the rows past the window
    assert e.teacher_idx.shape[0] == 2 and len(e.ids) == 4
    # a long prompt loses its start, not the answer: 40 prompt tokens, 3 answer tokens, window 36
    long = {**seq, "ids": torch.arange(43, dtype=torch.int32) % 10, "prompt_len": 40}
    (e,) = examples_from_shards([long], head, 10, seq_len=36, min_context=32)
    assert len(e.ids) == 36 and e.prompt_len == 33 and e.teacher_from == 32 and e.teacher_idx.shape[0] == 3
    assert e.ids == (torch.arange(7, 43) % 10).tolist()
    # a long answer too: keep 32 prompt tokens and as much answer as fits
    rows = torch.tensor([[3, 4, 5]] * 20, dtype=torch.int32)
    longer = {**long, "ids": torch.arange(60, dtype=torch.int32) % 10, "teacher_idx": rows,
              "teacher_logits": torch.ones(20, 3).half()}
    (e,) = examples_from_shards([longer], head, 10, seq_len=36, min_context=32)
    assert e.prompt_len == 32 and e.ids[0] == 8 and e.teacher_idx.shape[0] == 4


def test_training_on_shards_writes_a_draft_with_its_curve(shards, tmp_path):
    from ssd.models.draft_dir import load_draft_dir
    from ssd.train.distill import distill_from_data

    root, _, _ = shards
    cfg = TrainDraftConfig(out=str(tmp_path / "draft"), data=str(root / "sharegpt-train"), layers=1, head_vocab=256,
                           steps=4, batch_size=2, seq_len=128, eval_every=2, threads=1, curve_positions=6,
                           save_dtype="float32")
    info = distill_from_data(cfg, default_target_path(), "default")
    assert info["steps"] == 4 and info["eval_sequences"] > 0 and len(info["acceptance_curve"]["alpha"]) == 8
    # most teacher rows name tokens outside a 256-token head: their -inf logits must not poison the loss
    log = [json.loads(line) for line in (tmp_path / "draft" / "train_state" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r) and math.isfinite(info["eval"]["kl"])
    assert info["eval_data"] == str(root / "sharegpt-heldout")
    model = load_draft_dir(tmp_path / "draft", default_target_path())
    assert model.head_ids.numel() == 256 and (tmp_path / "draft" / "acceptance.png").stat().st_size > 0
    assert "n-alpha" in (tmp_path / "draft" / "README.md").read_text()
    with pytest.raises(ValueError, match="held-out"):  # training data used as evaluation data is refused
        distill_from_data(dataclasses.replace(cfg, eval_data=str(root / "sharegpt-train")), default_target_path(), "default")

    # more training for that draft on (here: the same) shards starts from its weights and keeps its head
    more = dataclasses.replace(cfg, out=str(tmp_path / "more"), init_from=str(tmp_path / "draft"), steps=2)
    again = distill_from_data(more, default_target_path(), "default")
    assert json.dumps(again["acceptance_curve_init"]) == json.dumps(info["acceptance_curve"])  # NaN-safe
    assert again["eval_step0"]["agreement"] == pytest.approx(info["eval"]["agreement"], abs=1e-6)
    assert torch.equal(load_draft_dir(tmp_path / "more", default_target_path()).head_ids, model.head_ids)
    card = (tmp_path / "more" / "README.md").read_text()
    assert "| earlier data | `ssd make-data`" in card and "| earlier training | 4 steps" in card
    assert "continued" in card and "answers cut at 10 tokens" in card
    last = max(x["index"] for x in shards[1]["shards"])
    assert f"shards 0–{last} of the fixed prompt order" in card and "seed" not in card
    # a deeper continuation starts from exactly the earlier draft's predictions (new layers add zero)
    grown = distill_from_data(dataclasses.replace(more, out=str(tmp_path / "grown"), layers=2),
                              default_target_path(), "default")
    assert json.dumps(grown["acceptance_curve_init"]) == json.dumps(info["acceptance_curve"])
    assert grown["eval_step0"]["agreement"] == pytest.approx(info["eval"]["agreement"], abs=1e-6)
    assert load_draft_dir(tmp_path / "grown", default_target_path()).cfg.num_layers == 2
    assert "grown from 1 to 2 layers" in (tmp_path / "grown" / "README.md").read_text()
    with pytest.raises(ValueError, match="more than --layers 1"):
        distill_from_data(dataclasses.replace(more, init_from=str(tmp_path / "grown")), default_target_path(), "default")
    with pytest.raises(ValueError, match="init-from"):
        dataclasses.replace(more, head_from=str(tmp_path / "draft"))


def test_training_mixes_several_data_directories(shards, tmp_path):
    import shutil

    from ssd.train.distill import distill_from_data

    root, m, _ = shards
    ds = tmp_path / "sharegpt-train-ds"
    dm = make_data(_cfg(ds, answers="dataset", generated_share=0, sampled_share=0, max_tokens=20, gen_tokens=8),
                   progress=False)
    cfg = TrainDraftConfig(out=str(tmp_path / "mixed"), data=f"{root / 'sharegpt-train'}, {ds}",
                           eval_data=str(root / "sharegpt-heldout"), layers=1, head_vocab=256, steps=2, batch_size=2,
                           seq_len=128, eval_every=2, threads=1, curve_positions=4, save_dtype="float32")
    assert cfg.data_dirs == (str(root / "sharegpt-train"), str(ds))
    info = distill_from_data(cfg, default_target_path(), "default")
    own, replies = info["sources"]
    assert (own["answers"], replies["answers"]) == ("target", "dataset")
    assert (own["train_answer_tokens"], replies["train_answer_tokens"]) == (m["tokens"], dm["tokens"])
    assert info["train_answer_tokens"] == m["tokens"] + dm["tokens"]
    assert info["train_sequences"] == own["train_sequences"] + replies["train_sequences"]
    card = (tmp_path / "mixed" / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| data |")]
    assert len(rows) == 2 and "the target's own answers" in rows[0] and "ShareGPT's own replies" in rows[1]
    assert all("mixed and shuffled" in r for r in rows) and "(as the training data)" not in card
    # a continuation carries both rows into its own card
    more = dataclasses.replace(cfg, out=str(tmp_path / "more"), init_from=str(tmp_path / "mixed"), data=str(ds))
    distill_from_data(more, default_target_path(), "default")
    assert sum(line.startswith("| earlier data |") for line in (tmp_path / "more" / "README.md").read_text().splitlines()) == 2
    # --data-tokens counts across the directories in order: a cap inside the first leaves out the second
    capped = distill_from_data(dataclasses.replace(cfg, out=str(tmp_path / "capped"), data_tokens=1),
                               default_target_path(), "default")
    assert capped["sources"][0]["train_sequences"] == 1 and capped["sources"][1]["train_sequences"] == 0
    with pytest.raises(ValueError, match="twice"):
        dataclasses.replace(cfg, data=f"{ds},{ds}")
    other = tmp_path / "other-target"
    shutil.copytree(ds, other)
    om = json.loads((other / "manifest.json").read_text())
    om["key"]["target"] = "/models/another-model"
    (other / "manifest.json").write_text(json.dumps(om))
    with pytest.raises(ValueError, match="different targets"):
        distill_from_data(dataclasses.replace(cfg, data=f"{ds},{other}"), default_target_path(), "default")
    with pytest.raises(FileNotFoundError, match="missing"):
        distill_from_data(dataclasses.replace(cfg, data=f"{ds},{tmp_path / 'missing'}"), default_target_path(), "default")


def test_bench_can_run_on_held_out_sharegpt_prompts():
    from ssd.benchmarks.engines import SHAREGPT_HELDOUT, load_prompts

    rows = load_prompts(SHAREGPT_HELDOUT, 4)
    held = [p["messages"][0]["content"] for p in sharegpt.prompts("heldout", max_chars=600) if p["kind"] == "first"]
    assert [r["prompt"] for r in rows] == held[:4] and all(r["category"] == "sharegpt" for r in rows)


def test_evaluate_a_shipped_draft_on_held_out_shards(shards, tmp_path):
    from ssd.models.draft import DEFAULT_DRAFT_DIR
    from ssd.train.evaluate import evaluate_draft_dir

    root, _, _ = shards
    out = evaluate_draft_dir(DEFAULT_DRAFT_DIR, default_target_path(), root / "sharegpt-heldout", positions=4)
    assert out["sequences"] > 0 and 0.0 <= out["agreement"] <= 1.0 and len(out["acceptance_curve"]["alpha"]) == 8
    with pytest.raises(ValueError, match="held-out"):
        evaluate_draft_dir(DEFAULT_DRAFT_DIR, default_target_path(), root / "sharegpt-train")
