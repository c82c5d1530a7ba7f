// Errors: library code throws kvq::Error with a one-line message naming what is
// wrong (the key, tensor, flag or request); only apps/ turns it into an exit status.
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace kvq {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad command-line usage (exit status 2 instead of 1).
class UsageError : public Error {
 public:
  using Error::Error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace kvq
