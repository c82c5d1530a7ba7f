// The --json envelope every command writes (DESIGN.md): who ran what, where,
// with which settings, and one result object per measured point.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace kvq {

extern const char* const kKvqVersion;
std::string git_commit();  // the commit the binary was built from

class RunReport {
 public:
  RunReport(std::string command, int argc, char** argv);
  void set_device(std::string device) { device_ = std::move(device); }
  void set_model(std::string model) { model_ = std::move(model); }
  nlohmann::json& settings() { return settings_; }
  void add_result(nlohmann::json result) { results_.push_back(std::move(result)); }
  nlohmann::json to_json() const;
  // Writes the object to `path` (nothing when path is empty), replacing the file whole; throws on I/O failure.
  // Long commands call it after each result too, so a run stopped part-way keeps what it measured.
  void write(const std::string& path) const;

 private:
  std::string command_;
  std::vector<std::string> argv_;
  std::string date_;
  std::string device_ = "cpu";
  std::string model_;
  nlohmann::json settings_ = nlohmann::json::object();
  nlohmann::json results_ = nlohmann::json::array();
};

}  // namespace kvq
