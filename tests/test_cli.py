import json
import os
import subprocess
import sys

import pytest

from ssd.benchmarks.engines import _add_ratios, _hf_row, _label, load_prompts, thm7_ideal
from ssd.cli import main
from ssd.config import config_args
from ssd.engine.base import EngineStats


def _ssd(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ssd.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_json_is_one_object_with_text_ids_and_stats():
    r = _ssd("generate", "--prompt", "Say hello.", "--max-tokens", "8", "--mode", "ssd", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mode"] == "ssd" and len(out["token_ids"]) <= 8 and out["token_ids"]
    assert isinstance(out["text"], str) and "trained draft" in out["draft"]
    assert out["stats"]["tokens"] == len(out["token_ids"])
    assert {"tokens_per_s", "mean_accepted_length", "cache_hit_rate"} <= set(out["stats"])


@pytest.mark.parametrize("args,msg", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--mode", "fast"], "mode"),
])
def test_generate_bad_flags_exit_2_with_message(args, msg):
    r = _ssd("generate", "--prompt", "hi", *args)
    assert r.returncode == 2 and msg in r.stderr


def test_bench_prompt_file_validation(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "category": "code"}\n\n{"prompt": "b"}\n')
    assert load_prompts(str(f)) == [{"prompt": "a", "category": "code"}, {"prompt": "b", "category": "all"}]
    f.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="expected"):
        load_prompts(str(f))
    f.write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        load_prompts(str(f))
    cats = {p["category"] for p in load_prompts(None)}
    assert cats == {"chat", "code", "math", "summarisation"}


def test_bench_baselines_ratios_and_thread_labels():
    """Every system is compared with AR on the target's threads, AR on all cores, plain-kernel AR
    and HF generate on both thread counts, side by side; labels say the threads."""
    r = {"modes": {"ar": {"tokens_per_s": 10.0}, "ssd": {"tokens_per_s": 15.0}, "ar-all": {"tokens_per_s": 12.0},
                   "ar-plain": {"tokens_per_s": 20.0}},
         "hf": {"hf": {"tokens_per_s": 8.0}, "hf_assisted": {"tokens_per_s": 4.0}, "hf-all": {"tokens_per_s": 16.0}}}
    _add_ratios(r)
    ssd = r["modes"]["ssd"]
    assert ssd["vs"] == pytest.approx({"ar": 1.5, "ar-all": 1.25, "ar-plain": 0.75, "hf": 1.875, "hf-all": 0.9375})
    assert (ssd["speedup_vs_ar"], ssd["speedup_vs_ar_all"], ssd["speedup_vs_plain_ar"]) == pytest.approx((1.5, 1.25, 0.75))
    assert r["hf"]["hf_assisted"]["vs"]["ar-all"] == pytest.approx(4 / 12)
    assert all(r["modes"][b]["vs"][b] == 1.0 for b in ("ar", "ar-all", "ar-plain"))
    assert _label("ar-all", 2, 2) == "AR (all 2 cores)" and _label("ar", 1, 2) == "AR (1 thread)"
    assert _label("sd-all", 2, 2) == "SD (all 2 cores, draft in-process)"
    assert _label("ssd", 1, 2, draft_threads=1) == "SSD (1 thread + draft process 1 thread)"
    from ssd.config import SpeculationConfig

    assert _label("sd", 1, 2, spec=SpeculationConfig(adaptive=True, num_speculative_tokens=6)) == \
        "SD (1 thread, draft in-process, adaptive K ≤ 6)"
    assert _label("ssd", 1, 2, draft_threads=1, spec=SpeculationConfig(adaptive=False)) == "SSD (1 thread + draft process 1 thread)"
    assert _label("ssd", 1, 2, draft_threads=1, spec=SpeculationConfig()) == "SSD (1 thread + draft process 1 thread, adaptive K ≤ 4)"
    assert _label("hf-all", 4, 4, dtype="bfloat16") == "HF generate (bfloat16, all 4 cores)"
    assert _label("hf_assisted", 1, 4, dtype="float32") == "HF assisted (float32, 1 thread)"


def test_thm7_ideal_matches_the_formula():
    st = EngineStats(steps=10, t_verify=1.0, cache_hit=6, cache_late=2, cache_miss=2,
                     tokens_after_hit=24, rounds_after_hit=8, tokens_after_miss=4, rounds_after_miss=2,
                     t_build=1.6, n_build=8, t_jit=0.1, n_jit=2)
    t = thm7_ideal(st)
    p, e_hit, e_miss, t_p, t_b = 0.8, 3.0, 2.0, 2.0, 0.5  # T_p = 0.2 s / 0.1 s, T_b = 0.05 s / 0.1 s
    expect = (p * e_hit + (1 - p) * e_miss) / (p * max(1, t_p) + (1 - p) * (1 + t_b))
    assert t["tokens_per_verify_unit"] == pytest.approx(expect)
    assert t["ideal_decode_tokens_per_s"] == pytest.approx(expect / 0.1)


def test_numerics_flags_parse_and_reach_child_processes(monkeypatch):
    import ssd.cli
    from ssd.config import EngineConfig

    seen = []
    monkeypatch.setattr(ssd.cli, "cmd_generate", lambda ns: seen.append(ssd.cli._configs(ns)[0]) or 0)
    assert ssd.cli.main(["generate", "--prompt", "hi", "--dtype", "bfloat16", "--no-batch-invariant"]) == 0
    assert seen[0].dtype == "bfloat16" and seen[0].batch_invariant is False
    assert ssd.cli.main(["generate", "--prompt", "hi"]) == 0
    assert seen[1].dtype == "auto" and seen[1].batch_invariant is True
    # ssd serve hands the same settings to its three child processes
    cfg = EngineConfig(dtype="bfloat16", batch_invariant=False)
    args = config_args(cfg)
    assert args[args.index("--dtype") + 1] == "bfloat16" and "--no-batch-invariant" in args
    assert "--batch-invariant" in config_args(EngineConfig())


def test_bad_dtype_exits_2_with_message():
    r = _ssd("generate", "--prompt", "hi", "--dtype", "float16")
    assert r.returncode == 2 and "dtype" in r.stderr



def test_bench_ratios_over_repeats_pair_systems_within_a_repeat():
    """With --repeats, a ratio is taken between two systems of the same repeat (the same stretch
    of machine time) and the median reported; it is not the ratio of the two medians."""
    r = {"modes": {"ar": {"tokens_per_s": 8.0, "tokens_per_s_repeats": [10.0, 5.0, 8.0]},
                   "ssd": {"tokens_per_s": 10.0, "tokens_per_s_repeats": [15.0, 10.0, 8.0]}},
         "hf": {"hf": _hf_row([{"tokens": 10, "wall_s": 1.0, "tokens_per_s": 10.0, "outputs": [[1]], "label": "HF",
                                "load_avg_1m_at_start": 0.5},
                               {"tokens": 10, "wall_s": 2.0, "tokens_per_s": 5.0, "outputs": [[1]], "label": "HF",
                                "load_avg_1m_at_start": 0.7},
                               {"tokens": 10, "wall_s": 0.5, "tokens_per_s": 20.0, "outputs": [[1]], "label": "HF",
                                "load_avg_1m_at_start": 0.9}])}}
    hf = r["hf"]["hf"]
    assert hf["tokens_per_s"] == 10.0 and (hf["tokens"], hf["wall_s"]) == (30, 3.5) and "outputs" not in hf
    assert hf["load_avg_1m_per_repeat"] == [0.5, 0.7, 0.9]
    _add_ratios(r)
    ssd = r["modes"]["ssd"]
    assert ssd["vs"]["ar"] == pytest.approx(1.5)  # within repeats: 1.5, 2.0, 1.0 (medians' ratio: 1.25)
    assert ssd["vs_range"]["ar"] == pytest.approx([1.0, 2.0])
    assert r["modes"]["ar"]["vs"]["hf"] == pytest.approx(1.0)  # 1.0, 1.0, 0.4
    assert r["hf"]["hf"]["vs_range"]["ar"] == pytest.approx([1.0, 2.5])
    r["modes"]["ssd"]["tokens_per_s_repeats"] = [15.0, 10.0]
    with pytest.raises(ValueError, match="2 repeats against 3"):
        _add_ratios(r)


def test_bench_repeats_that_cannot_apply_exit_2(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--numerics", "--repeats", "2"]) == 2
    assert "--numerics" in capsys.readouterr().err
    assert main(["bench", "--serve", "--repeats", "0"]) == 2  # --serve repeats its cells, at least once
    assert "--repeats must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_repeats_run_every_system_in_turn(tmp_path, capsys):
    """The real bench on the default pair, two repeats: every system (SD on all cores included)
    ran twice, greedy output equals AR's in every repeat, and the files are written."""
    rc = main(["bench", "--num-prompts", "2", "--max-tokens", "6", "--ignore-eos", "--no-hf", "--repeats", "2",
               "--modes", "ar,sd,ssd", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "repeat 2/2" in out and "over 2 repeats" in out
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["repeats"] == 2
    expected = {"ar", "sd", "ssd", "ar-plain"} | ({"ar-all", "sd-all"} if (os.cpu_count() or 1) > 1 else set())
    assert set(r["modes"]) == expected
    for name, row in r["modes"].items():
        assert len(row["tokens_per_s_repeats"]) == 2 and len(row["load_avg_1m_per_repeat"]) == 2, name
        assert row["tokens_per_s"] == pytest.approx(sum(row["tokens_per_s_repeats"]) / 2), name
        lo, hi = row["vs_range"]["ar"]
        assert lo <= row["vs"]["ar"] <= hi, name
        assert row["tokens"] == 2 * 2 * 6, name  # pooled over both repeats: 2 prompts x 6 tokens each
        if name != "ar-plain":  # plain kernels may flip a bf16 near-tie
            assert row["identical_to_ar"], name
    f = r["forward_ms"]  # the weight-bytes floor of one token beside the measured forward
    assert f["weights_mb_per_token"] > 0 and f["read_gb_per_s"] > 0
    assert f["target_1_over_floor"] == pytest.approx(f["target_1"] / f["floor_ms"])
    assert (tmp_path / "bench.png").stat().st_size > 10_000
