// The model on an accelerator. The CPU Gpt (trainer/gpt.h) stays the host container of the
// parameters (init, init_from, checkpoints, resume); a DeviceModel holds the device copy
// (FP32 master weights, BF16 compute copies, FP32 or BF16 gradients, AdamW moments) and runs the steps.
// The training loop (trainer/trainer.cc) drives either through the same calls.
#ifndef QTRAIN_TRAINER_DEVICE_MODEL_H_
#define QTRAIN_TRAINER_DEVICE_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "ops/distill.h"
#include "trainer/gpt.h"
#include "trainer/optimizer.h"
#include "trainer/param_store.h"

namespace qtrain {

// Element type of a device model's parameter gradients (training.grad_dtype).
enum class GradDtype { kFp32, kBf16 };
inline int64_t GradDtypeBytes(GradDtype d) { return d == GradDtype::kBf16 ? 2 : 4; }

class DeviceModel {
 public:
  virtual ~DeviceModel() = default;

  // Host -> device: parameters (ParamStore layout, fp32) and, when opt is non-null, the AdamW
  // moments and step. Device -> host for checkpoints: the same, into the host containers.
  virtual absl::Status Upload(const ParamStore& params, const AdamW* opt) = 0;
  virtual absl::Status Download(ParamStore* params, AdamW* opt) = 0;

  // inputs, targets: host (B,T). Returns the mean cross-entropy (0 without targets).
  // backward_scale > 0 (needs targets) promises that Backward(backward_scale) comes next, so the
  // model may start it here: the CUDA model runs the LM head's backward chunk by chunk while
  // that chunk's logits are at hand, and never holds the logits of the whole batch (this writes
  // wte's gradient). 0: no Backward follows (evaluation).
  virtual absl::StatusOr<double> Forward(const int32_t* inputs, const int32_t* targets, int B,
                                         int T, float backward_scale) = 0;
  // Accumulates d(loss_scale * mean loss)/d params of the last Forward into the gradients;
  // loss_scale must be the backward_scale that Forward was given (FailedPrecondition otherwise).
  virtual absl::Status Backward(float loss_scale) = 0;
  virtual absl::Status ZeroGrads() = 0;

  // The flat gradient buffer in device memory, ParamStore layout, of element type
  // grad_dtype() (for the NCCL all-reduce).
  virtual void* device_grads() = 0;
  virtual GradDtype grad_dtype() const = 0;
  virtual int64_t num_parameters() const = 0;
  // Sum of squares of the gradients (deterministic), for the global-norm clip.
  virtual absl::StatusOr<double> GradSumSquares() = 0;
  // Clips the gradients by min(1, grad_clip / grad_norm) and applies one AdamW update with
  // step number t (1-based), refreshing the BF16 copies. Weight decay per tensor as AdamW.
  virtual absl::Status Update(float lr, double grad_norm, const AdamWConfig& config, int t) = 0;
  // Waits for the device's work (for step timing).
  virtual absl::Status Synchronize() = 0;

  // Lets the gradient all-reduce overlap backward. While a hook is set, Backward calls it on the
  // host thread each time the gradients of a flat range [begin, end) are final, right after the
  // kernels that finish them were enqueued: block by block in backward order, then the rest
  // (embeddings, final layernorm), the ranges together covering [0, num_parameters()) once.
  // `ready` is an opaque cudaEvent_t recorded on the model's stream behind those kernels: work on
  // another stream that reads or writes the range must wait for it (cudaStreamWaitEvent) first.
  // It stays valid until the next Backward. The model does not wait for that other work: finish
  // it (e.g. NcclCommunicator::Synchronize) before the next call that touches the gradients
  // (GradSumSquares, Update, Backward, ...). An error from the hook ends Backward with it; an
  // empty hook removes it.
  using GradientReadyHook =
      std::function<absl::Status(int64_t begin, int64_t end, void* ready)>;
  virtual void SetGradientReadyHook(GradientReadyHook hook) = 0;

  // Block-output statistics (the residual stream after each block: the TWEO loss term, the
  // peak |A| and kurtosis per block) of the training Forwards while on (default off: they cost
  // one read of every block output). The trainer turns them on for the steps it logs.
  virtual void set_block_stats(bool on) = 0;
  struct OutputStats {
    double tweo_loss = 0;            // lambda / n_layer * sum_l mean((|A_l| / (tau+eps))^p)
    std::vector<BlockStats> blocks;  // per block
  };
  // Of the last training Forward that computed them (FailedPrecondition if none did).
  virtual absl::StatusOr<OutputStats> output_stats() const = 0;

  // QAT's auxiliary low-rank modules (Phi) on the device. InitPhi: Phi from the rank-r SVD of
  // W - Q(W) of the uploaded weights and steps (the host model's InitQuantizers set the steps
  // and left Phi to the device: Gpt::InitQuantizers(PhiInit::kSkip)). ApplyRankSchedule: QVGen's
  // rank decay for the 0-based step about to run, as Linear::ApplyRankSchedule (gamma, and at
  // period ends the re-factorisation of the kept half and fresh AdamW moments for it); once it
  // is called, it also forms the weights the step's forward reads. phi_ranks: per block, the
  // largest rank of its Linears (0 without Phi). No-ops without Phi.
  virtual absl::Status InitPhi() = 0;
  virtual absl::Status ApplyRankSchedule(int step) = 0;
  virtual std::vector<int> phi_ranks() const = 0;
  // FP8 delayed scaling: the device array of the amaxes the next Update rolls into the
  // histories (count floats), which data-parallel ranks max-reduce before Update so that every
  // replica keeps the same scales; null (count 0) when no FP8 Linear uses the history.
  virtual float* device_fp8_amax(int64_t* count) = 0;

  // precision.distill: `teacher`, a frozen full-precision model of the same kind (the teacher
  // checkpoint's weights uploaded, same n_embd and vocabulary), runs in every training Forward
  // on the same tokens; the LM head then adds weight * d distill / d logits of the chosen loss
  // (ops/distill.h) to the gradient, its logits compared chunk by chunk with the student's so
  // that full logits of both never exist. Evaluations (backward_scale 0) stay plain
  // cross-entropy. distill_loss(): the mean distillation loss of the last training Forward.
  virtual absl::Status SetTeacher(std::unique_ptr<DeviceModel> teacher, ops::DistillLoss loss,
                                  float weight) = 0;
  virtual double distill_loss() const = 0;
  // training.deterministic: bit-identical reruns and resumes, at some speed (on CUDA the
  // attention backward then avoids cuDNN's atomic dq accumulation).
  virtual void set_deterministic(bool on) = 0;
  // training.lm_head_chunks: the LM head's logits exist `chunks` row chunks at a time (0 or 1:
  // the whole batch at once).
  virtual absl::Status set_lm_head_chunks(int chunks) = 0;
};

// The CUDA implementation (trainer/cuda/); Unavailable with a clear message when no CUDA
// device can be used.
absl::StatusOr<std::unique_ptr<DeviceModel>> CreateCudaModel(const GptConfig& config,
                                                             const ParamStore& layout,
                                                             GradDtype grad_dtype);
// The same model for forward passes only (a distillation teacher, an evaluation): no gradients
// and no optimizer state on the device; Backward, Update and the other training calls fail.
absl::StatusOr<std::unique_ptr<DeviceModel>> CreateCudaModelForwardOnly(const GptConfig& config,
                                                                        const ParamStore& layout);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_DEVICE_MODEL_H_
