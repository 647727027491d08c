// The C++ kernels of ssd.kernels, one extension (bindings.cpp): quantized linears
// (quant_linear.cpp) and the per-token layer ops (layer_ops.cpp).
#pragma once
#include <torch/extension.h>

namespace ssd_native {

torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor blocks, int64_t N, int64_t K, c10::optional<torch::Tensor> bias);
torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor blocks, int64_t N, int64_t K, c10::optional<torch::Tensor> bias);
torch::Tensor q4_1_panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                                bool fp32_out);
torch::Tensor q8_0_panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                                bool fp32_out);
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                     c10::optional<torch::Tensor> limits, int64_t kv_len, c10::optional<torch::Tensor> slots);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor layer_forward(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> panels,
                            std::vector<int64_t> kinds, std::vector<int64_t> dims, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor write_cols,
                            int64_t slot_start, int64_t write_start, c10::optional<torch::Tensor> mask,
                            c10::optional<torch::Tensor> limits, int64_t kv_len, double eps);

}  // namespace ssd_native
