// CudaLinear: the per-Linear precision dispatch of the CUDA GPT (see linear_cuda.h). Each public
// call switches on the mode once and runs that mode's kernels from ops/cuda.
#include "trainer/cuda/linear_cuda.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "ops/cuda/fp8_cuda.h"
#include "ops/cuda/gelu_cuda.h"
#include "ops/cuda/gelu_quant_cuda.h"
#include "ops/cuda/layernorm_quant_cuda.h"
#include "ops/cuda/lowrank_cuda.h"
#include "ops/cuda/matmul_fp8_cuda.h"
#include "ops/cuda/matmul_int8_cuda.h"
#include "ops/status_macros.h"

namespace qtrain {

using ops::bf16;
using ops::Fp8Format;
using ops::GradWrite;

namespace {

// The offset of a tensor in the layout, checking its shape; -1 (and OK) when optional and absent.
absl::StatusOr<int64_t> Offset(const ParamStore& layout, const std::string& name,
                               const std::vector<int64_t>& shape, bool optional = false) {
  absl::StatusOr<int> idx = layout.Find(name);
  if (!idx.ok()) {
    if (optional) return int64_t{-1};
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA model: the parameter layout lacks '", name, "'"));
  }
  const ParamInfo& info = layout.info(*idx);
  if (!shape.empty() && info.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA model: parameter '", name,
                                                   "' has an unexpected shape"));
  }
  return info.offset;
}

ops::Fp8Operand PerTensor(const uint8_t* codes, Fp8Format format, const float* scale_inv) {
  ops::Fp8Operand o;
  o.codes = codes;
  o.format = format;
  o.scaling = ops::Fp8ScaleLayout::kPerTensor;
  o.scale_inv = scale_inv;
  return o;
}

ops::Fp8Operand Tiles(const uint8_t* codes, const float* scale_inv) {
  ops::Fp8Operand o;
  o.codes = codes;
  o.format = Fp8Format::kE4M3;
  o.scaling = ops::Fp8ScaleLayout::kTile1x128;
  o.scale_inv = scale_inv;
  return o;
}

ops::Fp8Operand Blocks(const uint8_t* codes, const float* scale_inv) {
  ops::Fp8Operand o;
  o.codes = codes;
  o.format = Fp8Format::kE4M3;
  o.scaling = ops::Fp8ScaleLayout::kBlock128x128;
  o.scale_inv = scale_inv;
  return o;
}

ops::Fp8Accumulation Accum(bool fast) {
  return fast ? ops::Fp8Accumulation::kFast : ops::Fp8Accumulation::kSplit;
}

// Fp8MatmulOutput for a BF16 or fp32 result (a gradient) written per gw.
template <typename T>
ops::Fp8MatmulOutput GemmOut(T* data, GradWrite write) {
  ops::Fp8MatmulOutput o;
  o.data = data;
  o.type = std::is_same_v<T, float> ? ops::Fp8OutType::kFp32 : ops::Fp8OutType::kBf16;
  o.write = write;
  return o;
}

}  // namespace

absl::StatusOr<CudaLinear> CudaLinear::Create(const std::string& name, int in_features,
                                              int out_features, const LinearOptions& options,
                                              LinearInputSource source, const ParamStore& layout,
                                              int fp8_first) {
  CudaLinear l;
  l.name_ = name;
  l.in_ = in_features;
  l.out_ = out_features;
  l.opt_ = options;
  l.source_ = source;
  ASSIGN_OR_RETURN(l.w_, Offset(layout, name + ".weight", {out_features, in_features}));
  ASSIGN_OR_RETURN(l.b_, Offset(layout, name + ".bias", {out_features}));
  switch (options.mode) {
    case LinearMode::kFull:
      break;
    case LinearMode::kFp8:
      if (fp8_first < 0) {
        return absl::InternalError(absl::StrCat(name, ": an FP8 Linear needs its scaling slots"));
      }
      l.recipe_ = options.fp8.recipe;
      l.fp8_first_ = fp8_first;
      break;
    case LinearMode::kQat: {
      const QatOptions& q = options.qat;
      ASSIGN_OR_RETURN(l.ws_, Offset(layout, name + ".w_scale", {}));
      l.n_steps_ = layout.info(*layout.Find(name + ".w_scale")).size;
      ASSIGN_OR_RETURN(l.wz_, Offset(layout, name + ".w_zero", {}, /*optional=*/true));
      if (q.weight_asymmetric != (l.wz_ >= 0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "CUDA model: ", name, ".w_zero ", l.wz_ >= 0 ? "present" : "missing",
            " for weight_asymmetric ", q.weight_asymmetric));
      }
      if (q.act == ActQuant::kPerTensor) {
        ASSIGN_OR_RETURN(l.xs_, Offset(layout, name + ".x_scale", {1}));
        ASSIGN_OR_RETURN(l.xz_, Offset(layout, name + ".x_zero", {1}, /*optional=*/true));
        l.act_init_ = false;  // until the host's flag says otherwise (Upload)
      }
      if (options.phi.enabled) {
        absl::StatusOr<int> li = layout.Find(name + ".phi_l");
        if (!li.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat("CUDA model: the parameter layout lacks '", name, ".phi_l'"));
        }
        l.rmax_ = static_cast<int>(layout.info(*li).shape[1]);
        ASSIGN_OR_RETURN(l.phi_l_, Offset(layout, name + ".phi_l", {out_features, l.rmax_}));
        ASSIGN_OR_RETURN(l.phi_r_, Offset(layout, name + ".phi_r", {l.rmax_, in_features}));
      }
      l.int8_ = q.int8_forward;
      break;
    }
  }
  return l;
}

ops::LsqConfig CudaLinear::weight_lsq_config() const {
  ops::LsqConfig c;
  c.bits = opt_.qat.weight_bits;
  c.mode = opt_.qat.weight_asymmetric ? ops::LsqMode::kAsymmetric : ops::LsqMode::kSymmetric;
  c.granularity = opt_.qat.weight_granularity;
  c.group_size = opt_.qat.group_size;
  return c;
}

ops::ActQuant CudaLinear::ActQuantFor(const LinearContext& c, bool with_codes) const {
  ops::ActQuant q;
  if (opt_.mode != LinearMode::kQat || opt_.qat.act == ActQuant::kNone) return q;
  q.bits = opt_.qat.act_bits;
  q.lsq_mode = opt_.qat.act_asymmetric ? ops::LsqMode::kAsymmetric : ops::LsqMode::kSymmetric;
  if (opt_.qat.act == ActQuant::kPerToken) {
    q.mode = ops::ActQuantMode::kPerToken;
    q.lsq_mode = ops::LsqMode::kSymmetric;
    q.token_scales = token_scales_;
  } else {
    q.mode = ops::ActQuantMode::kPerTensor;
    q.step = c.params + xs_;
    q.offset = xz_ >= 0 ? c.params + xz_ : nullptr;
  }
  // Linear::act_lsq_config: the gradient scale counts one token's features.
  q.grad_scale_count = in_;
  if (with_codes) q.codes = c.x_i8;
  return q;
}

void CudaLinear::AddScratchNeeds(int64_t N, LinearScratch* s) const {
  switch (opt_.mode) {
    case LinearMode::kFull:
      return;
    case LinearMode::kFp8:
      s->fp8 = true;
      s->fp8_block |= recipe_ == Fp8Recipe::kBlock;
      return;
    case LinearMode::kQat: {
      const ops::ActQuant q = ActQuantFor(LinearContext{}, false);
      s->xq |= source_ == LinearInputSource::kTensor && q.mode != ops::ActQuantMode::kNone;
      s->int8 |= int8_;
      const ops::LsqConfig cfg = weight_lsq_config();
      s->aux_ws_bytes = std::max(s->aux_ws_bytes,
                                 ops::lsq_weight_backward_cuda_workspace_bytes(out_, in_, cfg));
      if (rmax_ > 0) {
        s->phi = true;
        s->aux_ws_bytes = std::max({s->aux_ws_bytes,
                                  ops::phi_product_cuda_workspace_bytes(out_, rmax_),
                                    ops::phi_backward_cuda_workspace_bytes(out_, in_, rmax_)});
      }
      if (q.mode != ops::ActQuantMode::kNone) {
        const int n = static_cast<int>(N);
        s->q_ws_bytes = std::max({s->q_ws_bytes,
                                  ops::act_quant_backward_cuda_workspace_bytes(N, in_, q),
                                  ops::layernorm_backward_quant_cuda_workspace_bytes(n, in_, q),
                                  ops::lsq_act_init_cuda_workspace_bytes(N * in_)});
        ops::LsqInitOptions mse;
        mse.method = ops::LsqInit::kMseSearch;
        s->q_ws_bytes = std::max(s->q_ws_bytes, ops::lsq_act_init_cuda_workspace_bytes(N * in_, mse));
      }
      return;
    }
  }
}

absl::Status CudaLinear::AllocateState(const DeviceAllocFn& alloc, ops::bf16* weight_bf16) {
  const int64_t nw = static_cast<int64_t>(out_) * in_;
  if (opt_.mode == LinearMode::kFp8) {
    void* p = nullptr;
    if (nw % 16 == 0 && reinterpret_cast<uintptr_t>(weight_bf16) % 16 == 0) {
      // The weight's BF16 copy is never read (AdamW skips it, the casts read the masters): its
      // 2 bytes per element hold W's codes and W^T's, both 16-byte aligned for cuBLASLt.
      w8_ = reinterpret_cast<uint8_t*>(weight_bf16);
      w8_t_ = w8_ + nw;
    } else {
      ASSIGN_OR_RETURN(p, alloc(nw));
      w8_ = static_cast<uint8_t*>(p);
      ASSIGN_OR_RETURN(p, alloc(nw));
      w8_t_ = static_cast<uint8_t*>(p);
    }
    if (recipe_ == Fp8Recipe::kBlock) {
      const int64_t a = ops::fp8_num_blocks(out_) * ops::fp8_block_scale_ld(in_);
      const int64_t b = ops::fp8_num_blocks(in_) * ops::fp8_block_scale_ld(out_);
      ASSIGN_OR_RETURN(p, alloc(a * 4));
      w_sinv_ = static_cast<float*>(p);
      ASSIGN_OR_RETURN(p, alloc(b * 4));
      w_sinv_t_ = static_cast<float*>(p);
    }
  } else if (opt_.mode == LinearMode::kQat) {
    if (rmax_ > 0) {
      ASSIGN_OR_RETURN(void* p, alloc(static_cast<int64_t>(rmax_) * 4));
      gamma_ = static_cast<float*>(p);
    }
    if (int8_) {
      ASSIGN_OR_RETURN(void* p, alloc(nw));
      w_i8_ = static_cast<int8_t*>(p);
    }
    if (opt_.qat.fp16_scales) {
      ASSIGN_OR_RETURN(void* p, alloc(n_steps_ * 4));
      ws16_ = static_cast<float*>(p);
      if (wz_ >= 0) {
        ASSIGN_OR_RETURN(p, alloc(n_steps_ * 4));
        wz16_ = static_cast<float*>(p);
      }
    }
  }
  return absl::OkStatus();
}

void CudaLinear::CarveActivations(Carver& k, int64_t N) {
  N_ = N;
  x8_t_valid_ = false;
  if (opt_.mode == LinearMode::kFp8) {
    x8_ = k.Take<uint8_t>(N * in_);
    // The block quantizer writes the column-tiled transpose in the same pass: kept. The
    // per-tensor codes are transposed in backward into shared scratch instead (1 byte read and
    // written per element, against keeping N * in bytes per layer).
    const bool keep_t = recipe_ == Fp8Recipe::kBlock;
    x8_t_ = keep_t ? k.Take<uint8_t>(N * in_) : nullptr;
    if (recipe_ == Fp8Recipe::kBlock) {
      x_sinv_ = k.Take<float>(ops::fp8_num_blocks(in_) * N);
      x_sinv_t_ = k.Take<float>(ops::fp8_num_blocks(N) * in_);
    }
  } else if (opt_.mode == LinearMode::kQat && opt_.qat.act == ActQuant::kPerToken) {
    token_scales_ = k.Take<float>(N);
  }
}

// ---------------------------------------------------------------------------------------------
// Inputs.

absl::Status CudaLinear::CastInput(const LinearContext& c, const bf16* x, bool training) {
  const int64_t N = c.N;
  ops::Fp8ScalingState& st = *c.scaling;
  switch (recipe_) {
    case Fp8Recipe::kDelayed:
      RETURN_IF_ERROR(ops::fp8_cast_cuda(x8_, x8_t_, training ? st.amax() + kx() : nullptr, x, N,
                                         in_, Fp8Format::kE4M3, st.scale() + kx(), c.stream));
      break;
    case Fp8Recipe::kCurrent:
      RETURN_IF_ERROR(ops::fp8_amax_cuda(st.amax() + kx(), x, N * in_, c.stream));
      RETURN_IF_ERROR(ops::fp8_current_scale_cuda(st, kx(), 1, c.stream));
      RETURN_IF_ERROR(ops::fp8_cast_cuda(x8_, x8_t_, nullptr, x, N, in_, Fp8Format::kE4M3,
                                         st.scale() + kx(), c.stream));
      break;
    case Fp8Recipe::kBlock:
      RETURN_IF_ERROR(ops::fp8_block_quantize_act_cuda(x8_, x_sinv_, x8_t_, x_sinv_t_, x, N, in_,
                                                       Fp8Format::kE4M3, c.stream));
      break;
  }
  x8_t_valid_ = x8_t_ != nullptr;
  return c.Mark("fp8 cast input");
}

absl::Status CudaLinear::QuantizeTensor(const LinearContext& c, bf16* out, const bf16* x,
                                        bool training) {
  ops::ActQuant q = ActQuantFor(c, int8_);
  if (q.mode == ops::ActQuantMode::kPerTensor && !act_init_) {
    if (!training) {
      return absl::FailedPreconditionError(absl::StrCat(
          name_, ": activation step not initialised (train a step or calibrate first)"));
    }
    // LSQ initialises the activation step from the first batch it sees (Linear::ForwardQat).
    ops::LsqInitOptions init;
    init.method = opt_.qat.scale_init;
    RETURN_IF_ERROR(ops::lsq_act_init_cuda(c.params + xs_, xz_ >= 0 ? c.params + xz_ : nullptr,
                                           x, c.N * in_, q.bits, q.lsq_mode, init, c.q_ws,
                                           c.q_ws_bytes, c.stream));
    act_init_ = true;
  }
  RETURN_IF_ERROR(ops::act_quant_forward_cuda(out, x, c.N, in_, q, c.stream));
  return c.Mark("qat quantize input");
}

absl::Status CudaLinear::InputFromLayernorm(const LinearContext& c, const LayernormArgs& ln,
                                            bool training) {
  const int N = c.N, C = ln.C;
  const bool res = ln.b != nullptr;
  // The plain BF16 layernorm into the shared scratch: what BF16 GEMMs read, and what the
  // casts, the block quantizer and a first-batch quantizer init start from.
  auto plain = [&]() -> absl::Status {
    return res ? ops::residual_layernorm_forward_cuda(ln.residual, c.ln, ln.mean, ln.rstd, ln.a,
                                                      ln.b, ln.weight, ln.bias, N, C, c.stream)
               : ops::layernorm_forward_cuda(c.ln, ln.mean, ln.rstd, ln.a, ln.weight, ln.bias, N,
                                             C, c.stream);
  };
  switch (opt_.mode) {
    case LinearMode::kFull:
      return plain();
    case LinearMode::kFp8: {
      ops::Fp8ScalingState& st = *c.scaling;
      x8_t_valid_ = false;
      if (recipe_ == Fp8Recipe::kDelayed) {
        float* amax = training ? st.amax() + kx() : nullptr;
        return res ? ops::residual_layernorm_forward_fp8_cuda(
                         ln.residual, x8_, ln.mean, ln.rstd, amax, ln.a, ln.b, ln.weight,
                         ln.bias, N, C, Fp8Format::kE4M3, st.scale() + kx(), c.stream)
                   : ops::layernorm_forward_fp8_cuda(x8_, ln.mean, ln.rstd, amax, ln.a,
                                                     ln.weight, ln.bias, N, C, Fp8Format::kE4M3,
                                                     st.scale() + kx(), c.stream);
      }
      if (recipe_ == Fp8Recipe::kCurrent) {
        // The BF16 output and its amax in one pass, then the scale, then the cast.
        RETURN_IF_ERROR(res ? ops::residual_layernorm_forward_amax_cuda(
                                  ln.residual, c.ln, ln.mean, ln.rstd, st.amax() + kx(), ln.a,
                                  ln.b, ln.weight, ln.bias, N, C, c.stream)
                            : ops::layernorm_forward_amax_cuda(c.ln, ln.mean, ln.rstd,
                                                               st.amax() + kx(), ln.a, ln.weight,
                                                               ln.bias, N, C, c.stream));
        RETURN_IF_ERROR(ops::fp8_current_scale_cuda(st, kx(), 1, c.stream));
        return ops::fp8_cast_cuda(x8_, nullptr, nullptr, c.ln, N, C, Fp8Format::kE4M3,
                                  st.scale() + kx(), c.stream);
      }
      RETURN_IF_ERROR(plain());
      return CastInput(c, c.ln, training);
    }
    case LinearMode::kQat: {
      ops::ActQuant q = ActQuantFor(c, int8_);
      if (q.mode == ops::ActQuantMode::kNone) return plain();
      if (q.mode == ops::ActQuantMode::kPerTensor && !act_init_) {
        RETURN_IF_ERROR(plain());
        return QuantizeTensor(c, c.ln, c.ln, training);
      }
      return res ? ops::residual_layernorm_forward_quant_cuda(ln.residual, c.ln, ln.mean,
                                                              ln.rstd, ln.a, ln.b, ln.weight,
                                                              ln.bias, N, C, q, c.stream)
                 : ops::layernorm_forward_quant_cuda(c.ln, ln.mean, ln.rstd, ln.a, ln.weight,
                                                     ln.bias, N, C, q, c.stream);
    }
  }
  return absl::InternalError("unknown Linear mode");
}

absl::Status CudaLinear::InputFromTensor(const LinearContext& c, const bf16* x, bool training) {
  switch (opt_.mode) {
    case LinearMode::kFull:
      return absl::OkStatus();
    case LinearMode::kFp8:
      return CastInput(c, x, training);
    case LinearMode::kQat:
      if (opt_.qat.act == ActQuant::kNone) return absl::OkStatus();
      return QuantizeTensor(c, c.xq, x, training);
  }
  return absl::InternalError("unknown Linear mode");
}

bool CudaLinear::TakesPlainGelu() const {
  return opt_.mode == LinearMode::kFull ||
         (opt_.mode == LinearMode::kQat && opt_.qat.act == ActQuant::kNone);
}

bool CudaLinear::TakesFp8GeluEpilogue() const {
  return opt_.mode == LinearMode::kFp8 && recipe_ == Fp8Recipe::kDelayed;
}

absl::Status CudaLinear::InputFromGelu(const LinearContext& c, bf16* out, const bf16* pre,
                                       bool training) {
  const int64_t n = c.N * static_cast<int64_t>(in_);
  if (opt_.mode == LinearMode::kQat && opt_.qat.act != ActQuant::kNone) {
    const ops::ActQuant q = ActQuantFor(c, int8_);
    if (q.mode == ops::ActQuantMode::kPerTensor && !act_init_) {
      RETURN_IF_ERROR(ops::gelu_forward_cuda(out, pre, n, c.stream));
      return QuantizeTensor(c, out, out, training);
    }
    return ops::gelu_forward_quant_cuda(out, pre, c.N, in_, q, c.stream);
  }
  RETURN_IF_ERROR(ops::gelu_forward_cuda(out, pre, n, c.stream));
  RETURN_IF_ERROR(c.Mark("gelu"));
  if (opt_.mode == LinearMode::kFp8) return CastInput(c, out, training);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Forward.

absl::Status CudaLinear::Forward(const LinearContext& c, bf16* out, bool training,
                                 CudaLinear* gelu_consumer, bf16* pre_act,
                                 const bf16* tensor_input) {
  const int N = c.N;
  const bool gelu = gelu_consumer != nullptr;
  if (gelu && pre_act == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": GELU output needs pre_act"));
  }
  // The GELU goes into this GEMM's epilogue when its consumer reads the plain BF16 GELU (or, from
  // an FP8 GEMM, FP8 codes with a known scale); otherwise the GEMM writes the pre-activation and
  // the consumer produces its input from it.
  // fused: the GEMM's epilogue applies the GELU and writes the BF16 GELU output into `out`
  // (the consumer casts it to its FP8 codes afterwards where it is an FP8 Linear); otherwise the
  // GEMM writes the pre-activation and the consumer produces its input from it (QAT's
  // quantizing GELU, whose backward recomputes from pre_act) — or an FP8 GEMM writes the
  // consumer's FP8 codes straight from its epilogue.
  bool fused = gelu && (gelu_consumer->TakesPlainGelu() ||
                        gelu_consumer->mode() == LinearMode::kFp8);
  switch (opt_.mode) {
    case LinearMode::kFull:
    case LinearMode::kQat: {
      const bf16* x = c.ln;
      if (source_ != LinearInputSource::kLayernorm) x = tensor_input;
      if (opt_.mode == LinearMode::kQat && source_ == LinearInputSource::kTensor &&
          opt_.qat.act != ActQuant::kNone) {
        x = c.xq;
      }
      if (x == nullptr) return absl::InvalidArgumentError(absl::StrCat(name_, ": no input"));
      if (opt_.mode == LinearMode::kQat && int8_ && phi_rank_ == 0 &&
          opt_.qat.act != ActQuant::kNone) {
        // INT8 tensor cores on the codes the producer wrote (exact), the scales and bias in the
        // epilogue, which has no GELU: a GELU goes through the pre-activation.
        fused = false;
        const bool per_token = opt_.qat.act == ActQuant::kPerToken;
        RETURN_IF_ERROR(ops::matmul_int8_forward_cuda(
            *c.int8, gelu ? pre_act : out, c.x_i8, per_token ? token_scales_ : c.params + xs_,
            per_token ? ops::Int8ActScale::kPerToken : ops::Int8ActScale::kPerTensor, w_i8_,
            WSteps(c), Bias(c), N, in_, out_, c.stream));
      } else {
        RETURN_IF_ERROR(ops::matmul_forward_cuda(
            *c.mm, gelu && !fused ? pre_act : out, x, Weight(c), Bias(c), N, in_, out_, c.stream,
            fused ? ops::Activation::kGelu : ops::Activation::kNone, fused ? pre_act : nullptr));
      }
      break;
    }
    case LinearMode::kFp8: {
      ops::Fp8ScalingState& st = *c.scaling;
      ops::Fp8MatmulOptions mo;
      mo.bias = Bias(c);
      mo.accumulation = Accum(opt_.fp8.fast_accum_fprop);
      const bool block = recipe_ == Fp8Recipe::kBlock;
      const ops::Fp8Operand X = block ? Tiles(x8_, x_sinv_)
                                      : PerTensor(x8_, Fp8Format::kE4M3, st.scale_inv() + kx());
      const ops::Fp8Operand Wt = block ? Blocks(w8_, w_sinv_)
                                       : PerTensor(w8_, Fp8Format::kE4M3, st.scale_inv() + kw());
      ops::Fp8MatmulOutput o;
      o.data = out;
      o.type = ops::Fp8OutType::kBf16;
      // FP8 -> FP8: the GELU output cast in the epilogue with the consumer's (delayed) scale;
      // cuBLASLt has no FP8 output with block scales.
      const bool fp8_out = gelu && WritesFp8GeluFor(*gelu_consumer);
      if (fp8_out) fused = false;
      if (fused || fp8_out) {
        mo.act = ops::Activation::kGelu;
        mo.pre_act = pre_act;
      } else if (gelu) {
        o.data = pre_act;
      }
      if (fp8_out) {
        o.data = gelu_consumer->x8_;
        o.type = ops::Fp8OutType::kFp8;
        o.fp8_format = Fp8Format::kE4M3;
        o.fp8_scale = st.scale() + gelu_consumer->kx();
        o.fp8_amax = training ? st.amax() + gelu_consumer->kx() : nullptr;
      }
      RETURN_IF_ERROR(ops::fp8_matmul_cuda(*c.fp8, o, X, Wt, N, in_, out_, mo, c.stream));
      if (fp8_out) {
        gelu_consumer->x8_t_valid_ = false;
        return absl::OkStatus();
      }
      break;
    }
  }
  if (gelu && !fused) {
    RETURN_IF_ERROR(c.Mark("fwd gemm (pre-activation)"));
    return gelu_consumer->InputFromGelu(c, out, pre_act, training);
  }
  if (gelu && gelu_consumer->mode() == LinearMode::kFp8) {
    RETURN_IF_ERROR(c.Mark("fwd gemm+gelu"));
    return gelu_consumer->CastInput(c, out, training);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Backward.

absl::Status CudaLinear::BeginBackward(const LinearContext& c, const bf16* dout, bool training) {
  if (opt_.mode != LinearMode::kFp8) return absl::OkStatus();
  ops::Fp8ScalingState& st = *c.scaling;
  const int64_t N = c.N;
  switch (recipe_) {
    case Fp8Recipe::kDelayed:
      RETURN_IF_ERROR(ops::fp8_cast_cuda(c.dy8, c.dy8_t, training ? st.amax() + kg() : nullptr,
                                         dout, N, out_, Fp8Format::kE5M2, st.scale() + kg(),
                                         c.stream));
      break;
    case Fp8Recipe::kCurrent:
      RETURN_IF_ERROR(ops::fp8_amax_cuda(st.amax() + kg(), dout, N * out_, c.stream));
      RETURN_IF_ERROR(ops::fp8_current_scale_cuda(st, kg(), 1, c.stream));
      RETURN_IF_ERROR(ops::fp8_cast_cuda(c.dy8, c.dy8_t, nullptr, dout, N, out_,
                                         Fp8Format::kE5M2, st.scale() + kg(), c.stream));
      break;
    case Fp8Recipe::kBlock:
      RETURN_IF_ERROR(ops::fp8_block_quantize_act_cuda(c.dy8, c.dy_sinv, c.dy8_t, c.dy_sinv_t,
                                                       dout, N, out_, Fp8Format::kE4M3,
                                                       c.stream));
      break;
  }
  return c.Mark("fp8 cast dy");
}

template <typename G>
absl::Status CudaLinear::BackwardData(const LinearContext& c, bf16* dinp, const bf16* dout,
                                      G* grads, const bf16* gelu_pre, GradWrite gw) {
  const int N = c.N;
  const GradWrite over = GradWrite::kOverwrite;
  // The input quantizer's backward through a GELU (QAT with quantized activations): dinp is
  // first the gradient with respect to the quantized GELU output.
  const bool qat_gelu = gelu_pre != nullptr && opt_.mode == LinearMode::kQat &&
                        opt_.qat.act != ActQuant::kNone;
  switch (opt_.mode) {
    case LinearMode::kFull:
    case LinearMode::kQat:
      RETURN_IF_ERROR(ops::matmul_backward_cuda(*c.mm, dinp, nullptr, nullptr, dout, nullptr,
                                                Weight(c), N, in_, out_, c.mm_ws, c.mm_ws_bytes,
                                                c.stream, qat_gelu ? nullptr : gelu_pre,
                                                GradWrite::kAccumulate, over));
      if (qat_gelu) {
        const ops::ActQuant q = ActQuantFor(c, false);
        const bool tensor = q.mode == ops::ActQuantMode::kPerTensor;
        return ops::gelu_backward_quant_cuda(
            dinp, tensor ? grads + xs_ : nullptr, tensor && xz_ >= 0 ? grads + xz_ : nullptr,
            dinp, gelu_pre, N, in_, q, c.q_ws, c.q_ws_bytes, c.stream, gw);
      }
      return absl::OkStatus();
    case LinearMode::kFp8: {
      ops::Fp8ScalingState& st = *c.scaling;
      ops::Fp8MatmulOptions mo;
      mo.accumulation = Accum(opt_.fp8.fast_accum_backward);
      const bool block = recipe_ == Fp8Recipe::kBlock;
      const ops::Fp8Operand X = block ? Tiles(c.dy8, c.dy_sinv)
                                      : PerTensor(c.dy8, Fp8Format::kE5M2, st.scale_inv() + kg());
      const ops::Fp8Operand Wt = block ? Blocks(w8_t_, w_sinv_t_)
                                       : PerTensor(w8_t_, Fp8Format::kE4M3, st.scale_inv() + kw());
      RETURN_IF_ERROR(
          ops::fp8_matmul_cuda(*c.fp8, GemmOut(dinp, over), X, Wt, N, out_, in_, mo, c.stream));
      if (gelu_pre == nullptr) return absl::OkStatus();
      RETURN_IF_ERROR(c.Mark("bwd fp8 dgrad"));
      // No dGELU epilogue on FP8 GEMMs: the GELU's gradient in place, written over.
      return ops::gelu_backward_quant_cuda(dinp, static_cast<G*>(nullptr),
                                           static_cast<G*>(nullptr), dinp, gelu_pre, N, in_,
                                           ops::ActQuant{}, nullptr, 0, c.stream, gw);
    }
  }
  return absl::InternalError("unknown Linear mode");
}

absl::StatusOr<const uint8_t*> CudaLinear::InputTransposed(const LinearContext& c) {
  if (x8_t_valid_) return static_cast<const uint8_t*>(x8_t_);
  uint8_t* dst = x8_t_ != nullptr ? x8_t_ : c.x8_t;
  RETURN_IF_ERROR(ops::fp8_transpose_cuda(dst, x8_, c.N, in_, c.stream));
  RETURN_IF_ERROR(c.Mark("fp8 transpose x"));
  return static_cast<const uint8_t*>(dst);
}

template <typename G>
absl::Status CudaLinear::BackwardWeight(const LinearContext& c, G* grads, const bf16* dout,
                                        const bf16* tensor_input, GradWrite gw) {
  const int N = c.N;
  switch (opt_.mode) {
    case LinearMode::kFull:
    case LinearMode::kQat: {
      const bf16* x = c.ln;
      if (source_ != LinearInputSource::kLayernorm) x = tensor_input;
      if (opt_.mode == LinearMode::kQat && source_ == LinearInputSource::kTensor &&
          opt_.qat.act != ActQuant::kNone) {
        x = c.xq;  // recomputed by InputBackwardTensor
      }
      return ops::matmul_backward_cuda(*c.mm, nullptr, grads + w_, grads + b_, dout, x, nullptr,
                                       N, in_, out_, c.mm_ws, c.mm_ws_bytes, c.stream, nullptr,
                                       gw);
    }
    case LinearMode::kFp8: {
      ops::Fp8ScalingState& st = *c.scaling;
      ASSIGN_OR_RETURN(const uint8_t* xt, InputTransposed(c));
      ops::Fp8MatmulOptions mo;
      mo.accumulation = Accum(opt_.fp8.fast_accum_backward);
      const bool block = recipe_ == Fp8Recipe::kBlock;
      const ops::Fp8Operand X = block ? Tiles(c.dy8_t, c.dy_sinv_t)
                                      : PerTensor(c.dy8_t, Fp8Format::kE5M2, st.scale_inv() + kg());
      const ops::Fp8Operand Wt = block ? Tiles(xt, x_sinv_t_)
                                       : PerTensor(xt, Fp8Format::kE4M3, st.scale_inv() + kx());
      RETURN_IF_ERROR(ops::fp8_matmul_cuda(*c.fp8, GemmOut(grads + w_, gw), X, Wt, out_, N, in_,
                                           mo, c.stream));
      RETURN_IF_ERROR(c.Mark("bwd fp8 wgrad"));
      // The bias gradient from the unquantized output gradient, as the CPU FP8 Linear does.
      return ops::matmul_backward_cuda(*c.mm, nullptr, static_cast<G*>(nullptr), grads + b_, dout,
                                       nullptr, nullptr, N, in_, out_, c.mm_ws, c.mm_ws_bytes,
                                       c.stream, nullptr, gw);
    }
  }
  return absl::InternalError("unknown Linear mode");
}

template <typename G>
absl::Status CudaLinear::InputBackwardLayernorm(const LinearContext& c, G* grads,
                                                const LayernormBackwardArgs<G>& ln) {
  const int N = c.N;
  const ops::ActQuant q = ActQuantFor(c, false);
  if (opt_.mode == LinearMode::kQat && q.mode != ops::ActQuantMode::kNone) {
    const bool tensor = q.mode == ops::ActQuantMode::kPerTensor;
    return ops::layernorm_backward_quant_cuda(
        ln.dinp, ln.dweight, ln.dbias, tensor ? grads + xs_ : nullptr,
        tensor && xz_ >= 0 ? grads + xz_ : nullptr, ln.dout, ln.inp, ln.weight, ln.bias, ln.mean,
        ln.rstd, N, ln.C, q, c.q_ws, c.q_ws_bytes, c.stream, ln.gw, c.ln, ln.tweo);
  }
  // BF16 and weight-only QAT read the layernorm's output again in wgrad: recompute it (FP8 keeps
  // its codes instead).
  bf16* recompute = opt_.mode == LinearMode::kFp8 ? nullptr : c.ln;
  return ops::layernorm_backward_cuda(ln.dinp, ln.dweight, ln.dbias, ln.dout, ln.inp, ln.weight,
                                      ln.bias, ln.mean, ln.rstd, N, ln.C, ln.ws, ln.ws_bytes,
                                      c.stream, ln.gw, recompute, ln.tweo);
}

template <typename G>
absl::Status CudaLinear::InputBackwardTensor(const LinearContext& c, G* grads, bf16* d,
                                             const bf16* x, GradWrite gw) {
  const ops::ActQuant q = ActQuantFor(c, false);
  if (opt_.mode != LinearMode::kQat || q.mode == ops::ActQuantMode::kNone) {
    return absl::OkStatus();
  }
  const bool tensor = q.mode == ops::ActQuantMode::kPerTensor;
  return ops::act_quant_backward_cuda(d, tensor ? grads + xs_ : nullptr,
                                      tensor && xz_ >= 0 ? grads + xz_ : nullptr, d, x, c.N, in_,
                                      q, c.q_ws, c.q_ws_bytes, c.stream, GradWrite::kOverwrite, gw,
                                      c.xq);
}

// ---------------------------------------------------------------------------------------------
// Once per step.

template <typename G>
absl::Status CudaLinear::FinishGradients(const LinearContext& c, G* grads, cudaStream_t stream) {
  if (opt_.mode != LinearMode::kQat) return absl::OkStatus();
  G* dw = grads + w_;
  if (rmax_ > 0) {
    // Phi's factors from the unmasked dW_eff; at rank 0 their gradients are written zero.
    if constexpr (std::is_same_v<G, float>) {
      RETURN_IF_ERROR(ops::phi_backward_cuda(*c.phi, grads + phi_l_, grads + phi_r_, dw,
                                             c.params + phi_l_, c.params + phi_r_, gamma_, out_,
                                             in_, rmax_, phi_rank_, c.aux_ws, c.aux_ws_bytes,
                                             stream, GradWrite::kOverwrite));
    } else {
      RETURN_IF_ERROR(ops::phi_backward_cuda(*c.phi, grads + phi_l_, grads + phi_r_, dw,
                                             c.params_bf16 + phi_l_, c.params_bf16 + phi_r_,
                                             gamma_, out_, in_, rmax_, phi_rank_, c.aux_ws,
                                             c.aux_ws_bytes, stream, GradWrite::kOverwrite));
    }
  }
  return ops::lsq_weight_backward_cuda(dw, grads + ws_, wz_ >= 0 ? grads + wz_ : nullptr,
                                       c.params + w_, WSteps(c), WZeros(c), out_, in_,
                                       weight_lsq_config(), c.aux_ws, c.aux_ws_bytes, stream,
                                       GradWrite::kOverwrite);
}

absl::Status CudaLinear::RoundStepsFp16(const LinearContext& c, cudaStream_t stream) {
  if (ws16_ == nullptr) return absl::OkStatus();
  // The forward (and the step gradients) use the steps GGUF can store; the fp32 parameters keep
  // learning (straight-through), as Linear::ClampSteps.
  return ops::lsq_fp16_steps_cuda(ws16_, wz16_, c.params + ws_,
                                  wz_ >= 0 ? c.params + wz_ : nullptr, n_steps_, stream);
}

bool CudaLinear::adamw_writes_fp8() const {
  return opt_.mode == LinearMode::kFp8 && recipe_ != Fp8Recipe::kBlock;
}

absl::Status CudaLinear::PrepareWeights(const LinearContext& c, cudaStream_t stream,
                                        WeightsFrom from) {
  switch (opt_.mode) {
    case LinearMode::kFull:
      return absl::OkStatus();
    case LinearMode::kFp8: {
      ops::Fp8ScalingState& st = *c.scaling;
      const float* w = c.params + w_;
      switch (recipe_) {
        case Fp8Recipe::kDelayed:
          if (from == WeightsFrom::kAfterUpload) {
            // What AdamW would have written: the codes with this step's scale, W's amax recorded
            // for the next scaling update.
            return ops::fp8_cast_cuda(w8_, w8_t_, st.amax() + kw(), w, out_, in_,
                                      Fp8Format::kE4M3, st.scale() + kw(), stream);
          }
          return ops::fp8_transpose_cuda(w8_t_, w8_, out_, in_, stream);
        case Fp8Recipe::kCurrent:
          if (from == WeightsFrom::kAfterUpload) {
            RETURN_IF_ERROR(ops::fp8_amax_cuda(st.amax() + kw(), w,
                                               static_cast<int64_t>(out_) * in_, stream));
          }
          RETURN_IF_ERROR(ops::fp8_current_scale_cuda(st, kw(), 1, stream));
          return ops::fp8_cast_cuda(w8_, w8_t_, nullptr, w, out_, in_, Fp8Format::kE4M3,
                                    st.scale() + kw(), stream);
        case Fp8Recipe::kBlock:
          return ops::fp8_block_quantize_weight_cuda(w8_, w_sinv_, w8_t_, w_sinv_t_, w, out_, in_,
                                                     Fp8Format::kE4M3, stream);
      }
      return absl::InternalError("unknown FP8 recipe");
    }
    case LinearMode::kQat: {
      const float* phi_add = nullptr;
      if (rmax_ > 0 && phi_rank_ > 0) {
        RETURN_IF_ERROR(ops::phi_product_cuda(*c.phi, c.phi_ws, c.params + phi_l_,
                                              c.params + phi_r_, gamma_, out_, in_, rmax_,
                                              phi_rank_, c.aux_ws, c.aux_ws_bytes, stream));
        phi_add = c.phi_ws;
      }
      // The INT8 forward reads codes only while W_eff is on the grid (Phi gone).
      int8_t* codes = int8_ && phi_rank_ == 0 ? w_i8_ : nullptr;
      RETURN_IF_ERROR(RoundStepsFp16(c, stream));
      return ops::lsq_weight_forward_cuda(c.params_bf16 + w_, codes, nullptr, c.params + w_,
                                          WSteps(c), WZeros(c), phi_add, out_, in_,
                                          weight_lsq_config(), stream);
    }
  }
  return absl::InternalError("unknown Linear mode");
}

#define QT_LINEAR_INSTANTIATE(G)                                                               \
  template absl::Status CudaLinear::BackwardData(const LinearContext&, bf16*, const bf16*, G*, \
                                                 const bf16*, GradWrite);                      \
  template absl::Status CudaLinear::BackwardWeight(const LinearContext&, G*, const bf16*,      \
                                                   const bf16*, GradWrite);                    \
  template absl::Status CudaLinear::InputBackwardLayernorm(const LinearContext&, G*,           \
                                                           const LayernormBackwardArgs<G>&);   \
  template absl::Status CudaLinear::InputBackwardTensor(const LinearContext&, G*, bf16*,       \
                                                        const bf16*, GradWrite);               \
  template absl::Status CudaLinear::FinishGradients(const LinearContext&, G*, cudaStream_t);
QT_LINEAR_INSTANTIATE(float)
QT_LINEAR_INSTANTIATE(bf16)
#undef QT_LINEAR_INSTANTIATE

}  // namespace qtrain
