// LSQ / LSQ+ fake quantization (CPU reference): forward, straight-through backward, step-size
// init, integer codes for export, and per-token dynamic quantization of activations.
#ifndef QTRAIN_OPS_QUANT_LSQ_H_
#define QTRAIN_OPS_QUANT_LSQ_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain::ops {

namespace lsq_internal {
template <typename T>
struct Identity {
  using type = T;
};
}  // namespace lsq_internal
// Optional pointer arguments (beta, dv, ds, dbeta) take no part in deducing F, so callers
// can pass a plain nullptr.
template <typename T>
using NoDeduce = typename lsq_internal::Identity<T>::type;

// kSymmetric (LSQ): signed codes in [-Qn, Qp], Qn = 2^(b-1), Qp = 2^(b-1) - 1, no offset.
// kAsymmetric (LSQ+): unsigned codes in [0, Qp], Qn = 0, Qp = 2^b - 1, with a learned offset
//   beta per scale: q = clamp(round((v - beta) / s), 0, Qp) * s + beta.
// Codes of kSymmetric pack as CodeSign::kSigned, those of kAsymmetric as kUnsigned (pack.h).
enum class LsqMode { kSymmetric, kAsymmetric };

// The integer levels are -qn .. qp (both inclusive).
struct QuantRange {
  int qn;
  int qp;
  int lo() const { return -qn; }
  int hi() const { return qp; }
};
// bits in [2, 16] (the trainer uses 2, 3, 4, 8; pack.h packs 2, 3, 4, 8).
absl::StatusOr<QuantRange> quant_range(int bits, LsqMode mode);
// The static symmetric step of absmax calibration (PTQ): s = amax / Qp, and 1 for an amax of 0
// (an all-zero tensor, whose codes are 0 at any step).
inline float step_from_amax(float amax, const QuantRange& r) {
  return amax > 0 ? amax / static_cast<float>(r.qp) : 1.0f;
}

// Which elements of a (rows, cols) tensor share a scale (and offset):
//   kPerTensor: all; 1 scale.
//   kPerChannel: each row (an output channel of an (OC, C) weight); `rows` scales.
//   kPerGroup: runs of group_size consecutive elements along a row, starting at column 0; when
//     cols % group_size != 0 the last group of every row is shorter (cols % group_size
//     elements) and its N (init mean, gradient scale) counts only those elements. Scales are
//     row-major: index r * ceil(cols / group_size) + c / group_size.
enum class QuantGranularity { kPerTensor, kPerChannel, kPerGroup };

// kLsq: ds and dbeta are multiplied by g = 1 / sqrt(N * Qp), N = elements sharing the scale
// (or LsqConfig::grad_scale_count when set). LSQ+ scales dbeta by the same g. kNone: g = 1
// (the plain straight-through gradient; what finite-difference checks compare).
enum class LsqGradScale { kLsq, kNone };

struct LsqConfig {
  int bits = 4;
  LsqMode mode = LsqMode::kSymmetric;
  QuantGranularity granularity = QuantGranularity::kPerChannel;
  int group_size = 128;  // kPerGroup only; >= 1
  LsqGradScale grad_scale = LsqGradScale::kLsq;
  // N of the gradient scale when > 0, e.g. features per example for a per-tensor activation
  // quantizer whose batch dimension should not shrink g. 0: elements sharing the scale.
  int64_t grad_scale_count = 0;
};

// Number of scales (and offsets) for a (rows, cols) tensor; validates cfg and the shape.
absl::StatusOr<int64_t> lsq_num_scales(const LsqConfig& cfg, int64_t rows, int64_t cols);

// Shapes below: v, out, dv, dout (rows, cols) row-major; s, beta, ds, dbeta (S) with
// S = lsq_num_scales(cfg, rows, cols). beta/dbeta must be null for kSymmetric and beta
// non-null for kAsymmetric. Every s must be finite and > 0 and every beta finite, else
// InvalidArgument naming the index (the trainer clamps s before calling).
// Arithmetic, in F, fixed so that the GPU kernels can match it bit for bit: x = v / s
// (symmetric) or (v - beta) / s, a true division; r = nearbyint(x) (round half to even
// under the default rounding mode); clamp r to [-Qn, Qp]; q = r * s (+ beta), no fused
// multiply-add. A NaN v gives a NaN q.

// out = fake-quantized v. out may alias v.
template <typename F>
absl::Status lsq_forward(F* out, const F* v, const F* s, const NoDeduce<F>* beta, int64_t rows,
                         int64_t cols, const LsqConfig& cfg);

// Straight-through backward, ACCUMULATING (+=) like the other CPU ops; any of dv, ds, dbeta
// may be null to skip it. With x as above, per element:
//   inside  (-Qn < x < Qp): dv += dout; ds += dout * (round(x) - x); dbeta += 0
//   clipped (x <= -Qn):     dv += 0;    ds += dout * (-Qn);          dbeta += dout
//   clipped (x >= Qp):      dv += 0;    ds += dout * Qp;             dbeta += dout
// (the LSQ paper's convention: x exactly on a bound counts as clipped). ds and dbeta per
// scale are summed in double over the scale's elements in index order, multiplied by g,
// then added as F.
template <typename F>
absl::Status lsq_backward(NoDeduce<F>* dv, NoDeduce<F>* ds, NoDeduce<F>* dbeta, const F* dout,
                          const F* v, const F* s, const NoDeduce<F>* beta, int64_t rows,
                          int64_t cols, const LsqConfig& cfg);

// codes (rows, cols): the integer levels clamp(round(x), -Qn, Qp) of lsq_forward, so that
// lsq_dequantize(codes) == lsq_forward(v) bit for bit. InvalidArgument on a NaN v.
template <typename F>
absl::Status lsq_quantize_codes(int32_t* codes, const F* v, const F* s, const NoDeduce<F>* beta,
                                int64_t rows, int64_t cols, const LsqConfig& cfg);

// out (rows, cols) = codes * s (+ beta). InvalidArgument (naming the index) for a code
// outside [-Qn, Qp].
template <typename F>
absl::Status lsq_dequantize(F* out, const int32_t* codes, const F* s, const NoDeduce<F>* beta,
                            int64_t rows, int64_t cols, const LsqConfig& cfg);

// Step-size (and offset) initialisation per scale group, statistics in double:
//   kLsq, symmetric:  s = 2 * mean|v| / sqrt(Qp)              (LSQ)
//   kLsq, asymmetric: beta = min v, s = (max v - min v) / Qp  (LSQ+'s min/max init; the
//                     mean-|v| rule assumes a range centred on zero)
//   kMseSearch: for alpha on an even grid of grid_points values from alpha_min to alpha_max
//     (inclusive, ascending), symmetric s = alpha * max|v| / Qp; asymmetric
//     s = alpha * (max - min) / Qp with the clip range centred: beta = min + (1-alpha)(max-min)/2.
//     Picks the candidate with the least sum of squared error of lsq_forward (the first, i.e.
//     smallest alpha, on ties).
// A group whose statistic is 0 (all zeros; or all equal, asymmetric) gets s = 1 (any positive
// step reproduces it exactly; 1 keeps v / s finite) and beta = min.
enum class LsqInit { kLsq, kMseSearch };
struct LsqInitOptions {
  LsqInit method = LsqInit::kLsq;
  int grid_points = 71;  // 0.30, 0.31, ..., 1.00 with the defaults
  double alpha_min = 0.3;
  double alpha_max = 1.0;
};
// s (S) written; beta (S) written for kAsymmetric, must be null for kSymmetric; v (rows, cols).
template <typename F>
absl::Status lsq_init(F* s, NoDeduce<F>* beta, const F* v, int64_t rows, int64_t cols,
                      const LsqConfig& cfg, const LsqInitOptions& options = {});

// ---- per-token dynamic quantization (activations) ----
// Symmetric signed `bits`, one scale per row of inp (N, C): scale = absmax(row) / Qp (in F),
// q = clamp(round(x / scale), -Qn, Qp) * scale. Nothing is learned and nothing is clipped (the
// largest |x| maps to Qp), so the backward is the identity. An all-zero row gets scale 1
// (outputs zeros); a row holding inf or NaN gets a non-finite scale and NaN outputs.
// out (N, C), may alias inp; scales (N), may be null.
template <typename F>
absl::Status per_token_quant_forward(F* out, NoDeduce<F>* scales, const F* inp, int64_t N,
                                     int64_t C, int bits);
// dinp (n) += dout (n): the straight-through gradient.
template <typename F>
void per_token_quant_backward(F* dinp, const F* dout, int64_t n);
// codes (N, C) and scales (N) of per_token_quant_forward (dequantize with lsq_dequantize,
// kPerChannel, kSymmetric: out = codes * scales[row]). InvalidArgument on a non-finite row.
template <typename F>
absl::Status per_token_quantize_codes(int32_t* codes, F* scales, const F* inp, int64_t N, int64_t C,
                                      int bits);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_QUANT_LSQ_H_
