// Rotary position embedding on q and k in one launch, forward and backward.
//
// Rotate-half layout (GPT-NeoX, Megatron, HF Llama): for i < rot/2 the pair (x[i], x[i + rot/2]) is
//   out[i]         = x[i] cos - x[i + rot/2] sin
//   out[i + rot/2] = x[i + rot/2] cos + x[i] sin
// with the angle float(pos) * inv_freq[i] in fp32, exactly as the reference forms it. The backward
// pass is the inverse rotation (sin -> -sin). Dimensions >= rot are copied through (partial rotary).
//
// Work item = (token, slot); a slot is VEC consecutive dims (16-byte packs when the rotated half and
// the tail are whole packs, else one element). A thread computes its cos/sin once and applies them
// to every q and k head of its token, so the sincos cost is shared by all heads.
#include <algorithm>

#include "common.cuh"

namespace megaclm {
namespace {

template <typename T, int VEC>
__device__ __forceinline__ void rotate_heads(const T* src, int64_t src_head0, T* dst, int64_t dst_head0, int heads,
                                             int head_dim, int i, int half_rot, const float (&c)[VEC],
                                             const float (&s)[VEC]) {
    for (int h = 0; h < heads; ++h) {
        const T* x = src + src_head0 + int64_t(h) * head_dim;
        T* y = dst + dst_head0 + int64_t(h) * head_dim;
        float a[VEC], b[VEC];
        load_pack<T, VEC>(x + i, a);
        load_pack<T, VEC>(x + i + half_rot, b);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            const float x0 = a[v], x1 = b[v];
            a[v] = x0 * c[v] - x1 * s[v];
            b[v] = x1 * c[v] + x0 * s[v];
        }
        store_pack<T, VEC>(y + i, a);
        store_pack<T, VEC>(y + i + half_rot, b);
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void copy_heads(const T* src, int64_t src_head0, T* dst, int64_t dst_head0, int heads,
                                           int head_dim, int j) {
    for (int h = 0; h < heads; ++h)
        *reinterpret_cast<Pack<T, VEC>*>(dst + dst_head0 + int64_t(h) * head_dim + j) =
            *reinterpret_cast<const Pack<T, VEC>*>(src + src_head0 + int64_t(h) * head_dim + j);
}

template <typename T, int VEC>
__global__ void rope_kernel(const T* q, int64_t q_stride, const T* k, int64_t k_stride, T* q_out, T* k_out,
                            const int64_t* positions, const float* inv_freq, int64_t tokens, int q_heads, int k_heads,
                            int head_dim, int rot_dim, float sin_sign) {
    const int half_rot = rot_dim / 2;
    const int rot_slots = half_rot / VEC, slots = rot_slots + (head_dim - rot_dim) / VEC;
    const int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (item >= tokens * slots) return;
    const int64_t tok = item / slots;
    const int slot = int(item % slots);
    const int64_t q_out0 = tok * q_heads * head_dim, k_out0 = tok * k_heads * head_dim;

    if (slot < rot_slots) {
        const int i = slot * VEC;
        const float pos = float(positions[tok]);
        float c[VEC], s[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            sincosf(pos * inv_freq[i + v], &s[v], &c[v]);
            s[v] *= sin_sign;
        }
        rotate_heads<T, VEC>(q, tok * q_stride, q_out, q_out0, q_heads, head_dim, i, half_rot, c, s);
        if (k != nullptr) rotate_heads<T, VEC>(k, tok * k_stride, k_out, k_out0, k_heads, head_dim, i, half_rot, c, s);
    } else {
        const int j = rot_dim + (slot - rot_slots) * VEC;
        copy_heads<T, VEC>(q, tok * q_stride, q_out, q_out0, q_heads, head_dim, j);
        if (k != nullptr) copy_heads<T, VEC>(k, tok * k_stride, k_out, k_out0, k_heads, head_dim, j);
    }
}

template <typename T, int VEC>
cudaError_t launch(const void* q, int64_t q_stride, const void* k, int64_t k_stride, void* q_out, void* k_out,
                   const int64_t* positions, const float* inv_freq, int64_t tokens, int q_heads, int k_heads,
                   int head_dim, int rot_dim, bool inverse, cudaStream_t stream) {
    const int64_t items = tokens * (rot_dim / 2 / VEC + (head_dim - rot_dim) / VEC);
    if (items == 0) return cudaSuccess;
    constexpr int kThreads = 256;
    rope_kernel<T, VEC><<<ceil_div(items, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(q), q_stride, static_cast<const T*>(k), k_stride, static_cast<T*>(q_out),
        static_cast<T*>(k_out), positions, inv_freq, tokens, q_heads, k_heads, head_dim, rot_dim,
        inverse ? -1.f : 1.f);
    return cudaGetLastError();
}

}  // namespace

cudaError_t rope_forward(DType dtype, const void* q, int64_t q_token_stride, const void* k, int64_t k_token_stride,
                         void* q_out, void* k_out, const int64_t* positions, const float* inv_freq, int64_t tokens,
                         int q_heads, int k_heads, int head_dim, int rot_dim, bool inverse, cudaStream_t stream) {
    if (tokens == 0 || q_heads == 0) return cudaSuccess;
    if (rot_dim % 2 != 0 || rot_dim > head_dim) return cudaErrorInvalidValue;
    MEGACLM_DISPATCH(dtype, {
        constexpr int P = kPack<scalar_t>;
        const size_t e = sizeof(scalar_t);
        // Packs need whole packs in both rotated halves and in the tail, and 16-byte aligned heads.
        const bool packed = (rot_dim / 2) % P == 0 && packable(head_dim, e, {q, k, q_out, k_out}) &&
                            packable(q_token_stride, e, {}) && packable(k_token_stride, e, {});
        if (packed)
            return launch<scalar_t, P>(q, q_token_stride, k, k_token_stride, q_out, k_out, positions, inv_freq, tokens,
                                       q_heads, k_heads, head_dim, rot_dim, inverse, stream);
        return launch<scalar_t, 1>(q, q_token_stride, k, k_token_stride, q_out, k_out, positions, inv_freq, tokens,
                                   q_heads, k_heads, head_dim, rot_dim, inverse, stream);
    });
    return cudaSuccess;
}

}  // namespace megaclm
