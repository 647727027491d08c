// The C++ kernels of ssd.kernels, one extension (bindings.cpp): quantized linears
// (quant_linear.cpp: bf16 or fp32 activations; vnni_linear.cpp: 8-bit activations) and the per-token layer ops (layer_ops.cpp).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace ssd_native {

torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor blocks, int64_t N, int64_t K, c10::optional<torch::Tensor> bias);
torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor blocks, int64_t N, int64_t K, c10::optional<torch::Tensor> bias);
torch::Tensor q4_1_panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                                bool fp32_out);
torch::Tensor q8_0_panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                                bool fp32_out);
torch::Tensor q4_1_vnni_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                               bool fp32_out);
torch::Tensor q8_0_vnni_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                               bool fp32_out);
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                     c10::optional<torch::Tensor> limits, int64_t kv_len, c10::optional<torch::Tensor> slots);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor layer_forward(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> panels,
                            std::vector<int64_t> kinds, std::vector<int64_t> dims, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor write_cols,
                            int64_t slot_start, int64_t write_start, c10::optional<torch::Tensor> mask,
                            c10::optional<torch::Tensor> limits, int64_t kv_len, double eps);
std::vector<torch::Tensor> layers_forward(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> panels,
                                          std::vector<int64_t> kinds, std::vector<int64_t> dims, torch::Tensor cos,
                                          torch::Tensor sin, torch::Tensor k_all, torch::Tensor v_all, torch::Tensor slots,
                                          torch::Tensor write_cols, int64_t slot_start, int64_t write_start,
                                          c10::optional<torch::Tensor> mask, c10::optional<torch::Tensor> limits,
                                          int64_t kv_len, double eps, std::vector<int64_t> capture);

// shared by the kernels' files
namespace detail {

inline float bf16_to_float(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// columns [c0, c0 + W) of y [M, N] (fp32, or bf16 rounded once) from fp32 sums tmp [M][W], plus
// the bias (fp32) where there is one
inline void store_columns(const float* tmp, int64_t M, int64_t W, int64_t N, int64_t c0, const float* bias, bool fp32_out,
                          void* y) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < W; ++j) {
            float v = tmp[m * W + j];
            if (bias) v = v + bias[c0 + j];
            if (fp32_out)
                static_cast<float*>(y)[m * N + c0 + j] = v;
            else
                static_cast<uint16_t*>(y)[m * N + c0 + j] = float_to_bf16(v);
        }
}

// The frame of the panel kernels (16 output columns per panel): checks of x [M, K] bf16 and the
// panels, then checks and fp32 copy of the bias.
inline void check_panel_args(const char* name, const torch::Tensor& x, const torch::Tensor& panels, int64_t N, int64_t K,
                             int64_t panel_bytes) {
    TORCH_CHECK(x.device().is_cpu() && panels.device().is_cpu(), name, ": CPU tensors only");
    TORCH_CHECK(K % 32 == 0 && N % 16 == 0, name, ": needs in_features % 32 == 0 and out_features % 16 == 0");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kBFloat16, name, ": x must be bf16 [M, ", K, "]");
    const int64_t bytes = N / 16 * (K / 32) * panel_bytes;
    TORCH_CHECK(panels.scalar_type() == at::kByte && panels.is_contiguous() && panels.numel() == bytes,
                name, ": panels must be contiguous uint8 with ", bytes, " bytes");
}

// y [M, N] from tiles of NT panels split across threads: column(p0, nt, tmp) fills tmp [M][nt * 16]
// with the fp32 sums of panels p0 .. p0 + nt - 1; the bias is added and the result stored.
template <class Column>
void run_panels(int64_t M, int64_t N, int64_t K, int NT, const c10::optional<torch::Tensor>& bias, bool fp32_out,
                torch::Tensor& y, const char* name, Column column) {
    torch::Tensor bf;
    const float* bp = nullptr;
    if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->numel() == N, name, ": bias must have ", N, " elements");
        bf = bias->to(at::kFloat).contiguous();
        bp = bf.data_ptr<float>();
    }
    void* yp = y.data_ptr();
    const int64_t P = N / 16;
    const int64_t tiles = (P + NT - 1) / NT;
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, K));
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
        std::vector<float> tmp(M * NT * 16);
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t p0 = t * NT;
            const int64_t nt = std::min<int64_t>(NT, P - p0);
            column(p0, nt, tmp.data());
            store_columns(tmp.data(), M, nt * 16, N, p0 * 16, bp, fp32_out, yp);
        }
    });
}

}  // namespace detail

}  // namespace ssd_native
