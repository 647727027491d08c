"""Sampled traffic at max batch through the production gRPC configuration (the draft server and
the target's draft link exactly as `ssd service` builds them): the speculation cache, with its q
rows, must reach the target. It used to exceed the 64 MiB message limit at batch 8 (75.5 MB of
dense fp32 q rows), so the draft stream died every round and no sampled request ever hit."""
import pytest
import torch

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import ModelPair, SSDEngine
from ssd.engine.protocol import CachedBranches, CacheReply
from ssd.services.common import MAX_MESSAGE_BYTES
from ssd.services.convert import get_q_rows, put_q_rows, reply_to_pb
from ssd.services.protos import pb


def test_compact_q_rows_are_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(4, 1000)
    q[:, torch.randperm(1000, generator=g)[:120]] = torch.rand(4, 120, generator=g)
    q[2, 5] = 0.5  # a column nonzero in one row only
    sp = pb.Speculation(draft_token_ids=[1, 2, 3, 4])  # one q row per draft token
    put_q_rows(sp, q, None, 1000)
    assert len(sp.draft_probs_support) == int((q != 0).any(0).sum())
    assert torch.equal(get_q_rows(sp, 1000), q)
    dense = torch.rand(4, 1000, generator=g)  # a full-support q stays dense
    sp = pb.Speculation(draft_token_ids=[1, 2, 3, 4])  # one q row per draft token
    put_q_rows(sp, dense, None, 1000)
    assert not sp.draft_probs_support and torch.equal(get_q_rows(sp, 1000), dense)
    # q as the draft runner keeps it: over a reduced head whose ids are not 0..Vh-1
    head = torch.randperm(1000, generator=g)[:200]
    qh = torch.rand(4, 200, generator=g)
    qh[:, 7] = 0  # a head token nobody proposes: dropped from the wire
    sp = pb.Speculation(draft_token_ids=[1, 2, 3, 4])  # one q row per draft token
    put_q_rows(sp, qh, head, 1000)
    assert len(sp.draft_probs_support) == 199 and len(sp.draft_probs) == 4 * 199 * 4
    full = torch.zeros(4, 1000)
    full[:, head] = qh
    assert torch.equal(get_q_rows(sp, 1000), full)


def test_a_cache_over_the_message_limit_is_refused_not_sent():
    q = torch.rand(12, 4, 49152)  # dense q rows: 9.4 MB per sequence
    cache = {i: CachedBranches({(0, t): t for t in range(12)}, [[1, 2, 3, 4]] * 12, ("inline", q)) for i in range(8)}
    resp, rows = reply_to_pb(CacheReply(3, cache, 0.1), str, 49152)
    assert resp.cache.abandoned and resp.ByteSize() < MAX_MESSAGE_BYTES
    # the same cache with the default draft's 8192-token support fits easily
    q[..., 8192:] = 0
    resp, _ = reply_to_pb(CacheReply(3, cache, 0.1), str, 49152)
    assert not resp.cache.abandoned and len(resp.cache.items) == 96 and resp.ByteSize() < MAX_MESSAGE_BYTES / 4


@pytest.mark.slow
def test_sampled_max_batch_through_production_grpc_hits_the_cache():
    from ssd.services.draft.server import serve
    from ssd.services.draft_link import GrpcDraftLink

    # every step speculates (gate off): this follows sampled cache builds over gRPC, not whether the
    # gate would find plain decoding faster on this machine
    cfg = EngineConfig(mode="ssd", max_batch=8, max_model_len=512, speculation=SpeculationConfig(gate=False))
    pair = ModelPair.load(cfg, quiet=True)
    server, port = serve(pair.draft_desc, cfg.speculation, max_seqs=32, max_model_len=512)
    try:
        link = GrpcDraftLink(f"127.0.0.1:{port}", k=cfg.speculation.num_speculative_tokens)
        prompts = [pair.tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me fact number {i} about owls."}])
                   for i in range(8)]
        params = [SamplingParams(temperature=0.8, max_tokens=32, seed=i, ignore_eos=True) for i in range(8)]
        with SSDEngine(cfg, pair.target, pair.draft_desc, pair.tokenizer.eos_token_ids, link=link) as eng:
            seqs = eng.generate(prompts, params)
            st = eng.stats
            assert eng.draft_alive, "the draft stream died"
        assert all(len(s.output_ids) == 32 for s in seqs)
        assert st.cache_hit + st.cache_late > 0 and st.num_accepted_tokens > 0
    finally:
        server.stop(0)
