// Watchdog thread: sleeps until the armed call's deadline, then reports once per arming.
#include "distributed/watchdog.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace qtrain {

Watchdog::Watchdog(absl::Duration timeout, std::string who, OnTimeout on_timeout)
    : timeout_(timeout), who_(std::move(who)), on_timeout_(std::move(on_timeout)) {
  thread_ = std::thread([this] { Loop(); });
}

Watchdog::~Watchdog() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    cv_.Signal();
  }
  thread_.join();
}

void Watchdog::Arm(std::string what) {
  absl::MutexLock lock(&mu_);
  armed_ = true;
  fired_ = false;
  armed_at_ = absl::Now();
  what_ = std::move(what);
  cv_.Signal();
}

void Watchdog::Disarm() {
  absl::MutexLock lock(&mu_);
  armed_ = false;
}

void Watchdog::SetActivity(std::string activity) {
  absl::MutexLock lock(&mu_);
  activity_ = std::move(activity);
}

void Watchdog::Loop() {
  absl::MutexLock lock(&mu_);
  while (!stop_) {
    if (!armed_ || fired_) {
      cv_.Wait(&mu_);
      continue;
    }
    const absl::Time deadline = armed_at_ + timeout_;
    if (absl::Now() < deadline) {
      cv_.WaitWithDeadline(&mu_, deadline);
      continue;
    }
    fired_ = true;
    const std::string message = absl::StrCat(
        who_, ": ", what_, " did not finish within distributed.timeout_s = ",
        absl::FormatDuration(timeout_), activity_.empty() ? "" : absl::StrCat(" (", activity_, ")"),
        ": another rank has died or hangs; stopping the job");
    mu_.Unlock();
    on_timeout_(message);
    mu_.Lock();
  }
}

}  // namespace qtrain
