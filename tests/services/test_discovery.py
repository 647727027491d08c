"""Pod discovery through the Kubernetes API: the real ``kubernetes`` client, over a real socket,
against a small in-process emulator of the discovery.k8s.io/v1 EndpointSlice API (list with
label selectors, chunked watch streams with resourceVersions, 410 Gone after compaction,
streams the server ends or drops, failing requests)."""
from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

kubernetes = pytest.importorskip("kubernetes")

from ssd.services import discovery as disc_mod  # noqa: E402
from ssd.services.discovery import Endpoint, KubernetesDiscovery, StaticDiscovery, endpoints_of_slice, from_args  # noqa: E402
from ssd.models.draft import DraftDescription  # noqa: E402

NS = "ssd"
TARGET_SVC, DRAFT_SVC = "ssd-target", "ssd-draft"
WAIT = 5.0
_PATH = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices$")


# ------------------------------------------------------------------------------------------------
# The emulator


class ApiEmulator:
    """An in-memory EndpointSlice store served over HTTP the way kube-apiserver serves it."""

    def __init__(self):
        self.cond = threading.Condition()
        self.rv = 1000
        self.objects: dict[tuple[str, str], dict] = {}
        self.history: list[tuple[int, str, dict]] = []   # (resourceVersion, type, object)
        self.floor = 0              # a watch from a resourceVersion below this gets 410 Gone
        self.gone_as_status = False  # 410 as an HTTP status instead of an ERROR event
        self.generation = 0         # bumped to end every open watch
        self.abort = False          # ...by dropping the connection instead of ending the stream
        self.gate = True            # False: new watch requests wait
        self.fail_next = 0          # answer this many requests with 500
        self.requests: list[tuple[str, dict]] = []   # ("list" | "watch", query)
        self.open_watches = 0
        self.open_by_generation: dict[int, int] = {}
        self.closing = False
        emu = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                emu._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    # -- test-side controls ------------------------------------------------------------------

    def put(self, obj: dict) -> None:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", NS)
        key = (meta["namespace"], meta["name"])
        with self.cond:
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            etype = "MODIFIED" if key in self.objects else "ADDED"
            self.objects[key] = obj
            self.history.append((self.rv, etype, copy.deepcopy(obj)))
            self.cond.notify_all()

    def delete(self, name: str, namespace: str = NS) -> None:
        with self.cond:
            obj = self.objects.pop((namespace, name))
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append((self.rv, "DELETED", obj))
            self.cond.notify_all()

    def end_watches(self, abort: bool = False, timeout: float = WAIT) -> None:
        """End every open watch stream and return once they are all closed."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.abort = abort
            old = self.generation
            self.generation += 1
            self.cond.notify_all()
            while self.open_by_generation.get(old, 0) > 0 and time.monotonic() < deadline:
                self.cond.wait(0.05)
            assert self.open_by_generation.get(old, 0) == 0, "watch streams did not end"

    def compact(self) -> None:
        """Forget the history: watches from any resourceVersion before now get 410 Gone."""
        with self.cond:
            self.floor = self.rv
            self.history.clear()

    def set_gate(self, open_: bool) -> None:
        with self.cond:
            self.gate = open_
            self.cond.notify_all()

    def count(self, kind: str, service: str | None = None) -> int:
        with self.cond:
            return sum(1 for k, q in self.requests
                       if k == kind and (service is None or q.get("labelSelector", "").endswith("=" + service)))

    def wait_watching(self, n: int, timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.open_watches < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- serving ---------------------------------------------------------------------------

    @staticmethod
    def _selected(obj: dict, ns: str, selector: str) -> bool:
        meta = obj.get("metadata", {})
        if meta.get("namespace") != ns:
            return False
        labels = meta.get("labels") or {}
        for term in filter(None, (t.strip() for t in selector.split(","))):
            k, _, v = term.replace("==", "=").partition("=")
            if labels.get(k) != v:
                return False
        return True

    def _send_json(self, h, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "code": code, "reason": reason, "message": message}

    def _serve(self, h) -> None:
        url = urlsplit(h.path)
        m = _PATH.match(url.path)
        if not m:
            return self._send_json(h, 404, self._status(404, "NotFound", f"no route {url.path}"))
        ns = m.group(1)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        watching = q.get("watch") in ("true", "1")
        selector = q.get("labelSelector", "")
        with self.cond:
            self.requests.append(("watch" if watching else "list", q))
            if self.fail_next > 0:
                self.fail_next -= 1
                fail = True
            else:
                fail = False
        if fail:
            return self._send_json(h, 500, self._status(500, "InternalError", "injected failure"))
        if not watching:
            with self.cond:
                items = [copy.deepcopy(o) for o in self.objects.values() if self._selected(o, ns, selector)]
                rv = self.rv
            return self._send_json(h, 200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                            "metadata": {"resourceVersion": str(rv)}, "items": items})
        self._serve_watch(h, ns, selector, q)

    def _serve_watch(self, h, ns: str, selector: str, q: dict) -> None:
        with self.cond:
            while not self.gate and not self.closing:
                self.cond.wait(0.5)
            since = q.get("resourceVersion")
            gone = since not in (None, "", "0") and int(since) < self.floor
        if gone and self.gone_as_status:
            return self._send_json(h, 410, self._status(410, "Expired", "too old resource version"))
        h.close_connection = True
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(event: dict) -> None:
            data = json.dumps(event).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        if gone:
            send({"type": "ERROR", "object": self._status(410, "Expired", f"too old resource version: {since}")})
            h.wfile.write(b"0\r\n\r\n")
            return
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 3600)
        with self.cond:
            generation = self.generation
            if since in (None, "", "0"):   # no resourceVersion: synthetic ADDED for the current state
                pending = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for o in self.objects.values() if self._selected(o, ns, selector)]
                cursor = self.rv
            else:
                pending, cursor = [], int(since)
            self.open_watches += 1
            self.open_by_generation[generation] = self.open_by_generation.get(generation, 0) + 1
            self.cond.notify_all()
        try:
            while True:
                for event in pending:
                    send(event)
                with self.cond:
                    while True:
                        new = [(rv, t, o) for rv, t, o in self.history if rv > cursor]
                        ended = self.generation != generation or self.closing or time.monotonic() >= deadline
                        if new or ended:
                            break
                        self.cond.wait(max(0.01, min(0.5, deadline - time.monotonic())))
                    if new:
                        cursor = new[-1][0]
                    pending = [{"type": t, "object": copy.deepcopy(o)} for _, t, o in new
                               if self._selected(o, ns, selector)]
                    abort = self.abort
                if ended and not pending:
                    break
            if abort:
                h.connection.shutdown(socket.SHUT_RDWR)   # dropped mid-stream: no final chunk
            else:
                h.wfile.write(b"0\r\n\r\n")                # ended cleanly, like a server timeout
        except OSError:
            pass
        finally:
            with self.cond:
                self.open_watches -= 1
                self.open_by_generation[generation] -= 1
                self.cond.notify_all()


def eslice(name: str, service: str, endpoints: list[dict], ports=None, namespace: str = NS) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": namespace, "labels": {disc_mod.SERVICE_NAME_LABEL: service}},
            "ports": ports if ports is not None else [{"name": "metrics", "port": 9090, "protocol": "TCP"},
                                                      {"name": "grpc", "port": 50051, "protocol": "TCP"}],
            "endpoints": endpoints}


def ep(ip: str, node: str, pod: str, ready=True, terminating=None) -> dict:
    cond = {}
    if ready is not None:
        cond["ready"] = ready
    if terminating is not None:
        cond["terminating"] = terminating
    return {"addresses": [ip], "conditions": cond, "nodeName": node,
            "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}}


@pytest.fixture
def emu():
    e = ApiEmulator()
    yield e
    e.close()


def _client(emu: ApiEmulator):
    cfg = kubernetes.client.Configuration(host=emu.url)
    return kubernetes.client.ApiClient(configuration=cfg)


@pytest.fixture
def make_discovery(emu):
    made = []

    def make(**kw):
        kw.setdefault("api_client", _client(emu))
        d = KubernetesDiscovery(NS, TARGET_SVC, DRAFT_SVC, **kw)
        d.backoff_initial_s = 0.05
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.stop()


def addrs(endpoints: list[Endpoint]) -> set[str]:
    return {e.address for e in endpoints}


# ------------------------------------------------------------------------------------------------


def test_static_discovery():
    d = StaticDiscovery(["127.0.0.1:50051", " 127.0.0.1:50052 ", ""], ["127.0.0.1:50061,127.0.0.1:50062"])
    assert d.targets() == [Endpoint("127.0.0.1:50051", ""), Endpoint("127.0.0.1:50052", "")]
    assert d.drafts() == [Endpoint("127.0.0.1:50061", ""), Endpoint("127.0.0.1:50062", "")]
    d.targets().clear()                       # callers get copies
    assert len(d.targets()) == 2
    d.stop()
    s = from_args("static", NS, TARGET_SVC, DRAFT_SVC, ["a:1"], ["b:2"])
    assert isinstance(s, StaticDiscovery) and s.targets() == [Endpoint("a:1", "")]
    with pytest.raises(ValueError):
        from_args("consul", NS, TARGET_SVC, DRAFT_SVC, [], [])


def test_slice_parsing_follows_endpointslice_semantics():
    s = eslice("t-1", TARGET_SVC, [
        ep("10.0.0.1", "node-a", "t-0"),
        ep("10.0.0.2", "node-b", "t-1", ready=None),                      # unknown counts as ready
        ep("10.0.0.3", "node-b", "t-2", ready=False),
        ep("10.0.0.4", "node-c", "t-3", ready=True, terminating=True),    # publishNotReadyAddresses
        {"addresses": [], "conditions": {"ready": True}},
    ])
    assert endpoints_of_slice(s, "grpc") == [Endpoint("10.0.0.1:50051", "node-a", "t-0"),
                                             Endpoint("10.0.0.2:50051", "node-b", "t-1")]
    only = eslice("t-2", TARGET_SVC, [ep("10.0.0.1", "n", "p")], ports=[{"name": "", "port": 7000}])
    assert endpoints_of_slice(only, "grpc") == [Endpoint("10.0.0.1:7000", "n", "p")]   # the only port
    two = eslice("t-3", TARGET_SVC, [ep("10.0.0.1", "n", "p")], ports=[{"name": "a", "port": 1}, {"name": "b", "port": 2}])
    assert endpoints_of_slice(two, "grpc") == []                                        # ambiguous
    v6 = dict(eslice("t-4", TARGET_SVC, [ep("fd00::5", "n", "p")]), addressType="IPv6")
    assert endpoints_of_slice(v6, "grpc") == [Endpoint("[fd00::5]:50051", "n", "p")]


def test_pods_appear_become_unready_and_disappear(emu, make_discovery):
    emu.put(eslice("ssd-target-abc", TARGET_SVC, [ep("10.0.0.1", "node-a", "target-0")]))
    emu.put(eslice("ssd-draft-abc", DRAFT_SVC, [ep("10.0.1.1", "node-a", "draft-0")]))
    emu.put(eslice("other-abc", "other", [ep("10.9.9.9", "node-a", "other-0")]))
    changes = []
    d = make_discovery(on_change=lambda: changes.append(1))
    # the initial list is in place when start() returns
    assert d.targets() == [Endpoint("10.0.0.1:50051", "node-a", "target-0")]
    assert d.drafts() == [Endpoint("10.0.1.1:50051", "node-a", "draft-0")]
    assert changes, "on_change after the initial list"
    assert emu.wait_watching(2)

    # pods appear: a second target on node-b in a second slice, a draft there too
    n = len(changes)
    emu.put(eslice("ssd-target-def", TARGET_SVC, [ep("10.0.0.2", "node-b", "target-1"),
                                                  ep("10.0.0.1", "node-a", "target-0")]))  # duplicate across slices
    emu.put(eslice("ssd-draft-abc", DRAFT_SVC, [ep("10.0.1.1", "node-a", "draft-0"),
                                                ep("10.0.1.2", "node-b", "draft-1")]))
    assert d.wait_for(lambda x: len(x.targets()) == 2 and len(x.drafts()) == 2, WAIT)
    assert d.targets() == [Endpoint("10.0.0.1:50051", "node-a", "target-0"),
                           Endpoint("10.0.0.2:50051", "node-b", "target-1")]
    assert {(e.node, e.pod) for e in d.drafts()} == {("node-a", "draft-0"), ("node-b", "draft-1")}
    assert len(changes) > n

    # another service's slices never show up
    emu.put(eslice("other-def", "other", [ep("10.9.9.8", "node-b", "other-1")]))
    # a draft becomes unready, a target starts terminating
    emu.put(eslice("ssd-draft-abc", DRAFT_SVC, [ep("10.0.1.1", "node-a", "draft-0", ready=False),
                                                ep("10.0.1.2", "node-b", "draft-1")]))
    emu.put(eslice("ssd-target-def", TARGET_SVC, [ep("10.0.0.2", "node-b", "target-1", ready=False, terminating=True),
                                                  ep("10.0.0.1", "node-a", "target-0")]))
    assert d.wait_for(lambda x: addrs(x.drafts()) == {"10.0.1.2:50051"}
                      and addrs(x.targets()) == {"10.0.0.1:50051"}, WAIT)
    # ...and ready again
    emu.put(eslice("ssd-draft-abc", DRAFT_SVC, [ep("10.0.1.1", "node-a", "draft-0"), ep("10.0.1.2", "node-b", "draft-1")]))
    assert d.wait_for(lambda x: len(x.drafts()) == 2, WAIT)

    # pods disappear: one slice deleted (target-0 stays, it is in the other slice too), then the other
    emu.delete("ssd-target-abc")
    emu.put(eslice("ssd-target-def", TARGET_SVC, [ep("10.0.0.1", "node-a", "target-0")]))
    assert d.wait_for(lambda x: addrs(x.targets()) == {"10.0.0.1:50051"}, WAIT)
    emu.delete("ssd-target-def")
    assert d.wait_for(lambda x: x.targets() == [], WAIT)
    assert all(e.address.startswith("10.0.1.") for e in d.drafts())
    # the API was asked per service, by label
    assert emu.count("list", TARGET_SVC) == 1 and emu.count("list", DRAFT_SVC) == 1
    assert emu.count("list", "other") == 0


@pytest.mark.parametrize("abort", [False, True], ids=["ended", "dropped"])
def test_watch_ended_by_server_resumes_from_resource_version(emu, make_discovery, abort):
    emu.put(eslice("ssd-target-abc", TARGET_SVC, [ep("10.0.0.1", "node-a", "target-0")]))
    d = make_discovery()
    assert emu.wait_watching(2)
    watches = emu.count("watch", TARGET_SVC)
    emu.end_watches(abort=abort)
    emu.put(eslice("ssd-target-abc", TARGET_SVC, [ep("10.0.0.1", "node-a", "target-0"),
                                                  ep("10.0.0.2", "node-b", "target-1")]))
    assert d.wait_for(lambda x: len(x.targets()) == 2, WAIT)
    assert emu.count("watch", TARGET_SVC) > watches
    # nothing was lost, so no relist was needed: the watch resumed from its resourceVersion
    assert emu.count("list", TARGET_SVC) == 1
    # and it keeps following changes
    emu.delete("ssd-target-abc")
    assert d.wait_for(lambda x: x.targets() == [], WAIT)


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
def test_gone_relists_and_catches_up_on_missed_changes(emu, make_discovery, as_status):
    emu.gone_as_status = as_status
    emu.put(eslice("ssd-target-abc", TARGET_SVC, [ep("10.0.0.1", "node-a", "target-0")]))
    emu.put(eslice("ssd-target-def", TARGET_SVC, [ep("10.0.0.2", "node-b", "target-1")]))
    emu.put(eslice("ssd-draft-abc", DRAFT_SVC, [ep("10.0.1.1", "node-a", "draft-0")]))
    d = make_discovery()
    assert len(d.targets()) == 2
    assert emu.wait_watching(2)
    # while discovery is disconnected, one target slice goes away and a draft appears; the
    # API then compacts its history, so resuming the watch gets 410 Gone
    emu.set_gate(False)
    emu.end_watches()
    emu.delete("ssd-target-def")
    emu.put(eslice("ssd-draft-abc", DRAFT_SVC, [ep("10.0.1.1", "node-a", "draft-0"), ep("10.0.1.2", "node-b", "draft-1")]))
    emu.compact()
    emu.set_gate(True)
    assert d.wait_for(lambda x: addrs(x.targets()) == {"10.0.0.1:50051"} and len(x.drafts()) == 2, WAIT)
    assert emu.count("list", TARGET_SVC) == 2 and emu.count("list", DRAFT_SVC) == 2
    # recovered: the new watch follows changes again
    assert emu.wait_watching(2)
    emu.put(eslice("ssd-target-ghi", TARGET_SVC, [ep("10.0.0.3", "node-c", "target-2")]))
    assert d.wait_for(lambda x: addrs(x.targets()) == {"10.0.0.1:50051", "10.0.0.3:50051"}, WAIT)


def test_api_errors_back_off_and_recover(emu, make_discovery):
    emu.put(eslice("ssd-target-abc", TARGET_SVC, [ep("10.0.0.1", "node-a", "target-0")]))
    emu.fail_next = 4          # the initial lists and the first retries fail with 500
    d = make_discovery()
    assert d.targets() == []   # start() does not raise on a transient API error
    assert d.wait_for(lambda x: len(x.targets()) == 1, WAIT)
    assert emu.wait_watching(2)


def test_forbidden_is_a_clear_error(emu):
    class Forbidden(ApiEmulator):
        def _serve(self, h):
            self._send_json(h, 403, self._status(403, "Forbidden", "endpointslices is forbidden"))

    f = Forbidden()
    try:
        d = KubernetesDiscovery(NS, TARGET_SVC, DRAFT_SVC, api_client=_client(f))
        with pytest.raises(RuntimeError, match="endpointslices"):
            d.start()
        d.stop()
    finally:
        f.close()


def test_stop_ends_idle_watches_promptly(emu):
    d = KubernetesDiscovery(NS, TARGET_SVC, DRAFT_SVC, api_client=_client(emu)).start()
    assert emu.wait_watching(2)
    threads = list(d._threads)
    stopper = threading.Thread(target=d.stop)
    stopper.start()
    # stop() interrupts the open watches (the server would hold them for minutes): it returns and
    # both watch threads end; the join's timeout only keeps a hang from stalling the suite
    stopper.join(timeout=60)
    assert not stopper.is_alive()
    assert len(threads) == 2 and not any(t.is_alive() for t in threads)


def test_from_args_uses_the_kubeconfig(emu, tmp_path, monkeypatch):
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
        "users": [{"name": "emu", "user": {"token": "t"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
    }))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    emu.put(eslice("ssd-draft-abc", DRAFT_SVC, [ep("10.0.1.1", "node-a", "draft-0")]))
    saved = kubernetes.client.Configuration.get_default_copy()
    d = from_args("kubernetes", NS, TARGET_SVC, DRAFT_SVC, [], [])
    kubernetes.client.Configuration.set_default(saved)   # load_kube_config sets a process-wide default
    try:
        assert isinstance(d, KubernetesDiscovery)
        assert d.drafts() == [Endpoint("10.0.1.1:50051", "node-a", "draft-0")] and d.targets() == []
    finally:
        d.stop()


# ------------------------------------------------------------------------------------------------
# Discovery feeding the gateway's routing, with real target and draft gRPC servers behind the slices
# ------------------------------------------------------------------------------------------------
def test_gateway_routes_to_discovered_pods_and_follows_readiness(emu, make_discovery, small_pair):
    from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
    from ssd.engine import AREngine
    from ssd.models.loader import load_model
    from ssd.services.common import make_server
    from ssd.services.draft.server import DraftService
    from ssd.services.gateway.server import Gateway, GenerateError
    from ssd.services.protos import pb_grpc
    from ssd.services.target.server import EngineLoop, TargetService

    t_dir, d_dir, _ = small_pair
    cfg = EngineConfig(mode="ar", max_batch=4, max_model_len=64, speculation=SpeculationConfig(num_speculative_tokens=2, fan_out_budget=3))
    target = load_model(t_dir)[0]
    servers, loops, ports = [], {}, {}
    try:
        for node in ("node-a", "node-b"):
            loops[node] = EngineLoop(AREngine(cfg, target, (3,)))
            for role, add in (("target", lambda s, n=node: pb_grpc.add_TargetServicer_to_server(TargetService(loops[n], node=n), s)),
                              ("draft", lambda s, n=node: pb_grpc.add_DraftServicer_to_server(
                                  DraftService(DraftDescription(str(d_dir)), cfg.speculation, 8, 64, node=n), s))):
                s = make_server()
                add(s)
                ports[role, node] = s.add_insecure_port("127.0.0.1:0")
                s.start()
                servers.append(s)

        def publish(role, node, ready=True):
            svc = TARGET_SVC if role == "target" else DRAFT_SVC
            emu.put(eslice(f"{role}-{node}", svc, [ep("127.0.0.1", node, f"{role}-{node}", ready=ready)],
                           ports=[{"name": "grpc", "port": ports[role, node], "protocol": "TCP"}]))

        for node in ("node-a", "node-b"):
            publish("target", node)
            publish("draft", node)
        d = make_discovery()
        assert d.wait_for(lambda x: len(x.targets()) == 2 and len(x.drafts()) == 2, WAIT)
        gw = Gateway(None, d, "m", 64)
        # node-a's target is busy: the gateway picks node-b's, then the draft on node-b
        for _ in range(2):
            loops["node-a"].submit([0, 1, 2], SamplingParams(max_tokens=60, ignore_eos=True))
        addr, _, node = gw.pick_target()
        assert (addr, node) == (f"127.0.0.1:{ports['target', 'node-b']}", "node-b")
        assert gw.pick_draft(node) == f"127.0.0.1:{ports['draft', 'node-b']}"
        # node-b's target turns unready: only node-a's is left, busy or not
        publish("target", "node-b", ready=False)
        assert d.wait_for(lambda x: len(x.targets()) == 1, WAIT)
        assert gw.pick_target()[0] == f"127.0.0.1:{ports['target', 'node-a']}"
        # node-b's draft pod goes away: a target on node-b would now pair with any draft left
        emu.delete("draft-node-b")
        assert d.wait_for(lambda x: len(x.drafts()) == 1, WAIT)
        assert gw.pick_draft("node-b") == f"127.0.0.1:{ports['draft', 'node-a']}"
        emu.delete("target-node-a")
        emu.delete("target-node-b")
        assert d.wait_for(lambda x: not x.targets(), WAIT)
        with pytest.raises(GenerateError, match="no target is ready"):
            gw.pick_target()
    finally:
        for s in servers:
            s.stop(0)
        for loop in loops.values():
            loop.stop()
