// What the CUDA launchers ask of the device: attributes that size their grids (queried once per device: a driver
// call per launch would cost as much as a small kernel, and launches happen per layer per step), and whether the
// stream is being captured into a CUDA graph.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <mutex>

namespace finetune_ext {

// A device attribute, queried once per device.
template <cudaDeviceAttr kAttr>
inline int device_attribute(int device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<int, kMaxDevices> value{};
  if (device < 0 || device >= kMaxDevices) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, device));
    return v;
  }
  std::call_once(once[device], [device] { C10_CUDA_CHECK(cudaDeviceGetAttribute(&value[device], kAttr, device)); });
  return value[device];
}

inline int multiprocessors(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }

// The grid of a grid-stride kernel: one block per `threads` work items, at most one wave (multiprocessors x the
// blocks of this kernel that fit on one at once, queried once per device). With more, the last partial wave runs
// at low occupancy while the other multiprocessors idle. One static instance per kernel:
//   static OneWaveGrid grid;  kernel<<<grid.blocks(kernel, threads, items, device), threads>>>(...);
class OneWaveGrid {
 public:
  template <typename Kernel>
  int64_t blocks(Kernel kernel, int threads, int64_t items, int device) {
    const int64_t wave = static_cast<int64_t>(multiprocessors(device)) * resident(kernel, threads, device);
    return std::max<int64_t>(1, std::min<int64_t>((items + threads - 1) / threads, wave));
  }

 private:
  static constexpr int kMaxDevices = 64;
  template <typename Kernel>
  int resident(Kernel kernel, int threads, int device) {
    if (device < 0 || device >= kMaxDevices) return query(kernel, threads);
    std::call_once(once_[device], [&] { value_[device] = query(kernel, threads); });
    return value_[device];
  }
  template <typename Kernel>
  static int query(Kernel kernel, int threads) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
    return blocks > 0 ? blocks : 1;
  }
  std::array<std::once_flag, kMaxDevices> once_;
  std::array<int, kMaxDevices> value_{};
};

// The most shared memory one block may ask for (opting in beyond the default 48 KiB).
inline int shared_memory_per_block_optin(int device) {
  return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
}

// The random ops read their Philox key on the host, so a captured CUDA graph would replay the key of the capture:
// the same mask or noise at every replay. Refused, with the way out.
inline void refuse_graph_capture(cudaStream_t stream, const char* op) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, op,
              ": cannot run inside CUDA graph capture: its Philox key is read on the host, so every replay would draw "
              "the capture's mask again; run it outside the graph (in eval mode it draws nothing)");
}

}  // namespace finetune_ext
