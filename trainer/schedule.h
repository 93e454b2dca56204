// Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio.
#ifndef QTRAIN_TRAINER_SCHEDULE_H_
#define QTRAIN_TRAINER_SCHEDULE_H_

namespace qtrain {

struct CosineSchedule {
  float peak_lr = 0;
  int warmup_steps = 0;
  int total_steps = 0;
  float min_lr_ratio = 0.1f;

  // step is 0-based; the lr of step 0 is peak_lr / warmup_steps (never zero).
  float LrAt(int step) const;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_SCHEDULE_H_
