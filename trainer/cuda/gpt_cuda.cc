// CudaGpt: trainer/gpt.cc's forward and backward on ops/cuda's BF16 kernels, with FP32 master
// weights, gradients and AdamW moments in the host model's flat ParamStore layout.
#include "trainer/cuda/gpt_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ops/cuda/adamw_cuda.h"
#include "ops/cuda/attention_cuda.h"
#include "ops/cuda/crossentropy_cuda.h"
#include "ops/cuda/device.h"
#include "ops/cuda/encoder_cuda.h"
#include "ops/cuda/grad_norm_cuda.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/matmul_cuda.h"
#include "ops/cuda/tweo_cuda.h"
#include "ops/status_macros.h"
#include "trainer/cuda/carver.h"
#include "trainer/cuda/gpt_cuda_kernels.h"

namespace qtrain {
namespace {

using ops::bf16;

constexpr int64_t kAlign = Carver::kAlign;
constexpr int kMaxEvents = 1024;

}  // namespace

absl::StatusOr<std::unique_ptr<CudaGpt>> CudaGpt::Create(const GptConfig& config,
                                                        const ParamStore& layout,
                                                        GradDtype grad_dtype, bool forward_only) {
  if (config.n_layer <= 0 || config.n_embd <= 0 || config.n_head <= 0 ||
      config.n_embd % config.n_head != 0 || config.vocab_size <= 1 || config.max_seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CUDA model: bad shape n_layer=", config.n_layer, " n_embd=", config.n_embd,
        " n_head=", config.n_head, " vocab_size=", config.vocab_size,
        " max_seq_len=", config.max_seq_len));
  }
  if (config.n_embd / config.n_head > 256) {
    return absl::UnimplementedError(absl::StrCat("CUDA model: head size ",
                                                 config.n_embd / config.n_head,
                                                 " exceeds the attention kernels' 256"));
  }
  absl::StatusOr<int> devices = ops::DeviceCount();
  if (!devices.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "CUDA model: cannot query CUDA devices (cudaGetDeviceCount): ", devices.status().message()));
  }
  if (*devices == 0) {
    return absl::UnavailableError(
        "CUDA model: no CUDA device is usable (cudaGetDeviceCount found none, or no driver); "
        "run with device CPU or on a machine with an NVIDIA GPU");
  }
  std::unique_ptr<CudaGpt> m(new CudaGpt(config, grad_dtype));
  m->forward_only_ = forward_only;
  RETURN_IF_ERROR(m->Init(layout));
  return m;
}

absl::StatusOr<void*> CudaGpt::Alloc(int64_t bytes) {
  ASSIGN_OR_RETURN(void* p, ops::DeviceMalloc(std::max<int64_t>(bytes, kAlign)));
  allocations_.push_back(p);
  allocated_bytes_ += std::max<int64_t>(bytes, kAlign);
  return p;
}

absl::Status CudaGpt::Init(const ParamStore& layout) {
  const GptConfig& c = config_;
  const int64_t C = c.n_embd;
  // The layout must be exactly the full-precision Gpt's: the kernels address tensors by offset.
  int next = 0;
  auto expect = [&](const std::string& name, std::vector<int64_t> shape) -> absl::StatusOr<int64_t> {
    absl::StatusOr<int> idx = layout.Find(name);
    if (!idx.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("CUDA model: the parameter layout lacks '", name, "'"));
    }
    const ParamInfo& info = layout.info(*idx);
    if (info.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CUDA model: parameter '", name, "' has shape [", absl::StrJoin(info.shape, ","),
          "], expected [", absl::StrJoin(shape, ","), "]"));
    }
    ++next;
    return info.offset;
  };
  std::vector<ops::Fp8TensorSpec> fp8_specs;
  int fp8_history = ops::DelayedScaler::kDefaultHistoryLen;
  // model.padded_vocab_size: wte has table_rows() rows; the LM head's GEMMs run over all of
  // them, its softmax over the first vocab_size (ops::LmHeadExtras::table_rows).
  ASSIGN_OR_RETURN(wte_, expect("wte", {c.table_rows(), C}));
  ASSIGN_OR_RETURN(wpe_, expect("wpe", {c.max_seq_len, C}));
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string p = absl::StrCat("block.", l, ".");
    Block b;
    auto linear = [&](const char* role, int in, int out, LinearInputSource src) -> absl::Status {
      const std::string name = p + role;
      const LinearOptions opt = c.precision.For(name);
      int fp8_first = -1;
      if (opt.mode == LinearMode::kFp8) {
        fp8_first = static_cast<int>(fp8_specs.size());
        // x and W in E4M3, dy in E5M2 (HYBRID), as the CPU Linear's scalers.
        for (ops::Fp8Format f : {ops::Fp8Format::kE4M3, ops::Fp8Format::kE4M3,
                                 ops::Fp8Format::kE5M2}) {
          fp8_specs.push_back({f, opt.fp8.margin});
        }
        fp8_history = opt.fp8.history_len;
        fp8_delayed_ |= opt.fp8.recipe == Fp8Recipe::kDelayed;
      }
      ASSIGN_OR_RETURN(CudaLinear lin,
                       CudaLinear::Create(name, in, out, opt, src, layout, fp8_first));
      // The tensors it addresses: weight, bias and the mode's parameters.
      next += 2 + (lin.w_scale_offset() >= 0) + (lin.w_zero_offset() >= 0) +
              (lin.x_scale_offset() >= 0) + (lin.x_zero_offset() >= 0) +
              2 * (lin.phi_l_offset() >= 0);
      b.linears.push_back(std::move(lin));
      return absl::OkStatus();
    };
    ASSIGN_OR_RETURN(b.ln1w, expect(p + "ln1.weight", {C}));
    ASSIGN_OR_RETURN(b.ln1b, expect(p + "ln1.bias", {C}));
    RETURN_IF_ERROR(linear("attn.qkv", C, 3 * C, LinearInputSource::kLayernorm));
    RETURN_IF_ERROR(linear("attn.proj", C, C, LinearInputSource::kTensor));
    ASSIGN_OR_RETURN(b.ln2w, expect(p + "ln2.weight", {C}));
    ASSIGN_OR_RETURN(b.ln2b, expect(p + "ln2.bias", {C}));
    RETURN_IF_ERROR(linear("mlp.fc", C, 4 * C, LinearInputSource::kLayernorm));
    RETURN_IF_ERROR(linear("mlp.proj", 4 * C, C, LinearInputSource::kGelu));
    blocks_.push_back(std::move(b));
  }
  ASSIGN_OR_RETURN(lnfw_, expect("lnf.weight", {C}));
  ASSIGN_OR_RETURN(lnfb_, expect("lnf.bias", {C}));
  if (layout.size() != next) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA model: the layout has ", layout.size(),
                                                   " tensors, the GPT has ", next));
  }
  num_params_ = layout.num_elements();
  // Gradient-ready ranges: each block's tensors must be one run of the layout (Gpt adds them in
  // a row; the aligned layout may leave gaps between them), so that a block's range holds no
  // other tensor, nothing that backward finishes later.
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string p = absl::StrCat("block.", l, ".");
    int64_t lo = num_params_, hi = 0;
    for (const ParamInfo& info : layout.infos()) {
      if (info.name.compare(0, p.size(), p) != 0) continue;
      lo = std::min(lo, info.offset);
      hi = std::max(hi, info.offset + info.size);
    }
    bool interleaved = false;
    for (const ParamInfo& info : layout.infos()) {
      if (info.name.compare(0, p.size(), p) == 0) continue;
      interleaved |= info.offset < hi && info.offset + info.size > lo;
    }
    if (interleaved) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CUDA model: the tensors of block ", l, " are not one contiguous run of the layout"));
    }
    grad_ranges_.push_back({lo, hi});
  }
  std::vector<GradRange> blocks_sorted = grad_ranges_;
  std::sort(blocks_sorted.begin(), blocks_sorted.end(),
            [](const GradRange& a, const GradRange& b) { return a.begin < b.begin; });
  int64_t covered = 0;
  for (const GradRange& r : blocks_sorted) {
    if (r.begin > covered) grad_ranges_.push_back({covered, r.begin});
    covered = r.end;
  }
  if (covered < num_params_) grad_ranges_.push_back({covered, num_params_});
  ready_events_.assign(grad_ranges_.size(), nullptr);
  // Decay runs in layout order (AdamW's per-tensor weight decay, one launch per run).
  for (const ParamInfo& info : layout.infos()) {
    if (!decay_runs_.empty() && decay_runs_.back().decay == info.decay &&
        decay_runs_.back().offset + decay_runs_.back().size == info.offset) {
      decay_runs_.back().size += info.size;
    } else {
      decay_runs_.push_back({info.offset, info.size, info.decay});
    }
  }

  ASSIGN_OR_RETURN(stream_, ops::CreateStream());
  ASSIGN_OR_RETURN(matmul_, ops::MatmulContext::Create());
  matmul_->set_autotune(false);
  // What the Linears' modes need: FP8 GEMMs and one scaling state for all FP8 tensors, INT8
  // GEMMs, Phi's solver handles, and their long-lived buffers.
  if (!fp8_specs.empty()) {
    ASSIGN_OR_RETURN(fp8_mm_, ops::Fp8MatmulContext::Create(matmul_.get()));
    ASSIGN_OR_RETURN(fp8_state_, ops::Fp8ScalingState::Create(fp8_specs, fp8_history));
  }
  for (CudaLinear* lin : all_linears()) lin->AddScratchNeeds(1, &scratch_);
  if (scratch_.int8) {
    ASSIGN_OR_RETURN(int8_mm_, ops::Int8MatmulContext::Create());
  }
  if (scratch_.phi) {
    ASSIGN_OR_RETURN(phi_ctx_, ops::PhiContext::Create());
  }
  const int64_t n = num_params_;
  ASSIGN_OR_RETURN(void* p, Alloc(n * 4));
  params_ = static_cast<float*>(p);
  if (!forward_only_) {  // a forward-only model (a teacher, an evaluation) trains nothing
    ASSIGN_OR_RETURN(grads_, Alloc(n * grad_bytes()));
    ASSIGN_OR_RETURN(p, Alloc(n * 4));
    m_ = static_cast<float*>(p);
    ASSIGN_OR_RETURN(p, Alloc(n * 4));
    v_ = static_cast<float*>(p);
  }
  ASSIGN_OR_RETURN(p, Alloc(n * 2));
  params_bf16_ = static_cast<bf16*>(p);
  int64_t phi_elems = 0;
  for (CudaLinear* lin : all_linears()) {
    RETURN_IF_ERROR(lin->AllocateState([this](int64_t bytes) { return Alloc(bytes); },
                                       params_bf16_ + lin->weight_offset()));
    if (lin->phi_rmax() > 0) {
      phi_elems = std::max<int64_t>(phi_elems,
                                    static_cast<int64_t>(lin->out_features()) * lin->in_features());
    }
  }
  if (phi_elems > 0) {
    ASSIGN_OR_RETURN(void* pw, Alloc(phi_elems * 4));
    phi_ws_ = static_cast<float*>(pw);
  }
  if (scratch_.aux_ws_bytes > 0) {
    aux_ws_bytes_ = scratch_.aux_ws_bytes;
    ASSIGN_OR_RETURN(aux_ws_, Alloc(aux_ws_bytes_));
  }
  ASSIGN_OR_RETURN(p, Alloc(3 * sizeof(double)));
  scalars_ = static_cast<double*>(p);
  ASSIGN_OR_RETURN(p, Alloc(sizeof(float)));
  clip_factor_ = static_cast<float*>(p);
  norm_ws_bytes_ = ops::sum_squares_cuda_workspace_bytes();
  ASSIGN_OR_RETURN(norm_ws_, Alloc(norm_ws_bytes_));
  ASSIGN_OR_RETURN(p, Alloc(static_cast<int64_t>(c.n_layer) * ops::kNumBlockOutputStats *
                            sizeof(double)));
  stats_dev_ = static_cast<double*>(p);
  stats_host_.assign(static_cast<size_t>(c.n_layer) * ops::kNumBlockOutputStats, 0.0);
  ASSIGN_OR_RETURN(stats_ws_, Alloc(ops::block_output_stats_cuda_workspace_bytes()));
  RETURN_IF_ERROR(gpu::MemsetAsync(params_, 0, n * 4, stream_));
  if (!forward_only_) {
    for (float* buf : {m_, v_}) RETURN_IF_ERROR(gpu::MemsetAsync(buf, 0, n * 4, stream_));
    RETURN_IF_ERROR(gpu::MemsetAsync(grads_, 0, n * grad_bytes(), stream_));
  }
  // One AdamW plan per gradient range: the decay runs clipped to it.
  for (const GradRange& g : grad_ranges_) {
    std::vector<ops::AdamwSegment> segments;
    for (const DecayRun& r : decay_runs_) {
      const int64_t lo = std::max(r.offset, g.begin), hi = std::min(r.offset + r.size, g.end);
      if (lo < hi) segments.push_back({lo, hi - lo, r.decay});
    }
    // FP8 Linears of the per-tensor recipes get their weight codes (and amax) from the update.
    std::vector<ops::AdamwFp8Segment> fp8_segments;
    for (CudaLinear* lin : all_linears()) {
      if (!lin->adamw_writes_fp8()) continue;
      const int64_t w = lin->weight_offset(),
                    size = static_cast<int64_t>(lin->out_features()) * lin->in_features();
      if (w < g.begin || w + size > g.end) continue;
      ops::AdamwFp8Segment f;
      f.offset = w;
      f.size = size;
      f.scale_index = lin->fp8_weight_index();
      f.codes = lin->weight_codes();
      f.format = ops::Fp8Format::kE4M3;
      f.write_bf16 = false;  // an FP8 Linear reads its codes only
      fp8_segments.push_back(f);
    }
    ASSIGN_OR_RETURN(std::unique_ptr<ops::AdamwPlan> plan,
                     ops::AdamwPlan::Create(segments, n, fp8_segments));
    adamw_plans_.push_back(std::move(plan));
  }
  for (size_t i = blocks_.size(); i < grad_ranges_.size(); ++i) update_order_.push_back(i);
  for (size_t i = 0; i < blocks_.size(); ++i) update_order_.push_back(i);
  ASSIGN_OR_RETURN(opt_stream_, ops::CreateStream());
  ASSIGN_OR_RETURN(grads_final_, ops::CreateEvent());
  for (size_t i = 0; i < grad_ranges_.size(); ++i) {
    ASSIGN_OR_RETURN(cudaEvent_t e, ops::CreateEvent());
    update_events_.push_back(e);
  }
  RETURN_IF_ERROR(gpu::MemsetAsync(params_bf16_, 0, n * 2, stream_));
  return ops::SynchronizeStream(stream_);
}

CudaGpt::~CudaGpt() {
  teacher_.reset();  // it runs on this model's stream (SetTeacher)
  if (opt_stream_ != nullptr) (void)ops::SynchronizeStream(opt_stream_);
  if (stream_ != nullptr) (void)ops::SynchronizeStream(stream_);
  for (cudaEvent_t e : events_) (void)ops::DestroyEvent(e);
  for (cudaEvent_t e : update_events_) (void)ops::DestroyEvent(e);
  if (grads_final_ != nullptr) (void)ops::DestroyEvent(grads_final_);
  for (cudaEvent_t e : ready_events_) {
    if (e != nullptr) (void)ops::DestroyEvent(e);
  }
  (void)FreeActivations();
  for (void* p : allocations_) (void)ops::DeviceFree(p);
  matmul_.reset();
  if (stream_ != nullptr && !stream_borrowed_) (void)ops::DestroyStream(stream_);
  if (opt_stream_ != nullptr) (void)ops::DestroyStream(opt_stream_);
}

absl::Status CudaGpt::WaitForUpdate(size_t index) {
  if (!update_pending_) return absl::OkStatus();
  return ops::StreamWaitEvent(stream_, update_events_[index]);
}

absl::Status CudaGpt::JoinUpdate() {
  if (!update_pending_) return absl::OkStatus();
  for (size_t i : update_order_) RETURN_IF_ERROR(ops::StreamWaitEvent(stream_, update_events_[i]));
  update_pending_ = false;
  return absl::OkStatus();
}

absl::Status CudaGpt::FreeActivations() {
  if (act_block_ != nullptr) {
    RETURN_IF_ERROR(ops::SynchronizeStream(stream_));
    RETURN_IF_ERROR(ops::DeviceFree(act_block_));
    allocated_bytes_ -= act_bytes_;
  }
  act_block_ = nullptr;
  act_bytes_ = 0;
  B_ = T_ = 0;
  acts_.clear();
  return absl::OkStatus();
}

absl::Status CudaGpt::EnsureActivations(int B, int T) {
  if (B == B_ && T == T_) return absl::OkStatus();
  RETURN_IF_ERROR(FreeActivations());
  const GptConfig& c = config_;
  const int64_t N = static_cast<int64_t>(B) * T, C = c.n_embd, Vt = c.table_rows(),
                NH = c.n_head, L = c.n_layer;
  ASSIGN_OR_RETURN(const int64_t enc_ws, ops::encoder_backward_cuda_workspace_bytes(B, T, c.vocab_size));
  const int n = static_cast<int>(N);
  const int64_t ln_ws = ops::layernorm_backward_cuda_workspace_bytes(n, c.n_embd);
  const int64_t mm_ws = std::max({ops::matmul_backward_cuda_workspace_bytes(n, 4 * c.n_embd),
                                  ops::matmul_backward_cuda_workspace_bytes(n, 3 * c.n_embd),
                                  ops::matmul_backward_cuda_workspace_bytes(n, c.n_embd)});
  const int64_t att_ws = ops::attention_backward_cuda_workspace_bytes(B, T, c.n_head);
  const int logits_rows = LogitsChunkRows(n);
  // The Linears' shared scratch for N tokens: sized for the widest input or output (4C).
  LinearScratch need;
  for (CudaLinear* lin : all_linears()) lin->AddScratchNeeds(N, &need);
  const int64_t wide = N * 4 * C;

  // Two passes over the same carving: count, then assign.
  // A layer whose fc writes mlp.proj's FP8 codes from its epilogue keeps no BF16 GELU output;
  // its MLP backward writes dGELU into one buffer that such layers share.
  bool any_fp8_gelu = false;
  for (Block& b : blocks_) any_fp8_gelu |= b.fc().WritesFp8GeluFor(b.mlp_proj());
  auto carve = [&](Carver& k) {
    acts_.assign(L, LayerActs{});
    bf16* shared_gelu = any_fp8_gelu ? k.Take<bf16>(N * 4 * C) : nullptr;
    for (int l = 0; l < L; ++l) {
      LayerActs& a = acts_[l];
      Block& blk = blocks_[l];
      a.ln1_mean = k.Take<float>(N);
      a.ln1_rstd = k.Take<float>(N);
      a.qkv = k.Take<bf16>(N * 3 * C);
      a.atty = k.Take<bf16>(N * C);
      a.lse = k.Take<float>(static_cast<int64_t>(B) * NH * T);
      a.res2 = k.Take<bf16>(N * C);
      a.ln2_mean = k.Take<float>(N);
      a.ln2_rstd = k.Take<float>(N);
      a.fch = k.Take<bf16>(N * 4 * C);
      a.fch_gelu = blk.fc().WritesFp8GeluFor(blk.mlp_proj()) ? shared_gelu
                                                              : k.Take<bf16>(N * 4 * C);
      a.res3 = k.Take<bf16>(N * C);
    }
    inputs_ = k.Take<int32_t>(N);
    targets_ = k.Take<int32_t>(N);
    encoded_ = k.Take<bf16>(N * C);
    ln_ = k.Take<bf16>(N * C);
    lnf_ = k.Take<bf16>(N * C);
    lnf_mean_ = k.Take<float>(N);
    lnf_rstd_ = k.Take<float>(N);
    losses_ = k.Take<float>(N);
    distill_losses_ = teacher_ ? k.Take<float>(N) : nullptr;
    // One region, two uses never live together: the LM head's logits (the student's and the
    // teacher's) exist only inside the training Forward's LM head, the FP8 backward scratch
    // (dy codes and their transpose, x^T, the block recipe's tile scales) only inside Backward
    // (and Logits(), which recomputes logits, is never called inside Backward).
    Carver head = k.At();
    logits_ = head.Take<bf16>(static_cast<int64_t>(logits_rows) * Vt);
    teacher_logits_ = teacher_ ? head.Take<bf16>(static_cast<int64_t>(logits_rows) * Vt) : nullptr;
    Carver fp8 = k.At();
    dy8_ = need.fp8 ? fp8.Take<uint8_t>(wide) : nullptr;
    dy8_t_ = need.fp8 ? fp8.Take<uint8_t>(wide) : nullptr;
    x8_t_ = need.fp8 ? fp8.Take<uint8_t>(wide) : nullptr;
    dy_sinv_ = need.fp8_block ? fp8.Take<float>(ops::fp8_num_blocks(4 * C) * N) : nullptr;
    dy_sinv_t_ = need.fp8_block ? fp8.Take<float>(ops::fp8_num_blocks(N) * 4 * C) : nullptr;
    k.Skip(std::max(head.used(), fp8.used()));
    dres_ = k.Take<bf16>(N * C);
    dln_ = k.Take<bf16>(N * C);
    datty_ = k.Take<bf16>(N * C);
    proj_out_ = datty_;
    dqkv_ = k.Take<bf16>(N * 3 * C);
    enc_ws_ = k.Take<char>(enc_ws);
    ln_ws_ = k.Take<char>(ln_ws);
    mm_ws_ = k.Take<char>(mm_ws);
    att_ws_ = k.Take<char>(att_ws);
    xq_ = need.xq ? k.Take<bf16>(wide) : nullptr;
    x_i8_ = need.int8 ? k.Take<int8_t>(wide) : nullptr;
    q_ws_ = need.q_ws_bytes > 0 ? k.Take<char>(need.q_ws_bytes) : nullptr;
    for (CudaLinear* lin : all_linears()) lin->CarveActivations(k, N);
  };
  Carver count(nullptr);
  carve(count);
  ASSIGN_OR_RETURN(act_block_, ops::DeviceMalloc(count.used()));
  act_bytes_ = count.used();
  allocated_bytes_ += act_bytes_;
  Carver assign(static_cast<char*>(act_block_));
  carve(assign);
  enc_ws_bytes_ = enc_ws;
  ln_ws_bytes_ = ln_ws;
  mm_ws_bytes_ = mm_ws;
  att_ws_bytes_ = att_ws;
  logits_rows_ = logits_rows;
  q_ws_bytes_ = need.q_ws_bytes;
  B_ = B;
  T_ = T;
  have_targets_ = false;
  return absl::OkStatus();
}

absl::Status CudaGpt::Mark(const char* op) {
  if (!profiling_) return absl::OkStatus();
  if (events_used_ == kMaxEvents) {
    // Pool full: fold what is recorded into the totals and keep the last event as the start.
    RETURN_IF_ERROR(Profile().status());
  }
  if (events_used_ == static_cast<int>(events_.size())) {
    ASSIGN_OR_RETURN(cudaEvent_t e, ops::CreateEvent());
    events_.push_back(e);
    event_ops_.emplace_back();
  }
  RETURN_IF_ERROR(ops::RecordEvent(events_[events_used_], stream_));
  event_ops_[events_used_] = op;
  ++events_used_;
  return absl::OkStatus();
}

absl::StatusOr<std::map<std::string, double>> CudaGpt::Profile() {
  if (events_used_ > 0) {
    RETURN_IF_ERROR(ops::SynchronizeStream(stream_));
    for (int i = 1; i < events_used_; ++i) {
      ASSIGN_OR_RETURN(const float ms, ops::ElapsedMs(events_[i - 1], events_[i]));
      profile_ms_[event_ops_[i]] += ms;
    }
    std::swap(events_[0], events_[events_used_ - 1]);
    event_ops_[0] = event_ops_[events_used_ - 1];
    events_used_ = 1;
  }
  return profile_ms_;
}

void CudaGpt::ResetProfile() {
  profile_ms_.clear();
  events_used_ = 0;
}

absl::Status CudaGpt::Upload(const ParamStore& params, const AdamW* opt) {
  if (params.num_elements() != num_params_) {
    return absl::InvalidArgumentError(absl::StrCat("CudaGpt::Upload: ", params.num_elements(),
                                                   " parameters, the model has ", num_params_));
  }
  RETURN_IF_ERROR(JoinUpdate());
  RETURN_IF_ERROR(gpu::CopyToDeviceAsync(params_, params.params().data(), num_params_ * 4, stream_));
  RETURN_IF_ERROR(gpu::Fp32ToBf16(params_bf16_, params_, num_params_, stream_));
  if (opt != nullptr) {
    RETURN_IF_ERROR(RequireTrainable("Upload of AdamW moments"));
    if (opt->sharded() || static_cast<int64_t>(opt->m().size()) != num_params_ ||
        static_cast<int64_t>(opt->v().size()) != num_params_) {
      return absl::UnimplementedError(
          "CudaGpt::Upload: the optimizer must own every parameter (ZeRO-1 shards are not "
          "implemented on CUDA)");
    }
    RETURN_IF_ERROR(gpu::CopyToDeviceAsync(m_, opt->m().data(), num_params_ * 4, stream_));
    RETURN_IF_ERROR(gpu::CopyToDeviceAsync(v_, opt->v().data(), num_params_ * 4, stream_));
  }
  // The Linears' non-trainable state, from the host model's buffers (checkpoint or init).
  RETURN_IF_ERROR(MapBuffers(params));
  std::vector<CudaLinear*> lins = all_linears();
  if (fp8_state_) {
    const int h = fp8_state_->history_len();
    std::vector<float> history(static_cast<size_t>(fp8_state_->num_tensors()) * h),
        scale(fp8_state_->num_tensors());
    for (size_t i = 0; i < lins.size(); ++i) {
      if (lins[i]->mode() != LinearMode::kFp8) continue;
      const int k = lins[i]->fp8_weight_index() - 1;  // x, W, dy from here
      const std::vector<float>& hb = params.buffer(linear_buffers_[i].fp8_history);
      const std::vector<float>& sb = params.buffer(linear_buffers_[i].fp8_scale);
      if (static_cast<int>(hb.size()) != 3 * h || sb.size() != 3) {
        return absl::InvalidArgumentError(absl::StrCat(
            "CudaGpt::Upload: ", lins[i]->name(), "'s FP8 buffers hold ", hb.size(), " and ",
            sb.size(), " values, expected ", 3 * h, " and 3"));
      }
      std::copy(hb.begin(), hb.end(), history.begin() + static_cast<int64_t>(k) * h);
      std::copy(sb.begin(), sb.end(), scale.begin() + k);
    }
    RETURN_IF_ERROR(ops::SynchronizeStream(stream_));
    RETURN_IF_ERROR(fp8_state_->Upload(history, scale));
  }
  for (size_t i = 0; i < lins.size(); ++i) {
    const LinearBuffers& lb = linear_buffers_[i];
    if (lb.quant_init >= 0) lins[i]->set_act_initialized(params.buffer(lb.quant_init)[1] != 0);
    if (lb.phi_rank >= 0) {
      lins[i]->set_phi_rank(static_cast<int>(params.buffer(lb.phi_rank)[0]));
      const std::vector<float>& gamma = params.buffer(lb.phi_gamma);
      RETURN_IF_ERROR(gpu::CopyToDeviceAsync(lins[i]->phi_gamma(), gamma.data(),
                                             static_cast<int64_t>(gamma.size()) * 4, stream_));
    }
  }
  RETURN_IF_ERROR(PrepareAllWeights());
  return ops::SynchronizeStream(stream_);
}

absl::Status CudaGpt::PrepareAllWeights() {
  const LinearContext lc = linear_context();
  for (CudaLinear* lin : all_linears()) {
    RETURN_IF_ERROR(lin->PrepareWeights(lc, stream_, CudaLinear::WeightsFrom::kAfterUpload));
  }
  return absl::OkStatus();
}

absl::Status CudaGpt::MapBuffers(const ParamStore& params) {
  if (!linear_buffers_.empty()) return absl::OkStatus();
  auto find = [&](const std::string& name) {
    for (int i = 0; i < params.num_buffers(); ++i) {
      if (params.buffer_name(i) == name) return i;
    }
    return -1;
  };
  std::vector<LinearBuffers> out;
  for (CudaLinear* lin : all_linears()) {
    LinearBuffers b;
    const std::string& n = lin->name();
    if (lin->mode() == LinearMode::kFp8) {
      b.fp8_history = find(n + ".fp8_amax_history");
      b.fp8_scale = find(n + ".fp8_scale");
      if (b.fp8_history < 0 || b.fp8_scale < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("CudaGpt: the host model lacks ", n, "'s FP8 scaling buffers"));
      }
    } else if (lin->mode() == LinearMode::kQat) {
      b.quant_init = find(n + ".quant_initialized");
      if (b.quant_init < 0 || params.buffer(b.quant_init).size() != 2) {
        return absl::InvalidArgumentError(
            absl::StrCat("CudaGpt: the host model lacks ", n, ".quant_initialized"));
      }
      if (lin->phi_rmax() > 0) {
        b.phi_rank = find(n + ".phi_rank");
        b.phi_gamma = find(n + ".phi_gamma");
        if (b.phi_rank < 0 || b.phi_gamma < 0 ||
            static_cast<int>(params.buffer(b.phi_gamma).size()) != lin->phi_rmax()) {
          return absl::InvalidArgumentError(
              absl::StrCat("CudaGpt: the host model lacks ", n, "'s Phi buffers"));
        }
      }
    }
    out.push_back(b);
  }
  linear_buffers_ = std::move(out);
  return absl::OkStatus();
}

std::vector<CudaLinear*> CudaGpt::all_linears() {
  std::vector<CudaLinear*> out;
  for (Block& b : blocks_) {
    for (CudaLinear& l : b.linears) out.push_back(&l);
  }
  return out;
}

absl::Status CudaGpt::Download(ParamStore* params, AdamW* opt) {
  if (params->num_elements() != num_params_) {
    return absl::InvalidArgumentError(absl::StrCat("CudaGpt::Download: ", params->num_elements(),
                                                   " parameters, the model has ", num_params_));
  }
  RETURN_IF_ERROR(JoinUpdate());
  RETURN_IF_ERROR(gpu::CopyToHostAsync(params->params().data(), params_, num_params_ * 4, stream_));
  if (opt != nullptr) {
    RETURN_IF_ERROR(RequireTrainable("Download of AdamW moments"));
    if (opt->sharded() || static_cast<int64_t>(opt->m().size()) != num_params_ ||
        static_cast<int64_t>(opt->v().size()) != num_params_) {
      return absl::UnimplementedError(
          "CudaGpt::Download: the optimizer must own every parameter (ZeRO-1 shards are not "
          "implemented on CUDA)");
    }
    RETURN_IF_ERROR(gpu::CopyToHostAsync(opt->m().data(), m_, num_params_ * 4, stream_));
    RETURN_IF_ERROR(gpu::CopyToHostAsync(opt->v().data(), v_, num_params_ * 4, stream_));
  }
  RETURN_IF_ERROR(ops::SynchronizeStream(stream_));
  // The Linears' non-trainable state into the host model's buffers (checkpoints).
  RETURN_IF_ERROR(MapBuffers(*params));
  std::vector<CudaLinear*> lins = all_linears();
  std::vector<float> history, scale;
  if (fp8_state_) RETURN_IF_ERROR(fp8_state_->Download(&history, &scale));
  const int h = fp8_state_ ? fp8_state_->history_len() : 0;
  for (size_t i = 0; i < lins.size(); ++i) {
    const LinearBuffers& lb = linear_buffers_[i];
    if (lins[i]->mode() == LinearMode::kFp8) {
      const int k = lins[i]->fp8_weight_index() - 1;
      std::vector<float>& hb = params->buffer(lb.fp8_history);
      std::vector<float>& sb = params->buffer(lb.fp8_scale);
      hb.assign(history.begin() + static_cast<int64_t>(k) * h,
                history.begin() + static_cast<int64_t>(k + 3) * h);
      sb.assign(scale.begin() + k, scale.begin() + k + 3);
    }
    if (lb.quant_init >= 0) {
      params->buffer(lb.quant_init)[0] = 1;
      params->buffer(lb.quant_init)[1] = lins[i]->act_initialized() ? 1 : 0;
    }
    if (lb.phi_rank >= 0) {
      params->buffer(lb.phi_rank)[0] = static_cast<float>(lins[i]->phi_rank());
      std::vector<float>& gamma = params->buffer(lb.phi_gamma);
      RETURN_IF_ERROR(gpu::CopyToHostAsync(gamma.data(), lins[i]->phi_gamma(),
                                           static_cast<int64_t>(gamma.size()) * 4, stream_));
    }
  }
  return ops::SynchronizeStream(stream_);
}

absl::Status CudaGpt::DownloadGrads(std::vector<float>* grads) {
  RETURN_IF_ERROR(RequireTrainable("DownloadGrads"));
  RETURN_IF_ERROR(JoinUpdate());
  RETURN_IF_ERROR(FlushZeroGrads());
  RETURN_IF_ERROR(FinishGradients());
  grads->resize(num_params_);
  if (grad_dtype_ == GradDtype::kFp32) {
    RETURN_IF_ERROR(gpu::CopyToHostAsync(grads->data(), grads_, num_params_ * 4, stream_));
    return ops::SynchronizeStream(stream_);
  }
  std::vector<bf16> g16(num_params_);
  RETURN_IF_ERROR(gpu::CopyToHostAsync(g16.data(), grads_, num_params_ * 2, stream_));
  RETURN_IF_ERROR(ops::SynchronizeStream(stream_));
  for (int64_t i = 0; i < num_params_; ++i) (*grads)[i] = ops::Bf16ToFloat(g16[i]);
  return absl::OkStatus();
}

void CudaGpt::set_deterministic(bool on) {
  deterministic_ = on;
  matmul_->set_autotune(autotune_ && !deterministic_);
  if (teacher_) teacher_->set_deterministic(on);
}

void CudaGpt::set_autotune(bool on) {
  autotune_ = on;
  matmul_->set_autotune(autotune_ && !deterministic_);
}

absl::Status CudaGpt::set_lm_head_chunks(int chunks) {
  if (chunks < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CudaGpt: lm_head_chunks must be >= 0, got ", chunks));
  }
  if (std::max(chunks, 1) == lm_head_chunks_) return absl::OkStatus();
  lm_head_chunks_ = std::max(chunks, 1);
  return FreeActivations();  // the next Forward sizes the logits buffer anew
}

int CudaGpt::LogitsChunkRows(int N) const {
  // Equal chunks, rounded up to a multiple of 64 rows for the GEMMs when that is possible.
  const int rows = (N + lm_head_chunks_ - 1) / lm_head_chunks_;
  return std::min(N, N >= 64 * lm_head_chunks_ ? (rows + 63) / 64 * 64 : rows);
}

absl::StatusOr<double> CudaGpt::Forward(const int32_t* inputs, const int32_t* targets, int B,
                                        int T, float backward_scale) {
  const GptConfig& c = config_;
  have_targets_ = false;  // also when this call fails: Backward then refuses
  if (B <= 0 || T <= 0 || T > c.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("batch shape B=", B, " T=", T,
                                                   " must be positive with T <= max_seq_len ",
                                                   c.max_seq_len));
  }
  if (backward_scale > 0.f) RETURN_IF_ERROR(RequireTrainable("a training Forward"));
  if (!(backward_scale >= 0.f) || (backward_scale > 0.f && targets == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CudaGpt::Forward: backward_scale ", backward_scale,
        " must be 0 (no Backward follows) or positive with targets"));
  }
  const int64_t N64 = static_cast<int64_t>(B) * T;
  if (N64 > (1 << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("batch B*T=", N64, " is too large"));
  }
  const int N = static_cast<int>(N64), C = c.n_embd, V = c.vocab_size, NH = c.n_head;
  // Bad tokens would read outside the embedding (the kernels make them NaN); name them here.
  for (int i = 0; i < N; ++i) {
    if (inputs[i] < 0 || inputs[i] >= V || (targets && (targets[i] < 0 || targets[i] >= V))) {
      return absl::InvalidArgumentError(absl::StrCat("token at position ", i,
                                                     " is outside the vocabulary [0, ", V, ")"));
    }
  }
  RETURN_IF_ERROR(EnsureActivations(B, T));
  if (phi_weights_stale_) {
    // A Forward after an Update without ApplyRankSchedule (an evaluation): the Phi Linears'
    // W_eff from the updated masters and the current gamma, as the CPU model's forward forms it.
    RETURN_IF_ERROR(JoinUpdate());
    const LinearContext lc = linear_context();
    for (CudaLinear* lin : all_linears()) {
      if (lin->phi_rmax() == 0) continue;
      RETURN_IF_ERROR(lin->PrepareWeights(lc, stream_, CudaLinear::WeightsFrom::kAfterUpdate));
    }
    phi_weights_stale_ = false;
  }
  // The embeddings and the final layernorm (updated first) before anything; each block's
  // weights right before the block.
  for (size_t i = blocks_.size(); i < grad_ranges_.size(); ++i) RETURN_IF_ERROR(WaitForUpdate(i));
  RETURN_IF_ERROR(Mark("(host)"));
  RETURN_IF_ERROR(gpu::CopyToDeviceAsync(inputs_, inputs, N64 * 4, stream_));
  if (targets != nullptr) {
    RETURN_IF_ERROR(gpu::CopyToDeviceAsync(targets_, targets, N64 * 4, stream_));
  }
  RETURN_IF_ERROR(Mark("copy tokens"));
  RETURN_IF_ERROR(ops::encoder_forward_cuda(encoded_, inputs_, W(wte_), W(wpe_), B, T, C, V,
                                            stream_));
  RETURN_IF_ERROR(Mark("fwd encoder"));
  const LinearContext lc = linear_context();
  // Quantizer state advances (FP8 amaxes recorded, first-batch activation steps) only in a
  // training forward.
  const bool training = targets != nullptr && backward_scale > 0.f;
  if (teacher_ && training) {
    // The teacher's forward, queued on this model's stream (SetTeacher) before the student's,
    // so the LM head below reads its final hidden states in stream order.
    RETURN_IF_ERROR(teacher_->Forward(inputs, nullptr, B, T, 0.f).status());
    RETURN_IF_ERROR(Mark("(teacher forward queued)"));
  }
  for (int l = 0; l < c.n_layer; ++l) {
    Block& b = blocks_[l];
    LayerActs& a = acts_[l];
    const bf16* x = l > 0 ? acts_[l - 1].res3 : encoded_;
    RETURN_IF_ERROR(WaitForUpdate(l));
    // ln1 feeds qkv; past block 0 it is fused with the previous block's MLP residual.
    LayernormArgs ln1{nullptr, encoded_, nullptr, W(b.ln1w), W(b.ln1b), a.ln1_mean, a.ln1_rstd, C};
    if (l > 0) {
      const LayerActs& p = acts_[l - 1];
      ln1.residual = p.res3;
      ln1.a = p.res2;
      ln1.b = proj_out_;
    }
    RETURN_IF_ERROR(b.qkv().InputFromLayernorm(lc, ln1, training));
    RETURN_IF_ERROR(Mark("fwd layernorm"));
    RETURN_IF_ERROR(b.qkv().Forward(lc, a.qkv, training));
    RETURN_IF_ERROR(Mark("fwd matmul qkv"));
    RETURN_IF_ERROR(ops::attention_forward_cuda(a.atty, a.lse, a.qkv, B, T, C, NH, stream_,
                                                ops::AttentionKernel::kAuto, deterministic_));
    RETURN_IF_ERROR(Mark("fwd attention"));
    RETURN_IF_ERROR(b.attn_proj().InputFromTensor(lc, a.atty, training));
    RETURN_IF_ERROR(b.attn_proj().Forward(lc, proj_out_, training, nullptr, nullptr, a.atty));
    RETURN_IF_ERROR(Mark("fwd matmul attn.proj"));
    const LayernormArgs ln2{a.res2, x, proj_out_, W(b.ln2w), W(b.ln2b), a.ln2_mean, a.ln2_rstd, C};
    RETURN_IF_ERROR(b.fc().InputFromLayernorm(lc, ln2, training));
    RETURN_IF_ERROR(Mark("fwd layernorm"));
    // fc's GELU output is written as mlp.proj's input.
    RETURN_IF_ERROR(b.fc().Forward(lc, a.fch_gelu, training, &b.mlp_proj(), a.fch));
    RETURN_IF_ERROR(Mark("fwd matmul fc+gelu"));
    RETURN_IF_ERROR(b.mlp_proj().Forward(lc, proj_out_, training, nullptr, nullptr, a.fch_gelu));
    RETURN_IF_ERROR(Mark("fwd matmul mlp.proj"));
  }
  update_pending_ = false;  // stream_ has waited for every range
  const LayerActs& last = acts_.back();
  RETURN_IF_ERROR(ops::residual_layernorm_forward_cuda(last.res3, lnf_, lnf_mean_, lnf_rstd_,
                                                       last.res2, proj_out_, W(lnfw_), W(lnfb_),
                                                       N, C, stream_));
  RETURN_IF_ERROR(Mark("fwd layernorm"));
  const bool stats = block_stats_on_ && training;
  if (stats) {
    // The TWEO term's tau, p, eps (its defaults when TWEO is off: the peaks and kurtoses are
    // what the statistics are for then).
    const TweoOptions& tw = c.tweo;
    for (int l = 0; l < c.n_layer; ++l) {
      RETURN_IF_ERROR(ops::block_output_stats_cuda(
          stats_dev_ + static_cast<int64_t>(l) * ops::kNumBlockOutputStats, acts_[l].res3, N64 * C,
          tw.tau, tw.p, tw.eps, stats_ws_, ops::block_output_stats_cuda_workspace_bytes(),
          stream_));
    }
    RETURN_IF_ERROR(Mark("fwd block-output stats"));
  }
  if (targets == nullptr) return 0.0;
  if (backward_scale > 0.f) {
    // The gradients are written from here on; a pending ZeroGrads makes the first writes
    // overwrite. Every parameter gradient is then written once before anything adds to it,
    // except wpe's (the encoder adds into it): only wpe needs clearing.
    backward_gw_ = zero_pending_ ? ops::GradWrite::kOverwrite : ops::GradWrite::kAccumulate;
    if (zero_pending_) {
      RETURN_IF_ERROR(gpu::MemsetAsync(static_cast<char*>(grads_) + wpe_ * grad_bytes(), 0,
                                       static_cast<int64_t>(c.max_seq_len) * C * grad_bytes(),
                                       stream_));
      zero_pending_ = false;
    }
  }
  RETURN_IF_ERROR(OnGrads([&](auto* g) { return LmHead(g, backward_scale); }));
  double loss = 0;
  RETURN_IF_ERROR(gpu::CopyToHostAsync(&loss, &scalars_[0], sizeof(double), stream_));
  const bool distilled = teacher_ && backward_scale > 0.f;
  if (distilled) {
    RETURN_IF_ERROR(gpu::CopyToHostAsync(&distill_host_, &scalars_[2], sizeof(double), stream_));
  }
  if (stats) {
    RETURN_IF_ERROR(gpu::CopyToHostAsync(stats_host_.data(), stats_dev_,
                                         stats_host_.size() * sizeof(double), stream_));
  }
  RETURN_IF_ERROR(ops::SynchronizeStream(stream_));
  if (stats) {
    stats_valid_ = true;
    stats_n_ = N64 * C;
  }
  RETURN_IF_ERROR(Mark("(host)"));
  have_targets_ = backward_scale > 0.f;
  backward_scale_ = backward_scale;
  return loss;
}

template <typename G>
absl::Status CudaGpt::LmHead(G* grads, float backward_scale) {
  const int N = B_ * T_, C = config_.n_embd, V = config_.vocab_size;
  // Training: dln_ receives d lnf (written over), wte's gradient its LM-head term.
  const bool train = backward_scale > 0.f;
  ops::LmHeadExtras extras;
  extras.table_rows = config_.table_rows();
  const bool distill = teacher_ && train;
  if (distill) {
    extras.teacher_x = teacher_->lnf_;
    extras.teacher_wte = teacher_->W(teacher_->wte_);
    extras.teacher_logits = teacher_logits_;
    extras.distill = distill_kind_;
    extras.distill_weight = distill_weight_;
    extras.distill_losses = distill_losses_;
    extras.mean_distill = &scalars_[2];
  }
  RETURN_IF_ERROR(ops::lm_head_crossentropy_chunked_cuda(
      *matmul_, losses_, &scalars_[0], logits_, logits_rows_, train ? dln_ : nullptr,
      train ? grads + wte_ : nullptr, lnf_, W(wte_), targets_, N, C, V,
      train ? backward_scale : 1.f, stream_, backward_gw_, ops::GradWrite::kOverwrite, extras));
  if (distill) return Mark("fwd+bwd lm_head+crossentropy+distill (teacher's logits)");
  return Mark(train ? "fwd+bwd lm_head+crossentropy" : "fwd lm_head+crossentropy");
}

absl::Status CudaGpt::SetTeacher(std::unique_ptr<DeviceModel> teacher, ops::DistillLoss loss,
                                 float weight) {
  auto* t = dynamic_cast<CudaGpt*>(teacher.get());
  if (t == nullptr) {
    return absl::InvalidArgumentError("CudaGpt::SetTeacher: the teacher must be a CUDA model");
  }
  const GptConfig& a = config_;
  const GptConfig& b = t->config_;
  if (a.n_embd != b.n_embd || a.vocab_size != b.vocab_size || a.table_rows() != b.table_rows() ||
      a.max_seq_len != b.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "precision.distill.teacher_checkpoint: the teacher (n_embd ", b.n_embd, ", vocab ",
        b.vocab_size, "/", b.table_rows(), ", max_seq_len ", b.max_seq_len,
        ") does not fit the student (n_embd ", a.n_embd, ", vocab ", a.vocab_size, "/",
        a.table_rows(), ", max_seq_len ", a.max_seq_len, ")"));
  }
  if (!(weight >= 0.f) || !std::isfinite(weight)) {
    return absl::InvalidArgumentError(
        absl::StrCat("precision.distill.weight must be finite and >= 0, got ", weight));
  }
  // The teacher runs on this model's stream, in order with it: the cuDNN attention's state
  // (handle, workspace) is one per process, and two models using it from two streams at once
  // race on its workspace (124M distillation runs diverged with the teacher on its own stream).
  RETURN_IF_ERROR(ops::SynchronizeStream(t->stream_));
  if (!t->stream_borrowed_) RETURN_IF_ERROR(ops::DestroyStream(t->stream_));
  t->stream_ = stream_;
  t->stream_borrowed_ = true;
  RETURN_IF_ERROR(FreeActivations());  // the next batch carves the teacher's logits too
  t->set_deterministic(deterministic_);
  t->set_block_stats(false);
  RETURN_IF_ERROR(t->set_lm_head_chunks(lm_head_chunks_));
  teacher.release();
  teacher_.reset(t);
  distill_kind_ = loss;
  distill_weight_ = weight;
  return absl::OkStatus();
}

absl::Status CudaGpt::Backward(float loss_scale) {
  if (!have_targets_) {
    return absl::FailedPreconditionError(
        "CudaGpt::Backward needs a training Forward (targets, backward_scale > 0) right before "
        "it (and only one Backward per Forward)");
  }
  have_targets_ = false;
  if (loss_scale != backward_scale_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "CudaGpt::Backward: loss_scale ", loss_scale, " differs from the backward_scale ",
        backward_scale_, " the Forward was given (the LM head's backward ran with it)"));
  }
  RETURN_IF_ERROR(JoinUpdate());
  RETURN_IF_ERROR(Mark("(host)"));
  return OnGrads([&](auto* g) { return BackwardBlocks(g); });
}

template <typename G>
absl::Status CudaGpt::BackwardBlocks(G* grads) {
  const GptConfig& c = config_;
  const int B = B_, T = T_, N = B * T, C = c.n_embd, V = c.vocab_size, NH = c.n_head;
  const int64_t NC = static_cast<int64_t>(N) * C;
  const LinearContext lc = linear_context();
  const ops::GradWrite gw = backward_gw_;
  auto g = [grads](int64_t off) { return grads + off; };
  // dln_ holds d lnf from the LM head. dres_ carries d loss / d residual stream down through
  // the blocks. Activation gradients with one consumer are written over, not accumulated, so
  // their buffers need no clearing.
  RETURN_IF_ERROR(gpu::MemsetAsync(dres_, 0, NC * 2, stream_));
  // The TWEO term joins the residual gradient in the layernorm backwards whose input is a
  // block output: the final one here, each block's first below (block 0's reads the
  // embeddings).
  const ops::TweoGradTerm tweo = TweoTerm();
  RETURN_IF_ERROR(ops::layernorm_backward_cuda(dres_, g(lnfw_), g(lnfb_), dln_, acts_.back().res3,
                                               W(lnfw_), W(lnfb_), lnf_mean_, lnf_rstd_, N, C,
                                               ln_ws_, ln_ws_bytes_, stream_, gw, nullptr, tweo));
  RETURN_IF_ERROR(Mark("bwd layernorm"));
  for (int l = c.n_layer - 1; l >= 0; --l) {
    Block& b = blocks_[l];
    const LayerActs& a = acts_[l];
    const bf16* x = l > 0 ? acts_[l - 1].res3 : encoded_;
    // MLP branch: res3 = res2 + proj(gelu(fc(ln2(res2)))). The proj's weight gradient first
    // (it reads the GELU output), then its dinp through the GELU (and mlp.proj's input
    // quantizer), written over the GELU output (whose only reader is done).
    bf16* dfch = a.fch_gelu;
    RETURN_IF_ERROR(b.mlp_proj().BeginBackward(lc, dres_, true));
    RETURN_IF_ERROR(b.mlp_proj().BackwardWeight(lc, grads, dres_, a.fch_gelu, gw));
    RETURN_IF_ERROR(b.mlp_proj().BackwardData(lc, dfch, dres_, grads, a.fch, gw));
    RETURN_IF_ERROR(Mark("bwd matmul mlp.proj+dgelu"));
    // fc: dinp, then ln2's backward (recomputing ln2's output where fc's weight gradient reads
    // it), then fc's weight gradient.
    RETURN_IF_ERROR(b.fc().BeginBackward(lc, dfch, true));
    RETURN_IF_ERROR(b.fc().BackwardData(lc, dln_, dfch, grads, nullptr, gw));
    RETURN_IF_ERROR(Mark("bwd matmul fc"));
    LayernormBackwardArgs<G> ln2{dres_, g(b.ln2w), g(b.ln2b), dln_, a.res2, W(b.ln2w), W(b.ln2b),
                                 a.ln2_mean, a.ln2_rstd, C, ln_ws_, ln_ws_bytes_, gw, {}};
    RETURN_IF_ERROR(b.fc().InputBackwardLayernorm(lc, grads, ln2));
    RETURN_IF_ERROR(Mark("bwd layernorm"));
    RETURN_IF_ERROR(b.fc().BackwardWeight(lc, grads, dfch, nullptr, gw));
    RETURN_IF_ERROR(Mark("bwd matmul fc"));
    // Attention branch: res2 = x + proj(attn(qkv(ln1(x)))).
    RETURN_IF_ERROR(b.attn_proj().BeginBackward(lc, dres_, true));
    RETURN_IF_ERROR(b.attn_proj().BackwardData(lc, datty_, dres_, grads, nullptr, gw));
    RETURN_IF_ERROR(b.attn_proj().InputBackwardTensor(lc, grads, datty_, a.atty, gw));
    RETURN_IF_ERROR(b.attn_proj().BackwardWeight(lc, grads, dres_, a.atty, gw));
    RETURN_IF_ERROR(Mark("bwd matmul attn.proj"));
    RETURN_IF_ERROR(ops::attention_backward_cuda(
        dqkv_, datty_, a.qkv, a.atty, a.lse, B, T, C, NH, att_ws_, att_ws_bytes_, stream_,
        ops::AttentionKernel::kAuto, ops::GradWrite::kOverwrite, deterministic_));
    RETURN_IF_ERROR(Mark("bwd attention"));
    RETURN_IF_ERROR(b.qkv().BeginBackward(lc, dqkv_, true));
    RETURN_IF_ERROR(b.qkv().BackwardData(lc, dln_, dqkv_, grads, nullptr, gw));
    RETURN_IF_ERROR(Mark("bwd matmul qkv"));
    LayernormBackwardArgs<G> ln1{dres_, g(b.ln1w), g(b.ln1b), dln_, x, W(b.ln1w), W(b.ln1b),
                                 a.ln1_mean, a.ln1_rstd, C, ln_ws_, ln_ws_bytes_, gw,
                                 l > 0 ? tweo : ops::TweoGradTerm{}};
    RETURN_IF_ERROR(b.qkv().InputBackwardLayernorm(lc, grads, ln1));
    RETURN_IF_ERROR(Mark("bwd layernorm"));
    RETURN_IF_ERROR(b.qkv().BackwardWeight(lc, grads, dqkv_, nullptr, gw));
    RETURN_IF_ERROR(Mark("bwd matmul qkv"));
    // Nothing later in this backward touches block l's gradients.
    RETURN_IF_ERROR(GradientsReady(l));
  }
  RETURN_IF_ERROR(ops::encoder_backward_cuda(g(wte_), g(wpe_), dres_, inputs_, B, T, C, V,
                                             enc_ws_, enc_ws_bytes_, stream_));
  RETURN_IF_ERROR(Mark("bwd encoder"));
  // wte's gradient is finished only by the encoder (its second term), so the embeddings and the
  // final layernorm are reported together at the end.
  for (size_t i = blocks_.size(); i < grad_ranges_.size(); ++i) {
    RETURN_IF_ERROR(GradientsReady(i));
  }
  grads_unfinished_ = true;
  return absl::OkStatus();
}

ops::TweoGradTerm CudaGpt::TweoTerm() const {
  const TweoOptions& tw = config_.tweo;
  if (!tw.enabled) return {};
  return ops::TweoGradTerm::Make(static_cast<double>(backward_scale_) * tw.lambda / config_.n_layer,
                                 tw.tau, tw.p, tw.eps,
                                 static_cast<int64_t>(B_) * T_ * config_.n_embd);
}

absl::StatusOr<DeviceModel::OutputStats> CudaGpt::output_stats() const {
  if (!stats_valid_) {
    return absl::FailedPreconditionError(
        "CudaGpt::output_stats: no training Forward computed them (set_block_stats(true) first)");
  }
  OutputStats out;
  const int64_t n = stats_n_;
  double tweo_sum = 0;
  for (int l = 0; l < config_.n_layer; ++l) {
    const ops::BlockOutputSummary s = ops::SummarizeBlockOutputStats(
        stats_host_.data() + static_cast<size_t>(l) * ops::kNumBlockOutputStats, n);
    tweo_sum += s.tweo;
    out.blocks.push_back({s.peak, s.kurtosis});
  }
  if (config_.tweo.enabled) out.tweo_loss = tweo_sum * config_.tweo.lambda / config_.n_layer;
  return out;
}

LinearContext CudaGpt::linear_context() const {
  LinearContext lc;
  lc.mm = matmul_.get();
  lc.fp8 = fp8_mm_.get();
  lc.int8 = int8_mm_.get();
  lc.phi = phi_ctx_.get();
  lc.scaling = fp8_state_.get();
  lc.stream = stream_;
  lc.params = params_;
  lc.params_bf16 = params_bf16_;
  lc.mm_ws = mm_ws_;
  lc.mm_ws_bytes = mm_ws_bytes_;
  lc.N = B_ * T_;
  lc.ln = ln_;
  lc.xq = xq_;
  lc.dy8 = dy8_;
  lc.dy8_t = dy8_t_;
  lc.x8_t = x8_t_;
  lc.dy_sinv = dy_sinv_;
  lc.dy_sinv_t = dy_sinv_t_;
  lc.x_i8 = x_i8_;
  lc.q_ws = q_ws_;
  lc.q_ws_bytes = q_ws_bytes_;
  lc.phi_ws = phi_ws_;
  lc.aux_ws = aux_ws_;
  lc.aux_ws_bytes = aux_ws_bytes_;
  if (profiling_) {
    CudaGpt* self = const_cast<CudaGpt*>(this);
    lc.mark = [self](const char* op) { return self->Mark(op); };
  }
  return lc;
}

absl::Status CudaGpt::FinishGradients() {
  if (!grads_unfinished_) return absl::OkStatus();
  grads_unfinished_ = false;
  const LinearContext lc = linear_context();
  RETURN_IF_ERROR(OnGrads([&](auto* g) -> absl::Status {
    for (CudaLinear* lin : all_linears()) RETURN_IF_ERROR(lin->FinishGradients(lc, g, stream_));
    return absl::OkStatus();
  }));
  return Mark("finish gradients (QAT)");
}

absl::Status CudaGpt::InitPhi() {
  if (!phi_ctx_) return absl::OkStatus();
  RETURN_IF_ERROR(JoinUpdate());
  const LinearContext lc = linear_context();
  for (CudaLinear* lin : all_linears()) {
    const int rmax = lin->phi_rmax();
    if (rmax == 0) continue;
    const int OC = lin->out_features(), C = lin->in_features();
    // Phi starts as the best rank-r approximation of the quantization error W - Q(W).
    RETURN_IF_ERROR(lin->RoundStepsFp16(lc, stream_));
    RETURN_IF_ERROR(ops::lsq_weight_forward_cuda(nullptr, nullptr, phi_ws_,
                                                 P(lin->weight_offset()), lin->WSteps(lc),
                                                 lin->WZeros(lc), nullptr, OC, C,
                                                 lin->weight_lsq_config(), stream_));
    RETURN_IF_ERROR(ops::phi_factorize_cuda(*phi_ctx_, P(lin->phi_l_offset()),
                                            P(lin->phi_r_offset()), phi_ws_, OC, C, rmax, rmax,
                                            stream_));
    for (int64_t off : {lin->phi_l_offset(), lin->phi_r_offset()}) {
      RETURN_IF_ERROR(gpu::Fp32ToBf16(params_bf16_ + off, P(off), static_cast<int64_t>(rmax) *
                                      (off == lin->phi_l_offset() ? OC : C), stream_));
    }
    lin->set_phi_rank(rmax);
    RETURN_IF_ERROR(ops::phi_gamma_cuda(lin->phi_gamma(), rmax, rmax, 1.0f, stream_));
    RETURN_IF_ERROR(lin->PrepareWeights(lc, stream_, CudaLinear::WeightsFrom::kAfterUpdate));
  }
  return ops::SynchronizeStream(stream_);
}

absl::Status CudaGpt::ApplyRankSchedule(int step) {
  if (!phi_ctx_) return absl::OkStatus();
  schedule_driven_ = true;
  RETURN_IF_ERROR(JoinUpdate());  // the re-factorisation and W_eff read the updated masters
  const LinearContext lc = linear_context();
  for (CudaLinear* lin : all_linears()) {
    const int rmax = lin->phi_rmax();
    if (rmax == 0) continue;
    const int OC = lin->out_features(), C = lin->in_features();
    const int64_t l_off = lin->phi_l_offset(), r_off = lin->phi_r_offset();
    const int64_t l_n = static_cast<int64_t>(OC) * rmax, r_n = static_cast<int64_t>(rmax) * C;
    const PhiSchedule sched = PhiScheduleAt(lin->options().phi, rmax, step);
    int k = lin->phi_rank();
    while (sched.active && k > sched.target_rank) {
      // The period's end: the bottom half goes; the kept top half is re-factorised at its rank,
      // and its optimizer moments start afresh (Linear::ApplyRankSchedule's `reset`).
      const int keep = k / 2;
      if (keep == 0) {
        RETURN_IF_ERROR(gpu::MemsetAsync(P(l_off), 0, l_n * 4, stream_));
        RETURN_IF_ERROR(gpu::MemsetAsync(P(r_off), 0, r_n * 4, stream_));
      } else {
        RETURN_IF_ERROR(ops::phi_refactorize_cuda(*phi_ctx_, P(l_off), P(r_off), OC, C, rmax,
                                                  keep, keep, stream_));
      }
      RETURN_IF_ERROR(gpu::Fp32ToBf16(params_bf16_ + l_off, P(l_off), l_n, stream_));
      RETURN_IF_ERROR(gpu::Fp32ToBf16(params_bf16_ + r_off, P(r_off), r_n, stream_));
      for (float* mom : {m_, v_}) {
        if (mom == nullptr) continue;  // forward-only: no moments
        RETURN_IF_ERROR(gpu::MemsetAsync(mom + l_off, 0, l_n * 4, stream_));
        RETURN_IF_ERROR(gpu::MemsetAsync(mom + r_off, 0, r_n * 4, stream_));
      }
      k = keep;
    }
    lin->set_phi_rank(k);
    RETURN_IF_ERROR(ops::phi_gamma_cuda(lin->phi_gamma(), rmax, k, sched.active ? sched.u : 1.0f,
                                        stream_));
    // This step's W_eff = Q(W) + L diag(gamma) R.
    RETURN_IF_ERROR(lin->PrepareWeights(lc, stream_, CudaLinear::WeightsFrom::kAfterUpdate));
  }
  phi_weights_stale_ = false;
  return Mark("rank schedule");
}

std::vector<int> CudaGpt::phi_ranks() const {
  std::vector<int> out;
  for (const Block& b : blocks_) {
    int r = 0;
    for (const CudaLinear& l : b.linears) r = std::max(r, l.phi_rank());
    out.push_back(r);
  }
  return out;
}

int64_t CudaGpt::fp8_gemm_calls() const {
  return fp8_mm_ ? fp8_mm_->cublaslt_calls() + fp8_mm_->own_kernel_calls() : 0;
}

float* CudaGpt::device_fp8_amax(int64_t* count) {
  if (!fp8_state_ || !fp8_delayed_) {
    *count = 0;
    return nullptr;
  }
  *count = fp8_state_->num_tensors();
  return fp8_state_->amax();
}

absl::Status CudaGpt::GradientsReady(size_t index) {
  if (!grad_ready_hook_) return absl::OkStatus();
  cudaEvent_t& event = ready_events_[index];
  if (event == nullptr) {
    ASSIGN_OR_RETURN(event, ops::CreateEvent());
  }
  RETURN_IF_ERROR(ops::RecordEvent(event, stream_));
  const GradRange& r = grad_ranges_[index];
  return grad_ready_hook_(r.begin, r.end, event);
}

absl::Status CudaGpt::RequireTrainable(const char* op) const {
  if (!forward_only_) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "CudaGpt: ", op, " on a forward-only model (CreateCudaModelForwardOnly: no gradients or "
      "optimizer state)"));
}

absl::Status CudaGpt::ZeroGrads() {
  zero_pending_ = true;
  return absl::OkStatus();
}

absl::Status CudaGpt::FlushZeroGrads() {
  if (!zero_pending_ || forward_only_) return absl::OkStatus();
  RETURN_IF_ERROR(JoinUpdate());  // the update reads the gradients
  zero_pending_ = false;
  RETURN_IF_ERROR(Mark("(host)"));
  RETURN_IF_ERROR(gpu::MemsetAsync(grads_, 0, num_params_ * grad_bytes(), stream_));
  return Mark("zero grads");
}

void* CudaGpt::device_grads() {
  absl::Status s = JoinUpdate();
  if (s.ok()) s = FlushZeroGrads();
  if (!s.ok()) std::fprintf(stderr, "CudaGpt::device_grads: clearing the gradients: %s\n",
                            s.ToString().c_str());
  return grads_;
}

absl::StatusOr<double> CudaGpt::GradSumSquares() {
  RETURN_IF_ERROR(RequireTrainable("GradSumSquares"));
  RETURN_IF_ERROR(JoinUpdate());
  RETURN_IF_ERROR(FlushZeroGrads());
  RETURN_IF_ERROR(FinishGradients());
  RETURN_IF_ERROR(Mark("(host)"));
  RETURN_IF_ERROR(OnGrads([&](const auto* g) {
    return ops::sum_squares_cuda(&scalars_[1], g, num_params_, norm_ws_, norm_ws_bytes_,
                                 stream_);
  }));
  double sum = 0;
  RETURN_IF_ERROR(gpu::CopyToHostAsync(&sum, &scalars_[1], sizeof(double), stream_));
  RETURN_IF_ERROR(ops::SynchronizeStream(stream_));
  RETURN_IF_ERROR(Mark("grad sum of squares"));
  return sum;
}

absl::Status CudaGpt::Update(float lr, double grad_norm, const AdamWConfig& config, int t) {
  RETURN_IF_ERROR(RequireTrainable("Update"));
  if (t < 1) return absl::InvalidArgumentError(absl::StrCat("CudaGpt::Update: step t=", t, " < 1"));
  RETURN_IF_ERROR(JoinUpdate());
  RETURN_IF_ERROR(FlushZeroGrads());
  RETURN_IF_ERROR(FinishGradients());
  RETURN_IF_ERROR(Mark("(host)"));
  // The clip factor exactly as ops::clip_by_global_norm forms it (double, rounded to float);
  // the AdamW kernel multiplies each gradient by it as the CPU's clipped gradient is.
  const float* scale = nullptr;
  if (config.grad_clip > 0) {
    const float factor =
        static_cast<float>(std::min(1.0, static_cast<double>(config.grad_clip) / (grad_norm + 1e-6)));
    if (factor != 1.0f) {
      clip_host_ = factor;
      RETURN_IF_ERROR(gpu::CopyToDeviceAsync(clip_factor_, &clip_host_, sizeof(float), stream_));
      scale = clip_factor_;
    }
  }
  // Range by range on opt_stream_ behind the gradients (see update_events_); weight decay on
  // the runs whose flag is set. Profiling keeps it on stream_, where its time is measured.
  const bool overlap = !profiling_;
  cudaStream_t s = stream_;
  if (overlap) {
    RETURN_IF_ERROR(ops::RecordEvent(grads_final_, stream_));
    RETURN_IF_ERROR(ops::StreamWaitEvent(opt_stream_, grads_final_));
    s = opt_stream_;
  }
  // FP8 delayed scaling: this step's amaxes (of x and dy, and of W from the last update) roll
  // into the histories before AdamW writes the next weights' codes with the fresh scales. The
  // next forward waits for an update range before anything, so it sees the new scales.
  if (fp8_delayed_) RETURN_IF_ERROR(ops::fp8_delayed_update_cuda(*fp8_state_, 0, -1, s));
  const LinearContext lc = linear_context();
  for (size_t i : update_order_) {
    const ops::AdamwPlan& plan = *adamw_plans_[i];
    RETURN_IF_ERROR(OnGrads([&](const auto* g) {
      if (plan.num_fp8_segments() > 0) {
        // Delayed: the codes with the rolled scales; current: only W's amax (the codes follow
        // in PrepareWeights from this step's scale).
        return ops::adamw_update_multi_fp8_cuda(
            plan, params_, params_bf16_, g, m_, v_, lr, config.beta1, config.beta2, config.eps,
            config.weight_decay, t, scale, fp8_delayed_ ? fp8_state_->scale() : nullptr,
            fp8_state_->amax(), s);
      }
      return ops::adamw_update_multi_cuda(plan, params_, params_bf16_, g, m_, v_, lr,
                                          config.beta1, config.beta2, config.eps,
                                          config.weight_decay, t, scale, s);
    }));
    // The forward weights of the range's Linears (Phi's W_eff waits for the step's gamma when
    // the rank schedule drives it).
    if (i < blocks_.size()) {
      for (CudaLinear& lin : blocks_[i].linears) {
        if (schedule_driven_ && lin.phi_rmax() > 0) {
          // AdamW just wrote the latent W over this Linear's BF16 copy: until the next
          // ApplyRankSchedule forms W_eff, a Forward (an evaluation) must form it first.
          phi_weights_stale_ = true;
          continue;
        }
        RETURN_IF_ERROR(lin.PrepareWeights(lc, s, CudaLinear::WeightsFrom::kAfterUpdate));
      }
    }
    if (overlap) RETURN_IF_ERROR(ops::RecordEvent(update_events_[i], s));
  }
  update_pending_ = overlap;
  return Mark("adamw");
}

absl::Status CudaGpt::Synchronize() {
  RETURN_IF_ERROR(JoinUpdate());
  return ops::SynchronizeStream(stream_);
}

absl::StatusOr<std::vector<float>> CudaGpt::Logits(const std::vector<int>& rows) {
  if (B_ == 0) return absl::FailedPreconditionError("CudaGpt::Logits: no Forward yet");
  const int N = B_ * T_, C = config_.n_embd, V = config_.vocab_size, Vt = config_.table_rows();
  for (int r : rows) {
    if (r < 0 || r >= N) {
      return absl::InvalidArgumentError(
          absl::StrCat("CudaGpt::Logits: row ", r, " outside [0, ", N, ")"));
    }
  }
  RETURN_IF_ERROR(JoinUpdate());
  // The logits buffer holds one chunk's dlogits: recompute each row into its first row.
  have_targets_ = false;  // a pending Backward's state is not kept
  std::vector<bf16> row(V);
  std::vector<float> out;
  out.reserve(rows.size() * static_cast<size_t>(V));
  for (int r : rows) {
    RETURN_IF_ERROR(ops::matmul_forward_cuda(*matmul_, logits_, lnf_ + static_cast<int64_t>(r) * C,
                                             W(wte_), nullptr, 1, C, Vt, stream_));
    RETURN_IF_ERROR(gpu::CopyToHostAsync(row.data(), logits_, static_cast<int64_t>(V) * 2,
                                         stream_));
    RETURN_IF_ERROR(ops::SynchronizeStream(stream_));
    for (bf16 x : row) out.push_back(ops::Bf16ToFloat(x));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<DeviceModel>> CreateCudaModel(const GptConfig& config,
                                                             const ParamStore& layout,
                                                             GradDtype grad_dtype) {
  ASSIGN_OR_RETURN(std::unique_ptr<CudaGpt> m, CudaGpt::Create(config, layout, grad_dtype));
  return std::unique_ptr<DeviceModel>(std::move(m));
}

absl::StatusOr<std::unique_ptr<DeviceModel>> CreateCudaModelForwardOnly(const GptConfig& config,
                                                                        const ParamStore& layout) {
  ASSIGN_OR_RETURN(std::unique_ptr<CudaGpt> m,
                   CudaGpt::Create(config, layout, GradDtype::kBf16, /*forward_only=*/true));
  return std::unique_ptr<DeviceModel>(std::move(m));
}

}  // namespace qtrain
