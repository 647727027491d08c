"""--dtype: auto picks bf16 only where the hardware has it natively, and the choice reaches the
target, the draft (in its own process and in the draft service) and the KV cache."""
import pytest
import torch

from ssd.config import EngineConfig
from ssd.models.draft import DraftDescription, describe, draft_description, load_draft
from ssd.models.loader import default_target_path
from ssd.models.precision import cpu_has_native_bf16, resolve_dtype

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
ICELAKE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE = "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(ZEN4, True), (ICELAKE, False), (SAPPHIRE, True), (GRAVITON3, True), ("", False)])
def test_auto_is_bf16_only_with_native_bf16(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native
    dtype, why = resolve_dtype("auto", "cpu", cpuinfo)
    assert dtype == (torch.bfloat16 if native else torch.float32) and why.startswith("auto")


def test_explicit_dtype_wins_and_bad_names_are_refused():
    assert resolve_dtype("bfloat16", "cpu", ICELAKE)[0] == torch.bfloat16
    assert resolve_dtype("float32", "cpu", ZEN4)[0] == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float16")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="fp16")


@pytest.mark.slow
def test_draft_description_carries_dtype_and_kernels_to_the_loaded_draft():
    spec = draft_description("default", default_target_path(), 4, "bfloat16", batch_invariant=False)
    assert isinstance(spec, DraftDescription) and DraftDescription(spec.path).dtype == "float32"
    model = load_draft(spec)
    assert model.dtype == torch.bfloat16 and model.invariant is False
    assert model.new_cache(1, 16).k.dtype == torch.bfloat16  # the KV cache in the model dtype
    # different numerics are different drafts to the speculation index (its fingerprint)
    assert describe(spec) != draft_description("default", default_target_path(), 4, "float32").describe()
