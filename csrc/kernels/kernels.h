// Host-side launchers of megaclm's fused CUDA kernels.
//
// Plain C++ on purpose: raw pointers, a dtype tag and a stream, no torch types. The device code
// (the .cu files next to this header) then compiles with nvcc alone, which is what
// tests/unit/test_nvcc_compile.py checks on machines without a GPU; the torch glue (shape checks,
// allocation, streams) lives in bindings.cpp.
//
// Conventions shared by every launcher:
//   - tensors are contiguous, row-major; "rows" is the product of all leading dimensions;
//   - T is the activation dtype (DType); statistics (mean, rstd, lse, ...) are always fp32;
//   - launchers return cudaGetLastError() after the launch, so the caller can raise on failure.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace megaclm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- norms.cu ---------------------------------------------------------------------------------
// h = x (+ residual); y = norm(h) * weight (+ bias). RMSNorm when `rms`, else LayerNorm.
// residual / residual_out may be null (no fused add); bias may be null; mean is unused for RMSNorm.
// residual_out receives h rounded to T (the new residual stream), and h is what backward reads.
cudaError_t norm_forward(DType dtype, bool rms, const void* x, const void* residual, const void* weight,
                         const void* bias, void* y, void* residual_out, float* mean, float* rstd,
                         int64_t rows, int hidden, float eps, cudaStream_t stream);

// Scratch floats norm_backward needs for its per-block weight/bias gradient partials.
int64_t norm_backward_workspace(int64_t rows, int hidden);

// dh = d norm(h)/dh . dy (+ dresidual_out, the gradient reaching h through residual_out).
// dweight/dbias are full sums over rows (dbias may be null: RMSNorm or no bias).
// `workspace` holds norm_backward_workspace(rows, hidden) floats.
cudaError_t norm_backward(DType dtype, bool rms, const void* dy, const void* dresidual_out, const void* h,
                          const void* weight, const float* mean, const float* rstd, void* dh,
                          void* dweight, void* dbias, float* workspace, int64_t rows, int hidden,
                          cudaStream_t stream);

// ---- activations.cu ---------------------------------------------------------------------------
// y = gelu(x + bias) over rows x hidden (bias of `hidden` elements, may be null), tanh approximation.
cudaError_t bias_gelu_forward(DType dtype, const void* x, const void* bias, void* y,
                              int64_t rows, int hidden, cudaStream_t stream);
// dx = dy * gelu'(x + bias). The bias gradient is dx summed over rows (done by the caller).
cudaError_t bias_gelu_backward(DType dtype, const void* dy, const void* x, const void* bias,
                               void* dx, int64_t rows, int hidden, cudaStream_t stream);

// SwiGLU: y[r, j] = silu(gate[r, j]) * up[r, j] for j < ffn. gate and up are rows of `in_stride`
// elements: a packed (rows, 2*ffn) input [gate | up] is gate = x, up = x + ffn, in_stride = 2*ffn;
// two separate contiguous tensors are in_stride = ffn. y is (rows, ffn) contiguous.
cudaError_t swiglu_forward(DType dtype, const void* gate, const void* up, int64_t in_stride, void* y, int64_t rows,
                           int ffn, cudaStream_t stream);
// dgate = dy * up * silu'(gate), dup = dy * silu(gate); dgate/dup laid out like gate/up (in_stride).
cudaError_t swiglu_backward(DType dtype, const void* dy, const void* gate, const void* up, int64_t in_stride,
                            void* dgate, void* dup, int64_t rows, int ffn, cudaStream_t stream);

// ---- rope.cu ----------------------------------------------------------------------------------
// Rotary embedding, "rotate half" layout (GPT-NeoX / Llama / Megatron): for i < rot/2 the pair
// (x[i], x[i + rot/2]) turns by the angle float(pos) * inv_freq[i] (fp32, as the reference computes
// it); dimensions >= rot pass through. q: (tokens, q_heads, head_dim) with heads contiguous and
// `q_token_stride` elements between tokens (a view into a fused qkv row works); k likewise, may be
// null. Outputs are contiguous (tokens, heads, head_dim). positions: (tokens) int64.
// `inverse` turns by -angle (the backward pass). q and k are done in one launch.
cudaError_t rope_forward(DType dtype, const void* q, int64_t q_token_stride, const void* k, int64_t k_token_stride,
                         void* q_out, void* k_out, const int64_t* positions, const float* inv_freq, int64_t tokens,
                         int q_heads, int k_heads, int head_dim, int rot_dim, bool inverse, cudaStream_t stream);

// ---- softmax.cu -------------------------------------------------------------------------------
// y = softmax(scale * x + bias, masked) over the last dim of x (batch, heads, q_len, k_len).
// mask (bool/uint8) row (b, h, i) starts at mask + b*mask_batch_stride + h*mask_head_stride +
// i*mask_row_stride (stride 0 = broadcast), may be null; nonzero means "attend" when mask_keeps,
// else "masked out" (Megatron's convention). bias (fp32, additive: ALiBi, document biases) is
// indexed the same way with its own strides, may be null. `causal` masks keys j > i + (k_len - q_len).
// Fully masked rows give zeros (not NaN). Any k_len >= 1: no length cliff.
cudaError_t softmax_forward(DType dtype, const void* x, const uint8_t* mask, int64_t mask_batch_stride,
                            int64_t mask_head_stride, int64_t mask_row_stride, bool mask_keeps, const float* bias,
                            int64_t bias_batch_stride, int64_t bias_head_stride, int64_t bias_row_stride, bool causal,
                            float scale, void* y, int64_t batch, int64_t heads, int64_t q_len, int64_t k_len,
                            cudaStream_t stream);
// dx = scale * y * (dy - sum_j dy*y). In place (dx == dy) is allowed.
cudaError_t softmax_backward(DType dtype, const void* dy, const void* y, void* dx, float scale, int64_t rows,
                             int64_t k_len, cudaStream_t stream);

// ---- cross_entropy.cu -------------------------------------------------------------------------
// Per row of a (rows, vocab) logits chunk holding vocab ids [vocab_start, vocab_start + vocab):
// row_max, sum_exp = sum_j exp(l_j - row_max), target = l[label - vocab_start] if the label falls in
// this shard, else 0. The wrapper combines shards (all-reduce max, then rescaled sums) into lse.
cudaError_t ce_stats(DType dtype, const void* logits, const int64_t* labels, int64_t vocab_start, float* row_max,
                     float* sum_exp, float* target, int64_t rows, int64_t vocab, cudaStream_t stream);
// grad <- (exp(l - lse) - [j == label - vocab_start]) * grad_scale[row] for each row of logits;
// rows whose label is ignore_index become zeros. grad may be logits (in place).
cudaError_t ce_grad(DType dtype, const void* logits, void* grad, const int64_t* labels, int64_t vocab_start,
                    const float* lse, const float* grad_scale, int64_t rows, int64_t vocab, int64_t ignore_index,
                    cudaStream_t stream);

}  // namespace megaclm
