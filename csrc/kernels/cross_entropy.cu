// Row kernels of the fused linear + cross-entropy (megaclm/ops: the chunk loop and the GEMMs are in
// the wrapper, on cuBLAS). Per chunk of tokens the wrapper computes logits = hidden @ W_shard^T,
//   ce_stats: one read of the chunk -> per-row local max, sum-exp and target logit, which the wrapper
//             combines across tensor-parallel vocab shards into lse = max + log(sum-exp);
//   ce_grad:  logits -> (softmax - onehot) * grad_loss (in place in the chunk), the operand of the
//             two backward GEMMs; one read and one write.
// So the full (tokens, vocab) logits never exist: only one chunk at a time.
#include <algorithm>

#include "common.cuh"

namespace megaclm {
namespace {

template <typename T, int VEC, int WARPS, int ROWS>
__global__ void __launch_bounds__(WARPS * 32 * ROWS)
    ce_stats_kernel(const T* logits, const int64_t* labels, int64_t vocab_start, float* row_max, float* sum_exp,
                    float* target, int64_t rows, int64_t vocab) {
    __shared__ float2 scratch[WARPS * ROWS];
    constexpr int kGroup = WARPS * 32;
    const int lane = threadIdx.x % kGroup;
    for (int64_t row0 = int64_t(blockIdx.x) * ROWS; row0 < rows; row0 += int64_t(gridDim.x) * ROWS) {
        const int64_t row = row0 + threadIdx.x / kGroup;
        const bool live = row < rows;  // dead rows still join the group's barriers
        const T* lr = logits + row * vocab;
        MaxSum st{-INFINITY, 0.f};
        if (live)
            for (int64_t j = int64_t(lane) * VEC; j < vocab; j += kGroup * VEC) {
                float v[VEC];
                load_pack<T, VEC>(lr + j, v);
                st = maxsum_add<VEC>(st, v);
            }
        st = group_reduce_maxsum<WARPS>(st, scratch);
        if (live && lane == 0) {
            row_max[row] = st.m;
            sum_exp[row] = st.s;
            const int64_t local = labels[row] - vocab_start;
            target[row] = local >= 0 && local < vocab ? to_float<T>(lr[local]) : 0.f;
        }
    }
}

// Element-wise over the chunk: blockIdx.y walks rows, x threads walk packs of the row.
template <typename T, int VEC>
__global__ void ce_grad_kernel(const T* logits, T* grad, const int64_t* labels, int64_t vocab_start, const float* lse,
                               const float* grad_scale, int64_t rows, int64_t vocab, int64_t ignore_index) {
    const int64_t j = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
    if (j >= vocab) return;
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const int64_t label = labels[row];
        const float g = label == ignore_index ? 0.f : grad_scale[row];
        const float l = lse[row];
        const int64_t local = label - vocab_start;
        float v[VEC];
        load_pack<T, VEC>(logits + row * vocab + j, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            v[k] = g == 0.f ? 0.f : (expf(v[k] - l) - (j + k == local ? 1.f : 0.f)) * g;
        store_pack<T, VEC>(grad + row * vocab + j, v);
    }
}

template <typename T, int VEC>
cudaError_t launch_stats(const T* logits, const int64_t* labels, int64_t vocab_start, float* row_max,
                         float* sum_exp, float* target, int64_t rows, int64_t vocab, cudaStream_t stream) {
    return by_row_length(vocab, VEC, [&](auto warps, auto rows_per_block) {
        constexpr int W = decltype(warps)::value, R = decltype(rows_per_block)::value;
        const int grid = int(std::min<int64_t>((rows + R - 1) / R, 1 << 30));
        ce_stats_kernel<T, VEC, W, R><<<grid, W * 32 * R, 0, stream>>>(logits, labels, vocab_start, row_max, sum_exp,
                                                                      target, rows, vocab);
        return cudaGetLastError();
    });
}

template <typename T, int VEC>
cudaError_t launch_grad(const T* logits, T* grad, const int64_t* labels, int64_t vocab_start, const float* lse,
                        const float* grad_scale, int64_t rows, int64_t vocab, int64_t ignore_index,
                        cudaStream_t stream) {
    const int64_t packs = (vocab + VEC - 1) / VEC;
    const int threads = int(std::min<int64_t>(256, std::max<int64_t>(32, (packs + 31) / 32 * 32)));
    const dim3 grid(ceil_div(packs, threads), unsigned(std::min<int64_t>(rows, 65535)));
    ce_grad_kernel<T, VEC><<<grid, threads, 0, stream>>>(logits, grad, labels, vocab_start, lse, grad_scale, rows, vocab,
                                                         ignore_index);
    return cudaGetLastError();
}

}  // namespace

cudaError_t ce_stats(DType dtype, const void* logits, const int64_t* labels, int64_t vocab_start, float* row_max,
                     float* sum_exp, float* target, int64_t rows, int64_t vocab, cudaStream_t stream) {
    if (rows == 0) return cudaSuccess;
    if (vocab == 0) return cudaErrorInvalidValue;
    MEGACLM_DISPATCH(dtype, {
        const auto* l = static_cast<const scalar_t*>(logits);
        if (packable(vocab, sizeof(scalar_t), {logits}))
            return launch_stats<scalar_t, kPack<scalar_t>>(l, labels, vocab_start, row_max, sum_exp, target, rows,
                                                           vocab, stream);
        return launch_stats<scalar_t, 1>(l, labels, vocab_start, row_max, sum_exp, target, rows, vocab, stream);
    });
    return cudaSuccess;
}

cudaError_t ce_grad(DType dtype, const void* logits, void* grad, const int64_t* labels, int64_t vocab_start,
                    const float* lse, const float* grad_scale, int64_t rows, int64_t vocab, int64_t ignore_index,
                    cudaStream_t stream) {
    if (rows == 0 || vocab == 0) return cudaSuccess;
    MEGACLM_DISPATCH(dtype, {
        const auto* l = static_cast<const scalar_t*>(logits);
        auto* g = static_cast<scalar_t*>(grad);
        if (packable(vocab, sizeof(scalar_t), {logits, grad}))
            return launch_grad<scalar_t, kPack<scalar_t>>(l, g, labels, vocab_start, lse, grad_scale, rows, vocab,
                                                          ignore_index, stream);
        return launch_grad<scalar_t, 1>(l, g, labels, vocab_start, lse, grad_scale, rows, vocab, ignore_index, stream);
    });
    return cudaSuccess;
}

}  // namespace megaclm
