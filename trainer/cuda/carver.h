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

 private:
  char* base_;
  int64_t used_ = 0;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_CUDA_CARVER_H_
