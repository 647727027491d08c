"""The SSD engine speaking to a real draft gRPC service over a loopback socket."""
import pytest

from ssd.config import EngineConfig, SamplingParams, SpecConfig
from ssd.engine import AREngine, SSDEngine
from ssd.engine.draft_link import DraftUnavailable
from ssd.models.loader import load_model

pytest.importorskip("grpc")
from ssd.services.draft.server import serve  # noqa: E402
from ssd.services.draft_link import GrpcDraftLink  # noqa: E402

PROMPTS = [[0, 1, 2], [2, 2, 1, 0], [1], [3, 0]]


def _cfg(**spec):
    return EngineConfig(mode="ssd", max_batch=4, max_model_len=64,
                        spec=SpecConfig(num_speculative_tokens=2, fan_out_budget=3, critical_batch_size=100, **spec))


@pytest.fixture
def draft_server(small_pair):
    _, d_dir, _ = small_pair
    server, port = serve({"path": str(d_dir)}, _cfg().spec, max_seqs=8, max_model_len=64)
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
    with SSDEngine(_cfg(), target, {}, (3,), link=link) as eng:
        out = [s.output_ids for s in eng.generate(PROMPTS, params)]
        st = eng.stats
    assert out == ref
    assert eng.draft_alive and st.cache_hit + st.cache_late > 0 and st.n_jit > 0


def test_sampled_over_grpc_carries_q_rows(target, draft_server):
    """Sampling needs the full q rows: they travel inline in the gRPC messages."""
    link = GrpcDraftLink(draft_server[1], k=2)
    with SSDEngine(_cfg(saguaro_c=0.5), target, {}, (3,), link=link) as eng:
        seqs = eng.generate(PROMPTS, [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=i) for i in range(4)])
        assert eng.draft_alive and eng.stats.num_accepted_tokens > 0
    assert all(len(s.output_ids) == 20 for s in seqs)


def test_draft_service_stopped_mid_run_output_unchanged(target, ar_reference, draft_server):
    params, ref = GREEDY, ar_reference
    link = GrpcDraftLink(draft_server[1], k=2)
    with SSDEngine(_cfg(), target, {}, (3,), link=link) as eng:
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
