"""The SSD engine speaking to a real draft gRPC service over a loopback socket."""
import pytest

from ssd.config import EngineConfig, RequestOptions, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, SSDEngine
from ssd.engine.draft_link import DraftUnavailable
from ssd.engine.protocol import CachedBranches, CacheKeys, CacheReply, JitReply
from ssd.models.loader import load_model

pytest.importorskip("grpc")
from ssd.services.draft.server import serve  # noqa: E402
from ssd.services.draft_link import GrpcDraftLink  # noqa: E402
from ssd.models.draft import DraftDescription

PROMPTS = [[0, 1, 2], [2, 2, 1, 0], [1], [3, 0]]


def _cfg(**spec):
    """Every step speculates (gate off unless a test asks): these tests follow the draft link's
    rounds; the gate's plain steps, chosen by the machine's timings, are tested in tests/engine."""
    spec.setdefault("gate", False)
    return EngineConfig(mode="ssd", max_batch=4, max_model_len=64,
                        speculation=SpeculationConfig(num_speculative_tokens=2, fan_out_budget=3, critical_batch_size=100, **spec))


@pytest.fixture
def draft_server(small_pair):
    _, d_dir, _ = small_pair
    server, port = serve(DraftDescription(str(d_dir)), _cfg().speculation, max_seqs=8, max_model_len=64)
    yield server, f"127.0.0.1:{port}"
    server.stop(0)


GREEDY = SamplingParams(max_tokens=30, ignore_eos=True)


@pytest.fixture
def target(small_pair):
    return load_model(small_pair[0])[0]


@pytest.fixture
def ar_reference(target):
    return [s.output_ids for s in AREngine(_cfg().replace(mode="ar"), target, (3,)).generate(PROMPTS, GREEDY)]


def test_greedy_over_grpc_identical_to_ar(target, ar_reference, draft_server):
    params, ref = GREEDY, ar_reference
    link = GrpcDraftLink(draft_server[1], k=2)
    with SSDEngine(_cfg(), target, None, (3,), link=link) as eng:
        out = [s.output_ids for s in eng.generate(PROMPTS, params)]
        st = eng.stats
    assert out == ref
    assert eng.draft_alive and st.cache_hit + st.cache_late > 0 and st.n_jit > 0


def test_adaptive_over_grpc_identical_to_ar(target, small_pair, monkeypatch):
    """Adaptive speculation over the service links: per-sequence JIT lengths and the round's
    fan-out budget reach each of two draft services in SpeculateRequest (no p_min here, so every
    short speculation was sized by the target), and the output is still AR's. The lengths are
    pinned per sequence (1..4) so every one travels; the policy itself is tested in
    tests/speculation/test_adaptive.py."""
    from ssd.services.multi_draft import MultiDraftLink
    from ssd.speculation.adaptive import AdaptiveK

    monkeypatch.setattr(AdaptiveK, "k_for", lambda self, seq_id: 1 + seq_id % 4)
    monkeypatch.setattr(AdaptiveK, "k_for_cached", lambda self, seq_id, length=None: 2 + seq_id % 3)  # 2, 3 or all 4

    cfg = EngineConfig(mode="ssd", max_batch=4, max_model_len=80,
                       speculation=SpeculationConfig(num_speculative_tokens=4, fan_out_budget=8, saguaro_c=0.5,
                                                     adaptive=True, cut_cached=True))
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    ref = [s.output_ids for s in AREngine(cfg.replace(mode="ar"), target, (3,)).generate(PROMPTS, params)]
    servers = [serve(DraftDescription(str(small_pair[1])), cfg.speculation, max_seqs=8, max_model_len=80) for _ in range(2)]
    sent, got = [], []

    class Recording(GrpcDraftLink):
        def send(self, msg):
            sent.append(msg)
            super().send(msg)

        def recv(self, timeout=None):
            got.append(super().recv(timeout))
            return got[-1]

    try:
        link = MultiDraftLink(lambda a: Recording(a, k=4), [f"127.0.0.1:{p}" for _, p in servers])
        with SSDEngine(cfg, target, None, (3,), link=link) as eng:
            out = [s.output_ids for s in eng.generate(PROMPTS, params)]
            st = eng.stats
    finally:
        for s, _ in servers:
            s.stop(0)
    assert out == ref and eng.draft_alive and st.n_jit > 0
    asked = {(m.round_id, i): k for m in sent if getattr(m, "jit_k", None) for i, k in m.jit_k.items()}
    assert set(asked.values()) == {1, 2, 3, 4} and any(getattr(m, "fan_out_budget", 0) for m in sent)
    # each draft drafted exactly the length it was asked for (p_min is off)
    jit = {(r.round_id, i): len(sp.token_ids) for r in got if isinstance(r, JitReply) for i, sp in r.speculations.items()}
    assert all(jit[key] == k for key, k in asked.items() if key in jit) and set(asked) <= set(jit)
    # a cut cached speculation: the draft was told, and its next cache covers only outcomes of that prefix
    cut = {(m.round_id, i): k for m in sent if getattr(m, "hit_k", None) for i, k in m.hit_k.items()}
    assert cut and set(cut.values()) <= {2, 3} and st.cut_draft_tokens > 0
    keys = {(r.round_id, i): ks for r in got if isinstance(r, CacheKeys) for i, ks in r.keys.items()}
    assert all(max(k for k, _ in keys[key]) <= m for key, m in cut.items() if keys.get(key))
    assert any(max(k for k, _ in ks) == 4 for ks in keys.values())  # uncut ones still reach depth K


def test_sampled_over_grpc_carries_q_rows(target, draft_server):
    """Sampling needs the full q rows: they travel inline in the gRPC messages."""
    link = GrpcDraftLink(draft_server[1], k=2)
    with SSDEngine(_cfg(saguaro_c=0.5), target, None, (3,), link=link) as eng:
        seqs = eng.generate(PROMPTS, [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=i) for i in range(4)])
        assert eng.draft_alive and eng.stats.num_accepted_tokens > 0
    assert all(len(s.output_ids) == 20 for s in seqs)


def test_draft_service_stopped_mid_run_output_unchanged(target, ar_reference, draft_server):
    params, ref = GREEDY, ar_reference
    link = GrpcDraftLink(draft_server[1], k=2)
    with SSDEngine(_cfg(), target, None, (3,), link=link) as eng:
        seqs = [eng.add_request(p, params) for p in PROMPTS]
        for _ in range(3):
            eng.step()
        draft_server[0].stop(0)
        while eng.has_unfinished():
            eng.step()
        assert not eng.draft_alive
    assert [s.output_ids for s in seqs] == ref


def test_unreachable_draft_is_a_clear_error():
    with pytest.raises(DraftUnavailable, match="unreachable"):
        GrpcDraftLink("127.0.0.1:1", k=2, timeout=1.0)


def test_malformed_q_rows_lose_the_draft_not_the_requests(target, draft_server, monkeypatch):
    """A draft whose q rows do not match its tokens is dropped like a broken stream: every
    request still finishes, on the backup."""
    from ssd.services import convert

    put = convert.put_q_rows

    def short(sp, q, support, vocab_size):
        put(sp, q, support, vocab_size)
        sp.draft_probs = sp.draft_probs[:-4]

    monkeypatch.setattr(convert, "put_q_rows", short)  # the draft server runs in this process
    with SSDEngine(_cfg(), target, None, (3,), link=GrpcDraftLink(draft_server[1], k=2)) as eng:
        seqs = eng.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True))
        assert not eng.draft_alive
    assert all(len(s.output_ids) == 20 and s.error is None for s in seqs)


# ---- tensor channel ---------------------------------------------------------------------------
def test_tensor_channel_carries_q_rows_exactly():
    """reply -> (response, rows) -> gloo channel -> reply: the q rows arrive bit for bit."""
    import threading

    import torch

    from ssd.services import convert
    from ssd.services.tensor_channel import TensorChannel

    port, fut = TensorChannel.listen("gloo", host="127.0.0.1")
    target_side = {}
    t = threading.Thread(target=lambda: target_side.setdefault("ch", TensorChannel.connect("127.0.0.1", port, "gloo")))
    t.start()
    draft_ch = fut.result(timeout=30)
    t.join()
    V = 40
    head = torch.tensor([3, 9, 17, 30, 31])  # the draft head's token ids
    q = torch.rand(3, 2, 5)  # [branches, K, Vh], as the draft runner keeps it
    q[..., 2] = 0  # token 17: never proposed, left off the wire
    msg = CacheReply(5, {1: CachedBranches({(0, 4): 0, (1, 2): 1, (2, 6): 2}, [[1, 2], [3, 4], [5, 6]], ("inline", q))}, 0.01)
    resp, rows = convert.reply_to_pb(msg, str, V, head, channel=True, k=2)
    assert rows.shape == (3, 2, 4) and resp.channel_rows == 3 and not resp.cache.items[0].draft_probs
    assert list(resp.channel_support) == [3, 9, 30, 31]
    sender = threading.Thread(target=draft_ch.send, args=(rows,))
    sender.start()
    got = target_side["ch"].recv((resp.channel_rows, 2, len(resp.channel_support)))
    sender.join()
    back = convert.reply_from_pb(resp, 2, V, got)
    full = torch.zeros(3, 2, V)
    full[..., head] = q
    assert torch.equal(back.entries[1].q_ref[1], full) and back.entries[1].token_ids == [[1, 2], [3, 4], [5, 6]]
    assert target_side["ch"].received_bytes == 3 * 2 * 4 * 4
    draft_ch.close()
    target_side["ch"].close()


def test_bad_tensor_channel_backend_is_invalid_argument(draft_server):
    import grpc

    from ssd.services.protos import pb, pb_grpc

    stub = pb_grpc.DraftStub(grpc.insecure_channel(draft_server[1]))
    with pytest.raises(grpc.RpcError) as e:
        stub.OpenChannel(pb.OpenChannelRequest(backend="carrier-pigeon"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "backend" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # no GPU draft here: NCCL is refused, not hung
        stub.OpenChannel(pb.OpenChannelRequest(backend="nccl"), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---- several drafts per target, several targets per draft ---------------------------------------
@pytest.fixture
def two_drafts(small_pair):
    _, d_dir, _ = small_pair
    servers = [serve(DraftDescription(str(d_dir)), _cfg().speculation, max_seqs=8, max_model_len=64) for _ in range(2)]
    yield [(s, f"127.0.0.1:{p}") for s, p in servers]
    for s, _ in servers:
        s.stop(0)


def _multi(addrs, **kw):
    from ssd.services.multi_draft import MultiDraftLink

    return MultiDraftLink(lambda a: GrpcDraftLink(a, k=2, **kw), addrs)


def test_two_drafts_spread_sequences_and_survive_losing_one(target, ar_reference, two_drafts):
    link = _multi([a for _, a in two_drafts])
    with SSDEngine(_cfg(), target, None, (3,), link=link) as eng:
        seqs = [eng.add_request(p, GREEDY) for p in PROMPTS]
        eng.step()
        eng.step()
        assert sorted(link.load().values()) == [2, 2]  # least loaded placement
        two_drafts[0][0].stop(0)  # one draft dies; its sequences move to the other
        while eng.has_unfinished():
            eng.step()
        assert eng.draft_alive and list(link.links) == [two_drafts[1][1]]
        assert eng.stats.cache_hit + eng.stats.cache_late > 0
    assert [s.output_ids for s in seqs] == ar_reference


def test_sequence_goes_to_the_draft_the_gateway_named(target, ar_reference, two_drafts):
    import time

    a, b = (addr for _, addr in two_drafts)
    link = _multi([a])  # b is joined on demand, in the background
    with SSDEngine(_cfg(), target, None, (3,), link=link) as eng:
        s1 = eng.add_request(PROMPTS[0], GREEDY, RequestOptions(draft=b))
        eng.step()
        assert link.owner[s1.seq_id] == a  # not connected to b yet: no step waits for the join
        deadline = time.time() + 30
        while b not in link.links and time.time() < deadline:
            eng.step()
            time.sleep(0.02)
        s2 = eng.add_request(PROMPTS[1], GREEDY, RequestOptions(draft=b))
        s3 = eng.add_request(PROMPTS[2], GREEDY)
        eng.step()
        assert link.owner[s2.seq_id] == b and link.owner[s3.seq_id] == a
        while eng.has_unfinished():
            eng.step()
    assert [s2.output_ids, s3.output_ids] == ar_reference[1:3]


def test_two_targets_share_one_draft(target, ar_reference, draft_server):
    import threading

    out = {}

    def run(name):
        with SSDEngine(_cfg(), target, None, (3,), link=GrpcDraftLink(draft_server[1], k=2)) as eng:
            out[name] = [s.output_ids for s in eng.generate(PROMPTS, GREEDY)]

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert out == {"a": ar_reference, "b": ar_reference}


def test_a_shared_draft_does_not_keep_an_adaptive_targets_budget(target, ar_reference, draft_server, monkeypatch):
    """An adaptive target shrinks the fan-out budget of its rounds; a plain target on the same
    draft afterwards gets the draft's configured budget again (3 branches per sequence)."""
    import ssd.engine.ssd_engine as ssd_engine

    monkeypatch.setattr(ssd_engine, "next_budget", lambda budget, *a, **kw: 1)
    with SSDEngine(_cfg(adaptive=True), target, None, (3,), link=GrpcDraftLink(draft_server[1], k=2)) as eng:
        eng.generate(PROMPTS, GREEDY)
        assert eng.budget == 1
    keys = []

    class Recording(GrpcDraftLink):
        def recv(self, timeout=None):
            msg = super().recv(timeout)
            if isinstance(msg, CacheKeys):
                keys.extend(len(ks) for ks in msg.keys.values())
            return msg

    with SSDEngine(_cfg(), target, None, (3,), link=Recording(draft_server[1], k=2)) as eng:
        assert [s.output_ids for s in eng.generate(PROMPTS, GREEDY)] == ar_reference
    assert keys and max(keys) == 3


@pytest.mark.parametrize("adaptive", [False, True])
def test_sampled_over_gloo_with_two_drafts_matches_target_distribution(small_pair, two_drafts, adaptive):
    """Lossless sampling end to end over the services' transport: q rows on a gloo tensor
    channel, sequences spread over two draft services (chi-square, as in the engine tests).
    Adaptive: JIT speculations of varied length, their q rows padded on the channel and cut back."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("lossless", Path(__file__).parent.parent / "engine" / "test_sampling_lossless.py")
    lossless = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lossless)
    ALPHA, SAMPLINGS, chi_square_pvalue = lossless.ALPHA, lossless.SAMPLINGS, lossless.chi_square_pvalue
    exact_distribution, params_list, run, big_cfg = lossless.exact_distribution, lossless.params_list, lossless.run, lossless._cfg

    t_dir, d_dir, hf = small_pair
    tgt = load_model(t_dir)[0]
    cfg = big_cfg(saguaro_c=0.5, critical_batch_size=1000)
    if adaptive:
        cfg = big_cfg(saguaro_c=0.5, adaptive=True, p_min=0.6).replace(max_batch=8)  # small batches: JIT pays too
    servers = [serve(DraftDescription(str(d_dir)), cfg.speculation, max_seqs=128, max_model_len=32) for _ in range(2)]
    try:
        link = _multi([f"127.0.0.1:{p}" for _, p in servers], tensor_channel="gloo")
        assert all(l.info.tensor_channel == "gloo" for l in link.links.values())
        with SSDEngine(cfg, tgt, None, (3,), link=link) as eng:
            samples = run(eng, params_list(SAMPLINGS["t1"]))
            st = eng.stats
        assert all(l.tensors.received_bytes > 0 for l in link.links.values())
        assert st.cache_hit + st.cache_late > 100 and st.n_jit > 0
        if adaptive:  # some speculations shorter than K (p_min on the drafts; how many follows timings)
            assert st.num_draft_tokens < 2 * st.num_drafts
        assert chi_square_pvalue(samples, exact_distribution(hf, SAMPLINGS["t1"])) > ALPHA
    finally:
        for s, _ in servers:
            s.stop(0)


def test_draft_restarted_after_loss_takes_over_again(target, ar_reference, small_pair):
    """Every draft lost -> the n-gram backup; the draft pod comes back on its address -> the
    engine re-adds its sequences there and speculates again. Output stays identical."""
    _, d_dir, _ = small_pair
    server, port = serve(DraftDescription(str(d_dir)), _cfg().speculation, max_seqs=8, max_model_len=64)
    addr = f"127.0.0.1:{port}"
    link = _multi([addr])
    long = SamplingParams(max_tokens=100, ignore_eos=True)
    ref = [s.output_ids for s in AREngine(_cfg().replace(mode="ar"), target, (3,)).generate(PROMPTS, long)]
    with SSDEngine(_cfg(), target, None, (3,), link=link) as eng:
        link.revive_every_s = 0.1
        seqs = [eng.add_request(p, long) for p in PROMPTS]
        eng.step()
        server.stop(0).wait()
        for _ in range(3):
            eng.step()
        assert not eng.draft_alive
        lost_hits = eng.stats.cache_hit + eng.stats.cache_late
        server, _ = serve(DraftDescription(str(d_dir)), _cfg().speculation, max_seqs=8, max_model_len=64, address=addr)
        import time

        deadline = time.time() + 30
        while not eng.draft_alive and eng.has_unfinished() and time.time() < deadline:
            eng.step()  # never blocks on the reconnect: it runs in the background
            time.sleep(0.05)
        assert eng.draft_alive and eng.has_unfinished()
        while eng.has_unfinished():
            eng.step()
        assert eng.stats.cache_hit + eng.stats.cache_late > lost_hits  # speculating from its caches again
    server.stop(0)
    assert [s.output_ids for s in seqs] == ref


def test_draft_dying_between_keys_and_cache_with_another_draft_alive(target, two_drafts):
    """All of a round's sequences sit on one draft (node-local routing makes that normal); it
    dies after announcing its keys and before its cache. The other draft is still up: the
    sequences move there and the output is unchanged (the merged cache must not read as an
    abandoned one)."""
    a, b = (addr for _, addr in two_drafts)

    class DiesBeforeCache(GrpcDraftLink):
        armed = False

        def recv(self, timeout=None):
            msg = super().recv(timeout)
            if self.armed and isinstance(msg, CacheReply) and msg.entries is not None:
                self.armed = False
                raise DraftUnavailable("draft stream ended (pod killed after keys, before cache)")
            return msg

    from ssd.services.multi_draft import MultiDraftLink

    link = MultiDraftLink(lambda addr: (DiesBeforeCache if addr == a else GrpcDraftLink)(addr, k=2), [a, b])
    prompts = PROMPTS[:2]
    ref = [s.output_ids for s in AREngine(_cfg().replace(mode="ar"), target, (3,)).generate(prompts, GREEDY)]
    with SSDEngine(_cfg(), target, None, (3,), link=link) as eng:
        seqs = [eng.add_request(p, GREEDY, RequestOptions(draft=a)) for p in prompts]
        eng.step()
        eng.step()
        assert set(link.owner.values()) == {a}
        link.links[a].armed = True
        while eng.has_unfinished():
            eng.step()
        assert eng.draft_alive and list(link.links) == [b]
    assert [s.output_ids for s in seqs] == ref


def test_a_full_draft_refuses_only_the_sequences_it_has_no_room_for(target, ar_reference, small_pair):
    _, d_dir, _ = small_pair
    server, port = serve(DraftDescription(str(d_dir)), _cfg().speculation, max_seqs=2, max_model_len=64)
    try:
        with SSDEngine(_cfg(), target, None, (3,), link=GrpcDraftLink(f"127.0.0.1:{port}", k=2)) as eng:
            out = [s.output_ids for s in eng.generate(PROMPTS, GREEDY)]  # 4 sequences, room for 2
            assert eng.draft_alive and eng.stats.n_backup > 0 and eng.stats.cache_hit + eng.stats.cache_late > 0
    finally:
        server.stop(0)
    assert out == ar_reference


def test_idle_draft_stream_survives_keepalive_pings(target, small_pair, monkeypatch):
    """The target pings its draft streams (to notice a vanished peer); the draft must accept
    pings that often or it answers GOAWAY "too_many_pings" and the stream dies while idle."""
    import time

    monkeypatch.setenv("SSD_GRPC_KEEPALIVE_MS", "500")
    _, d_dir, _ = small_pair
    server, port = serve(DraftDescription(str(d_dir)), _cfg().speculation, max_seqs=8, max_model_len=64)
    try:
        with SSDEngine(_cfg(), target, None, (3,), link=GrpcDraftLink(f"127.0.0.1:{port}", k=2)) as eng:
            eng.generate(PROMPTS[:1], SamplingParams(max_tokens=8, ignore_eos=True))
            time.sleep(4)  # ~8 pings on an idle stream
            eng.generate(PROMPTS[:1], SamplingParams(max_tokens=8, ignore_eos=True))
            assert eng.draft_alive, eng.draft_error
    finally:
        server.stop(0)


def test_feature_drafter_over_grpc_and_rehomed_identical_to_ar(target, ar_reference, small_pair, small_feature_draft,
                                                               caplog):
    """A feature drafter as a draft service: the target's features travel with SequenceSetup and
    Outcome; when one of two drafts dies, its sequences move to the other with their features."""
    desc = DraftDescription(str(small_feature_draft), str(small_pair[0]))
    servers = [serve(desc, _cfg().speculation, max_seqs=8, max_model_len=64) for _ in range(2)]
    try:
        link = _multi([f"127.0.0.1:{p}" for _, p in servers])
        assert link.info.feature_layers == (0, 1)
        with SSDEngine(_cfg(), target, None, (3,), link=link) as eng:
            assert eng.target.capture == (0, 1)
            seqs = [eng.add_request(p, GREEDY) for p in PROMPTS]
            for _ in range(3):
                eng.step()
            servers[0][0].stop(0)
            while eng.has_unfinished():
                eng.step()
            assert eng.draft_alive, eng.draft_error
            assert eng.stats.cache_hit + eng.stats.cache_late > 0 and eng.stats.num_accepted_tokens > 0
        assert [s.output_ids for s in seqs] == ar_reference
        assert "refuses" not in caplog.text  # the moved sequences came with their features
    finally:
        for s, _ in servers:
            s.stop(0)


def test_draft_load_returns_to_zero_when_the_target_is_idle(target, draft_server):
    """Finished sequences are released to the draft at once, not with a next round that an idle
    target never runs: autoscaling and dashboards see the draft idle."""
    import time

    from ssd.services.protos import pb, pb_grpc
    from ssd.services.target.server import EngineLoop

    import grpc

    link = GrpcDraftLink(draft_server[1], k=2)
    loop = EngineLoop(SSDEngine(_cfg(), target, None, (3,), link=link))
    stub = pb_grpc.DraftStub(grpc.insecure_channel(draft_server[1]))
    try:
        streams = [loop.submit(p, GREEDY)[1] for p in PROMPTS]
        for q in streams:
            while (item := q.get(timeout=60)) is not None and item[1] is None:
                pass
        deadline = time.monotonic() + 10
        while stub.Load(pb.LoadRequest(), timeout=5).sequences and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.Load(pb.LoadRequest(), timeout=5).sequences == 0
    finally:
        loop.stop()
