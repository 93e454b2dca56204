// The GPT of trainer/gpt.h on one CUDA device (DeviceModel): FP32 master weights, BF16 compute
// copies and activations, FP32 or BF16 gradients (training.grad_dtype), FP32 AdamW moments, all
// over the ParamStore layout of the host model; the kernels are ops/cuda's. Each block Linear is
// a CudaLinear in the precision the job spec gives it (BF16, FP8, QAT; linear_cuda.h), the
// TWEO outlier loss is fused into the layernorm backwards.
//
// Memory: per layer and token the model keeps qkv (3C), the attention output (C), the two
// residuals (2C) and the MLP's pre- and post-GELU values (8C), in BF16. The layernorm outputs
// are not kept: the layernorm backward recomputes each one (a write, no extra read) just before
// the weight-gradient GEMM that needs it. The LM head's backward runs inside the training
// Forward, in training.lm_head_chunks chunks of rows, so the logits of only one chunk exist at
// a time.
#ifndef QTRAIN_TRAINER_CUDA_GPT_CUDA_H_
#define QTRAIN_TRAINER_CUDA_GPT_CUDA_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ops/cuda/adamw_cuda.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/matmul_cuda.h"
#include "ops/cuda/fp8_cuda.h"
#include "ops/cuda/lowrank_cuda.h"
#include "ops/cuda/matmul_fp8_cuda.h"
#include "ops/cuda/matmul_int8_cuda.h"
#include "trainer/cuda/linear_cuda.h"
#include "trainer/device_model.h"
#include "trainer/gpt.h"
#include "trainer/optimizer.h"
#include "trainer/param_store.h"

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

namespace qtrain {

class CudaGpt : public DeviceModel {
 public:
  // Unavailable without a usable CUDA device; Unimplemented for a feature the CUDA path lacks
  // (FP8/QAT Linears, TWEO); InvalidArgument when `layout` is not the full-precision Gpt's.
  // Allocates parameters, gradients and moments (zeroed); Upload fills them.
  // forward_only: no gradients and no AdamW moments are allocated (12-16 bytes per parameter
  // fewer); only evaluation Forwards (backward_scale 0) and Upload/Download of the parameters
  // work, the training calls fail naming themselves (a distillation teacher, an evaluation).
  static absl::StatusOr<std::unique_ptr<CudaGpt>> Create(const GptConfig& config,
                                                         const ParamStore& layout,
                                                         GradDtype grad_dtype = GradDtype::kFp32,
                                                         bool forward_only = false);
  ~CudaGpt() override;
  CudaGpt(const CudaGpt&) = delete;
  CudaGpt& operator=(const CudaGpt&) = delete;

  absl::Status Upload(const ParamStore& params, const AdamW* opt) override;
  absl::Status Download(ParamStore* params, AdamW* opt) override;
  absl::StatusOr<double> Forward(const int32_t* inputs, const int32_t* targets, int B, int T,
                                 float backward_scale) override;
  absl::Status Backward(float loss_scale) override;
  absl::Status ZeroGrads() override;
  // Clears first when a ZeroGrads is still pending (no Backward since).
  void* device_grads() override;
  GradDtype grad_dtype() const override { return grad_dtype_; }
  int64_t num_parameters() const override { return num_params_; }
  absl::StatusOr<double> GradSumSquares() override;
  absl::Status Update(float lr, double grad_norm, const AdamWConfig& config, int t) override;
  absl::Status Synchronize() override;
  void SetGradientReadyHook(GradientReadyHook hook) override {
    grad_ready_hook_ = std::move(hook);
  }

  // For tests and benchmarks. The logits (rows.size(), V) of the given rows (b*T + t) of the
  // last Forward (recomputed from its final hidden states: BF16 GEMM, fp32 accumulation).
  absl::StatusOr<std::vector<float>> Logits(const std::vector<int>& rows);
  // The gradients (ParamStore layout) on the host, widened to fp32.
  absl::Status DownloadGrads(std::vector<float>* grads);
  // Deterministic attention: our flash-attention kernels instead of cuDNN's fused attention,
  // whose backward sums dq with atomics (bit-identical reruns and resumes need this on; the
  // trainer's `training.deterministic`).
  // Also keeps GEMM autotuning off (below).
  void set_deterministic(bool on) override;
  void set_block_stats(bool on) override { block_stats_on_ = on; }
  absl::StatusOr<OutputStats> output_stats() const override;
  absl::Status InitPhi() override;
  absl::Status ApplyRankSchedule(int step) override;
  std::vector<int> phi_ranks() const override;
  float* device_fp8_amax(int64_t* count) override;
  // GEMM autotuning (ops::MatmulContext): time cuBLASLt's candidates on first use of each
  // problem and keep the fastest, instead of its first heuristic pick. Off by default (the pick
  // is stable across runs; tuned choices may differ between runs and gained little on the
  // H100, docs/benchmarks.md); never on in deterministic mode.
  void set_autotune(bool on);
  absl::Status set_lm_head_chunks(int chunks) override;
  absl::Status SetTeacher(std::unique_ptr<DeviceModel> teacher, ops::DistillLoss loss,
                          float weight) override;
  double distill_loss() const override { return distill_host_; }
  // The GEMM context, e.g. for MatmulContext::set_gelu_fusion (on by default: on the H100
  // cuBLASLt's GELU epilogues beat plain GEMMs plus our GELU kernels, docs/benchmarks.md) or
  // the autotuning report.
  ops::MatmulContext& matmul() { return *matmul_; }
  // FP8 GEMMs run so far (cuBLASLt or our kernel), for tests and benchmarks; the context's
  // per-problem report says which backend took each.
  int64_t fp8_gemm_calls() const;
  const ops::Fp8MatmulContext* fp8_matmul() const { return fp8_mm_.get(); }
  // Device bytes this model allocated (parameters, state, activations, workspaces).
  int64_t allocated_bytes() const { return allocated_bytes_; }

  // Per-op timing: with profiling on, every op is bracketed by CUDA events (which serialises
  // nothing more than the one stream already does, but costs host time); Profile() syncs and
  // returns the accumulated milliseconds per op name since the last ResetProfile().
  void set_profiling(bool on) { profiling_ = on; }
  absl::StatusOr<std::map<std::string, double>> Profile();
  void ResetProfile();

 private:
  // One block: its layernorms' element offsets in the flat buffers and its four Linears.
  struct Block {
    int64_t ln1w, ln1b, ln2w, ln2b;
    std::vector<CudaLinear> linears;  // qkv, attn.proj, mlp.fc, mlp.proj
    CudaLinear& qkv() { return linears[0]; }
    CudaLinear& attn_proj() { return linears[1]; }
    CudaLinear& fc() { return linears[2]; }
    CudaLinear& mlp_proj() { return linears[3]; }
  };
  // Runs of consecutive tensors with the same weight-decay flag: one AdamW launch each.
  struct DecayRun {
    int64_t offset, size;
    bool decay;
  };
  // Activations of one (B, T), in one allocation. The layernorm outputs are not among them
  // (see the top of this file).
  struct LayerActs {
    ops::bf16 *qkv, *atty, *res2, *fch, *fch_gelu, *res3;
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd, *lse;
  };

  CudaGpt(const GptConfig& config, GradDtype grad_dtype)
      : config_(config), grad_dtype_(grad_dtype) {}
  absl::Status Init(const ParamStore& layout);
  absl::Status EnsureActivations(int B, int T);
  absl::Status FreeActivations();
  absl::StatusOr<void*> Alloc(int64_t bytes);
  absl::Status Mark(const char* op);
  // Carries out a pending ZeroGrads as a plain memset.
  absl::Status FlushZeroGrads();
  // Backward's report that the gradients of range `index` (blocks first, see grad_ranges_) are
  // final: records that range's event and calls the hook, when one is set.
  absl::Status GradientsReady(size_t index);
  // stream_ waits for the last Update's range `index` / for all of it (no-op when none pending).
  absl::Status WaitForUpdate(size_t index);
  absl::Status JoinUpdate();
  // The training Forward's LM head (forward, cross-entropy and backward by row chunks) and
  // Backward's blocks, over gradients of type G (float or bf16).
  template <typename G>
  absl::Status LmHead(G* grads, float backward_scale);
  template <typename G>
  absl::Status BackwardBlocks(G* grads);
  // The TWEO gradient term of a layernorm backward whose input is a block output (none when
  // TWEO is off).
  ops::TweoGradTerm TweoTerm() const;
  // Rows per chunk of the LM head for a batch of N rows.
  int LogitsChunkRows(int N) const;

  float* P(int64_t off) { return params_ + off; }
  ops::bf16* W(int64_t off) { return params_bf16_ + off; }
  int64_t grad_bytes() const { return GradDtypeBytes(grad_dtype_); }
  // What the Linears' calls work in (the stream, GEMM contexts, buffers, scratch).
  LinearContext linear_context() const;
  // Once per optimizer step, on the accumulated (and all-reduced) gradients: the Linears'
  // FinishGradients (QAT: Phi's gradients, the weight quantizers' masks and step gradients).
  absl::Status FinishGradients();
  // Every Linear's forward weights (FP8 codes, QAT's W_eff) from the masters just uploaded.
  absl::Status PrepareAllWeights();
  // The buffers of the host model's ParamStore that hold this model's non-trainable state.
  absl::Status MapBuffers(const ParamStore& params);
  // fn(grads) with the gradient buffer as the pointer type of grad_dtype_ (float* or bf16*).
  template <typename Fn>
  absl::Status OnGrads(Fn&& fn) {
    if (grad_dtype_ == GradDtype::kBf16) return fn(static_cast<ops::bf16*>(grads_));
    return fn(static_cast<float*>(grads_));
  }

  GptConfig config_;
  GradDtype grad_dtype_;
  int64_t num_params_ = 0;
  int64_t wte_ = 0, wpe_ = 0, lnfw_ = 0, lnfb_ = 0;
  std::vector<Block> blocks_;
  std::vector<DecayRun> decay_runs_;
  // Update overlaps the next Forward: one AdamW launch per gradient range (grad_ranges_, the
  // embeddings and final layernorm first, then block by block) on opt_stream_, each followed by
  // its event in update_events_; Forward waits for a range's event right before it reads that
  // range's weights, so block l's update runs beside the forward of the blocks below it (a
  // memory-bound kernel beside compute-bound GEMMs). Every other call first waits for the whole
  // update (JoinUpdate). With profiling on, the update runs on stream_ (its time is then seen).
  std::vector<std::unique_ptr<ops::AdamwPlan>> adamw_plans_;  // per gradient range
  std::vector<size_t> update_order_;                          // ranges in update order
  std::vector<cudaEvent_t> update_events_;                    // per gradient range
  cudaEvent_t grads_final_ = nullptr;  // on stream_: the gradients and clip factor are ready
  cudaStream_t opt_stream_ = nullptr;
  bool update_pending_ = false;  // update_events_ not yet waited for on stream_
  // Flat ranges for the gradient-ready hook: [0, n_layer) block l's tensors, then the rest of
  // [0, num_params_) (embeddings, final layernorm) in ascending order; one event each.
  struct GradRange {
    int64_t begin, end;
  };
  std::vector<GradRange> grad_ranges_;
  std::vector<cudaEvent_t> ready_events_;  // created on first use
  DeviceModel::GradientReadyHook grad_ready_hook_;

  cudaStream_t stream_ = nullptr;
  bool stream_borrowed_ = false;  // stream_ is another model's (a teacher's): not destroyed
  std::unique_ptr<ops::MatmulContext> matmul_;
  // Precision machinery, present when some Linear needs it.
  std::unique_ptr<ops::Fp8MatmulContext> fp8_mm_;
  std::unique_ptr<ops::Fp8ScalingState> fp8_state_;
  bool fp8_delayed_ = false;  // some FP8 Linear scales by the amax history (one update per step)
  std::unique_ptr<ops::Int8MatmulContext> int8_mm_;
  std::unique_ptr<ops::PhiContext> phi_ctx_;
  LinearScratch scratch_;            // what the Linears need of the shared scratch
  float* phi_ws_ = nullptr;          // Phi's product P, the widest Phi Linear's out * in floats
  void* aux_ws_ = nullptr;
  int64_t aux_ws_bytes_ = 0;
  bool grads_unfinished_ = false;    // a Backward ran since the last FinishGradients
  bool schedule_driven_ = false;     // ApplyRankSchedule forms the Phi Linears' W_eff
  bool forward_only_ = false;        // Create's forward_only: grads_, m_, v_ are null
  // FailedPrecondition naming `op` on a forward-only model.
  absl::Status RequireTrainable(const char* op) const;
  bool phi_weights_stale_ = false;   // an Update since: their BF16 copies hold the latent W
  // Buffer indices in the host ParamStore per Linear (-1: none), filled by MapBuffers.
  struct LinearBuffers {
    int fp8_history = -1, fp8_scale = -1, quant_init = -1, phi_rank = -1, phi_gamma = -1;
  };
  std::vector<LinearBuffers> linear_buffers_;  // in all_linears() order
  // Every Linear, block by block.
  std::vector<CudaLinear*> all_linears();
  bool deterministic_ = false;
  bool autotune_ = false;
  int lm_head_chunks_ = 1;
  std::vector<void*> allocations_;  // freed in the destructor
  int64_t allocated_bytes_ = 0;

  // Parameter-sized state.
  float *params_ = nullptr, *m_ = nullptr, *v_ = nullptr;
  void* grads_ = nullptr;  // grad_dtype_
  ops::bf16* params_bf16_ = nullptr;
  double* scalars_ = nullptr;  // [0] mean loss, [1] sum of squares, [2] mean distillation loss
  float* clip_factor_ = nullptr;
  float clip_host_ = 1.0f;  // source of the clip factor's copy (outlives the call)
  void* norm_ws_ = nullptr;
  int64_t norm_ws_bytes_ = 0;

  // Activations for (B_, T_).
  int B_ = 0, T_ = 0;
  void* act_block_ = nullptr;
  int64_t act_bytes_ = 0;
  std::vector<LayerActs> acts_;
  int32_t *inputs_ = nullptr, *targets_ = nullptr;
  // ln_: a layernorm's output, for the GEMM after it (forward) or recomputed for the weight
  // gradient (backward); lnf_ is the final one. proj_out_ shares datty_'s memory (forward vs
  // backward). The MLP's dGELU output goes into the layer's fch_gelu once its weight gradient
  // no longer needs it.
  ops::bf16 *encoded_ = nullptr, *ln_ = nullptr, *lnf_ = nullptr, *logits_ = nullptr,
            *proj_out_ = nullptr;
  float *lnf_mean_ = nullptr, *lnf_rstd_ = nullptr, *losses_ = nullptr;
  int logits_rows_ = 0;  // rows of logits_ (one LM-head chunk)
  ops::bf16 *dres_ = nullptr, *dln_ = nullptr, *datty_ = nullptr, *dqkv_ = nullptr;
  // The Linears' shared per-batch scratch (LinearContext), carved with the activations.
  ops::bf16* xq_ = nullptr;
  uint8_t *dy8_ = nullptr, *dy8_t_ = nullptr, *x8_t_ = nullptr;
  float *dy_sinv_ = nullptr, *dy_sinv_t_ = nullptr;
  int8_t* x_i8_ = nullptr;
  void* q_ws_ = nullptr;
  int64_t q_ws_bytes_ = 0;
  void *enc_ws_ = nullptr, *ln_ws_ = nullptr, *mm_ws_ = nullptr, *att_ws_ = nullptr;
  int64_t enc_ws_bytes_ = 0, ln_ws_bytes_ = 0, mm_ws_bytes_ = 0, att_ws_bytes_ = 0;

  // State of the last Forward.
  // Backward needs a training Forward (targets, backward_scale > 0) right before it.
  bool have_targets_ = false;
  float backward_scale_ = 0.f;  // of that Forward
  // ZeroGrads is deferred: the next training Forward/Backward writes the gradients instead of
  // adding to them (GradWrite::kOverwrite), which spares a pass over them and the GEMMs' reads.
  bool zero_pending_ = false;
  ops::GradWrite backward_gw_ = ops::GradWrite::kAccumulate;  // of the current Forward/Backward

  // Block-output statistics (set_block_stats): kNumBlockOutputStats doubles per block on the
  // device, copied to the host with the loss.
  bool block_stats_on_ = false;
  bool stats_valid_ = false;
  int64_t stats_n_ = 0;  // elements of each block output they were computed over
  double* stats_dev_ = nullptr;
  std::vector<double> stats_host_;
  void* stats_ws_ = nullptr;

  // Distillation (SetTeacher): the teacher runs its forward on this model's stream (borrowed:
  // the cuDNN attention state is per process, so two streams would race on it). Per batch:
  // teacher_logits_ (one LM-head chunk) and the per-row distillation losses.
  std::unique_ptr<CudaGpt> teacher_;
  ops::DistillLoss distill_kind_ = ops::DistillLoss::kKl;
  float distill_weight_ = 0.f;
  ops::bf16* teacher_logits_ = nullptr;
  float* distill_losses_ = nullptr;
  double distill_host_ = 0;

  // Profiling.
  bool profiling_ = false;
  std::vector<cudaEvent_t> events_;
  std::vector<std::string> event_ops_;
  int events_used_ = 0;
  std::map<std::string, double> profile_ms_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_CUDA_GPT_CUDA_H_
