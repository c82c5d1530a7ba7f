// GPU board energy from NVML's total-energy counter (millijoules since the
// driver loaded). libnvidia-ml is opened with dlopen at run time and the few
// functions used are declared here, so kvq needs no NVML headers or link
// dependency and runs where there is no driver: then every reading is
// unavailable and status() says why ("unsupported: <why>").
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace kvq {

class NvmlEnergyMeter {
 public:
  // Opens `library` and the GPU whose PCI bus id is `pci_bus_id` (as CUDA
  // reports it), or NVML's device 0 when the id is empty. Never throws: a
  // failure at any step is kept in status().
  explicit NvmlEnergyMeter(const std::string& pci_bus_id = "", const char* library = "libnvidia-ml.so.1");
  ~NvmlEnergyMeter();
  NvmlEnergyMeter(const NvmlEnergyMeter&) = delete;
  NvmlEnergyMeter& operator=(const NvmlEnergyMeter&) = delete;

  bool supported() const { return status_ == "ok"; }
  // "ok" or "unsupported: <why>" (DESIGN.md's energy_status).
  const std::string& status() const { return status_; }
  // The board's energy counter in millijoules; nullopt when unsupported or the read fails (status() then says why).
  std::optional<uint64_t> total_energy_mj();

 private:
  using NvmlReturn = int;  // nvmlReturn_t; 0 is NVML_SUCCESS
  using NvmlDevice = void*;  // nvmlDevice_t, an opaque handle
  void mark_unsupported(const std::string& why);
  std::string describe(const char* function, NvmlReturn code) const;

  void* library_ = nullptr;  // dlopen handle
  bool initialized_ = false;  // nvmlInit_v2 succeeded: nvmlShutdown is owed
  NvmlDevice device_ = nullptr;
  NvmlReturn (*count_)(unsigned*) = nullptr;
  NvmlReturn (*shutdown_)() = nullptr;
  NvmlReturn (*get_total_energy_)(NvmlDevice, unsigned long long*) = nullptr;
  const char* (*error_string_)(NvmlReturn) = nullptr;
  std::string status_ = "ok";
};

}  // namespace kvq
