// Torch glue of the megaclm._cuda_kernels extension: checks shapes/dtypes/devices, allocates outputs
// on the current stream's device and calls the raw-pointer launchers of kernels.h. No math here; the
// autograd wiring is in megaclm/ops/_cuda.py. Every function takes the tensors exactly as that module
// prepares them (2-D rows x features unless noted) and raises (TORCH_CHECK -> RuntimeError) otherwise.
// Only the headers used, not <torch/extension.h> (all of libtorch): compiles in a third of the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

megaclm::DType dtype_of(const Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return megaclm::DType::kFloat32;
        case at::kHalf: return megaclm::DType::kFloat16;
        case at::kBFloat16: return megaclm::DType::kBFloat16;
        default: TORCH_CHECK(false, "megaclm kernels support float32, float16 and bfloat16, got ", t.scalar_type());
    }
}

void check_input(const Tensor& t, const char* name, const Tensor& like) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
}

void check_same(const Tensor& t, const char* name, const Tensor& like) {
    check_input(t, name, like);
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), ", expected ",
                like.scalar_type());
}

void check_float(const Tensor& t, const char* name, const Tensor& like, int64_t numel) {
    check_input(t, name, like);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == numel, name, " must be ", numel, " float32 values");
}

void check_labels(const Tensor& t, const Tensor& like, int64_t rows) {
    check_input(t, "labels", like);
    TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == rows, "labels must be ", rows, " int64 values");
}

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "megaclm ", what, " kernel failed: ", cudaGetErrorString(err));
}

const void* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// The current stream of the current device, through c10's device-generic interface: only core torch
// headers are needed, so this file also compiles against a CPU-only torch (the compile test does).
cudaStream_t stream() {
    const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    return static_cast<cudaStream_t>(impl.getStream(impl.getDevice()).native_handle());
}

// ---- norms ----------------------------------------------------------------------------------------
// Returns [y, h (the residual-stream output; empty without residual), mean (empty for RMSNorm), rstd].
std::vector<Tensor> norm_fwd(const Tensor& x, const OptTensor& residual, const Tensor& weight, const OptTensor& bias,
                             double eps, bool rms) {
    TORCH_CHECK(x.dim() == 2, "x must be (rows, hidden)");
    check_same(x, "x", x);
    const c10::DeviceGuard guard(x.device());
    const int64_t rows = x.size(0), hidden = x.size(1);
    check_same(weight, "weight", x);
    TORCH_CHECK(weight.numel() == hidden, "weight must have ", hidden, " elements");
    if (bias) {
        check_same(*bias, "bias", x);
        TORCH_CHECK(bias->numel() == hidden, "bias must have ", hidden, " elements");
    }
    if (residual) {
        check_same(*residual, "residual", x);
        TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have the shape of x");
    }
    Tensor y = at::empty_like(x);
    Tensor h = residual ? at::empty_like(x) : Tensor();
    Tensor mean = rms ? Tensor() : at::empty({rows}, x.options().dtype(at::kFloat));
    Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    check_launch(megaclm::norm_forward(dtype_of(x), rms, x.data_ptr(), ptr(residual), weight.data_ptr(), ptr(bias),
                                       y.data_ptr(), residual ? h.data_ptr() : nullptr,
                                       rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), rows,
                                       int(hidden), float(eps), stream()),
                 "norm forward");
    return {y, h, mean, rstd};
}

// Returns [dh, dweight, dbias (empty unless with_bias)]. dresidual is the gradient reaching h directly.
std::vector<Tensor> norm_bwd(const Tensor& dy, const OptTensor& dresidual, const Tensor& h, const Tensor& weight,
                             const OptTensor& mean, const Tensor& rstd, bool rms, bool with_bias) {
    TORCH_CHECK(h.dim() == 2, "h must be (rows, hidden)");
    check_same(h, "h", h);
    const c10::DeviceGuard guard(h.device());
    const int64_t rows = h.size(0), hidden = h.size(1);
    check_same(dy, "dy", h);
    TORCH_CHECK(dy.sizes() == h.sizes(), "dy must have the shape of h");
    if (dresidual) {
        check_same(*dresidual, "dresidual", h);
        TORCH_CHECK(dresidual->sizes() == h.sizes(), "dresidual must have the shape of h");
    }
    check_same(weight, "weight", h);
    TORCH_CHECK(weight.numel() == hidden, "weight must have ", hidden, " elements");
    check_float(rstd, "rstd", h, rows);
    TORCH_CHECK(rms || mean.has_value(), "LayerNorm backward needs mean");
    if (!rms) check_float(*mean, "mean", h, rows);
    Tensor dh = at::empty_like(h);
    Tensor dweight = at::zeros_like(weight);  // stays zero when rows == 0
    Tensor dbias = with_bias ? at::zeros_like(weight) : Tensor();
    Tensor workspace = at::empty({megaclm::norm_backward_workspace(rows, int(hidden))}, h.options().dtype(at::kFloat));
    check_launch(megaclm::norm_backward(dtype_of(h), rms, dy.data_ptr(), ptr(dresidual), h.data_ptr(), weight.data_ptr(),
                                        rms ? nullptr : mean->data_ptr<float>(), rstd.data_ptr<float>(), dh.data_ptr(),
                                        dweight.data_ptr(), with_bias ? dbias.data_ptr() : nullptr,
                                        workspace.data_ptr<float>(), rows, int(hidden), stream()),
                 "norm backward");
    return {dh, dweight, dbias};
}

// ---- activations ----------------------------------------------------------------------------------
void check_bias(const OptTensor& bias, const Tensor& x) {
    if (!bias) return;
    check_same(*bias, "bias", x);
    TORCH_CHECK(bias->numel() == x.size(1), "bias must have ", x.size(1), " elements");
}

Tensor bias_gelu_fwd(const Tensor& x, const OptTensor& bias) {
    TORCH_CHECK(x.dim() == 2, "x must be (rows, features)");
    check_same(x, "x", x);
    check_bias(bias, x);
    const c10::DeviceGuard guard(x.device());
    Tensor y = at::empty_like(x);
    check_launch(megaclm::bias_gelu_forward(dtype_of(x), x.data_ptr(), ptr(bias), y.data_ptr(), x.size(0),
                                            int(x.size(1)), stream()),
                 "bias-gelu forward");
    return y;
}

Tensor bias_gelu_bwd(const Tensor& dy, const Tensor& x, const OptTensor& bias) {
    TORCH_CHECK(x.dim() == 2, "x must be (rows, features)");
    check_same(x, "x", x);
    check_same(dy, "dy", x);
    TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have the shape of x");
    check_bias(bias, x);
    const c10::DeviceGuard guard(x.device());
    Tensor dx = at::empty_like(x);
    check_launch(megaclm::bias_gelu_backward(dtype_of(x), dy.data_ptr(), x.data_ptr(), ptr(bias), dx.data_ptr(),
                                             x.size(0), int(x.size(1)), stream()),
                 "bias-gelu backward");
    return dx;
}

// x: (rows, 2F) packed [gate | up].
Tensor swiglu_fwd(const Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be (rows, 2*ffn)");
    check_same(x, "x", x);
    const c10::DeviceGuard guard(x.device());
    const int64_t ffn = x.size(1) / 2;
    Tensor y = at::empty({x.size(0), ffn}, x.options());
    const char* base = static_cast<const char*>(x.data_ptr());
    check_launch(megaclm::swiglu_forward(dtype_of(x), base, base + ffn * x.element_size(), x.size(1), y.data_ptr(),
                                         x.size(0), int(ffn), stream()),
                 "swiglu forward");
    return y;
}

Tensor swiglu_bwd(const Tensor& dy, const Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be (rows, 2*ffn)");
    check_same(x, "x", x);
    const int64_t ffn = x.size(1) / 2;
    check_same(dy, "dy", x);
    TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == ffn, "dy must be (rows, ffn)");
    const c10::DeviceGuard guard(x.device());
    Tensor dx = at::empty_like(x);
    const size_t half = ffn * x.element_size();
    const char* in = static_cast<const char*>(x.data_ptr());
    char* out = static_cast<char*>(dx.data_ptr());
    check_launch(megaclm::swiglu_backward(dtype_of(x), dy.data_ptr(), in, in + half, x.size(1), out, out + half,
                                          x.size(0), int(ffn), stream()),
                 "swiglu backward");
    return dx;
}

// ---- rope -----------------------------------------------------------------------------------------
// q: (tokens, q_heads, head_dim) with heads contiguous (stride(1) == head_dim, stride(2) == 1) and
// any token stride; k likewise. Returns contiguous [q_out, k_out].
void check_heads(const Tensor& t, const char* name, const Tensor& like) {
    TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2) && t.stride(0) >= t.size(1) * t.size(2),
                name, " must be (tokens, heads, head_dim) with contiguous heads");
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
}

std::vector<Tensor> rope_fwd(const Tensor& q, const Tensor& k, const Tensor& positions, const Tensor& inv_freq,
                             bool inverse) {
    check_heads(q, "q", q);
    check_heads(k, "k", q);
    const c10::DeviceGuard guard(q.device());
    const int64_t tokens = q.size(0);
    TORCH_CHECK(k.size(0) == tokens && k.size(2) == q.size(2), "k must be (tokens, kv_heads, head_dim) like q");
    check_labels(positions, q, tokens);
    const int64_t rot = 2 * inv_freq.numel();
    check_float(inv_freq, "inv_freq", q, rot / 2);
    TORCH_CHECK(rot <= q.size(2), "2 * len(inv_freq) = ", rot, " exceeds head_dim ", q.size(2));
    Tensor q_out = at::empty(q.sizes(), q.options());
    Tensor k_out = at::empty(k.sizes(), k.options());
    check_launch(megaclm::rope_forward(dtype_of(q), q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), q_out.data_ptr(),
                                       k_out.data_ptr(), positions.data_ptr<int64_t>(), inv_freq.data_ptr<float>(),
                                       tokens, int(q.size(1)), int(k.size(1)), int(q.size(2)), int(rot), inverse,
                                       stream()),
                 "rope");
    return {q_out, k_out};
}

// ---- softmax --------------------------------------------------------------------------------------
// x: (B, nh, Tq, Tk) contiguous. mask (bool) and bias (float32): 4-D views broadcast to x's shape
// (expand, stride 0) with a contiguous last dim.
void check_broadcast(const Tensor& t, const char* name, const Tensor& x) {
    TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, " must be on ", x.device());
    TORCH_CHECK(t.sizes() == x.sizes() && t.stride(3) == 1, name,
                " must be expanded to the scores' shape with a contiguous last dim");
}

Tensor softmax_fwd(const Tensor& x, const OptTensor& mask, bool mask_keeps, const OptTensor& bias, bool causal,
                   double scale) {
    TORCH_CHECK(x.dim() == 4, "scores must be (batch, heads, q_len, k_len)");
    check_same(x, "scores", x);
    const c10::DeviceGuard guard(x.device());
    if (mask) {
        check_broadcast(*mask, "mask", x);
        TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte, "mask must be bool");
    }
    if (bias) {
        check_broadcast(*bias, "bias", x);
        TORCH_CHECK(bias->scalar_type() == at::kFloat, "bias must be float32");
    }
    auto stride = [](const OptTensor& t, int d) { return t ? t->stride(d) : int64_t(0); };
    Tensor y = at::empty_like(x);
    check_launch(megaclm::softmax_forward(
                     dtype_of(x), x.data_ptr(), mask ? static_cast<const uint8_t*>(mask->data_ptr()) : nullptr,
                     stride(mask, 0), stride(mask, 1), stride(mask, 2), mask_keeps,
                     bias ? bias->data_ptr<float>() : nullptr, stride(bias, 0), stride(bias, 1), stride(bias, 2),
                     causal, float(scale), y.data_ptr(), x.size(0), x.size(1), x.size(2), x.size(3), stream()),
                 "softmax forward");
    return y;
}

Tensor softmax_bwd(const Tensor& dy, const Tensor& y, double scale) {
    check_same(y, "probs", y);
    check_same(dy, "dy", y);
    TORCH_CHECK(y.dim() >= 1 && dy.sizes() == y.sizes(), "dy must have the shape of probs");
    const c10::DeviceGuard guard(y.device());
    const int64_t k_len = y.size(-1);
    Tensor dx = at::empty_like(y);
    check_launch(megaclm::softmax_backward(dtype_of(y), dy.data_ptr(), y.data_ptr(), dx.data_ptr(), float(scale),
                                           k_len == 0 ? 0 : y.numel() / k_len, k_len, stream()),
                 "softmax backward");
    return dx;
}

// ---- cross-entropy rows -------------------------------------------------------------------------
// logits: (rows, vocab) holding vocab ids [vocab_start, vocab_start + vocab). Returns
// [row max, sum exp(l - max), target logit (0 when the label is outside this shard)], fp32.
std::vector<Tensor> ce_stats(const Tensor& logits, const Tensor& labels, int64_t vocab_start) {
    TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must be (rows, vocab)");
    check_same(logits, "logits", logits);
    const c10::DeviceGuard guard(logits.device());
    const int64_t rows = logits.size(0);
    check_labels(labels, logits, rows);
    auto opts = logits.options().dtype(at::kFloat);
    Tensor row_max = at::empty({rows}, opts), sum_exp = at::empty({rows}, opts), target = at::empty({rows}, opts);
    check_launch(megaclm::ce_stats(dtype_of(logits), logits.data_ptr(), labels.data_ptr<int64_t>(), vocab_start,
                                   row_max.data_ptr<float>(), sum_exp.data_ptr<float>(), target.data_ptr<float>(), rows,
                                   logits.size(1), stream()),
                 "cross-entropy stats");
    return {row_max, sum_exp, target};
}

// (softmax - onehot) * grad_scale per row, written into `out` (which may be logits itself).
void ce_grad(const Tensor& logits, const Tensor& out, const Tensor& labels, int64_t vocab_start, const Tensor& lse,
             const Tensor& grad_scale, int64_t ignore_index) {
    TORCH_CHECK(logits.dim() == 2, "logits must be (rows, vocab)");
    check_same(logits, "logits", logits);
    check_same(out, "out", logits);
    TORCH_CHECK(out.sizes() == logits.sizes(), "out must have the shape of logits");
    const c10::DeviceGuard guard(logits.device());
    const int64_t rows = logits.size(0);
    check_labels(labels, logits, rows);
    check_float(lse, "lse", logits, rows);
    check_float(grad_scale, "grad_scale", logits, rows);
    check_launch(megaclm::ce_grad(dtype_of(logits), logits.data_ptr(), out.data_ptr(), labels.data_ptr<int64_t>(),
                                  vocab_start, lse.data_ptr<float>(), grad_scale.data_ptr<float>(), rows, logits.size(1),
                                  ignore_index, stream()),
                 "cross-entropy grad");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "megaclm fused CUDA kernels (see csrc/kernels/kernels.h; wrapped by megaclm.ops._cuda)";
    m.def("norm_fwd", &norm_fwd, "RMSNorm/LayerNorm forward, optional fused residual add");
    m.def("norm_bwd", &norm_bwd, "RMSNorm/LayerNorm backward");
    m.def("bias_gelu_fwd", &bias_gelu_fwd, "gelu_tanh(x + bias)");
    m.def("bias_gelu_bwd", &bias_gelu_bwd, "d gelu_tanh(x + bias) / dx");
    m.def("swiglu_fwd", &swiglu_fwd, "silu(gate) * up on packed [gate | up]");
    m.def("swiglu_bwd", &swiglu_bwd, "SwiGLU backward");
    m.def("rope_fwd", &rope_fwd, "rotary embedding of q and k (inverse=True: backward)");
    m.def("softmax_fwd", &softmax_fwd, "scaled masked / causal softmax forward");
    m.def("softmax_bwd", &softmax_bwd, "scaled softmax backward");
    m.def("ce_stats", &ce_stats, "cross-entropy row max, sum-exp and target logit of a logits chunk");
    m.def("ce_grad", &ce_grad, "cross-entropy (softmax - onehot) * grad of a logits chunk");
}
