// Status plumbing shared by every layer: RETURN_IF_ERROR / ASSIGN_OR_RETURN carry file:line
// and the failing call's text, since Abseil 20220623 has no status macros of its own.
#ifndef QTRAIN_OPS_STATUS_MACROS_H_
#define QTRAIN_OPS_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace qtrain::internal {

// Appends where the error passed through to its message, keeping the code and payloads.
inline absl::Status Annotate(const absl::Status& s, const char* file, int line,
                             const char* expr) {
  absl::Status out(s.code(), absl::StrCat(s.message(), "\n  at ", file, ":", line, " in ", expr));
  s.ForEachPayload([&out](absl::string_view url, const absl::Cord& payload) {
    out.SetPayload(url, payload);
  });
  return out;
}

}  // namespace qtrain::internal

#define QT_CONCAT_INNER_(a, b) a##b
#define QT_CONCAT_(a, b) QT_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                                                    \
  do {                                                                           \
    ::absl::Status qt_status_ = (expr);                                          \
    if (!qt_status_.ok())                                                        \
      return ::qtrain::internal::Annotate(qt_status_, __FILE__, __LINE__, #expr); \
  } while (0)

#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr)                                  \
  auto tmp = (expr);                                                            \
  if (!tmp.ok())                                                                \
    return ::qtrain::internal::Annotate(tmp.status(), __FILE__, __LINE__, #expr); \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(QT_CONCAT_(qt_statusor_, __LINE__), lhs, expr)

// Returns InvalidArgument naming the violated condition when `cond` is false.
#define QT_CHECK_ARG(cond, ...)                                                  \
  do {                                                                           \
    if (!(cond))                                                                 \
      return ::absl::InvalidArgumentError(::absl::StrCat(__VA_ARGS__));          \
  } while (0)

#endif  // QTRAIN_OPS_STATUS_MACROS_H_
