// Memory a bench point holds, measured rather than computed: device memory in
// use through the CUDA runtime, and the host process's peak resident set
// (Linux VmHWM, which the bench resets before each point). Also the two other
// things the bench asks of the CUDA runtime: the GPU's PCI bus id (to find the
// same GPU in NVML) and clearing the runtime's last error after an allocation
// failure that the bench reports as "oom". Without CUDA in the build (or
// without a GPU) the device functions answer "nothing".
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace kvq {

// Bytes in use on CUDA device 0 by every client (cudaMemGetInfo: total - free);
// nullopt without CUDA or a device.
std::optional<int64_t> device_bytes_in_use();
// The PCI bus id of CUDA device 0 ("0000:1B:00.0"), empty without CUDA or a device.
std::string cuda_pci_bus_id();
// A failed cudaMalloc leaves its error in the runtime's last-error slot, where
// the next launch check would find it: call after catching an out-of-memory error.
void clear_device_error();

// Resets the process's peak resident set to its current size (Linux
// /proc/self/clear_refs "5"); false where that is not possible.
bool reset_host_peak_rss();
// The process's peak resident set in bytes since start or the last reset (VmHWM), nullopt if unreadable.
std::optional<int64_t> host_peak_rss_bytes();

}  // namespace kvq
