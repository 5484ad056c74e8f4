// LK_CHECK(cond, parts...): TORCH_CHECK with the message built without C++ iostreams.
//
// TORCH_CHECK formats its parts through a std::ostringstream instantiated in the extension; in
// the extension built on the GPU machine (its /opt/gcc g++) every check whose message streamed an
// integer died with SIGSEGV inside that formatting, while the same checks with only strings
// raised cleanly. Here the parts are appended to one std::string (integers by std::to_string,
// header-only; doubles by snprintf; devices and dtypes by c10's own functions, compiled into
// torch's libraries), and TORCH_CHECK gets that single string, which it passes on unformatted.
// The parts are evaluated only when the check fails.
#pragma once

#include <cstdio>
#include <string>
#include <type_traits>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace lk {
namespace check_detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, c10::DeviceType v) { s += c10::DeviceTypeName(v, true); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>,
                                       int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}

// [a, b, c], as torch prints sizes.
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

}  // namespace check_detail

// The parts concatenated, each written as above.
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (check_detail::append(s, parts), ...);
  return s;
}

}  // namespace lk

#define LK_CHECK(cond, ...) TORCH_CHECK(cond, ::lk::message(__VA_ARGS__))
