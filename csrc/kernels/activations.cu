// Bias-GeLU and SwiGLU, forward and backward: element-wise, one read of each input and one write.
//
// Launch shape: blockIdx.y walks rows (grid-stride), x threads walk 16-byte packs of a row, so the
// bias / column index needs no integer division. The sum x + bias is rounded to T before GeLU, as
// the unfused `gelu(x + bias)` does, so fused and reference differ only in the last rounding.
#include <algorithm>

#include "common.cuh"

namespace megaclm {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;

// GeLU, tanh approximation (GPT-2, Megatron's bias_gelu): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + kGeluCoef * x * x * x)));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float t = tanhf(kSqrt2OverPi * (x + kGeluCoef * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluCoef * x * x);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Grid: (ceil(packs per row / threads), min(rows, 65535)).
struct RowGrid {
    dim3 grid, block;
};
RowGrid row_grid(int64_t rows, int cols, int vec) {
    const int packs = ceil_div(cols, vec);
    const int threads = std::min(256, std::max(32, ceil_div(packs, 32) * 32));
    return {dim3(ceil_div(packs, threads), unsigned(std::min<int64_t>(rows, 65535))), dim3(threads)};
}

template <typename T, int VEC, bool BACKWARD>
__global__ void bias_gelu_kernel(const T* dy, const T* x, const T* bias, T* out, int64_t rows, int hidden) {
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (c >= hidden) return;
    float b[VEC];
    if (bias != nullptr) load_pack<T, VEC>(bias + c, b);
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const int64_t off = row * hidden + c;
        float v[VEC], g[VEC];
        load_pack<T, VEC>(x + off, v);
        if (BACKWARD) load_pack<T, VEC>(dy + off, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const float z = bias != nullptr ? round_to<T>(v[i] + b[i]) : v[i];
            v[i] = BACKWARD ? g[i] * gelu_grad(z) : gelu(z);
        }
        store_pack<T, VEC>(out + off, v);
    }
}

template <typename T, int VEC, bool BACKWARD>
__global__ void swiglu_kernel(const T* dy, const T* gate, const T* up, int64_t in_stride, T* out, T* dup,
                              int64_t rows, int ffn) {
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (c >= ffn) return;
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const int64_t in = row * in_stride + c;
        float g[VEC], u[VEC];
        load_pack<T, VEC>(gate + in, g);
        load_pack<T, VEC>(up + in, u);
        if (!BACKWARD) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) g[i] = g[i] * sigmoid(g[i]) * u[i];
            store_pack<T, VEC>(out + row * ffn + c, g);
        } else {
            float d[VEC];
            load_pack<T, VEC>(dy + row * ffn + c, d);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float s = sigmoid(g[i]);
                const float silu = g[i] * s;
                g[i] = d[i] * u[i] * s * (1.f + g[i] * (1.f - s));  // d silu/dg = s (1 + g (1 - s))
                u[i] = d[i] * silu;
            }
            store_pack<T, VEC>(out + in, g);
            store_pack<T, VEC>(dup + in, u);
        }
    }
}

template <typename T, int VEC, bool BACKWARD>
cudaError_t launch_bias_gelu(const void* dy, const void* x, const void* bias, void* out, int64_t rows, int hidden,
                             cudaStream_t stream) {
    const RowGrid g = row_grid(rows, hidden, VEC);
    bias_gelu_kernel<T, VEC, BACKWARD><<<g.grid, g.block, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(out), rows,
        hidden);
    return cudaGetLastError();
}

template <typename T, int VEC, bool BACKWARD>
cudaError_t launch_swiglu(const void* dy, const void* gate, const void* up, int64_t in_stride, void* out, void* dup,
                          int64_t rows, int ffn, cudaStream_t stream) {
    const RowGrid g = row_grid(rows, ffn, VEC);
    swiglu_kernel<T, VEC, BACKWARD><<<g.grid, g.block, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(gate), static_cast<const T*>(up), in_stride,
        static_cast<T*>(out), static_cast<T*>(dup), rows, ffn);
    return cudaGetLastError();
}

template <bool BACKWARD>
cudaError_t bias_gelu(DType dtype, const void* dy, const void* x, const void* bias, void* out,
                      int64_t rows, int hidden, cudaStream_t stream) {
    if (rows == 0 || hidden == 0) return cudaSuccess;
    MEGACLM_DISPATCH(dtype, {
        if (packable(hidden, sizeof(scalar_t), {dy, x, bias, out}))
            return launch_bias_gelu<scalar_t, kPack<scalar_t>, BACKWARD>(dy, x, bias, out, rows, hidden, stream);
        return launch_bias_gelu<scalar_t, 1, BACKWARD>(dy, x, bias, out, rows, hidden, stream);
    });
    return cudaSuccess;
}

template <bool BACKWARD>
cudaError_t swiglu(DType dtype, const void* dy, const void* gate, const void* up, int64_t in_stride, void* out,
                   void* dup, int64_t rows, int ffn, cudaStream_t stream) {
    if (rows == 0 || ffn == 0) return cudaSuccess;
    MEGACLM_DISPATCH(dtype, {
        const bool packed = packable(ffn, sizeof(scalar_t), {dy, gate, up, out, dup}) &&
                            packable(in_stride, sizeof(scalar_t), {});
        if (packed)
            return launch_swiglu<scalar_t, kPack<scalar_t>, BACKWARD>(dy, gate, up, in_stride, out, dup, rows, ffn,
                                                                      stream);
        return launch_swiglu<scalar_t, 1, BACKWARD>(dy, gate, up, in_stride, out, dup, rows, ffn, stream);
    });
    return cudaSuccess;
}

}  // namespace

cudaError_t bias_gelu_forward(DType dtype, const void* x, const void* bias, void* y, int64_t rows,
                              int hidden, cudaStream_t stream) {
    return bias_gelu<false>(dtype, nullptr, x, bias, y, rows, hidden, stream);
}

cudaError_t bias_gelu_backward(DType dtype, const void* dy, const void* x, const void* bias,
                               void* dx, int64_t rows, int hidden, cudaStream_t stream) {
    return bias_gelu<true>(dtype, dy, x, bias, dx, rows, hidden, stream);
}

cudaError_t swiglu_forward(DType dtype, const void* gate, const void* up, int64_t in_stride, void* y, int64_t rows,
                           int ffn, cudaStream_t stream) {
    return swiglu<false>(dtype, nullptr, gate, up, in_stride, y, nullptr, rows, ffn, stream);
}

cudaError_t swiglu_backward(DType dtype, const void* dy, const void* gate, const void* up, int64_t in_stride,
                            void* dgate, void* dup, int64_t rows, int ffn, cudaStream_t stream) {
    return swiglu<true>(dtype, dy, gate, up, in_stride, dgate, dup, rows, ffn, stream);
}

}  // namespace megaclm
