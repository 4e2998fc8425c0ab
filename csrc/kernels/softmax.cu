// Scaled, masked / causal softmax over the key dim of attention scores, forward and backward.
//
// Forward: one row group (a warp, or several warps for long rows) per query row. Pass 1 keeps an
// online (max, sum-exp) of v = scale * x + bias over the unmasked keys and merges it across the
// group; pass 2 re-reads x and writes exp(v - max) / sum. DRAM sees one read and one write, so any
// key length works at the same speed per byte (the group size grows with the row, nothing switches
// off at 2k/4k). Keys past the causal limit are never read. Fully masked rows give zeros.
// Backward: dx = scale * y * (dy - sum_j dy_j y_j), one reduction per row.
#include <algorithm>

#include "common.cuh"

namespace megaclm {
namespace {

struct RowMask {
    const uint8_t* mask;  // row start, or null
    const float* bias;    // row start, or null
    bool keeps;           // nonzero mask = attend (else nonzero = masked out)
};

// Scaled, biased scores of keys [j, j+VEC) with -inf at masked or non-causal keys.
template <typename T, int VEC>
__device__ __forceinline__ void load_scores(const T* x, const RowMask& rm, int64_t j, int64_t limit, float scale,
                                            float (&v)[VEC]) {
    load_pack<T, VEC>(x + j, v);
    float b[VEC];
    if (rm.bias != nullptr) load_pack<float, VEC>(rm.bias + j, b);
    Pack<uint8_t, VEC> m;
    if (rm.mask != nullptr) m = *reinterpret_cast<const Pack<uint8_t, VEC>*>(rm.mask + j);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        const bool masked = j + i >= limit || (rm.mask != nullptr && (m.v[i] != 0) != rm.keeps);
        v[i] = masked ? -INFINITY : v[i] * scale + (rm.bias != nullptr ? b[i] : 0.f);
    }
}

struct FwdArgs {
    const uint8_t* mask;
    int64_t mask_sb, mask_sh, mask_sr;  // batch, head, row strides (0 = broadcast)
    bool mask_keeps;
    const float* bias;
    int64_t bias_sb, bias_sh, bias_sr;
    bool causal;
    float scale;
    int64_t heads, q_len, k_len, rows;
};

template <typename T, int VEC, int WARPS, int ROWS>
__global__ void __launch_bounds__(WARPS * 32 * ROWS) softmax_fwd_kernel(const T* x, T* y, FwdArgs a) {
    __shared__ float2 scratch[WARPS * ROWS];
    constexpr int kGroup = WARPS * 32;
    const int lane = threadIdx.x % kGroup;
    for (int64_t row0 = int64_t(blockIdx.x) * ROWS; row0 < a.rows; row0 += int64_t(gridDim.x) * ROWS) {
        // Rows past the end still join the reductions (their group's barriers need every thread).
        const int64_t row = row0 + threadIdx.x / kGroup;
        const bool live = row < a.rows;
        const int64_t i = row % a.q_len, bh = row / a.q_len, h = bh % a.heads, b = bh / a.heads;
        // Causal: query i sits at key position i + (k_len - q_len) (queries are the last q_len keys).
        const int64_t causal_end = i + a.k_len - a.q_len + 1;
        const int64_t limit = a.causal && causal_end < a.k_len ? causal_end : a.k_len;
        const RowMask rm{a.mask != nullptr ? a.mask + b * a.mask_sb + h * a.mask_sh + i * a.mask_sr : nullptr,
                         a.bias != nullptr ? a.bias + b * a.bias_sb + h * a.bias_sh + i * a.bias_sr : nullptr,
                         a.mask_keeps};
        const T* xr = x + row * a.k_len;
        T* yr = y + row * a.k_len;

        MaxSum st{-INFINITY, 0.f};
        if (live)
            for (int64_t j = int64_t(lane) * VEC; j < limit; j += kGroup * VEC) {
                float v[VEC];
                load_scores<T, VEC>(xr, rm, j, limit, a.scale, v);
                st = maxsum_add<VEC>(st, v);
            }
        st = group_reduce_maxsum<WARPS>(st, scratch);
        if (!live) continue;
        const float inv = st.m == -INFINITY ? 0.f : 1.f / st.s;
        for (int64_t j = int64_t(lane) * VEC; j < a.k_len; j += kGroup * VEC) {
            float v[VEC];
            if (j < limit) {
                load_scores<T, VEC>(xr, rm, j, limit, a.scale, v);
#pragma unroll
                for (int k = 0; k < VEC; ++k) v[k] = v[k] == -INFINITY ? 0.f : expf(v[k] - st.m) * inv;
            } else {
#pragma unroll
                for (int k = 0; k < VEC; ++k) v[k] = 0.f;
            }
            store_pack<T, VEC>(yr + j, v);
        }
    }
}

template <typename T, int VEC, int WARPS, int ROWS>
__global__ void __launch_bounds__(WARPS * 32 * ROWS)
    softmax_bwd_kernel(const T* dy, const T* y, T* dx, float scale, int64_t rows, int64_t k_len) {
    __shared__ float scratch[WARPS * ROWS];
    constexpr int kGroup = WARPS * 32;
    const int lane = threadIdx.x % kGroup;
    for (int64_t row0 = int64_t(blockIdx.x) * ROWS; row0 < rows; row0 += int64_t(gridDim.x) * ROWS) {
        const int64_t row = row0 + threadIdx.x / kGroup;
        const bool live = row < rows;
        const int64_t off = row * k_len;
        float dot = 0.f;
        if (live)
            for (int64_t j = int64_t(lane) * VEC; j < k_len; j += kGroup * VEC) {
                float g[VEC], p[VEC];
                load_pack<T, VEC>(dy + off + j, g);
                load_pack<T, VEC>(y + off + j, p);
#pragma unroll
                for (int k = 0; k < VEC; ++k) dot += g[k] * p[k];
            }
        dot = group_reduce<WARPS>(dot, SumOp{}, scratch);
        if (!live) continue;
        for (int64_t j = int64_t(lane) * VEC; j < k_len; j += kGroup * VEC) {
            float g[VEC], p[VEC];
            load_pack<T, VEC>(dy + off + j, g);
            load_pack<T, VEC>(y + off + j, p);
#pragma unroll
            for (int k = 0; k < VEC; ++k) g[k] = scale * p[k] * (g[k] - dot);
            store_pack<T, VEC>(dx + off + j, g);
        }
    }
}

int grid_for(int64_t rows, int rows_per_block) {
    return int(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, 1 << 30));
}

template <typename T, int VEC>
cudaError_t launch_fwd(const T* x, T* y, const FwdArgs& a, cudaStream_t stream) {
    return by_row_length(a.k_len, VEC, [&](auto warps, auto rows) {
        constexpr int W = decltype(warps)::value, R = decltype(rows)::value;
        softmax_fwd_kernel<T, VEC, W, R><<<grid_for(a.rows, R), W * 32 * R, 0, stream>>>(x, y, a);
        return cudaGetLastError();
    });
}

template <typename T, int VEC>
cudaError_t launch_bwd(const T* dy, const T* y, T* dx, float scale, int64_t rows, int64_t k_len,
                       cudaStream_t stream) {
    return by_row_length(k_len, VEC, [&](auto warps, auto rows_per_block) {
        constexpr int W = decltype(warps)::value, R = decltype(rows_per_block)::value;
        softmax_bwd_kernel<T, VEC, W, R><<<grid_for(rows, R), W * 32 * R, 0, stream>>>(dy, y, dx, scale, rows, k_len);
        return cudaGetLastError();
    });
}

bool strides_multiple_of(int vec, std::initializer_list<int64_t> strides) {
    for (int64_t s : strides)
        if (s % vec != 0) return false;
    return true;
}

}  // namespace

cudaError_t softmax_forward(DType dtype, const void* x, const uint8_t* mask, int64_t mask_batch_stride,
                            int64_t mask_head_stride, int64_t mask_row_stride, bool mask_keeps, const float* bias,
                            int64_t bias_batch_stride, int64_t bias_head_stride, int64_t bias_row_stride, bool causal,
                            float scale, void* y, int64_t batch, int64_t heads, int64_t q_len, int64_t k_len,
                            cudaStream_t stream) {
    const int64_t rows = batch * heads * q_len;
    if (rows == 0 || k_len == 0) return cudaSuccess;
    const FwdArgs a{mask, mask_batch_stride, mask_head_stride, mask_row_stride, mask_keeps,
                    bias, bias_batch_stride, bias_head_stride, bias_row_stride, causal, scale, heads, q_len, k_len, rows};
    MEGACLM_DISPATCH(dtype, {
        constexpr int P = kPack<scalar_t>;
        // Packs need aligned rows of x/y, of the mask (P bytes) and of the fp32 bias (4P bytes).
        const bool packed =
            packable(k_len, sizeof(scalar_t), {x, y}) && reinterpret_cast<uintptr_t>(mask) % P == 0 &&
            reinterpret_cast<uintptr_t>(bias) % (4 * P) == 0 &&
            strides_multiple_of(P, {mask_batch_stride, mask_head_stride, mask_row_stride, bias_batch_stride,
                                    bias_head_stride, bias_row_stride});
        if (packed)
            return launch_fwd<scalar_t, P>(static_cast<const scalar_t*>(x), static_cast<scalar_t*>(y), a, stream);
        return launch_fwd<scalar_t, 1>(static_cast<const scalar_t*>(x), static_cast<scalar_t*>(y), a, stream);
    });
    return cudaSuccess;
}

cudaError_t softmax_backward(DType dtype, const void* dy, const void* y, void* dx, float scale, int64_t rows,
                             int64_t k_len, cudaStream_t stream) {
    if (rows == 0 || k_len == 0) return cudaSuccess;
    MEGACLM_DISPATCH(dtype, {
        constexpr int P = kPack<scalar_t>;
        const auto* g = static_cast<const scalar_t*>(dy);
        const auto* p = static_cast<const scalar_t*>(y);
        auto* out = static_cast<scalar_t*>(dx);
        if (packable(k_len, sizeof(scalar_t), {dy, y, dx}))
            return launch_bwd<scalar_t, P>(g, p, out, scale, rows, k_len, stream);
        return launch_bwd<scalar_t, 1>(g, p, out, scale, rows, k_len, stream);
    });
    return cudaSuccess;
}

}  // namespace megaclm
