// Element sizes of the safetensors dtype names the parameter store accepts.
#ifndef QTRAIN_DISTRIBUTED_PS_DTYPE_H_
#define QTRAIN_DISTRIBUTED_PS_DTYPE_H_

#include "absl/strings/string_view.h"

namespace qtrain::ps {

// Bytes per element, 0 for a name the store does not accept.
inline int TensorDtypeBytes(absl::string_view dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" ||
      dtype == "F8_E5M2") {
    return 1;
  }
  return 0;
}

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_DTYPE_H_
