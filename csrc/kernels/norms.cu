// RMSNorm and LayerNorm, forward and backward, optionally fused with the residual add before them.
//
// Forward: one block per row. Pass 1 reads x (+ residual), writes h = x + residual (rounded to T,
// the new residual stream) and reduces sum(h) (LayerNorm) or sum(h^2) (RMSNorm); LayerNorm makes a
// second pass for sum((h - mean)^2) (two passes are exact where E[h^2] - mean^2 cancels); the last
// pass writes y. Re-reads of the row hit L1/L2: DRAM sees one read of the inputs and one write.
//
// Backward: a persistent grid of G blocks walks the rows. For each row it reduces
// sum(dy*w) and sum(dy*w*xhat), writes dh, and adds dy*xhat and dy into per-thread columns of a
// per-block accumulator (shared memory when 2*hidden floats fit, else the block's own workspace row;
// laid out so a warp's accesses are bank-conflict free), so weight/bias gradients need no atomics and
// no extra pass over dy; a small kernel sums the G partial rows at the end.
#include <algorithm>

#include "common.cuh"

namespace megaclm {
namespace {

constexpr int kMaxBlocksPerSm = 8;

template <typename T, int VEC, bool RMS>
__global__ void norm_fwd_kernel(const T* x, const T* res, const T* w, const T* b, T* y, T* res_out, float* mean_out,
                                float* rstd_out, int64_t rows, int hidden, float eps) {
    __shared__ float scratch[32];
    const int stride = blockDim.x * VEC;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const int64_t base = row * hidden;
        // With the fused add, h lives in res_out after pass 1 (this thread re-reads its own writes).
        const T* h = res != nullptr ? res_out + base : x + base;

        float acc = 0.f;
        for (int c = threadIdx.x * VEC; c < hidden; c += stride) {
            float a[VEC];
            load_pack<T, VEC>(x + base + c, a);
            if (res != nullptr) {
                float r[VEC];
                load_pack<T, VEC>(res + base + c, r);
#pragma unroll
                for (int i = 0; i < VEC; ++i) a[i] = round_to<T>(a[i] + r[i]);
                store_pack<T, VEC>(res_out + base + c, a);
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc += RMS ? a[i] * a[i] : a[i];
        }
        acc = block_sum(acc, scratch);

        float mean = 0.f, var;
        if constexpr (RMS) {
            var = acc / hidden;  // mean square
        } else {
            mean = acc / hidden;
            float sq = 0.f;
            for (int c = threadIdx.x * VEC; c < hidden; c += stride) {
                float a[VEC];
                load_pack<T, VEC>(h + c, a);
#pragma unroll
                for (int i = 0; i < VEC; ++i) sq += (a[i] - mean) * (a[i] - mean);
            }
            var = block_sum(sq, scratch) / hidden;
        }
        const float rstd = rsqrtf(var + eps);
        if (threadIdx.x == 0) {
            rstd_out[row] = rstd;
            if (!RMS) mean_out[row] = mean;
        }

        for (int c = threadIdx.x * VEC; c < hidden; c += stride) {
            float a[VEC], wv[VEC], bv[VEC];
            load_pack<T, VEC>(h + c, a);
            load_pack<T, VEC>(w + c, wv);
            if (b != nullptr) load_pack<T, VEC>(b + c, bv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) a[i] = (a[i] - mean) * rstd * wv[i] + (b != nullptr ? bv[i] : 0.f);
            store_pack<T, VEC>(y + base + c, a);
        }
    }
}

// Accumulator slot of column c (a multiple of VEC) + i: VEC planes of hidden/VEC floats, so the
// threads of a warp, which hold consecutive packs, hit consecutive shared-memory banks.
template <int VEC>
__device__ __forceinline__ int acc_slot(int c, int i, int hidden) { return i * (hidden / VEC) + c / VEC; }

// partial: gridDim.x rows of [dweight | dbias] fp32, each 2*hidden floats in acc_slot order.
template <typename T, int VEC, bool RMS>
__global__ void norm_bwd_kernel(const T* dy, const T* dres, const T* h, const T* w, const float* mean_in,
                                const float* rstd_in, T* dh, float* partial, int64_t rows, int hidden,
                                bool acc_in_smem) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    float* part = partial + int64_t(blockIdx.x) * 2 * hidden;
    float* acc_w = acc_in_smem ? smem : part;
    float* acc_b = acc_w + hidden;
    for (int s = threadIdx.x; s < 2 * hidden; s += blockDim.x) acc_w[s] = 0.f;
    __syncthreads();

    const int stride = blockDim.x * VEC;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const int64_t base = row * hidden;
        const float mean = RMS ? 0.f : mean_in[row], rstd = rstd_in[row];
        float s_g = 0.f, s_gx = 0.f;  // sum(dy*w), sum(dy*w*xhat)
        for (int c = threadIdx.x * VEC; c < hidden; c += stride) {
            float g[VEC], xv[VEC], wv[VEC];
            load_pack<T, VEC>(dy + base + c, g);
            load_pack<T, VEC>(h + base + c, xv);
            load_pack<T, VEC>(w + c, wv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float xhat = (xv[i] - mean) * rstd;
                s_g += g[i] * wv[i];
                s_gx += g[i] * wv[i] * xhat;
                // Only this thread ever touches these slots (its columns): no synchronisation needed.
                acc_w[acc_slot<VEC>(c, i, hidden)] += g[i] * xhat;
                acc_b[acc_slot<VEC>(c, i, hidden)] += g[i];
            }
        }
        s_gx = block_sum(s_gx, scratch) / hidden;
        s_g = RMS ? 0.f : block_sum(s_g, scratch) / hidden;

        for (int c = threadIdx.x * VEC; c < hidden; c += stride) {
            float g[VEC], xv[VEC], wv[VEC], r[VEC];
            load_pack<T, VEC>(dy + base + c, g);
            load_pack<T, VEC>(h + base + c, xv);
            load_pack<T, VEC>(w + c, wv);
            if (dres != nullptr) load_pack<T, VEC>(dres + base + c, r);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float xhat = (xv[i] - mean) * rstd;
                xv[i] = rstd * (g[i] * wv[i] - s_g - xhat * s_gx) + (dres != nullptr ? r[i] : 0.f);
            }
            store_pack<T, VEC>(dh + base + c, xv);
        }
    }

    if (acc_in_smem) {
        __syncthreads();
        for (int s = threadIdx.x; s < 2 * hidden; s += blockDim.x) part[s] = acc_w[s];
    }
}

// Sums the G partial rows: x threads walk the 2*hidden slots (coalesced reads), y threads split the
// rows, shared memory folds y; slot s of plane i = s / (hidden/vec) is column (s % (hidden/vec))*vec + i.
template <typename T>
__global__ void norm_bwd_finalize_kernel(const float* partial, int groups, int hidden, int vec, T* dweight,
                                         T* dbias) {
    __shared__ float fold[8][33];
    const int slot = blockIdx.x * 32 + threadIdx.x;  // [0, hidden): weight, [hidden, 2*hidden): bias
    float s = 0.f;
    if (slot < 2 * hidden)
        for (int g = threadIdx.y; g < groups; g += 8) s += partial[int64_t(g) * 2 * hidden + slot];
    fold[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && slot < 2 * hidden) {
        for (int k = 1; k < 8; ++k) s += fold[k][threadIdx.x];
        const bool is_bias = slot >= hidden;
        const int in_half = is_bias ? slot - hidden : slot, per_plane = hidden / vec;
        const int col = (in_half % per_plane) * vec + in_half / per_plane;
        if (!is_bias)
            dweight[col] = from_float<T>(s);
        else if (dbias != nullptr)
            dbias[col] = from_float<T>(s);
    }
}

// About 4 packs per thread, whole warps, at most 1024 threads (forward and backward alike).
int row_threads(int hidden, int vec) {
    const int packs = ceil_div(hidden, vec);
    return std::min(1024, std::max(32, ceil_div(ceil_div(packs, 4), 32) * 32));
}

size_t bwd_smem_bytes(int hidden) { return size_t(2) * hidden * sizeof(float); }

// Whether the per-block accumulator fits in shared memory (opting in above the default 48 KiB).
bool bwd_acc_in_smem(int hidden) {
    int dev = 0, optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    return bwd_smem_bytes(hidden) + 1024 <= size_t(std::max(optin, 48 * 1024));
}

// Upper bound of the backward grid, which sizes the workspace.
int64_t bwd_max_grid(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, kMaxBlocksPerSm * num_sms())); }

template <typename T, int VEC, bool RMS>
cudaError_t launch_bwd(const void* dy, const void* dres, const void* h, const void* w, const float* mean,
                       const float* rstd, void* dh, void* dweight, void* dbias, float* workspace, int64_t rows,
                       int hidden, cudaStream_t stream) {
    const bool in_smem = bwd_acc_in_smem(hidden);
    const size_t smem = in_smem ? bwd_smem_bytes(hidden) : 0;
    const int threads = row_threads(hidden, VEC);
    if (smem > 48 * 1024)
        cudaFuncSetAttribute(norm_bwd_kernel<T, VEC, RMS>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, norm_bwd_kernel<T, VEC, RMS>, threads, smem);
    const int grid = int(std::min<int64_t>(bwd_max_grid(rows), int64_t(std::max(per_sm, 1)) * num_sms()));
    norm_bwd_kernel<T, VEC, RMS><<<grid, threads, smem, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(dres), static_cast<const T*>(h), static_cast<const T*>(w),
        mean, rstd, static_cast<T*>(dh), workspace, rows, hidden, in_smem);
    norm_bwd_finalize_kernel<T><<<ceil_div(2 * int64_t(hidden), 32), dim3(32, 8), 0, stream>>>(
        workspace, grid, hidden, VEC, static_cast<T*>(dweight), static_cast<T*>(dbias));
    return cudaGetLastError();
}

template <typename T, int VEC, bool RMS>
cudaError_t launch_fwd(const void* x, const void* res, const void* w, const void* b, void* y, void* res_out,
                       float* mean, float* rstd, int64_t rows, int hidden, float eps, cudaStream_t stream) {
    const int grid = int(std::min<int64_t>(rows, 1 << 30));
    norm_fwd_kernel<T, VEC, RMS><<<grid, row_threads(hidden, VEC), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(res), static_cast<const T*>(w), static_cast<const T*>(b),
        static_cast<T*>(y), static_cast<T*>(res_out), mean, rstd, rows, hidden, eps);
    return cudaGetLastError();
}

}  // namespace

cudaError_t norm_forward(DType dtype, bool rms, const void* x, const void* residual, const void* weight,
                         const void* bias, void* y, void* residual_out, float* mean, float* rstd, int64_t rows,
                         int hidden, float eps, cudaStream_t stream) {
    if (rows == 0) return cudaSuccess;
    if ((residual == nullptr) != (residual_out == nullptr)) return cudaErrorInvalidValue;
    MEGACLM_DISPATCH(dtype, {
        const bool packed = packable(hidden, sizeof(scalar_t), {x, residual, weight, bias, y, residual_out});
        constexpr int P = kPack<scalar_t>;
        if (rms)
            return packed ? launch_fwd<scalar_t, P, true>(x, residual, weight, bias, y, residual_out, mean, rstd, rows,
                                                          hidden, eps, stream)
                          : launch_fwd<scalar_t, 1, true>(x, residual, weight, bias, y, residual_out, mean, rstd, rows,
                                                          hidden, eps, stream);
        return packed ? launch_fwd<scalar_t, P, false>(x, residual, weight, bias, y, residual_out, mean, rstd, rows,
                                                       hidden, eps, stream)
                      : launch_fwd<scalar_t, 1, false>(x, residual, weight, bias, y, residual_out, mean, rstd, rows,
                                                       hidden, eps, stream);
    });
    return cudaSuccess;
}

int64_t norm_backward_workspace(int64_t rows, int hidden) { return bwd_max_grid(rows) * 2 * hidden; }

cudaError_t norm_backward(DType dtype, bool rms, const void* dy, const void* dresidual_out, const void* h,
                          const void* weight, const float* mean, const float* rstd, void* dh, void* dweight,
                          void* dbias, float* workspace, int64_t rows, int hidden, cudaStream_t stream) {
    if (rows == 0) return cudaSuccess;  // the caller zero-fills dweight/dbias
    MEGACLM_DISPATCH(dtype, {
        const bool packed = packable(hidden, sizeof(scalar_t), {dy, dresidual_out, h, weight, dh});
        constexpr int P = kPack<scalar_t>;
        if (rms)
            return packed ? launch_bwd<scalar_t, P, true>(dy, dresidual_out, h, weight, mean, rstd, dh, dweight,
                                                          dbias, workspace, rows, hidden, stream)
                          : launch_bwd<scalar_t, 1, true>(dy, dresidual_out, h, weight, mean, rstd, dh, dweight,
                                                          dbias, workspace, rows, hidden, stream);
        return packed ? launch_bwd<scalar_t, P, false>(dy, dresidual_out, h, weight, mean, rstd, dh, dweight, dbias,
                                                       workspace, rows, hidden, stream)
                      : launch_bwd<scalar_t, 1, false>(dy, dresidual_out, h, weight, mean, rstd, dh, dweight, dbias,
                                                       workspace, rows, hidden, stream);
    });
    return cudaSuccess;
}

}  // namespace megaclm
