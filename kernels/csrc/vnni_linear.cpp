// Quantized linears with 8-bit activations: integer dot products (AVX-512 VNNI), batch-invariant.
//
// The weights are the GGUF file's own blocks (Q4_1, Q8_0), repacked on load into the "vnni"
// panel layout (kernels/quant.py: to_vnni). Each bf16 activation row is quantized, per block of
// 32 inputs, to int8 on a scale of its own: dx = max|x| / 127, qx = round(x / dx) (ties to even),
// and for Q4_1 also the block's sum sx = dx * sum(qx). Then for a block and an output column
//   Q4_1  w = dw * qw + mw   ->   sum_k w x  ~  (dw * dx) * sum_k qw qx  +  mw * sx
//   Q8_0  w = dw * qw        ->   sum_k w x  ~  (dw * dx) * sum_k qw qx
// The integer sums are exact (vpdpbusd: four u8 x s8 products into an int32 lane; the weights are
// the unsigned side: Q4_1's nibbles as they are, Q8_0's q stored as q + 128, whose extra
// 128 * sum_k qx the row's own block sum takes back), so their order never matters. Each row's
// fp32 part is one fixed sequence per (row, column): blocks in k order, acc = fma(isum, dw * dx,
// acc), then acc = fma(mw, sx, acc). Nothing a row computes depends on the other rows of the
// call, on the tile it falls in or on the thread: batch-invariant by construction.
//
// Layout, for a panel of 16 output columns and a block of 32 inputs (byte 4j + t of a 64-byte
// vector is lane j's byte t):
//   Q4_1  fp16 d[16], fp16 min[16], then 4 vectors; vector i, byte 4j + t = the file's qs[col j][4i + t]
//         (low nibble: q[col j][4i + t], high nibble: q[col j][16 + 4i + t])             (320 bytes)
//   Q8_0  fp16 d[16], then 8 vectors; vector g, byte 4j + t = q[col j][4g + t] + 128    (544 bytes)
#include "native.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int QK = 32;
constexpr int PANEL = 16;
constexpr int VNNI_ROWS = 8;  // activation rows per tile (a verify block of K + 1 <= 8 rows is one)

// One row's activations, quantized per block: q (int8), dx, sx, and the integer sum of q.
struct QuantRows {
    std::vector<uint8_t> q;   // [M, K]
    std::vector<float> dx;    // [M, K / 32]
    std::vector<float> sx;    // [M, K / 32]: dx * sum(q) (Q4_1's min term)
    std::vector<int32_t> sq;  // [M, K / 32]: 128 * sum(q) (what Q8_0's + 128 adds)
};

__attribute__((target("avx512f,avx512bw,avx512vl")))
void quantize_rows(const uint16_t* x, int64_t M, int64_t K, QuantRows& out) {
    const int64_t nb = K / QK;
    out.q.resize(M * K);
    out.dx.resize(M * nb);
    out.sx.resize(M * nb);
    out.sq.resize(M * nb);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t b = 0; b < nb; ++b) {
            const uint16_t* xb = x + m * K + b * QK;  // 32 bf16, widened exactly
            const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))), 16));
            const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))), 16));
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            const float d = amax / 127.0f;
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            const __m512 vid = _mm512_set1_ps(id);
            const __m512i lim = _mm512_set1_epi32(127);
            // round to nearest even (the default MXCSR mode), clamped to [-127, 127]
            __m512i ql = _mm512_cvtps_epi32(_mm512_mul_ps(lo, vid));
            __m512i qh = _mm512_cvtps_epi32(_mm512_mul_ps(hi, vid));
            ql = _mm512_max_epi32(_mm512_min_epi32(ql, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
            qh = _mm512_max_epi32(_mm512_min_epi32(qh, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
            const int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
            uint8_t* qb = out.q.data() + m * K + b * QK;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(ql));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(qh));
            out.dx[m * nb + b] = d;
            out.sx[m * nb + b] = d * static_cast<float>(s);
            out.sq[m * nb + b] = 128 * s;
        }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline __m512i bcast4(const uint8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

struct Q4_1V {
    static constexpr int bytes = 320;
    static constexpr bool has_min = true;
    // the block's 8 weight vectors (u8 nibbles) from 4 packed ones
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
    static inline void weights(const uint8_t* b, __m512i* w) {
        const __m512i mask = _mm512_set1_epi8(0x0f);
        for (int i = 0; i < 4; ++i) {
            const __m512i raw = _mm512_loadu_si512(b + 64 + 64 * i);
            w[i] = _mm512_and_si512(raw, mask);                           // inputs 4i .. 4i + 3
            w[4 + i] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);  // inputs 16 + 4i ..
        }
    }
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
    static inline __m512i dot(const __m512i* w, const uint8_t* qx, int32_t) {
        __m512i a = _mm512_setzero_si512(), c = _mm512_setzero_si512();  // two chains, exact integers
        for (int g = 0; g < 8; g += 2) {
            a = _mm512_dpbusd_epi32(a, w[g], bcast4(qx + 4 * g));
            c = _mm512_dpbusd_epi32(c, w[g + 1], bcast4(qx + 4 * g + 4));
        }
        return _mm512_add_epi32(a, c);
    }
};

struct Q8_0V {
    static constexpr int bytes = 544;
    static constexpr bool has_min = false;
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
    static inline void weights(const uint8_t* b, __m512i* w) {
        for (int g = 0; g < 8; ++g) w[g] = _mm512_loadu_si512(b + 32 + 64 * g);
    }
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
    static inline __m512i dot(const __m512i* w, const uint8_t* qx, int32_t sq) {
        __m512i a = _mm512_setzero_si512(), c = _mm512_setzero_si512();
        for (int g = 0; g < 8; g += 2) {
            a = _mm512_dpbusd_epi32(a, w[g], bcast4(qx + 4 * g));
            c = _mm512_dpbusd_epi32(c, w[g + 1], bcast4(qx + 4 * g + 4));
        }
        return _mm512_sub_epi32(_mm512_add_epi32(a, c), _mm512_set1_epi32(sq));  // - 128 * sum qx
    }
};

template <class Q, int MT, int NT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline void vnni_tile(const QuantRows& xq, int64_t K, const uint8_t* w, int64_t m0, int64_t p0,
                      float* out /* [MT][NT * 16] */) {
    const int64_t blocks = K / QK;
    __m512 acc[MT][NT];
    for (int r = 0; r < MT; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < blocks; ++kb) {
        for (int t = 0; t < NT; ++t) {
            const uint8_t* b = w + ((p0 + t) * blocks + kb) * Q::bytes;
            __m512i wv[8];
            Q::weights(b, wv);
            const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
            __m512 mw;
            if (Q::has_min) mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
            for (int r = 0; r < MT; ++r) {
                const int64_t row = m0 + r;
                const __m512 s = _mm512_cvtepi32_ps(Q::dot(wv, xq.q.data() + row * K + kb * QK, xq.sq[row * blocks + kb]));  // exact: |s| < 2^24
                const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(xq.dx[row * blocks + kb]));
                acc[r][t] = _mm512_fmadd_ps(s, scale, acc[r][t]);
                if (Q::has_min) acc[r][t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xq.sx[row * blocks + kb]), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < MT; ++r)
        for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + r * NT * PANEL + t * PANEL, acc[r][t]);
}

template <class Q, int NT>
void vnni_column(const QuantRows& xq, int64_t M, int64_t K, const uint8_t* w, int64_t p0, float* tmp) {
    constexpr int W = NT * PANEL;
    for (int64_t m0 = 0; m0 < M; m0 += VNNI_ROWS) {
        float* out = tmp + m0 * W;
        switch (std::min<int64_t>(VNNI_ROWS, M - m0)) {
            case 8: vnni_tile<Q, 8, NT>(xq, K, w, m0, p0, out); break;
            case 7: vnni_tile<Q, 7, NT>(xq, K, w, m0, p0, out); break;
            case 6: vnni_tile<Q, 6, NT>(xq, K, w, m0, p0, out); break;
            case 5: vnni_tile<Q, 5, NT>(xq, K, w, m0, p0, out); break;
            case 4: vnni_tile<Q, 4, NT>(xq, K, w, m0, p0, out); break;
            case 3: vnni_tile<Q, 3, NT>(xq, K, w, m0, p0, out); break;
            case 2: vnni_tile<Q, 2, NT>(xq, K, w, m0, p0, out); break;
            default: vnni_tile<Q, 1, NT>(xq, K, w, m0, p0, out); break;
        }
    }
}

template <class Q>
torch::Tensor vnni_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t N, int64_t K,
                          const c10::optional<torch::Tensor>& bias, bool fp32_out) {
    ssd_native::detail::check_panel_args("vnni_linear", x, panels, N, K, Q::bytes);
    const int64_t M = x.size(0);
    torch::Tensor y = torch::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
    if (M == 0) return y;
    const torch::Tensor xc = x.contiguous();
    QuantRows xq;
    quantize_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, xq);
    const uint8_t* wp = panels.data_ptr<uint8_t>();
    // one panel per tile: the weights are then read as one sequential stream, panel after panel,
    // which the hardware prefetcher follows (two or four panels side by side, or software
    // prefetches, measured 1.3-1.9x slower at one row); the tiling never changes a row's numbers
    ssd_native::detail::run_panels(M, N, K, 1, bias, fp32_out, y, "vnni_linear", [&](int64_t p0, int64_t, float* tmp) {
        vnni_column<Q, 1>(xq, M, K, wp, p0, tmp);
    });
    return y;
}

}  // namespace

namespace ssd_native {

torch::Tensor q4_1_vnni_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                               bool fp32_out) {
    return vnni_linear<Q4_1V>(x, panels, N, K, bias, fp32_out);
}

torch::Tensor q8_0_vnni_linear(torch::Tensor x, torch::Tensor panels, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                               bool fp32_out) {
    return vnni_linear<Q8_0V>(x, panels, N, K, bias, fp32_out);
}

}  // namespace ssd_native
