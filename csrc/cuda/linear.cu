// Fully connected layer on our GEMM: y = x w^T + b, the bias added in the
// GEMM's epilogue; the bias gradient sums columns in double (channel_sums.h).
#include "channel_sums.h"
#include "fastcnn/cuda_launch.h"

namespace fastcnn {
namespace cuda {
namespace {

}  // namespace

void linear_forward(const Exec& ex, index_t n, index_t in, index_t out, const float* x,
                    const float* w, const float* bias, float* y, bool relu) {
  // x: (n, in), w: (out, in), bias: (out,) or null -> y: (n, out)
  GemmProblem p;
  p.m = n;
  p.n = out;
  p.k = in;
  p.a = make_operand(x, in, 1);
  p.b = make_operand(w, in, 1);
  p.c = make_output(y, out);
  p.bias = bias;
  p.bias_per_row = false;
  p.relu = relu;
  gemm(ex, p);
}

void linear_backward(const Exec& ex, index_t n, index_t in, index_t out, const float* dy,
                     const float* x, const float* w, float* dx, float* dw, float* db) {
  // dy: (n, out) -> dx (n, in) = dy @ w;  dw (out, in) = dy^T @ x;  db (out,) = sum_n dy
  if (dx != nullptr) {
    GemmProblem p;
    p.m = n;
    p.n = in;
    p.k = out;
    p.a = make_operand(dy, out, 1);
    p.b = make_operand(w, 1, in);
    p.c = make_output(dx, in);
    gemm(ex, p);
  }
  if (dw != nullptr) {
    GemmProblem p;
    p.m = out;
    p.n = in;
    p.k = n;
    p.a = make_operand(dy, 1, out);
    p.b = make_operand(x, 1, in);
    p.c = make_output(dw, in);
    gemm(ex, p);
  }
  if (db != nullptr)
    channel_sum(ex, "linear_bias_grad", n, out, 1, dy, db);  // dy as (n, out, 1)
}

}  // namespace cuda
}  // namespace fastcnn
