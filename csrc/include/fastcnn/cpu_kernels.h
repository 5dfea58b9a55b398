// The CPU kernels: raw pointers and shapes in, no Python, no output
// allocation. Arrays are C-contiguous float32, NCHW. The Python layer has
// validated every shape and argument before it calls any of these.
#pragma once

#include <cstdint>

#include "fastcnn/common.h"
#include "fastcnn/conv_geometry.h"
#include "fastcnn/optim_math.h"

namespace fastcnn {
namespace cpu {

// ---- im2col.cpp
// The column matrices of `count` images (x_stride floats apart), side by
// side, written straight in the packed-B layout of sgemm_packed_b with
// panels `width` columns wide; only panels [q0, q1) when q1 >= 0.
void im2col_packed(const ConvShape& cs, const float* x, index_t x_stride, index_t count,
                   int width, float* dst, index_t q0 = 0, index_t q1 = -1);
// The transpose of those columns, (count oh ow, c/groups r s), in the same
// packed layout (panels of `width` taps): an operand of the weight gradient.
void im2col_packed_transposed(const ConvShape& cs, const float* x, index_t x_stride,
                              index_t count, int width, float* dst);
// A chunk's output gradient (one group's k/g channels of `count` images,
// y_stride floats apart) as the packed matrix (k/g, count oh ow), and its
// transpose: operands of the input and weight gradients.
void grad_output_packed(const ConvShape& cs, const float* dy, index_t y_stride, index_t count,
                        int width, float* dst);
void grad_output_packed_transposed(const ConvShape& cs, const float* dy, index_t y_stride,
                                   index_t count, int width, float* dst);
// One image, one group; `ld` is the row stride of cols (>= oh * ow: several
// images' columns may sit side by side).
// cols: (c/groups * r * s, oh * ow) -> dx: (c/groups, h, w), overwritten
void col2im(const ConvShape& cs, const float* cols, index_t ld, float* dx);

// ---- conv2d.cpp
// x: (n, c, h, w), w: (k, c/groups, r, s), bias: (k,) or null -> y: (n, k, oh, ow)
void conv2d_forward(const ConvShape& cs, const float* x, const float* w, const float* bias,
                    float* y);
// dy: (n, k, oh, ow) -> dx (like x), dw (like w), db (k,); each may be null (not wanted).
void conv2d_backward(const ConvShape& cs, const float* dy, const float* x, const float* w,
                     float* dx, float* dw, float* db);

// ---- winograd.cpp: F(2x2, 3x3) for 3x3 / stride 1 / dilation 1 / one group,
// taken by conv2d_forward / conv2d_backward where winograd_applies (which
// depends on the layer's shape, the pass and the CPU, never on the batch size).
bool winograd_applies(const ConvShape& cs, bool backward);
bool winograd_enabled();
void set_winograd_enabled(bool on);
void winograd_forward(const ConvShape& cs, const float* x, const float* w, const float* bias,
                      float* y);
// dx (overwritten) and dw (overwritten), each may be null; the bias gradient is the caller's.
void winograd_backward(const ConvShape& cs, const float* dy, const float* x, const float* w,
                       float* dx, float* dw);

// ---- conv_direct.cpp: stride 1 / dilation 1 / one group with 4 to 27 taps
// (c r s) per output, the first layers (AVX-512 CPUs).
bool direct_conv_applies(const ConvShape& cs);
void direct_conv_forward(const ConvShape& cs, const float* x, const float* w, const float* bias,
                         float* y);
// dw overwritten.
void direct_conv_weight_grad(const ConvShape& cs, const float* dy, const float* x, float* dw);
// dw and db (each may be null) of a direct-path convolution whose output went
// through ReLU and a 2x2 / stride-2 max-pool that kept window codes
// (max_pool2d_2x2_codes_forward, relu): from the pooled gradient dpool
// (n, k, oh / 2, ow / 2), never writing the output gradient. The same bits as
// conv2d_backward on the gradient the pool's backward pass would give.
void direct_conv_grads_from_pool(const ConvShape& cs, const float* dpool,
                                 const std::uint8_t* codes, const float* x, float* dw,
                                 float* db);
// A plane's sum for the bias gradient: 16 lanes over each row's 16-column
// blocks, lanes added in order.
float row_block_sum(const float* plane, index_t oh, index_t ow);

// ---- linear.cpp: x: (n, in), w: (out, in), bias: (out,) or null -> y: (n, out)
void linear_forward(index_t n, index_t in, index_t out, const float* x, const float* w,
                    const float* bias, float* y);
void linear_backward(index_t n, index_t in, index_t out, const float* dy, const float* x,
                     const float* w, float* dx, float* dw, float* db);

// ---- activation.cpp (elementwise over `count` values)
void relu_forward(index_t count, const float* x, float* y);
// dx = dy where x > 0 (and, if guided, dy > 0), else 0
void relu_backward(index_t count, const float* dy, const float* x, bool guided, float* dx);

// ---- deeplift.cpp: arrays of 2 * count values, the image's half then the
// reference's (kernel_math.h's deeplift_* rules, element by element)
void deeplift_relu(index_t count, const float* in, const float* out, const float* g, float eps,
                   float* result);
void deeplift_pool_split(index_t count, const float* out, const float* g, float* result);
void deeplift_rescale(index_t count, const float* in, const float* routed, const float* plain,
                      float eps, float* result);

// ---- pool.cpp: x: (n, c, h, w) -> y: (n, c, oh, ow), indices (flat h * w + w) or null
// relu: y = max_pool2d(relu(x)) (relu_window_max); the indices stay those of x.
void max_pool2d_forward(const PoolShape& ps, const float* x, float* y, std::int64_t* indices,
                        bool relu = false);
// dx (like x) = 0, then dy routed to each window's argmax: from `indices` when
// given, else recomputed from x. relu: the gradient of relu(max_pool2d(x)),
// which routes a window's gradient only where x > 0. Returns the number of
// given indices outside [min_index, h w) (skipped; 0 when all are valid).
index_t max_pool2d_backward(const PoolShape& ps, const float* dy, const float* x,
                            const std::int64_t* indices, bool relu, std::int64_t min_index,
                            float* dx);

// 2x2 windows of stride 2, no padding, dilation 1 (oh = h / 2, ow = w / 2):
// y = the maxima (ReLU'd with `relu`) and one byte per window, bits 0-1 the
// winning tap in row-major order (the rule above), bit 2 set where the
// gradient passes (always without relu; with relu where the maximum is > 0
// or NaN). The backward pass needs only dy and those bytes.
// With scale and shift (c,), each plane's input is first mapped to
// x * scale[ch] + shift[ch] as batch_norm_normalize computes it: a batch
// norm's output pooled without being written.
void max_pool2d_2x2_codes_forward(const PoolShape& ps, const float* x, bool relu, float* y,
                                  std::uint8_t* codes, const float* scale = nullptr,
                                  const float* shift = nullptr);
void max_pool2d_2x2_codes_backward(const PoolShape& ps, const float* dy,
                                   const std::uint8_t* codes, float* dx);
// One plane of it: dx (h x w) from dy and codes ((h / 2) x (w / 2)); up to
// `readable` code bytes may be read from `codes` on (>= the plane's).
void max_pool2d_2x2_codes_backward_plane(const float* dy, const std::uint8_t* codes, index_t h,
                                         index_t w, index_t readable, float* dx);

// ---- softmax.cpp: x viewed as (outer, dim, inner), softmax along dim.
void softmax_forward(index_t outer, index_t dim, index_t inner, const float* x, bool log,
                     float* y);
// y is the forward output. softmax: dx = y (dy - sum(dy y)); log: dx = dy - exp(y) sum(dy)
void softmax_backward(index_t outer, index_t dim, index_t inner, const float* dy,
                      const float* y, bool log, float* dx);
// logits: (n, classes), target: (n,) int64. loss: (n,) per-sample loss (0 where ignored).
void cross_entropy_forward(index_t n, index_t classes, const float* logits,
                           const std::int64_t* target, std::int64_t ignore_index,
                           float label_smoothing, float* loss);
// grad_scale: (n,) dL/dloss_i (already divided by the count for mean) -> dx (n, classes)
void cross_entropy_backward(index_t n, index_t classes, const float* logits,
                            const std::int64_t* target, std::int64_t ignore_index,
                            float label_smoothing, const float* grad_scale, float* dx);

// ---- batchnorm.cpp: x viewed as (n, c, l), statistics per channel over (n, l).
// Training: batch statistics; writes save_mean / save_invstd (c,) and, when
// running_mean / running_var are given, updates them with momentum and the
// unbiased variance. weight / bias may be null (identity affine).
// y may be null (statistics only); scale / shift (c,), when given, receive the
// per-channel y = x * scale + shift that the normalisation applies.
void batch_norm_forward_train(index_t n, index_t c, index_t l, const float* x,
                              const float* weight, const float* bias, double eps,
                              double momentum, float* running_mean, float* running_var,
                              float* y, float* save_mean, float* save_invstd,
                              float* scale = nullptr, float* shift = nullptr);
// y = x * scale[ch] + shift[ch]: the training forward's normalisation, bit for bit.
void batch_norm_normalize(index_t n, index_t c, index_t l, const float* x, const float* scale,
                          const float* shift, float* y);
void batch_norm_forward_eval(index_t n, index_t c, index_t l, const float* x,
                             const float* running_mean, const float* running_var,
                             const float* weight, const float* bias, double eps, float* y);
// The y = x * scale + shift (c,) that batch_norm_forward_eval applies, for a
// fused pass that normalises without writing y (max_pool2d_2x2_codes_forward).
void batch_norm_eval_affine(index_t c, const float* running_mean, const float* running_var,
                            const float* weight, const float* bias, double eps, float* scale,
                            float* shift);
// mean / invstd: the statistics the forward normalised with (batch ones when
// training, running ones in eval). training adds the terms through the batch
// statistics. dx, dweight, dbias may be null.
void batch_norm_backward(index_t n, index_t c, index_t l, const float* dy, const float* x,
                         const float* mean, const float* invstd, const float* weight,
                         bool training, float* dx, float* dweight, float* dbias);

// The training backward of a batch norm over (n, c, h, w) whose output went
// through ReLU and a 2x2 / stride-2 max-pool that kept window codes: from the
// pooled gradient dp (n, c, h / 2, w / 2), never writing the output gradient.
// The same bits as batch_norm_backward on the gradient the pool's backward
// pass would give.
void batch_norm_backward_from_pool(index_t n, index_t c, index_t h, index_t w, const float* dp,
                                   const std::uint8_t* codes, const float* x, const float* mean,
                                   const float* invstd, const float* weight, float* dx,
                                   float* dweight, float* dbias);

// ---- dropout.cpp: y = x * multiplier(seed, offset, i), multiplier in {0, 1/(1-p)}.
// With x == null, writes the multiplier itself (the mask).
void dropout_apply(index_t count, const float* x, double p, std::uint64_t seed,
                   std::uint64_t offset, float* y);

// ---- normalize.cpp: uint8 x viewed as (outer, c, inner):
// y = x / 255 * scale[c] + shift[c] with scale = 1/std, shift = -mean/std.
void normalize_u8(index_t outer, index_t c, index_t inner, const std::uint8_t* x,
                  const float* mean, const float* stdev, float* y);

// ---- optim.cpp: one parameter's update, in place (fastcnn.optim's rules;
// the per-element maths and the options are in fastcnn/optim_math.h).
using fastcnn::AdamOptions;
using fastcnn::SgdOptions;
// buf: the momentum buffer, or null without momentum
void sgd_step(index_t count, float* p, const float* g, float* buf, const SgdOptions& o);
void adam_step(index_t count, float* p, const float* g, float* exp_avg, float* exp_avg_sq,
               const AdamOptions& o);

}  // namespace cpu
}  // namespace fastcnn
