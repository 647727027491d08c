"""Tensor channel benchmark: q rows from a draft process to a target process, inline gRPC bytes
vs the torch.distributed channel (gloo on CPU; nccl when both ends have a GPU), side by side.

    python -m ssd.benchmarks.channel [--iters 30] [--out docs/bench/channel] [--backend gloo]

A child process plays the draft: a gRPC server whose stream answers each request with one
float32 tensor [rows, K, vocab], either as bytes inside the response (inline) or announced by
the response and sent on the channel right after it (what the Draft service does). The parent
plays the target and times request -> tensor in hand. Payloads are the real shapes: one JIT row
set, and a full speculation cache (fan-out budget 12) for the default target's vocabulary.
"""
from __future__ import annotations

from . import save_results

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time

K = 4
SHAPES = {  # name -> (rows, K, vocab)
    "jit row set, reduced head 8192": (1, K, 8192),
    "jit row set, vocab 49152": (1, K, 49152),
    "cache of 12 branches, vocab 49152": (12, K, 49152),
}
_METHOD = "/ssd.bench.Channel/Pull"


def _child(conn, backend: str, device: str):
    from concurrent import futures

    import grpc
    import torch

    from ssd.services.tensor_channel import TensorChannel

    tensors = {name: torch.rand(shape, device=device) for name, shape in SHAPES.items()}
    port_ch, fut = TensorChannel.listen(backend, device, host="127.0.0.1")

    def pull(request_iterator, context):
        ch = fut.result(timeout=60)
        for req in request_iterator:
            name, mode = req.decode().split("|")
            t = tensors[name]
            if mode == "inline":
                yield t.detach().cpu().numpy().tobytes()
            else:
                yield b""
                ch.send(t)

    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", 256 << 20)])
    handler = grpc.method_handlers_generic_handler("ssd.bench.Channel", {
        "Pull": grpc.stream_stream_rpc_method_handler(pull, request_deserializer=None, response_serializer=None)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send((port, port_ch))
    conn.recv()  # parent done
    server.stop(0)


def run(iters: int, backend: str, device: str) -> dict:
    import grpc
    import numpy as np
    import torch

    from ssd.services.tensor_channel import TensorChannel

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, backend, device), daemon=True)
    proc.start()
    port, port_ch = parent.recv()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 256 << 20)])
    requests: queue.Queue = queue.Queue()
    stream = channel.stream_stream(_METHOD)(iter(requests.get, None))
    holder = {}
    joiner = threading.Thread(target=lambda: holder.setdefault("ch", TensorChannel.connect("127.0.0.1", port_ch, backend, device)))
    joiner.start()
    requests.put(f"{next(iter(SHAPES))}|inline".encode())
    next(stream)
    joiner.join()
    ch = holder["ch"]
    results = {}
    for name, shape in SHAPES.items():
        nbytes = int(np.prod(shape)) * 4
        row = {"shape": list(shape), "bytes": nbytes}
        for mode in ("inline", backend):
            times = []
            for i in range(iters + 3):
                t0 = time.perf_counter()
                requests.put(f"{name}|{'inline' if mode == 'inline' else 'channel'}".encode())
                resp = next(stream)
                if mode == "inline":
                    t = torch.from_numpy(np.frombuffer(resp, dtype=np.float32).copy()).reshape(shape).to(device)
                else:
                    t = ch.recv(shape)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            times.sort()
            p50 = statistics.median(times)
            row[mode] = {"p50_ms": p50 * 1e3, "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3,
                         "GB_per_s": nbytes / p50 / 1e9}
        row["speedup_p50"] = row["inline"]["p50_ms"] / row[backend]["p50_ms"]
        results[name] = row
        print(f"{name:36s} {nbytes / 1e6:7.2f} MB  inline p50 {row['inline']['p50_ms']:7.2f} ms  "
              f"{backend} p50 {row[backend]['p50_ms']:7.2f} ms  ({row['speedup_p50']:.2f}x)", flush=True)
    requests.put(None)
    parent.send("done")
    proc.join(timeout=10)
    return {"backend": backend, "device": device, "iters": iters, "cpu_count": os.cpu_count(), "results": results}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["results"])
    b = res["backend"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [res["results"][n]["inline"]["p50_ms"] for n in names], 0.4, label="inline gRPC bytes")
    ax.bar([i + 0.2 for i in x], [res["results"][n][b]["p50_ms"] for n in names], 0.4, label=f"tensor channel ({b})")
    ax.set_xticks(list(x), [f"{n}\n{res['results'][n]['bytes'] / 1e6:.1f} MB" for n in names], fontsize=8)
    ax.set_ylabel("draft -> target, p50 ms")
    ax.set_title(f"q rows across processes ({res['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--backend", default="", help="gloo | nccl (default: nccl with a GPU, else gloo)")
    p.add_argument("--out", default="bench-results/channel")
    ns = p.parse_args(argv)
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    backend = ns.backend or ("nccl" if device != "cpu" else "gloo")
    res = run(ns.iters, backend, device)
    js, png = save_results(ns.out, "channel", res, plot)
    print(f"wrote {js} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
