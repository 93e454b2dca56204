// OverlappedGradSum: the GPU gradient all-reduce of a data-parallel CUDA run, fed range by range
// from the model's backward (DeviceModel::SetGradientReadyHook) so that NCCL overlaps it.
#ifndef QTRAIN_TRAINER_GRAD_SUM_H_
#define QTRAIN_TRAINER_GRAD_SUM_H_

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "distributed/nccl_communicator.h"
#include "trainer/device_model.h"

namespace qtrain {

// The model reports ranges of final gradients, NCCL's stream waits for each range's event and
// sums it over the ranks while backward goes on with earlier blocks. Adjacent ranges are
// gathered until they hold a bucket (distributed.bucket_mb), so a small model does not pay a
// collective per block; a larger range goes whole. Every rank's model reports the same ranges
// in the same order, so the collectives match and the reduction is the same every run.
class OverlappedGradSum {
 public:
  OverlappedGradSum(NcclCommunicator* nccl, void* grads, GradDtype dtype, int64_t n,
                    int64_t bucket_bytes)
      : nccl_(nccl),
        grads_(grads),
        dtype_(dtype),
        n_(n),
        bucket_elems_(std::max<int64_t>(1, bucket_bytes / GradDtypeBytes(dtype))) {}

  // The hook: gradients [begin, end) are final once `ready` (a cudaEvent_t) has passed.
  absl::Status Ready(int64_t begin, int64_t end, void* ready);

  // After Backward: sends what is still gathered and checks that the ranges covered every
  // gradient exactly once (a gap would let the replicas drift apart). The caller then waits
  // with nccl->Synchronize() before anything else touches the gradients.
  absl::Status Finish();

 private:
  absl::Status Flush();

  NcclCommunicator* nccl_;
  void* grads_;
  GradDtype dtype_;
  int64_t n_;
  int64_t bucket_elems_;
  int64_t pending_begin_ = 0, pending_end_ = 0;  // gathered, not yet sent
  std::vector<std::pair<int64_t, int64_t>> seen_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_GRAD_SUM_H_
