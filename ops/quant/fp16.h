// IEEE 754 binary16 (fp16) conversion, CPU reference: the scale type of GGUF's block formats
// and a dtype of safetensors files. Every fp16 value is a float, so decoding is exact.
#ifndef QTRAIN_OPS_QUANT_FP16_H_
#define QTRAIN_OPS_QUANT_FP16_H_

#include <cstdint>

namespace qtrain::ops {

inline constexpr float kFp16Max = 65504.0f;               // largest finite
inline constexpr float kFp16MinSubnormal = 5.9604645e-8f;  // 2^-24

// Round to nearest, ties to even (as CUDA's __float2half_rn and numpy's astype(float16)),
// with subnormals; beyond the finite range +-inf; NaN -> a quiet NaN (0x7E00 with the sign).
uint16_t fp32_to_fp16(float x);
float fp16_to_fp32(uint16_t h);
// fp16_to_fp32(fp32_to_fp16(x)): the nearest fp16 value as a float.
inline float round_to_fp16(float x) { return fp16_to_fp32(fp32_to_fp16(x)); }

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_QUANT_FP16_H_
