"""The llama.cpp baseline of `ssd bench` (ssd/benchmarks/llamacpp.py), against a stand-in for
llama-cpp-python's Llama class (the real package builds llama.cpp from source, minutes that the
test tier does not spend): the same prompt ids, stop tokens, token budget and sampling settings
reach llama.cpp's loop; one instance per thread count; a crash of llama.cpp's own process, a
missing package or a missing GGUF is a reported skip, not a crash of the bench."""
import sys
import types
from concurrent.futures.process import BrokenProcessPool

import pytest

from ssd.benchmarks import llamacpp
from ssd.config import SamplingParams


class FakeLlama:
    made = []

    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, n_batch, seed, verbose):
        self.n_threads, self.n_ctx, self.calls = n_threads, n_ctx, []
        FakeLlama.made.append(self)

    def generate(self, tokens, reset, **kw):
        self.calls.append((list(tokens), kw))
        yield from [7, 8, 9, 2, 5, 5, 5]  # token 2 is the stop token below


@pytest.fixture
def fake_llama(monkeypatch):
    FakeLlama.made = []
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    monkeypatch.setattr(llamacpp, "_LLM", {})
    return FakeLlama


def _ref(tmp_path, params, threads=1, all_cores=4, **kw):
    return llamacpp.LlamaCppReference(tmp_path / "m.gguf", kw.pop("prompts", [[1, 2, 3], [4, 5]]), params, (2,),
                                      threads, all_cores, lambda name, n: f"{name}/{n}", isolate=False)


def test_prompts_stops_and_threads_reach_llama_cpp(fake_llama, tmp_path):
    prompts = [[1, 2, 3], [4, 5]]
    out = _ref(tmp_path, SamplingParams(max_tokens=6), prompts=prompts).run(first=False)
    assert [(m.n_threads, m.n_ctx) for m in fake_llama.made] == [(1, 3 + 6 + 16), (4, 3 + 6 + 16)]
    assert set(out) == {"llama.cpp", "llama.cpp-all"}
    one = out["llama.cpp"]
    assert one["outputs"] == [[7, 8, 9, 2]] * 2 and one["tokens"] == 8  # stopped at the stop token
    assert one["label"] == "llama.cpp/1" and one["threads"] == 1
    calls = fake_llama.made[0].calls
    assert [c[0] for c in calls] == prompts and calls[0][1] == {"temp": 0.0, "repeat_penalty": 1.0}  # greedy
    short = _ref(tmp_path, SamplingParams(max_tokens=2), all_cores=1)
    assert short.run(first=True)["llama.cpp"]["outputs"] == [[7, 8]] * 2  # the token budget
    assert len(short.systems) == 1  # all cores = the target's: one system


def test_sampled_settings_are_llama_cpps_own_names(fake_llama, tmp_path):
    p = SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, top_k=0, seed=4)
    _ref(tmp_path, p, all_cores=1, prompts=[[1]]).run(first=False)
    assert fake_llama.made[0].calls[0][1] == {"temp": 0.8, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0}


def test_a_crash_of_llama_cpps_process_is_a_reported_skip(tmp_path):
    class CrashedPool:
        def submit(self, *a):
            raise BrokenProcessPool("a child process terminated abruptly")

        def shutdown(self, cancel_futures=False):
            self.closed = True

    ref = _ref(tmp_path, SamplingParams(max_tokens=4))
    ref.pools = {name: CrashedPool() for name, _, _ in ref.systems}
    assert ref.run(first=True) == {} and "crashed" in ref.failed
    assert all(p.closed for p in ref.pools.values()) and ref.run(first=False) == {}


def test_agreeing_prefix_and_what_is_skipped(monkeypatch, tmp_path):
    assert llamacpp.agreeing_prefix([[1, 2, 3], [4, 9]], [[1, 2, 5], [4, 5]]) == pytest.approx(1.5)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    assert "not installed" in llamacpp.available()
    assert llamacpp.gguf_of("some/dir", tmp_path) == (None, f"no .gguf file in {tmp_path}")
    (tmp_path / "x.gguf").write_bytes(b"")
    assert llamacpp.gguf_of("some/dir", tmp_path) == (tmp_path / "x.gguf", "")
    path, why = llamacpp.gguf_of("default", tmp_path)
    assert why == "" and path.name.endswith(".gguf") and path.exists()
