// The inner loops shared by bitfast's GroupNorm+ReLU and BatchNorm+ReLU CPU kernels.
//
// Both norms reduce x over some elements, then apply a per-channel scale and shift and the
// ReLU; their backward passes reduce dy and dy * (x - mean) and then write dx as a
// per-channel linear combination of dy (masked by the ReLU) and x. Only the shape of the
// data differs, so these loops come in two shapes:
//
//  * planar (NCHW): R rows of L contiguous elements, rows `stride` elements apart, one set
//    of parameters per row (a row is one channel of one sample);
//  * columns (channels_last): R rows of C contiguous channels, one parameter per column,
//    vectorized across the channels.
//
// Everything is computed in float32 (float64 for float64 tensors): fp16 data are widened
// into float buffers by the callers; bf16 is read and written in place by the loops with
// bf16 entry points (converted in registers, bitwise what the float loops give on widened
// copies), or widened where a caller has no such loop. Sums that may cover many elements
// come back in double, accumulated from float vector lanes a chunk at a time, so a group or
// channel of 10^5 elements sums as accurately as a few hundred; column sums cover a block
// of rows and are combined in double by the callers. Every sum has a fixed order: results
// do not depend on the number of threads.
//
// The ReLU mask is recomputed in the backward with exactly the forward's arithmetic,
// (x * s + t > 0) with s = rstd * weight and t = bias - mean * s, so the two agree on
// every element.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace bitfast::cpu::rows {

// sum of x[0..n)
double sum(const float* x, int64_t n);
double sum(const double* x, int64_t n);

// sum of (x - m)^2 over x[0..n)
double sum_sq_dev(const float* x, int64_t n, float m);
double sum_sq_dev(const double* x, int64_t n, double m);

// sum of x, and of (x - m)^2, over R rows of L elements, rows `stride` apart (the N rows of
// a BatchNorm channel in NCHW)
double sum_rows(const float* x, int64_t R, int64_t L, int64_t stride);
double sum_rows(const double* x, int64_t R, int64_t L, int64_t stride);
double sum_sq_dev_rows(const float* x, int64_t R, int64_t L, int64_t stride, float m);
double sum_sq_dev_rows(const double* x, int64_t R, int64_t L, int64_t stride, double m);

// Planar: y = x * s[r] + t[r], then max(y, 0) when relu, for the R rows of L elements.
void planar_affine(const float* x,   // R rows of L, `stride` apart
                   float* y,         // same layout as x
                   int64_t R,
                   int64_t L,
                   int64_t stride,
                   const float* s,   // (R,) scale
                   const float* t,   // (R,) shift
                   bool relu);
void planar_affine(const double* x, double* y, int64_t R, int64_t L, int64_t stride, const double* s,
                   const double* t, bool relu);

// Planar backward sums: with d = dy masked by (x * s[r] + t[r] > 0) when relu,
// sum_dy[r] = sum d and sum_dyx[r] = sum d * (x - m[r]) over row r.
void planar_bwd_sums(const float* dy,  // R rows of L, `stride` apart
                     const float* x,   // same layout as dy
                     int64_t R,
                     int64_t L,
                     int64_t stride,
                     const float* s,   // (R,) forward scale
                     const float* t,   // (R,) forward shift
                     const float* m,   // (R,) mean the row was normalized with
                     bool relu,
                     double* sum_dy,   // (R,) out
                     double* sum_dyx); // (R,) out
void planar_bwd_sums(const double* dy, const double* x, int64_t R, int64_t L, int64_t stride, const double* s,
                     const double* t, const double* m, bool relu, double* sum_dy, double* sum_dyx);

// Planar dx = a[r] * d + kx[r] * x + k0[r], d as in planar_bwd_sums.
void planar_bwd_dx(const float* dy, const float* x, float* dx, int64_t R, int64_t L, int64_t stride,
                   const float* s, const float* t, const float* a, const float* kx, const float* k0, bool relu);
void planar_bwd_dx(const double* dy, const double* x, double* dx, int64_t R, int64_t L, int64_t stride,
                   const double* s, const double* t, const double* a, const double* kx, const double* k0,
                   bool relu);

// Columns: R rows of C contiguous channels, rows `ld` (>= C) elements apart in every array
// of a call (ld = C for whole rows; larger for a range of channels of each row).

// Columns: acc[c] = sum over the R rows of x[r * ld + c] (acc is overwritten).
void cols_sum(const float* x, int64_t R, int64_t C, int64_t ld, float* acc);
void cols_sum(const double* x, int64_t R, int64_t C, int64_t ld, double* acc);

// Columns: acc[c] = sum over the R rows of (x[r * ld + c] - m[c])^2.
void cols_sum_sq_dev(const float* x, int64_t R, int64_t C, int64_t ld, const float* m, float* acc);
void cols_sum_sq_dev(const double* x, int64_t R, int64_t C, int64_t ld, const double* m, double* acc);

// Columns: y = x * s[c] + t[c], then max(y, 0) when relu.
void cols_affine(const float* x, float* y, int64_t R, int64_t C, int64_t ld, const float* s, const float* t,
                 bool relu);
void cols_affine(const double* x, double* y, int64_t R, int64_t C, int64_t ld, const double* s, const double* t,
                 bool relu);

// Columns backward sums (overwritten): with d = dy masked by (x * s[c] + t[c] > 0) when
// relu, sum_dy[c] = sum d and sum_dyx[c] = sum d * (x - m[c]) over the R rows.
void cols_bwd_sums(const float* dy, const float* x, int64_t R, int64_t C, int64_t ld, const float* s, const float* t,
                   const float* m, bool relu, float* sum_dy, float* sum_dyx);
void cols_bwd_sums(const double* dy, const double* x, int64_t R, int64_t C, int64_t ld, const double* s,
                   const double* t, const double* m, bool relu, double* sum_dy, double* sum_dyx);

// The column loops on bf16 storage (x, dy read as bf16; y, dx rounded to bf16 as they are
// stored), computing in float: bitwise what the float loops give on widened copies, without
// the copies.
void cols_sum(const c10::BFloat16* x, int64_t R, int64_t C, int64_t ld, float* acc);
void cols_sum_sq_dev(const c10::BFloat16* x, int64_t R, int64_t C, int64_t ld, const float* m, float* acc);
void cols_affine(const c10::BFloat16* x, c10::BFloat16* y, int64_t R, int64_t C, int64_t ld, const float* s,
                 const float* t, bool relu);
void cols_bwd_sums(const c10::BFloat16* dy, const c10::BFloat16* x, int64_t R, int64_t C, int64_t ld, const float* s,
                   const float* t, const float* m, bool relu, float* sum_dy, float* sum_dyx);
void cols_bwd_dx(const c10::BFloat16* dy, const c10::BFloat16* x, c10::BFloat16* dx, int64_t R, int64_t C, int64_t ld,
                 const float* s, const float* t, const float* a, const float* kx, const float* k0, bool relu);

// The planar loops on bf16 storage, computing in float, as the column loops above.
double sum_rows(const c10::BFloat16* x, int64_t R, int64_t L, int64_t stride);
double sum_sq_dev_rows(const c10::BFloat16* x, int64_t R, int64_t L, int64_t stride, float m);
double sum(const c10::BFloat16* x, int64_t n);
double sum_sq_dev(const c10::BFloat16* x, int64_t n, float m);
void planar_affine(const c10::BFloat16* x, c10::BFloat16* y, int64_t R, int64_t L, int64_t stride, const float* s,
                   const float* t, bool relu);
void planar_bwd_sums(const c10::BFloat16* dy, const c10::BFloat16* x, int64_t R, int64_t L, int64_t stride,
                     const float* s, const float* t, const float* m, bool relu, double* sum_dy, double* sum_dyx);
void planar_bwd_dx(const c10::BFloat16* dy, const c10::BFloat16* x, c10::BFloat16* dx, int64_t R, int64_t L,
                   int64_t stride, const float* s, const float* t, const float* a, const float* kx, const float* k0,
                   bool relu);

// Columns dx = a[c] * d + kx[c] * x + k0[c], d as in cols_bwd_sums.
void cols_bwd_dx(const float* dy, const float* x, float* dx, int64_t R, int64_t C, int64_t ld, const float* s,
                 const float* t, const float* a, const float* kx, const float* k0, bool relu);
void cols_bwd_dx(const double* dy, const double* x, double* dx, int64_t R, int64_t C, int64_t ld, const double* s,
                 const double* t, const double* a, const double* kx, const double* k0, bool relu);

}  // namespace bitfast::cpu::rows
