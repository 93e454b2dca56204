// TrainingSession: one run of a job, laid out as the recipe reads. Setup (out_dir, model,
// optimizer, data, resume state, device model, sinks), then for each step: rank-decay hook,
// forward, loss terms, backward, gradient sync, update; evaluation; checkpoint. What the run
// emits goes to RunSinks (trainer/sinks.h). RunTraining (trainer/trainer.h) is its entry point.
#ifndef QTRAIN_TRAINER_SESSION_H_
#define QTRAIN_TRAINER_SESSION_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"
#include "distributed/distributed_context.h"
#include "distributed/gradient_sync.h"
#include "distributed/nccl_communicator.h"
#include "trainer/data_loader.h"
#include "trainer/device_model.h"
#include "trainer/gpt.h"
#include "trainer/grad_sum.h"
#include "trainer/model_setup.h"
#include "trainer/optimizer.h"
#include "trainer/rng.h"
#include "trainer/schedule.h"
#include "trainer/sinks.h"
#include "trainer/trainer.h"

namespace qtrain {

class TrainingSession {
 public:
  // Everything the loop needs, built in the recipe's order; collective under data parallelism
  // (every rank calls it, errors that all ranks hold come back agreed).
  static absl::StatusOr<std::unique_ptr<TrainingSession>> Create(const JobSpec& spec,
                                                                 const RunOptions& options);
  TrainingSession(const TrainingSession&) = delete;
  TrainingSession& operator=(const TrainingSession&) = delete;

  // Steps from the start (or resumed) step to training.steps.
  absl::StatusOr<RunResult> Run();

 private:
  // What one optimizer step produced: losses are means over micro-steps and ranks.
  struct StepStats {
    float lr = 0;
    double loss = 0, tweo = 0, distill = 0;
    double grad_norm = 0;
  };

  TrainingSession(const JobSpec& spec, const RunOptions& options);

  // Setup.
  absl::Status PrepareOutDir();
  absl::Status WriteJobSpecFile();
  absl::Status BuildModel();
  void BuildOptimizer();
  absl::Status OpenData();
  absl::Status Resume();
  absl::Status CheckSpecAgainstCheckpoint(const std::string& path);
  absl::Status InitFresh();
  absl::Status CreateDeviceModel();
  absl::Status OpenSinks();
  void PrintBanner() const;

  // One optimizer step and its parts.
  absl::StatusOr<StepStats> Step(int step);
  absl::Status ApplyRankDecay(int step);
  // Steps whose progress line is printed and whose device block statistics are logged.
  bool IsLogStep(int step) const;
  absl::Status AddDeviceMetrics(MetricRow* row) const;
  absl::Status ZeroGrads();
  absl::Status HostMicroStep(StepStats* stats);
  absl::Status DeviceMicroStep(bool last_micro, StepStats* stats);
  absl::Status AverageLossesOverRanks(int step, StepStats* stats);
  absl::StatusOr<double> SyncGradientsAndUpdate(float lr);

  // Evaluation and checkpoints.
  absl::StatusOr<double> Evaluate();
  absl::Status Checkpoint(int done);
  void PrintStep(int done, const StepStats& s, double seconds, double ema_step) const;

  // The job and the ranks.
  const JobSpec spec_;
  const RunOptions options_;
  std::unique_ptr<DistributedContext> own_dist_;
  DistributedContext* dist_ = nullptr;
  int world_ = 1, rank_ = 0;
  bool root_ = true, quiet_ = false;
  std::string out_dir_, spec_text_;
  int B_ = 0, T_ = 0, accum_ = 1;
  int64_t global_batch_ = 0;  // sequences per optimizer step over all ranks

  // Model, optimizer, data.
  GptConfig gc_;
  std::unique_ptr<Gpt> model_;
  std::unique_ptr<Teacher> teacher_;
  AdamWConfig adam_config_;
  bool zero1_ = false;
  std::optional<GradientSync> sync_;
  std::optional<AdamW> optimizer_;
  CosineSchedule schedule_;
  std::unique_ptr<DataLoader> train_, val_;
  Rng rng_;
  int start_step_ = 0;
  std::string run_id_;       // kept across resumes; checkpoint rotation touches only its files
  std::string resumed_from_;  // the checkpoint path, when resuming
  std::vector<int32_t> x_, y_;

  // On an accelerator the host model keeps the parameters for checkpoints; the device copy
  // computes every step. Gradients in device memory travel over NCCL (bootstrapped by the job's
  // MPI), whichever of MPI or NCCL the job names: one GPU per rank, picked by the local rank.
  std::unique_ptr<DeviceModel> dev_;
  std::unique_ptr<NcclCommunicator> nccl_;
  std::optional<OverlappedGradSum> grad_sum_;

  // Rank 0 only: metrics.jsonl, the checkpoint directory, then RunOptions::sinks.
  SinkFanOut sinks_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_SESSION_H_
