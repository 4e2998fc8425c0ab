// Device helpers shared by megaclm's kernels: dtype conversion, packed (16-byte) loads and stores,
// warp/block reductions and the dtype dispatch of the launchers. Plain CUDA C++, no torch.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace megaclm {

// ---- scalar conversion: all arithmetic is fp32, storage is T ----------------------------------
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round an fp32 value to T and back: what the value would be after a store in T.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

// ---- packed access: VEC consecutive elements in one load/store instruction --------------------
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[VEC]) {
    Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float<T>(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[VEC]) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Elements per 16-byte pack.
template <typename T> constexpr int kPack = 16 / sizeof(T);

// True when every pointer is 16-byte aligned (null pointers do not count) and rows of `row_elems`
// elements keep that alignment, so the packed kernels can be used.
inline bool packable(int64_t row_elems, int elem_size, std::initializer_list<const void*> ptrs) {
    if ((row_elems * elem_size) % 16 != 0) return false;
    for (const void* p : ptrs)
        if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
    return true;
}

// ---- reductions -------------------------------------------------------------------------------
struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
    static constexpr float kIdentity = 0.f;
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
    static constexpr float kIdentity = -INFINITY;
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Reduce `v` over the WARPS consecutive warps that share one row (a "row group" of WARPS*32 threads
// starting at a multiple of WARPS*32). Every thread of the group gets the result.
// `scratch` is shared memory of at least blockDim.x/32 floats; the trailing __syncthreads makes the
// scratch reusable by the next call. Must be reached by all threads of the block when WARPS > 1.
template <int WARPS, typename Op>
__device__ __forceinline__ float group_reduce(float v, Op op, float* scratch) {
    v = warp_reduce(v, op);
    if constexpr (WARPS == 1) {
        return v;
    } else {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        if (lane == 0) scratch[warp] = v;
        __syncthreads();
        const int first = warp / WARPS * WARPS;
        float r = scratch[first];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) r = op(r, scratch[first + w]);
        __syncthreads();
        return r;
    }
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); all threads get the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    v = warp_reduce(v, SumOp{});
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < warps; ++w) r += scratch[w];
    __syncthreads();
    return r;
}

// Online softmax statistics: (max m, sum of exp(x - m)) merged without a second pass.
struct MaxSum {
    float m, s;
};
// Add a pack of VEC values (-inf = masked): one rescale per pack, one exp per value.
template <int VEC>
__device__ __forceinline__ MaxSum maxsum_add(MaxSum a, const float (&v)[VEC]) {
    float m = a.m;
#pragma unroll
    for (int i = 0; i < VEC; ++i) m = fmaxf(m, v[i]);
    if (m == -INFINITY) return a;  // nothing unmasked yet
    float s = a.s * expf(a.m - m);  // a.m = -inf: a.s is 0 and so is the product
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += expf(v[i] - m);  // exp(-inf) = 0 for masked values
    return {m, s};
}
__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
    if (b.m == -INFINITY) return a;
    if (a.m == -INFINITY) return b;
    const float m = fmaxf(a.m, b.m);
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_reduce_maxsum(MaxSum v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
        v = maxsum_merge(v, o);
    }
    return v;
}

template <int WARPS>
__device__ __forceinline__ MaxSum group_reduce_maxsum(MaxSum v, float2* scratch) {
    v = warp_reduce_maxsum(v);
    if constexpr (WARPS == 1) {
        return v;
    } else {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        if (lane == 0) scratch[warp] = make_float2(v.m, v.s);
        __syncthreads();
        const int first = warp / WARPS * WARPS;
        MaxSum r{scratch[first].x, scratch[first].y};
#pragma unroll
        for (int w = 1; w < WARPS; ++w) r = maxsum_merge(r, MaxSum{scratch[first + w].x, scratch[first + w].y});
        __syncthreads();
        return r;
    }
}

// Row group size for row-wise kernels over long rows (softmax, cross-entropy): grows with the row so
// each thread keeps a few packs. Calls launch(warps per row, rows per block) as compile-time ints.
template <typename F>
cudaError_t by_row_length(int64_t row_len, int vec, F&& launch) {
    const int64_t packs = (row_len + vec - 1) / vec;
    if (packs <= 128) return launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 4>{});
    if (packs <= 512) return launch(std::integral_constant<int, 4>{}, std::integral_constant<int, 1>{});
    return launch(std::integral_constant<int, 16>{}, std::integral_constant<int, 1>{});
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Number of SMs of the current device (cached per process; megaclm uses one device per process).
inline int num_sms() {
    static int sms = [] {
        int dev = 0, n = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
        return n > 0 ? n : 1;
    }();
    return sms;
}

}  // namespace megaclm

// Run the statement with `scalar_t` bound to the C++ type of a DType.
#define MEGACLM_DISPATCH(dtype, ...)                                  \
    do {                                                              \
        switch (dtype) {                                              \
            case ::megaclm::DType::kFloat32: {                        \
                using scalar_t = float;                               \
                __VA_ARGS__;                                          \
                break;                                                \
            }                                                         \
            case ::megaclm::DType::kFloat16: {                        \
                using scalar_t = __half;                              \
                __VA_ARGS__;                                          \
                break;                                                \
            }                                                         \
            case ::megaclm::DType::kBFloat16: {                       \
                using scalar_t = __nv_bfloat16;                       \
                __VA_ARGS__;                                          \
                break;                                                \
            }                                                         \
            default:                                                  \
                return cudaErrorInvalidValue;                         \
        }                                                             \
    } while (0)
