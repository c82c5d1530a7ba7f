// NVML through dlopen (nvml_energy.h). The signatures below are NVML's public
// C API (nvml.h), which has been stable since the _v2 entry points of CUDA 5.5;
// nvmlDeviceGetTotalEnergyConsumption needs a Volta or newer GPU.
#include "bench/nvml_energy.h"

#include <dlfcn.h>

#include <fmt/format.h>

namespace kvq {
namespace {

template <typename Function>
Function symbol(void* library, const char* name) {
  return reinterpret_cast<Function>(dlsym(library, name));
}

}  // namespace

NvmlEnergyMeter::NvmlEnergyMeter(const std::string& pci_bus_id, const char* library) {
  library_ = dlopen(library, RTLD_NOW | RTLD_LOCAL);
  if (library_ == nullptr) {
    const char* why = dlerror();
    mark_unsupported(fmt::format("cannot load {} (no NVIDIA driver?): {}", library, why ? why : "dlopen failed"));
    return;
  }
  auto init = symbol<NvmlReturn (*)()>(library_, "nvmlInit_v2");
  auto by_index = symbol<NvmlReturn (*)(unsigned, NvmlDevice*)>(library_, "nvmlDeviceGetHandleByIndex_v2");
  auto by_bus_id = symbol<NvmlReturn (*)(const char*, NvmlDevice*)>(library_, "nvmlDeviceGetHandleByPciBusId_v2");
  count_ = symbol<NvmlReturn (*)(unsigned*)>(library_, "nvmlDeviceGetCount_v2");
  shutdown_ = symbol<NvmlReturn (*)()>(library_, "nvmlShutdown");
  get_total_energy_ = symbol<NvmlReturn (*)(NvmlDevice, unsigned long long*)>(library_,
                                                                                "nvmlDeviceGetTotalEnergyConsumption");
  error_string_ = symbol<const char* (*)(NvmlReturn)>(library_, "nvmlErrorString");
  if (!init || !by_index || !by_bus_id || !shutdown_ || !get_total_energy_) {
    mark_unsupported(fmt::format("{} lacks the NVML functions kvq needs", library));
    return;
  }
  if (NvmlReturn code = init(); code != 0) {
    mark_unsupported(describe("nvmlInit_v2", code));
    return;
  }
  initialized_ = true;
  NvmlReturn code = pci_bus_id.empty() ? by_index(0, &device_) : by_bus_id(pci_bus_id.c_str(), &device_);
  unsigned count = 0;
  if (code != 0 && count_ && count_(&count) == 0 && count == 1) code = by_index(0, &device_);  // the only GPU is ours
  if (code != 0) {
    mark_unsupported(describe(pci_bus_id.empty() ? "nvmlDeviceGetHandleByIndex_v2(0)" : "nvmlDeviceGetHandleByPciBusId_v2", code));
    return;
  }
  total_energy_mj();  // a GPU without the counter (before Volta) is unsupported from the start
}

NvmlEnergyMeter::~NvmlEnergyMeter() {
  if (initialized_) shutdown_();
  if (library_ != nullptr) dlclose(library_);
}

std::optional<uint64_t> NvmlEnergyMeter::total_energy_mj() {
  if (!supported()) return std::nullopt;
  unsigned long long millijoules = 0;
  if (NvmlReturn code = get_total_energy_(device_, &millijoules); code != 0) {
    mark_unsupported(describe("nvmlDeviceGetTotalEnergyConsumption", code));
    return std::nullopt;
  }
  return millijoules;
}

void NvmlEnergyMeter::mark_unsupported(const std::string& why) { status_ = "unsupported: " + why; }

std::string NvmlEnergyMeter::describe(const char* function, NvmlReturn code) const {
  const char* text = error_string_ ? error_string_(code) : nullptr;
  return fmt::format("{} failed: {} (NVML error {})", function, text ? text : "unknown", code);
}

}  // namespace kvq
