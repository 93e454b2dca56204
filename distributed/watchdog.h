// Watchdog: a thread that stops the job when one collective runs longer than a timeout, so a
// dead or hung rank turns into a clear error on the others instead of a silent hang.
#ifndef QTRAIN_DISTRIBUTED_WATCHDOG_H_
#define QTRAIN_DISTRIBUTED_WATCHDOG_H_

#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace qtrain {

class Watchdog {
 public:
  // Called on the watchdog thread with the full message when an armed call overruns; the
  // MPI communicator's callback aborts the job and does not return. If it does return
  // (tests), the watchdog waits for the next Arm.
  using OnTimeout = std::function<void(const std::string& message)>;

  // `who` names this process in the message ("rank 1 of 2 (host node7)").
  Watchdog(absl::Duration timeout, std::string who, OnTimeout on_timeout);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Arms the timer for one call (`what`: "MPI_Allreduce of 1024 floats"); Disarm when it
  // returns. Calls do not nest.
  void Arm(std::string what);
  void Disarm();
  // Context for the message ("step 12"), kept until changed.
  void SetActivity(std::string activity);

  absl::Duration timeout() const { return timeout_; }

  // Arms for the lifetime of the scope.
  class Scope {
   public:
    Scope(Watchdog* w, std::string what) : w_(w) { w_->Arm(std::move(what)); }
    ~Scope() { w_->Disarm(); }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Watchdog* w_;
  };

 private:
  void Loop();

  const absl::Duration timeout_;
  const std::string who_;
  const OnTimeout on_timeout_;
  absl::Mutex mu_;
  absl::CondVar cv_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool armed_ ABSL_GUARDED_BY(mu_) = false;
  bool fired_ ABSL_GUARDED_BY(mu_) = false;  // for the current arming
  absl::Time armed_at_ ABSL_GUARDED_BY(mu_);
  std::string what_ ABSL_GUARDED_BY(mu_);
  std::string activity_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_WATCHDOG_H_
