// What the CUDA launchers ask of the device: attributes that size their grids (queried once per device: a driver
// call per launch would cost as much as a small kernel, and launches happen per layer per step), and whether the
// stream is being captured into a CUDA graph.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <mutex>

namespace finetune_ext {

inline int multiprocessors(int device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<int, kMaxDevices> count{};
  if (device < 0 || device >= kMaxDevices) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }
  std::call_once(once[device], [device] {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count[device], cudaDevAttrMultiProcessorCount, device));
  });
  return count[device];
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
