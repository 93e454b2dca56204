// OverlappedGradSum: bucketing of the model's gradient-ready ranges into NCCL all-reduces.
#include "trainer/grad_sum.h"

#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"

namespace qtrain {

absl::Status OverlappedGradSum::Ready(int64_t begin, int64_t end, void* ready) {
  if (begin < 0 || begin > end || end > n_) {
    return absl::InternalError(absl::StrCat("the model reported gradient range [", begin, ", ",
                                            end, ") outside [0, ", n_, ")"));
  }
  if (begin == end) return absl::OkStatus();
  seen_.push_back({begin, end});
  // NCCL's stream waits at once, whenever the bucket goes: later collectives queue behind it.
  RETURN_IF_ERROR(nccl_->WaitEvent(ready));
  if (pending_end_ > pending_begin_ && (end == pending_begin_ || begin == pending_end_)) {
    pending_begin_ = std::min(pending_begin_, begin);
    pending_end_ = std::max(pending_end_, end);
  } else {
    RETURN_IF_ERROR(Flush());
    pending_begin_ = begin;
    pending_end_ = end;
  }
  return pending_end_ - pending_begin_ >= bucket_elems_ ? Flush() : absl::OkStatus();
}

absl::Status OverlappedGradSum::Finish() {
  RETURN_IF_ERROR(Flush());
  std::sort(seen_.begin(), seen_.end());
  int64_t covered = 0;
  for (const auto& [begin, end] : seen_) {
    if (begin != covered) {
      return absl::InternalError(absl::StrCat(
          "the model's gradient-ready ranges ", begin < covered ? "overlap" : "leave a gap",
          " at element ", std::min(begin, covered), " of ", n_));
    }
    covered = end;
  }
  seen_.clear();
  if (covered != n_) {
    return absl::InternalError(absl::StrCat("the model's gradient-ready ranges end at element ",
                                            covered, " of ", n_));
  }
  return absl::OkStatus();
}

absl::Status OverlappedGradSum::Flush() {
  if (pending_end_ <= pending_begin_) return absl::OkStatus();
  const int64_t n = pending_end_ - pending_begin_;
  if (dtype_ == GradDtype::kBf16) {
    RETURN_IF_ERROR(nccl_->AllReduceSumAsync(static_cast<ops::bf16*>(grads_) + pending_begin_, n));
  } else {
    RETURN_IF_ERROR(nccl_->AllReduceSumAsync(static_cast<float*>(grads_) + pending_begin_, n));
  }
  pending_begin_ = pending_end_ = 0;
  return absl::OkStatus();
}

}  // namespace qtrain
