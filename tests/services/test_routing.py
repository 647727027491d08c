"""Gateway routing over real sockets: least-loaded target, then a draft on that target's node
(node-local pairing for NCCL P2P), falling back to any draft when none shares the node."""
import pytest

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine
from ssd.models.loader import load_model
from ssd.services.common import make_server
from ssd.services.discovery import Endpoint
from ssd.services.draft.server import DraftService
from ssd.services.gateway.server import Gateway, GenerateError
from ssd.services.protos import pb_grpc
from ssd.services.target.server import EngineLoop, TargetService
from ssd.models.draft import DraftDescription

CFG = EngineConfig(mode="ar", max_batch=4, max_model_len=64, speculation=SpeculationConfig(num_speculative_tokens=2, fan_out_budget=3))


class Fixed:
    """Discovery as Kubernetes would report it: addresses with node names."""

    def __init__(self, targets, drafts):
        self._t, self._d = targets, drafts

    def targets(self):
        return self._t

    def drafts(self):
        return self._d


@pytest.fixture
def cluster(small_pair):
    t_dir, d_dir, _ = small_pair
    target = load_model(t_dir)[0]
    servers, loops, targets, drafts = [], [], [], []
    for node in ("node-a", "node-b"):
        loop = EngineLoop(AREngine(CFG, target, (3,)))
        s = make_server()
        pb_grpc.add_TargetServicer_to_server(TargetService(loop, node=node), s)
        port = s.add_insecure_port("127.0.0.1:0")
        s.start()
        servers.append(s)
        loops.append(loop)
        targets.append(Endpoint(f"127.0.0.1:{port}", node))
        d = make_server()
        pb_grpc.add_DraftServicer_to_server(DraftService(DraftDescription(str(d_dir)), CFG.speculation, 8, 64, node=node), d)
        dport = d.add_insecure_port("127.0.0.1:0")
        d.start()
        servers.append(d)
        drafts.append(Endpoint(f"127.0.0.1:{dport}", node))
    yield targets, drafts, loops
    for s in servers:
        s.stop(0)
    for loop in loops:
        loop.stop()


def test_least_loaded_target_then_draft_on_its_node(cluster):
    targets, drafts, loops = cluster
    # node-a's target is busy: the gateway must pick node-b's target, then node-b's draft
    loops[0].submit([0, 1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
    loops[0].submit([0, 1], SamplingParams(max_tokens=50, ignore_eos=True))
    gw = Gateway(None, Fixed(targets, drafts), "m", 64)
    addr, _, node = gw.pick_target()
    assert (addr, node) == (targets[1].address, "node-b")
    assert gw.pick_draft(node) == drafts[1].address
    assert gw.pick_draft("node-a") == drafts[0].address


def test_no_draft_on_the_node_falls_back_to_any_and_no_target_is_unavailable(cluster):
    targets, drafts, _ = cluster
    gw = Gateway(None, Fixed(targets, drafts[:1]), "m", 64)
    assert gw.pick_draft("node-b") == drafts[0].address
    assert Gateway(None, Fixed(targets, []), "m", 64).pick_draft("node-a") == ""
    dead = Gateway(None, Fixed([Endpoint("127.0.0.1:1", "node-a")], drafts), "m", 64)
    with pytest.raises(GenerateError, match="no target is ready"):
        dead.pick_target()
