// LSQ / LSQ+ reference loops. Every op walks the tensor as (row, group) segments so that one
// code path serves per-tensor, per-channel and per-group scales.
#include "ops/quant/lsq.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

const char* ModeName(LsqMode mode) {
  return mode == LsqMode::kSymmetric ? "symmetric" : "asymmetric";
}

// Where the scales sit: segment (r, gi) covers columns [gi * group, min(cols, (gi+1) * group))
// of row r and uses scale ScaleIndex(r, gi).
struct Layout {
  int64_t rows = 0;
  int64_t cols = 0;
  QuantGranularity granularity = QuantGranularity::kPerTensor;
  int64_t group = 0;           // columns per segment
  int64_t groups_per_row = 0;  // segments per row
  int64_t num_scales = 0;

  int64_t ScaleIndex(int64_t r, int64_t gi) const {
    switch (granularity) {
      case QuantGranularity::kPerTensor:
        return 0;
      case QuantGranularity::kPerChannel:
        return r;
      case QuantGranularity::kPerGroup:
        return r * groups_per_row + gi;
    }
    return 0;
  }
  // Elements sharing scale k.
  int64_t Count(int64_t k) const {
    switch (granularity) {
      case QuantGranularity::kPerTensor:
        return rows * cols;
      case QuantGranularity::kPerChannel:
        return cols;
      case QuantGranularity::kPerGroup: {
        const int64_t c0 = (k % groups_per_row) * group;
        return std::min(group, cols - c0);
      }
    }
    return 0;
  }
  // Calls fn(k, first_element_index, length) for every segment, in memory order.
  template <typename Fn>
  void ForEachSegment(Fn&& fn) const {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t gi = 0; gi < groups_per_row; ++gi) {
        const int64_t c0 = gi * group;
        fn(ScaleIndex(r, gi), r * cols + c0, std::min(group, cols - c0));
      }
    }
  }
};

absl::StatusOr<Layout> MakeLayout(const char* op, const LsqConfig& cfg, int64_t rows,
                                  int64_t cols) {
  QT_CHECK_ARG(rows >= 1 && cols >= 1, op, ": shape (rows = ", rows, ", cols = ", cols,
               ") must have rows >= 1 and cols >= 1");
  QT_CHECK_ARG(cfg.grad_scale_count >= 0, op, ": grad_scale_count = ", cfg.grad_scale_count,
               " must be >= 0");
  Layout l;
  l.rows = rows;
  l.cols = cols;
  l.granularity = cfg.granularity;
  switch (cfg.granularity) {
    case QuantGranularity::kPerTensor:
      l.group = cols;
      l.groups_per_row = 1;
      l.num_scales = 1;
      break;
    case QuantGranularity::kPerChannel:
      l.group = cols;
      l.groups_per_row = 1;
      l.num_scales = rows;
      break;
    case QuantGranularity::kPerGroup:
      QT_CHECK_ARG(cfg.group_size >= 1, op, ": group_size = ", cfg.group_size,
                   " must be >= 1 for per-group quantization");
      l.group = cfg.group_size;
      l.groups_per_row = (cols + cfg.group_size - 1) / cfg.group_size;
      l.num_scales = rows * l.groups_per_row;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": unknown granularity ", static_cast<int>(cfg.granularity)));
  }
  return l;
}

// The arithmetic every op shares (see lsq.h for why it is spelled out).
template <typename F>
struct Quantizer {
  F lo;
  F hi;
  bool asymmetric;

  F Scaled(F v, F s, F b) const { return asymmetric ? (v - b) / s : v / s; }
  // NaN passes through (both comparisons are false).
  F Level(F x) const {
    F r = std::nearbyint(x);
    if (r < lo) r = lo;
    if (r > hi) r = hi;
    return r;
  }
  F Value(F r, F s, F b) const { return asymmetric ? r * s + b : r * s; }
};

template <typename F>
struct Prepared {
  Layout layout;
  QuantRange range;
  Quantizer<F> q;
};

template <typename F>
absl::StatusOr<Prepared<F>> Prepare(const char* op, const LsqConfig& cfg, int64_t rows,
                                    int64_t cols, const F* s, const F* beta, bool check_s) {
  Prepared<F> p;
  ASSIGN_OR_RETURN(p.layout, MakeLayout(op, cfg, rows, cols));
  ASSIGN_OR_RETURN(p.range, quant_range(cfg.bits, cfg.mode));
  const bool asym = cfg.mode == LsqMode::kAsymmetric;
  p.q = Quantizer<F>{static_cast<F>(p.range.lo()), static_cast<F>(p.range.hi()), asym};
  if (asym) {
    QT_CHECK_ARG(beta != nullptr, op, ": beta is null but asymmetric (LSQ+) quantization needs ",
                 p.layout.num_scales, " offsets");
  } else {
    QT_CHECK_ARG(beta == nullptr, op,
                 ": beta must be null for symmetric quantization (it has no offset)");
  }
  if (check_s) {
    QT_CHECK_ARG(s != nullptr, op, ": s is null");
    for (int64_t k = 0; k < p.layout.num_scales; ++k) {
      QT_CHECK_ARG(std::isfinite(s[k]) && s[k] > 0, op, ": s[", k, "] = ", s[k],
                   " must be finite and > 0");
      if (asym) {
        QT_CHECK_ARG(std::isfinite(beta[k]), op, ": beta[", k, "] = ", beta[k], " must be finite");
      }
    }
  }
  return p;
}

}  // namespace

absl::StatusOr<QuantRange> quant_range(int bits, LsqMode mode) {
  QT_CHECK_ARG(bits >= 2 && bits <= 16, "quant_range: bits = ", bits, " must be in [2, 16] (",
               ModeName(mode), ")");
  if (mode == LsqMode::kSymmetric) return QuantRange{1 << (bits - 1), (1 << (bits - 1)) - 1};
  return QuantRange{0, (1 << bits) - 1};
}

absl::StatusOr<int64_t> lsq_num_scales(const LsqConfig& cfg, int64_t rows, int64_t cols) {
  ASSIGN_OR_RETURN(Layout l, MakeLayout("lsq_num_scales", cfg, rows, cols));
  RETURN_IF_ERROR(quant_range(cfg.bits, cfg.mode).status());
  return l.num_scales;
}

template <typename F>
absl::Status lsq_forward(F* out, const F* v, const F* s, const NoDeduce<F>* beta, int64_t rows,
                         int64_t cols, const LsqConfig& cfg) {
  ASSIGN_OR_RETURN(Prepared<F> p, Prepare("lsq_forward", cfg, rows, cols, s, beta, true));
  QT_CHECK_ARG(out != nullptr && v != nullptr, "lsq_forward: null out or v");
  const Quantizer<F> q = p.q;
  p.layout.ForEachSegment([&](int64_t k, int64_t i0, int64_t len) {
    const F sk = s[k];
    const F bk = q.asymmetric ? beta[k] : F(0);
    for (int64_t i = i0; i < i0 + len; ++i)
      out[i] = q.Value(q.Level(q.Scaled(v[i], sk, bk)), sk, bk);
  });
  return absl::OkStatus();
}

template <typename F>
absl::Status lsq_backward(NoDeduce<F>* dv, NoDeduce<F>* ds, NoDeduce<F>* dbeta, const F* dout,
                          const F* v, const F* s, const NoDeduce<F>* beta, int64_t rows,
                          int64_t cols, const LsqConfig& cfg) {
  ASSIGN_OR_RETURN(Prepared<F> p, Prepare("lsq_backward", cfg, rows, cols, s, beta, true));
  QT_CHECK_ARG(dout != nullptr && v != nullptr, "lsq_backward: null dout or v");
  QT_CHECK_ARG(cfg.mode == LsqMode::kAsymmetric || dbeta == nullptr,
               "lsq_backward: dbeta must be null for symmetric quantization");
  const Quantizer<F> q = p.q;
  const Layout& l = p.layout;
  std::vector<double> ds_acc(ds ? l.num_scales : 0, 0.0);
  std::vector<double> db_acc(dbeta ? l.num_scales : 0, 0.0);
  l.ForEachSegment([&](int64_t k, int64_t i0, int64_t len) {
    const F sk = s[k];
    const F bk = q.asymmetric ? beta[k] : F(0);
    // Continue the scale's running sums, so that per-tensor sums run over the whole tensor
    // in index order rather than adding per-row partial sums.
    double ds_sum = ds ? ds_acc[k] : 0.0;
    double db_sum = dbeta ? db_acc[k] : 0.0;
    for (int64_t i = i0; i < i0 + len; ++i) {
      const F x = q.Scaled(v[i], sk, bk);
      const double g_out = static_cast<double>(dout[i]);
      if (x <= q.lo) {
        ds_sum += g_out * static_cast<double>(q.lo);
        db_sum += g_out;
      } else if (x >= q.hi) {
        ds_sum += g_out * static_cast<double>(q.hi);
        db_sum += g_out;
      } else {
        if (dv) dv[i] += dout[i];
        ds_sum += g_out * static_cast<double>(std::nearbyint(x) - x);
      }
    }
    if (ds) ds_acc[k] = ds_sum;
    if (dbeta) db_acc[k] = db_sum;
  });
  for (int64_t k = 0; k < l.num_scales; ++k) {
    double g = 1.0;
    if (cfg.grad_scale == LsqGradScale::kLsq) {
      const int64_t n = cfg.grad_scale_count > 0 ? cfg.grad_scale_count : l.Count(k);
      g = 1.0 / std::sqrt(static_cast<double>(n) * static_cast<double>(p.range.qp));
    }
    if (ds) ds[k] += static_cast<F>(ds_acc[k] * g);
    if (dbeta) dbeta[k] += static_cast<F>(db_acc[k] * g);
  }
  return absl::OkStatus();
}

template <typename F>
absl::Status lsq_quantize_codes(int32_t* codes, const F* v, const F* s, const NoDeduce<F>* beta,
                                int64_t rows, int64_t cols, const LsqConfig& cfg) {
  ASSIGN_OR_RETURN(Prepared<F> p, Prepare("lsq_quantize_codes", cfg, rows, cols, s, beta, true));
  QT_CHECK_ARG(codes != nullptr && v != nullptr, "lsq_quantize_codes: null codes or v");
  const Quantizer<F> q = p.q;
  int64_t bad = -1;
  p.layout.ForEachSegment([&](int64_t k, int64_t i0, int64_t len) {
    const F sk = s[k];
    const F bk = q.asymmetric ? beta[k] : F(0);
    for (int64_t i = i0; i < i0 + len; ++i) {
      const F r = q.Level(q.Scaled(v[i], sk, bk));
      if (std::isnan(r)) {
        if (bad < 0) bad = i;
        codes[i] = 0;
      } else {
        codes[i] = static_cast<int32_t>(r);
      }
    }
  });
  QT_CHECK_ARG(bad < 0, "lsq_quantize_codes: v[", bad / cols, ", ", bad % cols,
               "] is NaN and has no code");
  return absl::OkStatus();
}

template <typename F>
absl::Status lsq_dequantize(F* out, const int32_t* codes, const F* s, const NoDeduce<F>* beta,
                            int64_t rows, int64_t cols, const LsqConfig& cfg) {
  ASSIGN_OR_RETURN(Prepared<F> p, Prepare("lsq_dequantize", cfg, rows, cols, s, beta, true));
  QT_CHECK_ARG(out != nullptr && codes != nullptr, "lsq_dequantize: null out or codes");
  const int64_t n = rows * cols;
  for (int64_t i = 0; i < n; ++i) {
    QT_CHECK_ARG(codes[i] >= p.range.lo() && codes[i] <= p.range.hi(), "lsq_dequantize: code[",
                 i / cols, ", ", i % cols, "] = ", codes[i], " outside [", p.range.lo(), ", ",
                 p.range.hi(), "] for ", cfg.bits, "-bit ", ModeName(cfg.mode));
  }
  const Quantizer<F> q = p.q;
  p.layout.ForEachSegment([&](int64_t k, int64_t i0, int64_t len) {
    const F sk = s[k];
    const F bk = q.asymmetric ? beta[k] : F(0);
    for (int64_t i = i0; i < i0 + len; ++i) out[i] = q.Value(static_cast<F>(codes[i]), sk, bk);
  });
  return absl::OkStatus();
}

template <typename F>
absl::Status lsq_init(F* s, NoDeduce<F>* beta, const F* v, int64_t rows, int64_t cols,
                      const LsqConfig& cfg, const LsqInitOptions& options) {
  ASSIGN_OR_RETURN(Prepared<F> p, Prepare("lsq_init", cfg, rows, cols, s, beta, false));
  QT_CHECK_ARG(s != nullptr && v != nullptr, "lsq_init: null s or v");
  const Layout& l = p.layout;
  const Quantizer<F> q = p.q;
  const double qp = p.range.qp;
  const int64_t S = l.num_scales;

  // Per-scale statistics in double.
  std::vector<double> sum_abs(S, 0.0), vmin(S, std::numeric_limits<double>::infinity()),
      vmax(S, -std::numeric_limits<double>::infinity());
  l.ForEachSegment([&](int64_t k, int64_t i0, int64_t len) {
    for (int64_t i = i0; i < i0 + len; ++i) {
      const double x = static_cast<double>(v[i]);
      sum_abs[k] += std::fabs(x);
      vmin[k] = std::min(vmin[k], x);
      vmax[k] = std::max(vmax[k], x);
    }
  });
  for (int64_t k = 0; k < S; ++k) {
    QT_CHECK_ARG(std::isfinite(sum_abs[k]), "lsq_init: scale group ", k,
                 " holds a non-finite value");
  }

  if (options.method == LsqInit::kLsq) {
    for (int64_t k = 0; k < S; ++k) {
      if (q.asymmetric) {
        const double range = vmax[k] - vmin[k];
        s[k] = range > 0 ? static_cast<F>(range / qp) : F(1);
        beta[k] = static_cast<F>(vmin[k]);
      } else {
        const double mean_abs = sum_abs[k] / static_cast<double>(l.Count(k));
        s[k] = mean_abs > 0 ? static_cast<F>(2.0 * mean_abs / std::sqrt(qp)) : F(1);
      }
      // A statistic so small that the step underflows in F behaves like an all-zero group.
      if (!(s[k] > 0)) s[k] = F(1);
    }
    return absl::OkStatus();
  }

  QT_CHECK_ARG(options.method == LsqInit::kMseSearch, "lsq_init: unknown method ",
               static_cast<int>(options.method));
  QT_CHECK_ARG(options.grid_points >= 1, "lsq_init: grid_points = ", options.grid_points,
               " must be >= 1");
  QT_CHECK_ARG(options.alpha_min > 0 && options.alpha_min <= options.alpha_max,
               "lsq_init: alpha range [", options.alpha_min, ", ", options.alpha_max,
               "] must satisfy 0 < alpha_min <= alpha_max");
  std::vector<double> spread(S);  // max|v| (symmetric) or max - min (asymmetric)
  for (int64_t k = 0; k < S; ++k) {
    spread[k] = q.asymmetric ? vmax[k] - vmin[k] : std::max(std::fabs(vmin[k]), vmax[k]);
  }
  std::vector<double> best_err(S, std::numeric_limits<double>::infinity());
  std::vector<F> cand_s(S), cand_b(S, F(0));
  std::vector<double> err(S);
  for (int a = 0; a < options.grid_points; ++a) {
    const double alpha = options.grid_points == 1
                             ? options.alpha_max
                             : options.alpha_min + (options.alpha_max - options.alpha_min) * a /
                                                       static_cast<double>(options.grid_points - 1);
    for (int64_t k = 0; k < S; ++k) {
      cand_s[k] = static_cast<F>(alpha * spread[k] / qp);
      if (q.asymmetric) cand_b[k] = static_cast<F>(vmin[k] + (1.0 - alpha) * spread[k] / 2.0);
      err[k] = 0.0;
    }
    l.ForEachSegment([&](int64_t k, int64_t i0, int64_t len) {
      const F sk = cand_s[k];
      const F bk = cand_b[k];
      if (!(sk > 0)) return;
      for (int64_t i = i0; i < i0 + len; ++i) {
        const double d = static_cast<double>(q.Value(q.Level(q.Scaled(v[i], sk, bk)), sk, bk)) -
                         static_cast<double>(v[i]);
        err[k] += d * d;
      }
    });
    for (int64_t k = 0; k < S; ++k) {
      if (!(cand_s[k] > 0)) continue;
      if (err[k] < best_err[k]) {
        best_err[k] = err[k];
        s[k] = cand_s[k];
        if (q.asymmetric) beta[k] = cand_b[k];
      }
    }
  }
  for (int64_t k = 0; k < S; ++k) {
    if (best_err[k] == std::numeric_limits<double>::infinity()) {  // spread 0 or underflow
      s[k] = F(1);
      if (q.asymmetric) beta[k] = static_cast<F>(vmin[k]);
    }
  }
  return absl::OkStatus();
}

namespace {

// scale of one row of the per-token quantizer; see lsq.h for the zero and non-finite cases.
template <typename F>
F RowScale(const F* row, int64_t C, int qp) {
  F m = 0;
  for (int64_t c = 0; c < C; ++c) {
    const F a = std::fabs(row[c]);
    if (std::isnan(a)) return a;
    if (a > m) m = a;
  }
  return m == 0 ? F(1) : m / static_cast<F>(qp);
}

}  // namespace

template <typename F>
absl::Status per_token_quant_forward(F* out, NoDeduce<F>* scales, const F* inp, int64_t N,
                                     int64_t C, int bits) {
  ASSIGN_OR_RETURN(QuantRange range, quant_range(bits, LsqMode::kSymmetric));
  QT_CHECK_ARG(N >= 1 && C >= 1, "per_token_quant_forward: shape (N = ", N, ", C = ", C,
               ") must have N >= 1 and C >= 1");
  QT_CHECK_ARG(out != nullptr && inp != nullptr, "per_token_quant_forward: null out or inp");
  const Quantizer<F> q{static_cast<F>(range.lo()), static_cast<F>(range.hi()), false};
  for (int64_t n = 0; n < N; ++n) {
    const F* x = inp + n * C;
    F* y = out + n * C;
    const F sc = RowScale(x, C, range.qp);
    if (scales) scales[n] = sc;
    for (int64_t c = 0; c < C; ++c) y[c] = q.Value(q.Level(q.Scaled(x[c], sc, F(0))), sc, F(0));
  }
  return absl::OkStatus();
}

template <typename F>
void per_token_quant_backward(F* dinp, const F* dout, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dinp[i] += dout[i];
}

template <typename F>
absl::Status per_token_quantize_codes(int32_t* codes, F* scales, const F* inp, int64_t N, int64_t C,
                                      int bits) {
  ASSIGN_OR_RETURN(QuantRange range, quant_range(bits, LsqMode::kSymmetric));
  QT_CHECK_ARG(N >= 1 && C >= 1, "per_token_quantize_codes: shape (N = ", N, ", C = ", C,
               ") must have N >= 1 and C >= 1");
  QT_CHECK_ARG(codes != nullptr && scales != nullptr && inp != nullptr,
               "per_token_quantize_codes: null codes, scales or inp");
  const Quantizer<F> q{static_cast<F>(range.lo()), static_cast<F>(range.hi()), false};
  for (int64_t n = 0; n < N; ++n) {
    const F* x = inp + n * C;
    const F sc = RowScale(x, C, range.qp);
    QT_CHECK_ARG(std::isfinite(sc), "per_token_quantize_codes: row ", n,
                 " holds inf or NaN (scale = ", sc, ")");
    scales[n] = sc;
    for (int64_t c = 0; c < C; ++c) {
      codes[n * C + c] = static_cast<int32_t>(q.Level(q.Scaled(x[c], sc, F(0))));
    }
  }
  return absl::OkStatus();
}

#define QT_LSQ_INSTANTIATE(F)                                                                  \
  template absl::Status lsq_forward<F>(F*, const F*, const F*, const F*, int64_t, int64_t,     \
                                       const LsqConfig&);                                      \
  template absl::Status lsq_backward<F>(F*, F*, F*, const F*, const F*, const F*, const F*,    \
                                        int64_t, int64_t, const LsqConfig&);                   \
  template absl::Status lsq_quantize_codes<F>(int32_t*, const F*, const F*, const F*, int64_t, \
                                              int64_t, const LsqConfig&);                      \
  template absl::Status lsq_dequantize<F>(F*, const int32_t*, const F*, const F*, int64_t,     \
                                          int64_t, const LsqConfig&);                          \
  template absl::Status lsq_init<F>(F*, F*, const F*, int64_t, int64_t, const LsqConfig&,      \
                                    const LsqInitOptions&);                                    \
  template absl::Status per_token_quant_forward<F>(F*, F*, const F*, int64_t, int64_t, int);   \
  template void per_token_quant_backward<F>(F*, const F*, int64_t);                            \
  template absl::Status per_token_quantize_codes<F>(int32_t*, F*, const F*, int64_t, int64_t, int);

QT_LSQ_INSTANTIATE(float)
QT_LSQ_INSTANTIATE(double)
#undef QT_LSQ_INSTANTIATE

}  // namespace qtrain::ops
