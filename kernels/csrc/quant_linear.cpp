// Weight-only quantized linear layers over GGUF blocks, row-invariant by construction (AVX-512).
//
// y[m, n] = sum_k x[m, k] * w[n, k] where w's rows are stored as GGUF blocks of 32 weights:
//   Q4_1  {fp16 d; fp16 min; uint8 qs[16]}  w[j] = d * (qs[j] & 15) + min,  w[j + 16] = d * (qs[j] >> 4) + min
//   Q8_0  {fp16 d; int8 qs[32]}             w[j] = d * qs[j]
// The weights are exactly the file's numbers (each dequantized value is computed in fp32, as the
// file's reference dequantizer does); activations are fp32 or bf16 (widened exactly to fp32);
// products are summed in fp32.
//
// Batch invariance: every output element is computed by the same instruction sequence whatever
// M (rows in the call), the row's position in the call, or the thread count: one 16-lane fp32
// accumulator per (row, column), fed block after block in k order by fused multiply-adds of the
// dequantized weights (low half, then high half), then one fixed horizontal reduction. Rows are
// tiled (up to ROWS_TILE share one dequantization) and columns are tiled and split across threads,
// but a tile only shares loads, never partial sums. Compiled with -ffp-contract=off so that no
// expression outside the intrinsics is fused differently in different instantiations.
#include "native.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace {

constexpr int QK = 32;             // weights per block
constexpr int Q4_1_BYTES = 20;     // 2 + 2 + 16
constexpr int Q8_0_BYTES = 34;     // 2 + 32
constexpr int ROWS_TILE = 4;       // activation rows sharing one dequantized block
constexpr int COLS_TILE = 4;       // output columns computed together (independent accumulators)

inline float half_to_float(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}


struct Q4_1 {
    static constexpr int bytes = Q4_1_BYTES;
    // the two 16-weight halves of one block
    static inline void dequant(const uint8_t* b, __m512& lo, __m512& hi) {
        const __m512 table = _mm512_fmadd_ps(  // the block's 16 possible values d * q + min, q = 0..15
            _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_ps(half_to_float(b)), _mm512_set1_ps(half_to_float(b + 2)));
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
        lo = _mm512_permutexvar_ps(q, table);  // the permute reads the index's low 4 bits: qs & 15
        hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
    }
};

struct Q8_0 {
    static constexpr int bytes = Q8_0_BYTES;
    static inline void dequant(const uint8_t* b, __m512& lo, __m512& hi) {
        const __m512 d = _mm512_set1_ps(half_to_float(b));
        lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)))), d);
        hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)))), d);
    }
};

// One tile: MT rows (of xf, fp32 [M, K]) x NT columns (weight rows starting at n0).
template <class Q, int MT, int NT>
inline void tile(const float* xf, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t m0, int64_t n0,
                 float* out /* [MT][NT] */) {
    __m512 acc[MT][NT];
    for (int r = 0; r < MT; ++r)
        for (int j = 0; j < NT; ++j) acc[r][j] = _mm512_setzero_ps();
    const int64_t blocks = K / QK;
    for (int64_t kb = 0; kb < blocks; ++kb) {
        __m512 xl[MT], xh[MT];
        for (int r = 0; r < MT; ++r) {
            const float* xr = xf + (m0 + r) * K + kb * QK;
            xl[r] = _mm512_loadu_ps(xr);
            xh[r] = _mm512_loadu_ps(xr + 16);
        }
        for (int j = 0; j < NT; ++j) {
            __m512 lo, hi;
            Q::dequant(w + (n0 + j) * row_bytes + kb * Q::bytes, lo, hi);
            for (int r = 0; r < MT; ++r) {
                acc[r][j] = _mm512_fmadd_ps(lo, xl[r], acc[r][j]);
                acc[r][j] = _mm512_fmadd_ps(hi, xh[r], acc[r][j]);
            }
        }
    }
    for (int r = 0; r < MT; ++r)
        for (int j = 0; j < NT; ++j) out[r * NT + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <class Q, int NT>
inline void column_tile(const float* xf, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t n0,
                        float* tmp /* [M][NT] */) {
    float part[ROWS_TILE * NT];
    int64_t m0 = 0;
    for (; m0 + ROWS_TILE <= M; m0 += ROWS_TILE) {
        tile<Q, ROWS_TILE, NT>(xf, K, w, row_bytes, m0, n0, part);
        std::memcpy(tmp + m0 * NT, part, sizeof(float) * ROWS_TILE * NT);
    }
    const int64_t rest = M - m0;
    if (rest == 3) tile<Q, 3, NT>(xf, K, w, row_bytes, m0, n0, part);
    if (rest == 2) tile<Q, 2, NT>(xf, K, w, row_bytes, m0, n0, part);
    if (rest == 1) tile<Q, 1, NT>(xf, K, w, row_bytes, m0, n0, part);
    if (rest) std::memcpy(tmp + m0 * NT, part, sizeof(float) * rest * NT);
}

template <class Q>
torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& blocks, int64_t N, int64_t K,
                           const c10::optional<torch::Tensor>& bias) {
    TORCH_CHECK(x.device().is_cpu() && blocks.device().is_cpu(), "quant_linear: CPU tensors only");
    TORCH_CHECK(K % QK == 0, "quant_linear: in_features must be a multiple of 32, got ", K);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "quant_linear: x must be [M, ", K, "]");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "quant_linear: x must be fp32 or bf16");
    const int64_t row_bytes = K / QK * Q::bytes;
    TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.numel() == N * row_bytes,
                "quant_linear: blocks must be contiguous uint8 [", N, ", ", row_bytes, "]");
    const int64_t M = x.size(0);
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    const torch::Tensor xf = x.to(at::kFloat).contiguous();  // exact widening for bf16
    torch::Tensor y = torch::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
    const float* xp = xf.data_ptr<float>();
    const uint8_t* wp = blocks.data_ptr<uint8_t>();
    const float* bp = nullptr;
    torch::Tensor bf;
    if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->numel() == N, "quant_linear: bias must have ", N, " elements");
        bf = bias->to(at::kFloat).contiguous();
        bp = bf.data_ptr<float>();
    }
    void* yp = y.data_ptr();
    const int64_t tiles = (N + COLS_TILE - 1) / COLS_TILE;
    // a thread's share of columns: enough work to pay for the hand-off, whatever M is
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K));
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
        std::vector<float> tmp(M * COLS_TILE);
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t n0 = t * COLS_TILE;
            const int64_t nt = std::min<int64_t>(COLS_TILE, N - n0);
            switch (nt) {
                case 4: column_tile<Q, 4>(xp, M, K, wp, row_bytes, n0, tmp.data()); break;
                case 3: column_tile<Q, 3>(xp, M, K, wp, row_bytes, n0, tmp.data()); break;
                case 2: column_tile<Q, 2>(xp, M, K, wp, row_bytes, n0, tmp.data()); break;
                default: column_tile<Q, 1>(xp, M, K, wp, row_bytes, n0, tmp.data()); break;
            }
            ssd_native::detail::store_columns(tmp.data(), M, nt, N, n0, bp, !bf16, yp);
        }
    });
    return y;
}

}  // namespace

namespace ssd_native {

torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor blocks, int64_t N, int64_t K, c10::optional<torch::Tensor> bias) {
    return quant_linear<Q4_1>(x, blocks, N, K, bias);
}

torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor blocks, int64_t N, int64_t K, c10::optional<torch::Tensor> bias) {
    return quant_linear<Q8_0>(x, blocks, N, K, bias);
}


// ---- the bf16 panel layout (CPUs with AVX-512 BF16, bf16 activations) ---------------------------
// Repacked on load (kernels/quant.py: to_panels) so that sixteen output columns share a vector:
// for a panel of 16 columns and a block of 32 inputs,
//   Q4_1  fp16 d[16], fp16 min[16], then 8 groups of 32 bytes; in group g, byte 2j+t holds
//         q[col j][4g+t] in its low nibble and q[col j][4g+2+t] in its high nibble     (320 bytes)
//   Q8_0  fp16 d[16], then 16 pairs of 32 bytes; in pair i, byte 2j+t (j < 8) and 16+2(j-8)+t
//         (j >= 8) hold q[col j][2i+t]                                                 (544 bytes)
// The integer q is exact in bf16, so vdpbf16ps computes q * x pairs exactly and sums them in
// fp32; per block and column the sum is scaled: acc = fma(sum, d, acc), then + min * sum(x)
// (Q4_1). Each row's sequence of operations is fixed (its own accumulators, blocks in order, pairs
// in order), whatever M, the tile or the thread: batch-invariant by construction.
constexpr int PANEL = 16;
constexpr int Q4_1_PANEL_BYTES = 320;
constexpr int Q8_0_PANEL_BYTES = 544;
constexpr int PREFETCH_BLOCKS = 8;
constexpr int PANEL_ROWS = 8;  // activation rows per panel tile

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline __m512 dp(__m512 acc, __m512i q, const uint16_t* x2) {  // acc += q . (x[0], x[1]) per lane
    int32_t pair;
    std::memcpy(&pair, x2, 4);
    return _mm512_dpbf16_ps(acc, (__m512bh)q, (__m512bh)_mm512_set1_epi32(pair));
}

// block sums of each row (Q4_1's min term), fp32, one fixed order per row
inline void block_sums(const uint16_t* x, int64_t M, int64_t K, float* out) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t kb = 0; kb < K / QK; ++kb) {
            const uint16_t* xb = x + m * K + kb * QK;  // 32 bf16, widened exactly
            const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))), 16));
            const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))), 16));
            out[m * (K / QK) + kb] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
}

struct Q4_1P {
    static constexpr int bytes = Q4_1_PANEL_BYTES;
    static constexpr bool has_min = true;
    // one block of one panel for MT rows: s0/s1 accumulate the block's q . x (two chains per row)
    template <int MT>
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
    static inline void block(const uint8_t* b, const uint16_t* const* x, __m512* s0, __m512* s1, const __m512i& table) {
        for (int g = 0; g < 8; ++g) {
            const __m512i raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 + 32 * g)));
            const __m512i lo = _mm512_permutexvar_epi16(raw, table);  // low 5 bits index a doubled table
            const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 4), table);
            for (int r = 0; r < MT; ++r) {
                s0[r] = dp(s0[r], lo, x[r] + 4 * g);
                s1[r] = dp(s1[r], hi, x[r] + 4 * g + 2);
            }
        }
    }
};

struct Q8_0P {
    static constexpr int bytes = Q8_0_PANEL_BYTES;
    static constexpr bool has_min = false;
    template <int MT>
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
    static inline void block(const uint8_t* b, const uint16_t* const* x, __m512* s0, __m512* s1, const __m512i&) {
        for (int i = 0; i < 16; i += 2) {
            __m512i q[2];
            for (int h = 0; h < 2; ++h) {
                const uint8_t* p = b + 32 + 32 * (i + h);
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
                q[h] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // exact: |q| <= 127
            }
            for (int r = 0; r < MT; ++r) {
                s0[r] = dp(s0[r], q[0], x[r] + 2 * i);
                s1[r] = dp(s1[r], q[1], x[r] + 2 * i + 2);
            }
        }
    }
};

template <class Q, int MT, int NT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline void panel_tile(const uint16_t* x, const float* xs, int64_t K, const uint8_t* w, int64_t m0, int64_t p0,
                       float* out /* [MT][NT * 16] */) {
    alignas(64) static const uint16_t kTable[32] = {  // bf16 of 0..15, twice
        0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
        0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
    const __m512i table = _mm512_load_si512(kTable);
    const int64_t blocks = K / QK;
    __m512 acc[MT][NT];
    for (int r = 0; r < MT; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < blocks; ++kb) {
        const uint16_t* xr[MT];
        for (int r = 0; r < MT; ++r) xr[r] = x + (m0 + r) * K + kb * QK;
        for (int t = 0; t < NT; ++t) {
            const uint8_t* b = w + ((p0 + t) * blocks + kb) * Q::bytes;
            if (kb + PREFETCH_BLOCKS < blocks)  // the panel's bytes a few blocks ahead (a pure hint)
                for (int c = 0; c < Q::bytes; c += 64)
                    _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH_BLOCKS * Q::bytes + c), _MM_HINT_T0);
            __m512 s0[MT], s1[MT];
            for (int r = 0; r < MT; ++r) s0[r] = s1[r] = _mm512_setzero_ps();
            Q::template block<MT>(b, xr, s0, s1, table);
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
            for (int r = 0; r < MT; ++r) acc[r][t] = _mm512_fmadd_ps(_mm512_add_ps(s0[r], s1[r]), d, acc[r][t]);
            if (Q::has_min) {
                const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
                for (int r = 0; r < MT; ++r)
                    acc[r][t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[(m0 + r) * blocks + kb]), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < MT; ++r)
        for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + r * NT * PANEL + t * PANEL, acc[r][t]);
}

template <class Q, int NT>
inline void panel_column(const uint16_t* x, const float* xs, int64_t M, int64_t K, const uint8_t* w, int64_t p0,
                         float* tmp /* [M][NT * 16] */) {
    // rows in tiles of up to PANEL_ROWS sharing one dequantization of the panel (a verify block of
    // K + 1 rows is one tile); every row's own operations are the same in any tile
    constexpr int W = NT * PANEL;
    for (int64_t m0 = 0; m0 < M; m0 += PANEL_ROWS) {
        float* out = tmp + m0 * W;
        switch (std::min<int64_t>(PANEL_ROWS, M - m0)) {
            case 8: panel_tile<Q, 8, NT>(x, xs, K, w, m0, p0, out); break;
            case 7: panel_tile<Q, 7, NT>(x, xs, K, w, m0, p0, out); break;
            case 6: panel_tile<Q, 6, NT>(x, xs, K, w, m0, p0, out); break;
            case 5: panel_tile<Q, 5, NT>(x, xs, K, w, m0, p0, out); break;
            case 4: panel_tile<Q, 4, NT>(x, xs, K, w, m0, p0, out); break;
            case 3: panel_tile<Q, 3, NT>(x, xs, K, w, m0, p0, out); break;
            case 2: panel_tile<Q, 2, NT>(x, xs, K, w, m0, p0, out); break;
            default: panel_tile<Q, 1, NT>(x, xs, K, w, m0, p0, out); break;
        }
    }
}

template <class Q>
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t N, int64_t K,
                           const c10::optional<torch::Tensor>& bias, bool fp32_out) {
    ssd_native::detail::check_panel_args("panel_linear", x, panels, N, K, Q::bytes);
    const int64_t M = x.size(0);
    torch::Tensor y = torch::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
    if (M == 0) return y;
    const torch::Tensor xc = x.contiguous();
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
    std::vector<float> xs(Q::has_min ? M * (K / QK) : 0);
    if (Q::has_min) block_sums(xp, M, K, xs.data());
    const uint8_t* wp = panels.data_ptr<uint8_t>();
    ssd_native::detail::run_panels(M, N, K, 2, bias, fp32_out, y, "panel_linear", [&](int64_t p0, int64_t nt, float* tmp) {
        if (nt == 2) panel_column<Q, 2>(xp, xs.data(), M, K, wp, p0, tmp);
        else panel_column<Q, 1>(xp, xs.data(), M, K, wp, p0, tmp);
    });
    return y;
}

torch::Tensor q4_1_panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                                bool fp32_out) {
    return panel_linear<Q4_1P>(x, panels, N, K, bias, fp32_out);
}

torch::Tensor q8_0_panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                                bool fp32_out) {
    return panel_linear<Q8_0P>(x, panels, N, K, bias, fp32_out);
}

}  // namespace ssd_native
