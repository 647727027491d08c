"""Where the gateway finds target and draft pods.

Two sources with one face (``targets()`` / ``drafts()`` -> ``list[Endpoint]``):

* ``StaticDiscovery`` — fixed ``host:port`` lists, for local runs (node names unknown).
* ``KubernetesDiscovery`` — the ready endpoints of the target and draft Services, read from
  their ``discovery.k8s.io/v1`` EndpointSlices (label ``kubernetes.io/service-name``) with the
  official ``kubernetes`` client. Each endpoint carries ``nodeName``, so the gateway can pair a
  target with a draft on the same node without reading pods. One LIST per service, then a
  WATCH from the list's resourceVersion in a background thread; a watch that ends is resumed
  from the last resourceVersion seen, a 410 Gone (history compacted) or a periodic resync
  relists, and errors back off exponentially. The RBAC this needs: ``get``, ``list``,
  ``watch`` on ``endpointslices.discovery.k8s.io`` in the release's namespace.

Readiness follows the EndpointSlice contract: ``conditions.ready`` true or unset (unknown is
to be read as ready) and not ``terminating``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_ROLES = ("target", "draft")


@dataclass(frozen=True)
class Endpoint:
    address: str      # "ip:port" for gRPC
    node: str         # node name ("" when unknown)
    pod: str = ""     # pod name ("" when unknown)


def _parse_static(addresses: Iterable[str]) -> list[Endpoint]:
    out: list[Endpoint] = []
    seen: set[str] = set()
    for raw in addresses:
        for a in str(raw).split(","):
            a = a.strip()
            if a and a not in seen:
                seen.add(a)
                out.append(Endpoint(address=a, node=""))
    return out


class StaticDiscovery:
    """Fixed addresses (local runs, tests); node names are unknown ("")."""

    def __init__(self, targets: list[str], drafts: list[str]):
        self._targets = _parse_static(targets or [])
        self._drafts = _parse_static(drafts or [])

    def start(self) -> "StaticDiscovery":
        return self

    def targets(self) -> list[Endpoint]:
        return list(self._targets)

    def drafts(self) -> list[Endpoint]:
        return list(self._drafts)

    def wait_for(self, predicate: Callable[["StaticDiscovery"], bool], timeout: float) -> bool:
        return bool(predicate(self))

    def stop(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# EndpointSlice parsing (raw JSON dicts, as the API server sends them)


def _join_host_port(host: str, port: int, address_type: str) -> str:
    if address_type == "IPv6" or (":" in host and not host.startswith("[")):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _slice_port(slice_obj: dict, port_name: str) -> int | None:
    ports = [p for p in (slice_obj.get("ports") or []) if isinstance(p, dict)]
    chosen = next((p for p in ports if (p.get("name") or "") == port_name), None)
    if chosen is None and len(ports) == 1:
        chosen = ports[0]
    if chosen is None or chosen.get("port") is None:
        return None
    return int(chosen["port"])


def endpoints_of_slice(slice_obj: dict, port_name: str) -> list[Endpoint]:
    """The ready, non-terminating endpoints of one EndpointSlice, addressed on its port named
    ``port_name`` (or its only port). A slice without a usable port yields nothing."""
    port = _slice_port(slice_obj, port_name)
    if port is None:
        return []
    address_type = slice_obj.get("addressType") or "IPv4"
    out: list[Endpoint] = []
    for ep in slice_obj.get("endpoints") or []:
        if not isinstance(ep, dict):
            continue
        cond = ep.get("conditions") or {}
        if cond.get("ready") is False or cond.get("terminating") is True:
            continue
        addresses = ep.get("addresses") or []
        if not addresses:
            continue
        ref = ep.get("targetRef") or {}
        pod = ref.get("name", "") if ref.get("kind", "Pod") == "Pod" else ""
        # Consumers use the first address (the API says all addresses of an endpoint are
        # fungible, and kube-proxy only ever uses the first).
        out.append(Endpoint(address=_join_host_port(str(addresses[0]), port, address_type),
                            node=ep.get("nodeName") or "", pod=pod or ""))
    return out


def _merge(slices: dict[str, list[Endpoint]]) -> list[Endpoint]:
    """Deduplicate by address across slices (an endpoint may sit in two slices while the
    controller moves it), preferring the entry that knows its node and pod."""
    best: dict[str, Endpoint] = {}
    for name in sorted(slices):
        for e in slices[name]:
            cur = best.get(e.address)
            if cur is None or (bool(e.node), bool(e.pod)) > (bool(cur.node), bool(cur.pod)):
                best[e.address] = e
    return sorted(best.values(), key=lambda e: (e.node, e.address))


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""


class KubernetesDiscovery:
    """Ready target/draft endpoints of two Services, kept current by EndpointSlice watches."""

    def __init__(self, namespace: str, target_service: str, draft_service: str, port_name: str = "grpc",
                 api_client=None, on_change=None, resync_s: float = 300.0):
        from kubernetes import client as k8s_client

        self.namespace = namespace
        self.services = {"target": target_service, "draft": draft_service}
        self.port_name = port_name
        self.on_change = on_change
        self.resync_s = float(resync_s)
        self._own_client = api_client is None
        self._api_client = api_client if api_client is not None else k8s_client.ApiClient()
        self._api = k8s_client.DiscoveryV1Api(self._api_client)
        self._cond = threading.Condition(threading.RLock())
        self._slices: dict[str, dict[str, list[Endpoint]]] = {r: {} for r in _ROLES}
        self._view: dict[str, list[Endpoint]] = {r: [] for r in _ROLES}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: dict[str, object] = {}   # role -> the open watch response (for stop())
        self.backoff_initial_s = 0.1
        self.backoff_max_s = 10.0
        self.watch_timeout_s = max(1, int(min(self.resync_s, 300.0)))   # server-side watch timeout
        self.request_timeout_s = 30.0

    # -- public face --------------------------------------------------------------------------

    def start(self) -> "KubernetesDiscovery":
        """LIST both services' slices (an auth error raises here), then watch in the background.
        Other list errors are logged and retried by the watch threads."""
        from kubernetes.client.exceptions import ApiException

        if self._threads:
            return self
        rvs: dict[str, str | None] = {}
        for role in _ROLES:
            try:
                rvs[role] = self._list(role)
            except ApiException as e:
                if e.status in (401, 403):
                    raise RuntimeError(
                        f"endpoint discovery not allowed ({e.status} {e.reason}): the gateway's "
                        f"ServiceAccount needs get/list/watch on endpointslices.discovery.k8s.io "
                        f"in namespace {self.namespace!r}") from e
                log.warning("initial EndpointSlice list for %s failed: %s", self.services[role], e)
                rvs[role] = None
            except Exception as e:  # noqa: BLE001 - API unreachable at start; the thread retries
                log.warning("initial EndpointSlice list for %s failed: %s", self.services[role], e)
                rvs[role] = None
        for role in _ROLES:
            t = threading.Thread(target=self._run, args=(role, rvs[role]), daemon=True,
                                 name=f"ssd-discovery-{role}")
            t.start()
            self._threads.append(t)
        return self

    def targets(self) -> list[Endpoint]:
        with self._cond:
            return list(self._view["target"])

    def drafts(self) -> list[Endpoint]:
        with self._cond:
            return list(self._view["draft"])

    def wait_for(self, predicate: Callable[["KubernetesDiscovery"], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (re-checked after every update); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            responses = list(self._responses.values())
            self._cond.notify_all()
        for resp in responses:
            _interrupt(resp)
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []
        if self._own_client:
            try:
                self._api_client.close()
            except Exception:  # noqa: BLE001
                pass

    # -- state --------------------------------------------------------------------------------

    def _publish(self, role: str, mutate: Callable[[dict[str, list[Endpoint]]], None]) -> None:
        with self._cond:
            mutate(self._slices[role])
            new = _merge(self._slices[role])
            changed = new != self._view[role]
            self._view[role] = new
            self._cond.notify_all()
        if changed:
            log.info("discovery: %s endpoints now %s", self.services[role],
                     [f"{e.address}@{e.node or '?'}" for e in new])
            if self.on_change is not None:
                try:
                    self.on_change()
                except Exception:  # noqa: BLE001 - a listener must not kill the watch
                    log.exception("discovery on_change callback failed")

    def _belongs(self, role: str, obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return labels.get(SERVICE_NAME_LABEL) == self.services[role]

    # -- API calls ----------------------------------------------------------------------------

    def _selector(self, role: str) -> str:
        return f"{SERVICE_NAME_LABEL}={self.services[role]}"

    def _list(self, role: str) -> str | None:
        """LIST the service's slices, replace the role's state, return the list resourceVersion."""
        resp = self._api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self._selector(role), _preload_content=False,
            _request_timeout=self.request_timeout_s)
        try:
            body = json.loads(resp.data)
        finally:
            _release(resp)
        fresh: dict[str, list[Endpoint]] = {}
        for obj in body.get("items") or []:
            if self._belongs(role, obj):
                fresh[(obj.get("metadata") or {}).get("name", "")] = endpoints_of_slice(obj, self.port_name)

        def replace(slices: dict[str, list[Endpoint]]) -> None:
            slices.clear()
            slices.update(fresh)

        self._publish(role, replace)
        return (body.get("metadata") or {}).get("resourceVersion") or None

    def _watch(self, role: str, rv: str | None) -> tuple[str | None, int]:
        """One watch connection; returns (last resourceVersion, events seen) when it ends."""
        from kubernetes.client.exceptions import ApiException

        kwargs = dict(label_selector=self._selector(role), watch=True, allow_watch_bookmarks=True,
                      timeout_seconds=self.watch_timeout_s, _preload_content=False,
                      _request_timeout=(self.request_timeout_s, self.watch_timeout_s + self.request_timeout_s))
        if rv:
            kwargs["resource_version"] = rv
        try:
            resp = self._api.list_namespaced_endpoint_slice(self.namespace, **kwargs)
        except ApiException as e:
            if e.status == 410:
                raise _Gone(str(e.reason)) from e
            raise
        with self._cond:
            self._responses[role] = resp
        if self._stop.is_set():
            _interrupt(resp)
        seen = 0
        try:
            for line in _lines(resp):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise _Gone(obj.get("message") or "resource version too old")
                    raise RuntimeError(f"watch error {code}: {obj.get('reason')}: {obj.get('message')}")
                meta = obj.get("metadata") or {}
                rv = meta.get("resourceVersion") or rv
                seen += 1
                if etype == "BOOKMARK":
                    continue
                name = meta.get("name", "")
                if etype in ("ADDED", "MODIFIED") and self._belongs(role, obj):
                    eps = endpoints_of_slice(obj, self.port_name)
                    self._publish(role, lambda s, n=name, v=eps: s.__setitem__(n, v))
                elif etype in ("ADDED", "MODIFIED", "DELETED"):
                    # deleted, or relabelled away from this service
                    self._publish(role, lambda s, n=name: s.pop(n, None))
        finally:
            with self._cond:
                self._responses.pop(role, None)
            _release(resp)
        return rv, seen

    def _run(self, role: str, rv: str | None) -> None:
        backoff = self.backoff_initial_s
        last_list = time.monotonic() if rv is not None else 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if rv is None or time.monotonic() - last_list >= self.resync_s:
                    rv = self._list(role)
                    last_list = time.monotonic()
                rv, seen = self._watch(role, rv)
                if seen or time.monotonic() - started >= 1.0:
                    backoff = self.backoff_initial_s
                    continue            # ended normally (server timeout): resume from rv
                # ended at once with nothing in it (API server restarting?): resume after a pause
                log.info("discovery: %s watch closed at once; resuming in %.1f s", self.services[role], backoff)
                if self._stop.wait(backoff * random.uniform(0.8, 1.2)):
                    break
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            except _Gone as e:
                log.info("discovery: %s watch expired (%s); relisting", self.services[role], e)
                rv = None               # relist right away
                continue
            except Exception as e:  # noqa: BLE001 - API down, connection reset, bad response...
                if self._stop.is_set():
                    break
                reason = f"{type(e).__name__}: {e}"
                # keep rv: resuming the watch is valid; a too-old rv comes back as 410 -> relist
            log.warning("discovery: %s watch: %s; retrying in %.1f s", self.services[role], reason, backoff)
            if self._stop.wait(backoff * random.uniform(0.8, 1.2)):
                break
            backoff = min(backoff * 2, self.backoff_max_s)


def _lines(resp) -> Iterator[str]:
    """Newline-delimited JSON events from a streaming HTTP response."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=True) if hasattr(resp, "stream") else iter(resp):
        if not chunk:
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if line:
                yield line.decode("utf-8")
    if buf.strip():
        yield buf.strip().decode("utf-8")


def _interrupt(resp) -> None:
    """Unblock a thread that is reading ``resp`` (urllib3 >= 2.3 has shutdown())."""
    for name in ("shutdown", "close"):
        fn = getattr(resp, name, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception:  # noqa: BLE001
                continue


def _release(resp) -> None:
    for name in ("close", "release_conn"):
        fn = getattr(resp, name, None)
        if fn is not None:
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass


def _default_namespace() -> str:
    try:
        with open(_NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def from_args(kind: str, namespace: str, target_service: str, draft_service: str,
              targets: list[str], drafts: list[str], on_change=None):
    """kind 'static' -> StaticDiscovery; 'kubernetes' -> KubernetesDiscovery(...).start(), using
    in-cluster config when KUBERNETES_SERVICE_HOST is set, else the kubeconfig. An empty
    namespace means the pod's own namespace (in cluster) or "default"."""
    if kind == "static":
        return StaticDiscovery(targets, drafts)
    if kind != "kubernetes":
        raise ValueError(f"unknown discovery kind {kind!r} (expected 'static' or 'kubernetes')")
    from kubernetes import client as k8s_client, config as k8s_config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config()
    else:
        # KUBECONFIG is read here, not at import (the client reads it once when imported)
        k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    api = k8s_client.ApiClient()
    disc = KubernetesDiscovery(namespace or _default_namespace(), target_service, draft_service,
                               api_client=api, on_change=on_change)
    disc._own_client = True
    return disc.start()
