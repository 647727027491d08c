"""Process entry points: `ssd service draft|target|gateway` (one role, as in a pod) and
`ssd serve` (all three as local processes: the embedded default, no cluster, no Redis)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

READY = "SSD_READY"


def _announce(port: int, http_port: int | None = None, metrics_port: int | None = None) -> None:
    # the parent of `ssd serve` (and humans) read the bound ports from this line
    print(f"{READY} port={port}" + (f" http_port={http_port}" if http_port is not None else "")
          + (f" metrics_port={metrics_port}" if metrics_port is not None else ""), flush=True)


@dataclass
class _Role:
    """What one service added to the gRPC server: its health names, what to stop on exit, what to
    do first when told to drain, and (the gateway) its HTTP port and readiness watch."""

    names: list[str]
    stops: list = field(default_factory=list)
    on_drain: object = None  # deadline -> None
    http_port: int | None = None
    gateway: object = None


def run_role(ns, cfg) -> int:
    """Start one service and block until SIGTERM/SIGINT (drain, then exit)."""
    from .common import ApiKeyInterceptor, add_health_and_reflection, add_port, drain_on_sigterm, load_api_keys, make_server

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {ns.role} %(levelname)s %(message)s")
    from ssd.models.loader import resolve_model
    from ssd.models.precision import dtype_name, resolve_dtype

    from . import telemetry as tm
    from .metrics import Metrics

    target_path = resolve_model(cfg.target)
    dtype = dtype_name(resolve_dtype(cfg.dtype)[0])  # target and draft resolve `auto` alike on one node
    keys = load_api_keys(ns.api_keys, ns.api_key_file) if ns.role == "gateway" else frozenset()
    # the gateway is the client face: API keys and TLS apply to it (the internal services sit
    # behind it, on the pod network)
    server = make_server(interceptors=[ApiKeyInterceptor(keys)] if keys else ())
    tm.setup_tracing(f"ssd-{ns.role}")  # OTEL_* environment; off (no-op) without an exporter
    tracer = tm.get_tracer(f"ssd-{ns.role}")
    metrics = Metrics(ns.role, num_speculative_tokens=cfg.speculation.num_speculative_tokens)
    metrics_port = metrics.start_http(ns.metrics_port, ns.host) if ns.metrics_port >= 0 else None
    add = {"draft": _add_draft, "target": _add_target, "gateway": _add_gateway}[ns.role]
    role = add(server, ns, cfg, target_path, dtype, tracer, metrics, keys)
    hs = add_health_and_reflection(server, role.names)
    if role.gateway is not None:
        from .gateway.server import watch_readiness

        role.stops.append(watch_readiness(role.gateway, hs, role.names).set)
    tls = (ns.tls_cert, ns.tls_key) if ns.role == "gateway" else ("", "")
    port = add_port(server, f"{ns.host}:{ns.port}", *tls)
    server.start()
    _announce(port, role.http_port, metrics_port)

    def on_stop():
        for stop in role.stops:
            stop()
        tm.shutdown()  # flush the spans of the last requests
        metrics.stop_http()

    drain_on_sigterm(server, hs, ns.grace_s, on_stop, on_drain=role.on_drain).wait()
    return 0


def _add_draft(server, ns, cfg, target_path, dtype, tracer, metrics, keys) -> _Role:
    import torch

    from ssd.models.draft import draft_description
    from ssd.models.quantized import resolve_draft_weights

    from .draft.server import DraftService
    from .protos import pb_grpc

    torch.set_num_threads(cfg.draft_threads)
    draft_desc = draft_description(cfg.draft, target_path, cfg.standin_layers, dtype, cfg.batch_invariant,
                                   resolve_draft_weights(cfg.draft_weights), cfg.activations)
    service = DraftService(draft_desc, cfg.speculation, cfg.max_batch * 4, cfg.max_model_len,
                           index=_index(ns.redis_url, cfg.index_ttl_s), node=os.environ.get("NODE_NAME", ""),
                           channel_host=ns.host, advertise_host=os.environ.get("POD_IP", ""), tracer=tracer,
                           metrics=metrics)
    pb_grpc.add_DraftServicer_to_server(service, server)
    return _Role(["Draft"])


def _add_target(server, ns, cfg, target_path, dtype, tracer, metrics, keys) -> _Role:
    import torch

    from ssd.engine import load_target
    from ssd.tokenizer import Tokenizer

    from .protos import pb_grpc
    from .target.server import EngineLoop, TargetService, build_target_engine

    torch.set_num_threads(cfg.target_threads)
    model, _ = load_target(cfg, target_path)
    engine = build_target_engine(cfg, model, Tokenizer(target_path).eos_token_ids, ns.draft_address,
                                 _index(ns.redis_url, cfg.index_ttl_s), tensor_channel=ns.tensor_channel,
                                 device=str(next(model.parameters()).device), draft_wait_s=ns.draft_wait_s)
    loop = EngineLoop(engine, tracer, metrics)
    pb_grpc.add_TargetServicer_to_server(TargetService(loop, node=os.environ.get("NODE_NAME", ""), tracer=tracer), server)
    # draining: its in-flight rpcs end in the server's graceful stop
    return _Role(["Target"], stops=[loop.stop], on_drain=lambda deadline: loop.drain())


def _add_gateway(server, ns, cfg, target_path, dtype, tracer, metrics, keys) -> _Role:
    from ssd.models.draft import draft_description
    from ssd.models.quantized import resolve_draft_weights
    from ssd.tokenizer import Tokenizer

    from .discovery import from_args
    from .gateway.http import serve_http
    from .gateway.server import Gateway, GatewayService
    from .protos import pb_grpc

    targets = [t for t in ns.targets.split(",") if t]
    drafts = [t for t in ns.drafts.split(",") if t]
    if ns.discovery == "static" and not targets:
        raise SystemExit("error: the gateway needs --targets (or --discovery kubernetes)")
    discovery = from_args(ns.discovery, ns.k8s_namespace or os.environ.get("POD_NAMESPACE", "default"),
                          ns.target_service, ns.draft_service, targets, drafts)
    desc = draft_description(cfg.draft, target_path, cfg.standin_layers, dtype, cfg.batch_invariant,
                             resolve_draft_weights(cfg.draft_weights), cfg.activations).describe()
    gw = Gateway(Tokenizer(target_path), discovery, ns.model_name, cfg.max_model_len, desc, tracer, metrics)
    pb_grpc.add_GatewayServicer_to_server(GatewayService(gw), server)
    # draining: gRPC and HTTP requests alike are refused at once, the running ones end in the grace
    role = _Role(["Gateway"], stops=[discovery.stop], on_drain=gw.drain, gateway=gw)
    if ns.http_port >= 0:
        httpd = serve_http(gw, ns.host, ns.http_port, api_keys=keys,
                           cors_origins=[o.strip() for o in ns.cors_origins.split(",") if o.strip()],
                           max_connections=ns.max_http_connections,
                           ssl_certfile=ns.tls_cert or None, ssl_keyfile=ns.tls_key or None)
        role.http_port = httpd.server_address[1]
        role.stops.append(httpd.shutdown)
    return role


def _index(redis_url: str, ttl_s: float):
    if not redis_url:
        return None
    from .index_redis import RedisIndex

    return RedisIndex(redis_url, ttl_s=ttl_s)


def _spawn(role: str, args: list[str], env=None):
    # from a neutral directory: `python -m` puts the working directory first on sys.path, and a
    # source checkout there would shadow the installed package in the children
    cmd = [sys.executable, "-m", "ssd.cli", "service", role, *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=_neutral_dir(),
                         start_new_session=True,  # our signals reach them through us, once, in order
                         preexec_fn=_die_with_parent)
    deadline = time.time() + 600
    ports = {}
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{role} service exited before it was ready (code {p.wait()})")
        if line.startswith(READY):
            ports = dict(kv.split("=") for kv in line.split()[1:])
            break
    return p, {k: int(v) for k, v in ports.items()}


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the supervisor dies, even by SIGKILL, so no
    service outlives `ssd serve` holding its port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _neutral_dir() -> str:
    from ssd.models.loader import cache_root

    d = cache_root() / "run"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def start_stack(common_args: list[str], procs: list, *, env=None, redis_url: str = "", tensor_channel: str = "auto",
                port: int = 0, http_port: int = -1, gateway_args: list[str] = (),
                metrics_port: int = -1) -> dict[str, dict[str, int]]:
    """draft, target and gateway as local processes wired to each other on loopback; each
    started process is appended to procs at once (the caller stops them, even after a failure
    half-way). Returns each role's bound ports. metrics_port: -1 = no /metrics; 0 = each on
    a free port; N = gateway N, target N+1, draft N+2."""
    redis = ["--redis-url", redis_url] if redis_url else []

    def metrics(offset: int) -> list[str]:
        return [] if metrics_port < 0 else ["--metrics-port", str(metrics_port + offset if metrics_port else 0)]
    draft, dports = _spawn("draft", common_args + ["--port", "0"] + redis + metrics(2), env)
    procs.append(draft)
    target, tports = _spawn("target", common_args + ["--port", "0", "--draft-address", f"127.0.0.1:{dports['port']}",
                                                     "--tensor-channel", tensor_channel] + redis + metrics(1), env)
    procs.append(target)
    gw, gports = _spawn("gateway", common_args + ["--port", str(port), "--http-port", str(http_port),
                                                  "--targets", f"127.0.0.1:{tports['port']}",
                                                  "--drafts", f"127.0.0.1:{dports['port']}", *gateway_args]
                        + metrics(0), env)
    procs.append(gw)
    return {"draft": dports, "target": tports, "gateway": gports}


def stop_stack(procs: list) -> None:
    """SIGTERM (drain) in reverse start order, then wait; kill what does not exit."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def serve_local(ns, cfg, common_args: list[str]) -> int:
    """draft, target and gateway as three local processes on loopback."""
    from ssd.models.loader import default_target_path

    if cfg.target in ("default", "smollm2-135m-instruct"):
        default_target_path()  # convert once here, not three times in parallel
    procs = []
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        access = ["--api-keys", ns.api_keys, "--api-key-file", ns.api_key_file, "--tls-cert", ns.tls_cert,
                  "--tls-key", ns.tls_key, "--cors-origins", ns.cors_origins,
                  "--max-http-connections", str(ns.max_http_connections)]
        ports = start_stack(common_args, procs, redis_url=ns.redis_url, tensor_channel=ns.tensor_channel,
                            port=ns.port, http_port=ns.http_port, gateway_args=access, metrics_port=ns.metrics_port)
        dports, tports, gports = ports["draft"], ports["target"], ports["gateway"]
        addr = f"127.0.0.1:{gports['port']}"
        scheme = "https" if ns.tls_cert else "http"
        print(f"gateway: grpc {addr}, http {scheme}://127.0.0.1:{gports.get('http_port')}  "
              f"(target 127.0.0.1:{tports['port']}, draft 127.0.0.1:{dports['port']}; "
              f"pids draft={procs[0].pid} target={procs[1].pid} gateway={procs[2].pid})", file=sys.stderr, flush=True)
        if ns.metrics_port >= 0:
            print("metrics: " + ", ".join(f"{role} http://127.0.0.1:{p['metrics_port']}/metrics"
                                          for role, p in (("gateway", gports), ("target", tports), ("draft", dports))),
                  file=sys.stderr, flush=True)
        if ns.prompt is None:
            draft_args = ["--metrics-port", str(dports["metrics_port"])] if ns.metrics_port >= 0 else []
            return _supervise(procs, common_args + draft_args, dports["port"], ns.redis_url)
        return _one_generation(addr, ns, cfg)
    except KeyboardInterrupt:
        return 130
    except _Stop as e:
        return 128 + e.signum  # 143 for SIGTERM, as a process that drained and exited on it
    finally:
        # the children drain and stop whatever signals arrive meanwhile (a second Ctrl-C too)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        stop_stack(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)


def _supervise(procs: list, common_args: list[str], draft_port: int, redis_url: str) -> int:
    """Keep the services up until a signal: a draft that exits is started again on its port
    (the target serves target-only meanwhile and takes it back when it answers); the target or
    the gateway exiting ends the whole stack."""
    draft = procs[0]
    restarts = 0
    while True:
        time.sleep(0.5)
        if any(p.poll() is not None for p in procs[1:]):
            print("ssd serve: the target or the gateway exited; stopping", file=sys.stderr, flush=True)
            return 1
        if draft.poll() is not None:
            restarts += 1
            print(f"ssd serve: the draft exited (code {draft.returncode}); restarting it (restart {restarts})",
                  file=sys.stderr, flush=True)
            redis = ["--redis-url", redis_url] if redis_url else []
            try:
                draft, _ = _spawn("draft", common_args + ["--port", str(draft_port)] + redis)
            except RuntimeError as e:
                print(f"ssd serve: the draft did not come back ({e}); retrying", file=sys.stderr, flush=True)
                time.sleep(min(30, 2 ** restarts))
                continue
            procs[0] = draft
            print(f"ssd serve: draft back on 127.0.0.1:{draft_port} (pid {draft.pid})", file=sys.stderr, flush=True)


def _one_generation(addr: str, ns, cfg) -> int:
    import grpc

    from .common import CHANNEL_OPTIONS
    from .convert import sampling_to_pb
    from .protos import pb, pb_grpc

    from ssd.config import SamplingParams

    params = SamplingParams(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, max_tokens=ns.max_tokens, seed=ns.seed)
    from .common import load_api_keys

    if ns.tls_cert:  # our own certificate is the root we trust (a self-signed one works too)
        creds = grpc.ssl_channel_credentials(root_certificates=open(ns.tls_cert, "rb").read())
        channel = grpc.secure_channel(addr, creds, options=CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", "localhost")])
    else:
        channel = grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)
    stub = pb_grpc.GatewayStub(channel)
    keys = sorted(load_api_keys(ns.api_keys, ns.api_key_file))
    metadata = [("authorization", f"Bearer {keys[0]}")] if keys else None
    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=ns.prompt)]),
                             sampling=sampling_to_pb(params))
    t0 = time.perf_counter()
    last = None
    try:
        for r in stub.Generate(req, timeout=3600, metadata=metadata):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    st, n = last.stats, last.usage.completion_tokens
    rounds_tokens = n - 1
    print("\n---")
    parts = ["mode=ssd (services)", f"tokens={n}", f"{n / wall:.2f} tok/s",
             f"mean accepted length={rounds_tokens / st.num_rounds:.2f}" if st.num_rounds else "mean accepted length=-"]
    lookups = st.cache_hit + st.cache_late + st.cache_miss
    if st.num_draft_tokens:
        parts.append(f"acceptance={st.num_accepted_tokens / st.num_draft_tokens:.2f}")
    if lookups:
        parts.append(f"cache hit rate={(st.cache_hit + st.cache_late) / lookups:.2f}")
    print("  ".join(parts))
    return 0
