// Python bindings of the one native extension (kernels/quant.py builds it; native.h lists it).
#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using namespace ssd_native;
    m.def("q4_1_linear", &q4_1_linear, "x [M, K] @ Q4_1 blocks [N, K/32*20]^T -> [M, N] (x's dtype)");
    m.def("q8_0_linear", &q8_0_linear, "x [M, K] @ Q8_0 blocks [N, K/32*34]^T -> [M, N] (x's dtype)");
    m.def("q4_1_panel_linear", &q4_1_panel_linear, "bf16 x [M, K] @ Q4_1 panels -> bf16 (or fp32) [M, N] (AVX-512 BF16)");
    m.def("q8_0_panel_linear", &q8_0_panel_linear, "bf16 x [M, K] @ Q8_0 panels -> bf16 (or fp32) [M, N] (AVX-512 BF16)");
    m.def("q4_1_vnni_linear", &q4_1_vnni_linear, "bf16 x [M, K], 8-bit per block, @ Q4_1 vnni panels -> bf16 (or fp32) [M, N]");
    m.def("q8_0_vnni_linear", &q8_0_vnni_linear, "bf16 x [M, K], 8-bit per block, @ Q8_0 vnni panels -> bf16 (or fp32) [M, N]");
    m.def("attend", &attend, "batch-invariant attention, one query row at a time (layer_ops.cpp)");
    m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension, one row at a time");
    m.def("layer_forward", &layer_forward, "one Llama decoder layer over quantized panels (layer_ops.cpp)");
    m.def("layers_forward", &layers_forward, "every decoder layer in one call (layer_ops.cpp)");
}
