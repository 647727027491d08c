"""`ssd serve` as a supervisor of its three services: a dead draft is started again on its port
while the target serves on; SIGTERM (also repeated) drains and stops every child."""
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from ssd.services.protos import pb, pb_grpc

pytestmark = pytest.mark.slow

LINE = re.compile(r"gateway: grpc (\S+), .*draft (\S+); pids draft=(\d+) target=(\d+) gateway=(\d+)\)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _generate(addr: str) -> int:
    stub = pb_grpc.GatewayStub(grpc.insecure_channel(addr))
    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Say hi.")]),
                             sampling=pb.SamplingParams(max_tokens=8))
    return sum(len(r.token_ids) for r in stub.Generate(req, timeout=120))


def test_draft_restarted_and_sigterm_stops_everything(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ssd.cli", "serve", "--port", "0", "--http-port", "-1",
                             "--max-batch", "2", "--max-model-len", "256",
                             "--metrics-port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        m = None
        deadline = time.monotonic() + 300
        seen = []
        while m is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, f"ssd serve exited: {''.join(seen)[-2000:]}"
            seen.append(line)
            m = LINE.search(line)
        gw_addr, draft_addr = m.group(1), m.group(2)
        pids = [int(m.group(i)) for i in (3, 4, 5)]
        urls = re.findall(r"http://\S+/metrics", proc.stderr.readline())
        assert len(urls) == 3
        from ssd.services.metrics import scrape

        for url in urls:
            assert scrape(url), url  # each service's Prometheus text
        assert _generate(gw_addr) == 8
        os.kill(pids[0], signal.SIGKILL)  # the draft dies
        assert _generate(gw_addr) == 8  # the target serves on, target-only
        while True:
            line = proc.stderr.readline()
            assert line, "ssd serve exited instead of restarting the draft"
            if "draft back on" in line:
                break
        new_draft = int(re.search(r"pid (\d+)", line).group(1))
        draft = pb_grpc.DraftStub(grpc.insecure_channel(draft_addr))
        _wait(lambda: draft.Load(pb.LoadRequest(), timeout=5) is not None, 60, "the draft on its old port")
        assert _generate(gw_addr) == 8
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # a second signal must not orphan anything
        assert proc.wait(timeout=120) == 143  # it drained and exited itself (128 + SIGTERM)
        _wait(lambda: not any(_alive(p) for p in pids[1:] + [new_draft]), 30, "every child to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
