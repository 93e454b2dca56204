// MPI error codes as absl::Status: MPI_RETURN_IF_ERROR carries file:line, the call's text and
// MPI's own error string, like RETURN_IF_ERROR (ops/status_macros.h) does for statuses.
#ifndef QTRAIN_DISTRIBUTED_MPI_STATUS_H_
#define QTRAIN_DISTRIBUTED_MPI_STATUS_H_

#include <mpi.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qtrain::internal {

inline std::string MpiErrorString(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return absl::StrCat("MPI error ", code);
  return std::string(text, len);
}

inline absl::Status MpiErrorToStatus(int code, const char* file, int line, const char* expr) {
  int error_class = code;
  MPI_Error_class(code, &error_class);
  return absl::InternalError(absl::StrCat(expr, " failed: ", MpiErrorString(code),
                                          " (MPI error class ", error_class, ")\n  at ", file,
                                          ":", line));
}

}  // namespace qtrain::internal

#define MPI_RETURN_IF_ERROR(expr)                                                         \
  do {                                                                                    \
    const int qt_mpi_rc_ = (expr);                                                        \
    if (qt_mpi_rc_ != MPI_SUCCESS)                                                        \
      return ::qtrain::internal::MpiErrorToStatus(qt_mpi_rc_, __FILE__, __LINE__, #expr); \
  } while (0)

#endif  // QTRAIN_DISTRIBUTED_MPI_STATUS_H_
