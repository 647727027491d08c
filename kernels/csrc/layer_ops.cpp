// Per-token layer ops, batch-invariant by construction (AVX-512): attention over KV-cache columns
// one query row at a time, and RMSNorm one row at a time.
//
// Attention:
// For each (sequence b, query head h, query token i): the visible columns (mask[b, i, c], or
// c < limit[b, i] for append-causal blocks) are gathered in column order; scores q . k_c / sqrt(D)
// in fp32; softmax with the exact row max; out = sum_c p_c v_c / sum_c p_c with columns added in
// order. A row's result is a function of its q and of the sequence of its visible (k, v) columns
// only: not of the number of rows in the call, of other sequences, nor of how many masked columns
// lie between its visible ones (tree masks, rolled-back columns, padding). So a token gets the
// same bits alone (AR), in a verify block, in a batch or as a tree branch. Fully masked rows give
// zeros. Compiled with -ffp-contract=off; exp is a fixed polynomial applied element-wise.
#include "native.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using ssd_native::detail::bf16_to_float;
using ssd_native::detail::float_to_bf16;

// exp for x <= 0 (scores minus the row max): 2^n * p(r), |r| <= ln2 / 2, degree-7 polynomial
inline __m512 exp_nonpositive(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f);
    x = _mm512_max_ps(x, lo);  // below: the result underflows to ~0 either way
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

template <typename T>
inline void load_row(const T* src, int64_t D, float* dst) {
    for (int64_t d = 0; d < D; ++d) {
        if constexpr (std::is_same_v<T, float>) dst[d] = src[d];
        else dst[d] = bf16_to_float(src[d]);
    }
}

template <typename T>
inline __m512 load16(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
        return _mm512_loadu_ps(p);
    } else {
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
    }
}

// one query row: qf [D] fp32 (already scaled), columns `cols` of k/v rows (stride in elements)
// The 16 lane-sums of 16 vectors at once: lane 4 * (c % 4) + c / 4 of the result is the sum of
// v[c]'s lanes, added in the same tree for every c: lane l with l + 8, then m with m + 4, m + 2,
// m + 1 (a butterfly: 30 shuffles and 15 adds for 16 sums instead of 16 full reductions).
inline __m512 reduce16(const __m512* v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; ++i)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; ++i)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

constexpr int MAX_GROUP = 16;  // query heads sharing one kv head, computed together

// The R query rows of one token that share a kv head (and so their visible columns): qf [R][D]
// fp32, already scaled; scores [R][n_cols + 16] scratch; out [R][D]. Each k and v column is
// widened once for all R rows; every row's own sequence of operations is the one it would have
// alone (its accumulators are its own), so grouping changes no bits.
// RT, NT: R and D / 16 known at compile time (0: given at run time), so that the accumulators
// of the common head shapes stay in registers; the operations are the same either way.
template <typename T, int RT, int NT>
void attend_rows(const float* qf, int64_t R_, const T* k, const T* v, int64_t col_stride, const int64_t* cols,
                 int64_t n_cols, int64_t D_, float* scores, float* out) {
    const int64_t R = RT ? RT : R_, D = NT ? 16 * NT : D_;
    const int64_t stride = n_cols + 16;
    if (n_cols == 0) {
        std::memset(out, 0, sizeof(float) * R * D);
        return;
    }
    // scores, 16 columns at a time: each column's 16-lane partial products reduced together by
    // reduce16, whose pairing of lanes is the same for every column (a column's score does not
    // depend on the group it falls in, on its neighbours, or on the zero padding of the last group)
    alignas(64) float group[16];
    alignas(64) float kw[256];  // one column of k, widened (D <= 256)
    __m512 part[RT ? RT : MAX_GROUP][16];
    for (int64_t j0 = 0; j0 < n_cols; j0 += 16) {
        const int64_t cnt = std::min<int64_t>(16, n_cols - j0);
        for (int64_t i = 0; i < 16; ++i) {
            for (int64_t r = 0; r < R; ++r) part[r][i] = _mm512_setzero_ps();
            if (i >= cnt) continue;
            const T* kc = k + cols[j0 + i] * col_stride;
            for (int64_t d = 0; d < D; d += 16) _mm512_store_ps(kw + d, load16(kc + d));
            for (int64_t r = 0; r < R; ++r) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + r * D + d), _mm512_load_ps(kw + d), acc);
                part[r][i] = acc;
            }
        }
        for (int64_t r = 0; r < R; ++r) {
            _mm512_store_ps(group, reduce16(part[r]));
            for (int64_t i = 0; i < cnt; ++i) scores[r * stride + j0 + i] = group[4 * (i % 4) + i / 4];
        }
    }
    // softmax numerators and their sum: the max is exact in any order (16 lanes, then across
    // them); the sum is 16 lane sums (lane l adds columns l, l + 16, ... in order, the padding
    // lanes of the last vector add exact zeros) reduced by one fixed tree: a row's sum depends
    // only on its own scores
    float sums[MAX_GROUP];
    for (int64_t r = 0; r < R; ++r) {
        float* sr = scores + r * stride;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n_cols; j += 16) {
            const __mmask16 m = n_cols - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n_cols - j)) - 1);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, sr + j));
        }
        const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n_cols; j += 16) {
            const __mmask16 m = n_cols - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n_cols - j)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + j), vmx)));
            _mm512_mask_storeu_ps(sr + j, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        sums[r] = _mm512_reduce_add_ps(vsum);
    }
    // the weighted sum of v: up to 4 vectors of a column (64 of D) for all R rows per pass over
    // the columns, so 4R accumulator chains run side by side; each output lane still adds its
    // columns in column order, as alone
    constexpr int DC = 4;
    for (int64_t d0 = 0; d0 < D; d0 += 16 * DC) {
        const int nc = static_cast<int>(std::min<int64_t>(DC, (D - d0) / 16));
        __m512 acc[RT ? RT : MAX_GROUP][DC];
        for (int64_t r = 0; r < R; ++r)
            for (int c = 0; c < DC; ++c) acc[r][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n_cols; ++j) {
            const T* vr = v + cols[j] * col_stride + d0;
            for (int c = 0; c < nc; ++c) {
                const __m512 vc = load16(vr + 16 * c);
                for (int64_t r = 0; r < R; ++r)
                    acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * stride + j]), vc, acc[r][c]);
            }
        }
        for (int64_t r = 0; r < R; ++r)
            for (int c = 0; c < nc; ++c)
                _mm512_storeu_ps(out + r * D + d0 + 16 * c, _mm512_div_ps(acc[r][c], _mm512_set1_ps(sums[r])));
    }
}

template <typename T>
using AttendRows = void (*)(const float*, int64_t, const T*, const T*, int64_t, const int64_t*, int64_t, int64_t, float*, float*);

// the compiled shape for rep query heads per kv head and head_dim D, or the run-time one
template <typename T>
AttendRows<T> pick_attend_rows(int64_t rep, int64_t D) {
#define SSD_ROWS(R) \
    if (rep == R && D == 64) return attend_rows<T, R, 4>; \
    if (rep == R && D == 128) return attend_rows<T, R, 8>;
    SSD_ROWS(1) SSD_ROWS(2) SSD_ROWS(3) SSD_ROWS(4) SSD_ROWS(5) SSD_ROWS(6) SSD_ROWS(7) SSD_ROWS(8)
#undef SSD_ROWS
    return attend_rows<T, 0, 0>;
}

template <typename T>
torch::Tensor attend_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          const c10::optional<torch::Tensor>& mask, const c10::optional<torch::Tensor>& limits,
                          int64_t kv_len, const c10::optional<torch::Tensor>& slots) {
    const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3), Hkv = k.size(1);
    const int64_t rep = Hq / Hkv;
    const torch::Tensor qc = q.contiguous();
    torch::Tensor out = torch::empty_like(qc);
    const T* qp = reinterpret_cast<const T*>(qc.data_ptr());
    T* op = reinterpret_cast<T*>(out.data_ptr());
    const T* kp = reinterpret_cast<const T*>(k.data_ptr());
    const T* vp = reinterpret_cast<const T*>(v.data_ptr());
    const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
    const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && v.stride(2) == ks2, "attend: k/v rows must be contiguous, alike");
    const bool* mp = nullptr;
    torch::Tensor mc, lc;
    const int64_t* lp = nullptr;
    if (mask.has_value() && mask->defined()) {
        mc = mask->contiguous();
        mp = mc.data_ptr<bool>();
    } else {
        lc = limits->contiguous();
        lp = lc.data_ptr<int64_t>();
    }
    torch::Tensor sc;  // with slots, k and v are a whole layer's cache and row b reads slot slots[b]
    const int64_t* sp = nullptr;
    if (slots.has_value() && slots->defined()) {
        sc = slots->to(at::kLong).contiguous();
        TORCH_CHECK(sc.numel() == B, "attend: one slot per row");
        sp = sc.data_ptr<int64_t>();
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    auto rows = pick_attend_rows<T>(rep, D);
    // work items: (b, kv head, token); the rep query heads of a kv head share the column list
    at::parallel_for(0, B * Hkv * n, 1, [&](int64_t w0, int64_t w1) {
        std::vector<int64_t> cols(kv_len);
        std::vector<float> scores(rep * (kv_len + 16)), qf(rep * D), of(rep * D);
        for (int64_t w = w0; w < w1; ++w) {
            const int64_t b = w / (Hkv * n), g = (w / n) % Hkv, i = w % n;
            int64_t nc = 0;
            if (mp) {
                const bool* row = mp + (b * n + i) * kv_len;
                for (int64_t c = 0; c < kv_len; ++c)
                    if (row[c]) cols[nc++] = c;
            } else {
                const int64_t lim = std::min<int64_t>(lp[b * n + i], kv_len);
                for (int64_t c = 0; c < lim; ++c) cols[nc++] = c;
            }
            for (int64_t r = 0; r < rep; ++r) {
                load_row(qp + ((b * Hq + g * rep + r) * n + i) * D, D, qf.data() + r * D);
                for (int64_t d = 0; d < D; ++d) qf[r * D + d] = qf[r * D + d] * scale;
            }
            const int64_t kb = sp ? sp[b] : b;
            const T* kg = kp + kb * ks0 + g * ks1;
            const T* vg = vp + kb * vs0 + g * vs1;
            rows(qf.data(), rep, kg, vg, ks2, cols.data(), nc, D, scores.data(), of.data());
            for (int64_t r = 0; r < rep; ++r) {
                T* orow = op + ((b * Hq + g * rep + r) * n + i) * D;
                for (int64_t d = 0; d < D; ++d) {
                    if constexpr (std::is_same_v<T, float>) orow[d] = of[r * D + d];
                    else orow[d] = float_to_bf16(of[r * D + d]);
                }
            }
        }
    });
    return out;
}

// RMSNorm over the last dimension, one row at a time: y = x / sqrt(mean(x^2) + eps) * w, in fp32
// (16-lane sum of squares in a fixed order, one reduction), rounded once to x's dtype.
template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t H, float eps) {
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        std::vector<float> xf(H), wf(H);
        load_row(w, H, wf.data());
        for (int64_t r = r0; r < r1; ++r) {
            load_row(x + r * H, H, xf.data());
            __m512 acc = _mm512_setzero_ps();
            int64_t d = 0;
            for (; d + 16 <= H; d += 16) {
                const __m512 v = _mm512_loadu_ps(xf.data() + d);
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            float ss = _mm512_reduce_add_ps(acc);
            for (; d < H; ++d) ss = ss + xf[d] * xf[d];
            const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
            T* yr = y + r * H;
            for (int64_t j = 0; j < H; ++j) {
                const float v = (xf[j] * inv) * wf[j];
                if constexpr (std::is_same_v<T, float>) yr[j] = v;
                else yr[j] = float_to_bf16(v);
            }
        }
    });
}

}  // namespace

namespace ssd_native {

torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                     c10::optional<torch::Tensor> limits, int64_t kv_len, c10::optional<torch::Tensor> slots) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend: q, k, v must be 4-D");
    TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "attend: one dtype");
    TORCH_CHECK(q.size(3) % 16 == 0 && k.size(3) == q.size(3), "attend: head_dim must be a multiple of 16");
    TORCH_CHECK(q.size(1) % k.size(1) == 0, "attend: num_heads must be a multiple of num_kv_heads");
    TORCH_CHECK(q.size(1) / k.size(1) <= MAX_GROUP && q.size(3) <= 256, "attend: at most 16 query heads per kv head, head_dim <= 256");
    TORCH_CHECK((slots.has_value() && slots->defined()) || k.size(0) == q.size(0), "attend: k/v batch != q batch");
    TORCH_CHECK(k.size(2) >= kv_len && v.size(2) >= kv_len, "attend: k/v hold fewer than kv_len columns");
    TORCH_CHECK((mask.has_value() && mask->defined()) != (limits.has_value() && limits->defined()),
                "attend: exactly one of mask and limits");
    if (q.scalar_type() == at::kFloat) return attend_impl<float>(q, k, v, mask, limits, kv_len, slots);
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "attend: fp32 or bf16");
    return attend_impl<uint16_t>(q, k, v, mask, limits, kv_len, slots);
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
    TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must share a dtype");
    const int64_t H = x.size(-1);
    TORCH_CHECK(w.dim() == 1 && w.size(0) == H, "rms_norm: w must be [", H, "]");
    const torch::Tensor xc = x.contiguous(), wc = w.contiguous();
    torch::Tensor y = torch::empty_like(xc);
    const int64_t rows = H ? xc.numel() / H : 0;
    if (x.scalar_type() == at::kFloat) {
        rms_norm_impl<float>(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), rows, H, static_cast<float>(eps));
    } else {
        TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rms_norm: fp32 or bf16");
        rms_norm_impl<uint16_t>(reinterpret_cast<const uint16_t*>(xc.data_ptr()), reinterpret_cast<const uint16_t*>(wc.data_ptr()),
                                reinterpret_cast<uint16_t*>(y.data_ptr()), rows, H, static_cast<float>(eps));
    }
    return y;
}


namespace {

// ---- the elementwise steps of layer_forward, each ATen bf16 operation's arithmetic written out:
// every operation computes in fp32 from bf16 inputs and rounds its result to bf16 (round to
// nearest even), as ATen's bf16 kernels do, so the result is bit for bit the Python layer's

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// a + b, same shape, bf16
torch::Tensor add_bf16(const torch::Tensor& a, const torch::Tensor& b) {
    TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16, "add_bf16");
    const torch::Tensor ac = a.contiguous(), bc = b.contiguous();
    torch::Tensor y = torch::empty_like(ac);
    const uint16_t* ap = reinterpret_cast<const uint16_t*>(ac.data_ptr());
    const uint16_t* bp = reinterpret_cast<const uint16_t*>(bc.data_ptr());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    for (int64_t i = 0, n = ac.numel(); i < n; ++i) yp[i] = float_to_bf16(bf16_to_float(ap[i]) + bf16_to_float(bp[i]));
    return y;
}

// qkv [B, n, Hq + 2 Hkv, D] bf16 -> q [B, Hq, n, D], rotated; k (rotated) and v written into the
// layer's cache [slots, Hkv, max_len, D] at slot slot_start + b (or slots[b]) and column
// write_start + i (or write_cols[b, i]). Rotate-half RoPE as ssd/models/llama.py apply_rope:
// cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin), each product, difference and sum rounded to bf16.
torch::Tensor rope_and_write(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                             torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                             const torch::Tensor& write_cols, int64_t slot_start, int64_t write_start, int64_t Hq,
                             int64_t Hkv) {
    const int64_t B = qkv.size(0), n = qkv.size(1), D = qkv.size(3), half = D / 2, Hall = Hq + 2 * Hkv;
    TORCH_CHECK(qkv.size(2) == Hall && qkv.is_contiguous(), "rope_and_write: qkv");
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 && k_cache.stride(3) == 1 &&
                v_cache.stride(3) == 1, "rope_and_write: bf16 caches with contiguous rows");
    const torch::Tensor cc = cos.contiguous(), sc = sin.contiguous();  // [B, n, 1, D / 2]
    TORCH_CHECK(cc.numel() == B * n * half && sc.numel() == B * n * half, "rope_and_write: cos/sin");
    const uint16_t* cp = reinterpret_cast<const uint16_t*>(cc.data_ptr());
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr());
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(qkv.data_ptr());
    torch::Tensor q = torch::empty({B, Hq, n, D}, qkv.options());
    uint16_t* qp = reinterpret_cast<uint16_t*>(q.data_ptr());
    uint16_t* kc = reinterpret_cast<uint16_t*>(k_cache.data_ptr());
    uint16_t* vc = reinterpret_cast<uint16_t*>(v_cache.data_ptr());
    const bool direct = slot_start >= 0 && write_start >= 0;
    torch::Tensor sl, wc;
    const int64_t *slp = nullptr, *wcp = nullptr;
    if (!direct) {
        sl = slots.to(at::kLong).contiguous();
        wc = write_cols.to(at::kLong).expand({B, n}).contiguous();
        slp = sl.data_ptr<int64_t>();
        wcp = wc.data_ptr<int64_t>();
    }
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t slot = direct ? slot_start + b : slp[b], col = direct ? write_start + i : wcp[b * n + i];
            const uint16_t* c = cp + (b * n + i) * half;
            const uint16_t* s = sp + (b * n + i) * half;
            for (int64_t h = 0; h < Hall; ++h) {
                const uint16_t* x = xp + ((b * n + i) * Hall + h) * D;
                uint16_t* dst;
                if (h < Hq) dst = qp + ((b * Hq + h) * n + i) * D;
                else if (h < Hq + Hkv) dst = kc + slot * k_cache.stride(0) + (h - Hq) * k_cache.stride(1) + col * k_cache.stride(2);
                else dst = vc + slot * v_cache.stride(0) + (h - Hq - Hkv) * v_cache.stride(1) + col * v_cache.stride(2);
                if (h >= Hq + Hkv) {  // v: as it is
                    std::memcpy(dst, x, sizeof(uint16_t) * D);
                    continue;
                }
                for (int64_t j = 0; j < half; ++j) {
                    const float x1 = bf16_to_float(x[j]), x2 = bf16_to_float(x[j + half]);
                    const float cj = bf16_to_float(c[j]), sj = bf16_to_float(s[j]);
                    dst[j] = float_to_bf16(round_bf16(x1 * cj) - round_bf16(x2 * sj));
                    dst[j + half] = float_to_bf16(round_bf16(x2 * cj) + round_bf16(x1 * sj));
                }
            }
        }
    return q;
}

}  // namespace

// One Llama decoder layer (no biases, no QK-norm) over bf16 activations and quantized panel
// weights: the same operations, in the same order and with the same arithmetic (ATen's own silu
// and product, the others written out above), as DecoderLayer.forward in ssd/models/llama.py
// does on this path, so the result is bit for bit the same; one call instead of ~40 Python-level
// operations per layer.
// norms = {input norm, post-attention norm}; panels = {qkv, o, gate_up, down} with kinds
// (0 = Q4_1 panels, 1 = Q8_0 panels: bf16 activations; 2 = Q4_1, 3 = Q8_0 vnni panels: 8-bit
// activations; kernels/quant.py NATIVE_KINDS); dims = {Hq, Hkv, D, intermediate}; cos, sin [B, n, 1, D/2].
torch::Tensor layer_forward(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> panels,
                            std::vector<int64_t> kinds, std::vector<int64_t> dims, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor write_cols,
                            int64_t slot_start, int64_t write_start, c10::optional<torch::Tensor> mask,
                            c10::optional<torch::Tensor> limits, int64_t kv_len, double eps) {
    TORCH_CHECK(norms.size() == 2 && panels.size() == 4 && kinds.size() == 4 && dims.size() == 4, "layer_forward: arguments");
    TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kBFloat16, "layer_forward: x must be bf16 [B, n, H]");
    const int64_t B = x.size(0), n = x.size(1), H = x.size(2);
    const int64_t Hq = dims[0], Hkv = dims[1], D = dims[2], I = dims[3];
    auto lin = [&](const torch::Tensor& t, int i, int64_t N, int64_t K) {
        const torch::Tensor x2 = t.reshape({-1, K});
        torch::Tensor y;
        switch (kinds[i]) {
            case 0: y = q4_1_panel_linear(x2, panels[i], N, K, c10::nullopt, false); break;
            case 1: y = q8_0_panel_linear(x2, panels[i], N, K, c10::nullopt, false); break;
            case 2: y = q4_1_vnni_linear(x2, panels[i], N, K, c10::nullopt, false); break;
            case 3: y = q8_0_vnni_linear(x2, panels[i], N, K, c10::nullopt, false); break;
            default: TORCH_CHECK(false, "layer_forward: unknown weight kind ", kinds[i]);
        }
        return y.view({B, n, N});
    };
    torch::Tensor h = rms_norm(x, norms[0], eps);
    torch::Tensor qkv = lin(h, 0, (Hq + 2 * Hkv) * D, H).view({B, n, Hq + 2 * Hkv, D});
    torch::Tensor q = rope_and_write(qkv, cos, sin, k_cache, v_cache, slots, write_cols, slot_start, write_start, Hq, Hkv);
    torch::Tensor a = attend(q, k_cache, v_cache, mask, limits, kv_len, slots).transpose(1, 2).reshape({B, n, Hq * D});
    x = add_bf16(x, lin(a, 1, H, Hq * D));
    h = rms_norm(x, norms[1], eps);
    torch::Tensor gu = lin(h, 2, 2 * I, H);
    return add_bf16(x, lin(at::silu(gu.slice(2, 0, I)) * gu.slice(2, I), 3, H, I));
}

// Every decoder layer in one call: layer l is layer_forward with norms[2l, 2l + 1], panels and kinds
// [4l .. 4l + 3], the same dims, and layer l of the caches k_all, v_all [L, slots, Hkv, max_len, D].
// Returns {x after the last layer, then the input of each layer in `capture`, in that order}.
std::vector<torch::Tensor> layers_forward(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> panels,
                                          std::vector<int64_t> kinds, std::vector<int64_t> dims, torch::Tensor cos,
                                          torch::Tensor sin, torch::Tensor k_all, torch::Tensor v_all, torch::Tensor slots,
                                          torch::Tensor write_cols, int64_t slot_start, int64_t write_start,
                                          c10::optional<torch::Tensor> mask, c10::optional<torch::Tensor> limits,
                                          int64_t kv_len, double eps, std::vector<int64_t> capture) {
    const int64_t L = static_cast<int64_t>(norms.size()) / 2;
    TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L && static_cast<int64_t>(panels.size()) == 4 * L &&
                    static_cast<int64_t>(kinds.size()) == 4 * L && k_all.size(0) >= L && v_all.size(0) >= L,
                "layers_forward: 2 norms, 4 panels and 4 kinds per layer, a cache layer per layer");
    std::vector<torch::Tensor> out(1 + capture.size());
    for (int64_t l = 0; l < L; ++l) {
        for (size_t c = 0; c < capture.size(); ++c)
            if (capture[c] == l) out[1 + c] = x;
        x = layer_forward(x, {norms[2 * l], norms[2 * l + 1]}, {panels.begin() + 4 * l, panels.begin() + 4 * l + 4},
                          {kinds.begin() + 4 * l, kinds.begin() + 4 * l + 4}, dims, cos, sin, k_all.select(0, l),
                          v_all.select(0, l), slots, write_cols, slot_start, write_start, mask, limits, kv_len, eps);
    }
    out[0] = x;
    return out;
}

}  // namespace ssd_native
