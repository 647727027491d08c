"""`ssd bench --serve`: the real services under concurrent clients. The report's numbers must
agree with each other and with the services' own counters, and greedy output must not depend
on the mode or the concurrency."""
import json

import pytest

from ssd.benchmarks.serving import IN_PROCESS, check_identity, mode_ratios, parse_levels, parse_samplings, percentile
from ssd.cli import main

MAX_TOKENS, PROMPTS, LEVELS, MODES = 6, 2, (1, 2), ("ar", "sd", "ssd")


def test_levels_samplings_and_percentiles():
    assert parse_levels("1,2, 16") == [1, 2, 16]
    for bad in ("", "0,1", "2,2", "1,-4"):
        with pytest.raises(ValueError):
            parse_levels(bad)
    assert parse_samplings("sampled,greedy,seeded") == ["sampled", "greedy", "seeded"]
    with pytest.raises(ValueError):
        parse_samplings("greedy,beam")
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert percentile([5.0], 99) == 5.0


def test_identity_flags_a_differing_output_per_sampling_setting():
    cells = [{"sampling": k, "mode": m, "concurrency": 1, "outputs": [[1, 2], [3]]} for k in ("greedy", "seeded", "sampled")
             for m in MODES]
    cells[2]["outputs"] = [[1, 2], [4]]
    cells[3]["outputs"] = cells[4]["outputs"] = [[7], [8]]  # seeded: its own reference
    cells[5]["outputs"] = [[7], None]  # a failed request is no match
    cells[7]["outputs"] = [[9], [9]]  # unseeded sampling: outputs differ by design, no verdict
    r = {"cells": cells}
    check_identity(r)
    assert [c["identical_to_reference"] for c in r["cells"]] == [True, True, False, True, True, False, None, None, None]
    assert r["identity_reference"] == {"greedy": "ar at concurrency 1", "seeded": "ar at concurrency 1"}


def test_ratios_are_taken_within_a_repeat_then_the_median():
    """Modes run side by side in each repeat: a ratio pairs cells of the same repeat, and the
    report gives the median over repeats and their range (a slow stretch of the machine in one
    repeat must not pair with a quiet one)."""
    tps = {0: {"ar": 10.0, "ssd": 12.0, IN_PROCESS: 12.5}, 1: {"ar": 5.0, "ssd": 7.0, IN_PROCESS: 7.0},
           2: {"ar": 20.0, "ssd": 18.0, IN_PROCESS: 20.0}}
    cells = [{"sampling": "greedy", "concurrency": 1, "repeat": rep, "mode": m, "aggregate_tokens_per_s": v}
             for rep, row in tps.items() for m, v in row.items()]
    (row,) = mode_ratios(cells)
    assert row["ssd/ar"] == pytest.approx(1.2) and row["ssd/ar range"] == pytest.approx([0.9, 1.4])
    assert row[f"ssd/{IN_PROCESS}"] == pytest.approx(0.96) and "ssd/sd" not in row


def test_bench_serve_flags_that_do_not_apply_exit_2(capsys):
    assert main(["bench", "--serve", "--no-hf"]) == 2
    assert "--no-hf" in capsys.readouterr().err
    assert main(["bench", "--serve", "--concurrency", "0"]) == 2
    assert main(["bench", "--serve", "--sampling", "nucleus"]) == 2


@pytest.mark.slow
def test_serving_report_is_consistent(tmp_path, capsys):
    rc = main(["bench", "--serve", "--num-prompts", str(PROMPTS), "--max-tokens", str(MAX_TOKENS), "--ignore-eos",
               "--concurrency", ",".join(map(str, LEVELS)), "--temperature", "0.8", "--seed", "5",
               "--max-batch", "4", "--no-gate", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    kinds = ("greedy", "sampled", "seeded")
    n_cells = len(kinds) * (len(LEVELS) * len(MODES) + 1)  # + the in-process engine at one client
    assert f"[{n_cells}/{n_cells}" in out  # progress, one line per cell
    r = json.loads((tmp_path / "serve.json").read_text())
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    assert r["sampling"]["greedy"]["temperature"] == 0.0 and r["sampling"]["sampled"]["temperature"] == 0.8
    assert r["sampling"]["sampled"]["seed"] is None and r["sampling"]["seeded"]["temperature"] == 0.8
    # one stack for the run (its measured costs carry over, as in a server that has been up a while);
    # a greedy SSD cell waits until earlier cells' speculations have left the index
    assert r["stack_starts"] == 1 and r["index_ttl_s"] > 0
    cells = {(c["sampling"], c["concurrency"], c["mode"]): c for c in r["cells"]}
    assert set(cells) == {(s, c, m) for s in kinds for c in LEVELS for m in MODES} | {(s, 1, IN_PROCESS) for s in kinds}
    for (kind, level, mode), c in cells.items():
        where = (kind, level, mode)
        assert c["errors"] == [] and c["requests"] == PROMPTS, where
        # every request streamed exactly max_tokens (ignore_eos), and its usage says so
        assert c["tokens_per_request"] == [MAX_TOKENS] * PROMPTS and "outputs" not in c, where
        assert c["tokens"] == PROMPTS * MAX_TOKENS and c["tokens_match_usage"], where
        assert c["aggregate_tokens_per_s"] == pytest.approx(c["tokens"] / c["wall_s"])
        assert c["requests_per_s"] == pytest.approx(PROMPTS / c["wall_s"])
        if level == 1:  # one client: the cell's wall is at least the sum of its requests
            assert c["aggregate_tokens_per_s"] <= c["per_request_tokens_per_s"]["mean"] * 1.001, where
        # lossless: greedy output is the same in every mode, alone or beside another request, in
        # the services or in process; so is a seeded sampled one (coupled verification)
        assert c["identical_to_reference"] is (None if kind == "sampled" else True), where
        if mode == IN_PROCESS:  # no gateway: nothing the services count
            continue
        assert 0 < c["ttft_s"]["p50"] <= c["ttft_s"]["p99"] and 0 <= c["itl_s"]["p50"] <= c["itl_s"]["p99"], where
        # the client saw what the gateway recorded: one TTFT per request, as many token gaps
        srv = c["server_counters"]
        assert srv["ttft_count"] == PROMPTS and srv["generation_tokens"] == c["tokens"], where
        assert c["itl_s"]["count"] == srv["itl_count"] == PROMPTS * (MAX_TOKENS - 1), where
        # the requests' own statistics add up to the target's counters over the cell
        st = c["request_stats"]
        for res in ("hit", "late", "miss"):
            assert st[f"cache_{res}"] == srv[f"cache_{res}"], (where, res)
        assert sum(c["speculation_sources"].values()) == srv["num_drafts"] == st["num_drafts"], where
        lookups = st["cache_hit"] + st["cache_late"] + st["cache_miss"]
        if mode == "ar":
            assert st["num_draft_tokens"] == 0 and srv["num_drafts"] == 0 and c["backup_share"] is None, where
            assert st["num_rounds"] == PROMPTS * (MAX_TOKENS - 1) and c["mean_accepted_length"] == 1.0, where
        else:
            # a round commits its accepted tokens + 1 (the last one may be cut at max_tokens)
            assert st["num_rounds"] <= PROMPTS * (MAX_TOKENS - 1) <= st["num_rounds"] + st["num_accepted_tokens"], where
            # --no-gate: every step speculates (one stack serves the run, and the gate's arm would
            # follow this machine's timings from cell to cell); greedy rows always draft, sampled ones
            # where the measured acceptance at their temperature gives a row a token to draft
            assert st["num_drafts"] > 0 if kind == "greedy" else st["num_drafts"] >= 0, where
            assert c["backup_share"] is None if st["num_drafts"] == 0 else 0 <= c["backup_share"] <= 1, where
        if mode == "sd":  # just-in-time drafts only, never the speculation cache
            assert lookups == 0 and c["speculation_sources"]["cache"] == 0, where
        if mode == "ssd" and kind == "greedy":
            assert lookups > 0
            assert c["speculation_sources"]["index"] == 0, where  # no replay of an earlier cell's drafts
        if lookups:
            assert c["cache_hit_rate"] == pytest.approx((st["cache_hit"] + st["cache_late"]) / lookups)
    for row in r["ratios"]:
        tps = {m: cells[(row["sampling"], row["concurrency"], m)]["aggregate_tokens_per_s"] for m in MODES}
        assert row["ssd/ar"] == pytest.approx(tps["ssd"] / tps["ar"])
        if row["concurrency"] == 1:  # the services against the same engine in process
            engine = cells[(row["sampling"], 1, IN_PROCESS)]["aggregate_tokens_per_s"]
            assert row[f"ssd/{IN_PROCESS}"] == pytest.approx(tps["ssd"] / engine)
