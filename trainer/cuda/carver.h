// Carves aligned sub-buffers out of one device allocation; a first pass with base == nullptr only
// counts the bytes. Shared by the CUDA GPT's activation block and its Linears' buffers.
#ifndef QTRAIN_TRAINER_CUDA_CARVER_H_
#define QTRAIN_TRAINER_CUDA_CARVER_H_

#include <cstdint>

namespace qtrain {

class Carver {
 public:
  // Every sub-buffer starts 256-byte aligned (cuBLASLt's and the vector kernels' wish).
  static constexpr int64_t kAlign = 256;
  static int64_t RoundUp(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* Take(int64_t count) {
    T* p = base_ != nullptr ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += RoundUp(count * static_cast<int64_t>(sizeof(T)));
    return p;
  }
  int64_t used() const { return used_; }
  // A carver starting where this one stands: carve a region with it (or several, each from its
  // own At(), to overlay buffers that are never live at the same time), then Skip its size here.
  Carver At() const { return Carver(base_ != nullptr ? base_ + used_ : nullptr); }
  void Skip(int64_t bytes) { used_ += RoundUp(bytes); }

 private:
  char* base_;
  int64_t used_ = 0;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_CUDA_CARVER_H_
