"""The three services (gateway, target, draft) in one test process, over real loopback gRPC
sockets and the gateway's HTTP server; shared by the service tests."""
import contextlib

import grpc
import pytest

from ssd.models.draft import describe
from ssd.services.common import CHANNEL_OPTIONS, add_health_and_reflection, make_server
from ssd.services.discovery import StaticDiscovery
from ssd.services.draft.server import DraftService
from ssd.services.gateway.http import serve_http
from ssd.services.gateway.server import Gateway, GatewayService
from ssd.services.protos import pb_grpc
from ssd.services.target.server import EngineLoop, TargetService, build_target_engine


@contextlib.contextmanager
def target_service(engine):
    """A target service over `engine` on a loopback port; yields its address, then stops it."""
    loop = EngineLoop(engine)
    server = make_server()
    pb_grpc.add_TargetServicer_to_server(TargetService(loop), server)
    add_health_and_reflection(server, ["Target"])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
        loop.stop()


class Stack:
    def __init__(self, pair, cfg, max_len):
        self.servers = []
        spec = pair.draft_desc
        self.draft = self._start(lambda s: pb_grpc.add_DraftServicer_to_server(
            DraftService(spec, cfg.speculation, 64, max_len), s), ["Draft"])
        engine = build_target_engine(cfg, pair.target, pair.tokenizer.eos_token_ids, f"127.0.0.1:{self.draft[1]}")
        self.loop = EngineLoop(engine)
        self.target = self._start(lambda s: pb_grpc.add_TargetServicer_to_server(TargetService(self.loop), s), ["Target"])
        self.gw = Gateway(pair.tokenizer, StaticDiscovery([f"127.0.0.1:{self.target[1]}"], [f"127.0.0.1:{self.draft[1]}"]), "smollm2-135m-instruct", max_len, describe(spec))
        self.gateway = self._start(lambda s: pb_grpc.add_GatewayServicer_to_server(GatewayService(self.gw), s), ["Gateway"])
        self.httpd = serve_http(self.gw)
        self.stub = pb_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{self.gateway[1]}", options=CHANNEL_OPTIONS))
        self.target_stub = pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{self.target[1]}"))
        self.http = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _start(self, add, names):
        s = make_server()
        add(s)
        add_health_and_reflection(s, names)
        port = s.add_insecure_port("127.0.0.1:0")
        s.start()
        self.servers.append(s)
        return s, port

    def close(self):
        self.httpd.shutdown()
        for s in reversed(self.servers):
            s.stop(0)
        self.loop.stop()


def stack_fixture(cfg, max_len):
    """A module-scoped `stack` fixture: the three services over the shared `pair`, with cfg."""
    @pytest.fixture(scope="module")
    def stack(pair):
        st = Stack(pair, cfg, max_len)
        yield st
        st.close()

    return stack
