// Torch-side helpers of the CUDA glue: the one-device check of a launch, the grouping of its params, and
// the launch's tables (entry rows, key words, coefficients) packed into one pinned host buffer and copied
// to the device in one transfer on the current stream.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <map>
#include <utility>
#include <vector>

namespace zo {
namespace cuda {

// The device of a call's launches (params non-empty): one launch serves all params, so they must share it.
inline at::Device launch_device(at::TensorList params) {
  for (size_t i = 1; i < params.size(); ++i)
    TORCH_CHECK(params[i].device() == params[0].device(), "params[", i, "] is on ", params[i].device(),
                " but params[0] on ", params[0].device());
  return params[0].device();
}

// The indices of the non-empty params grouped by group(i) (e.g. their dtype): one launch per group.
template <class Group>
auto launch_groups(at::TensorList params, Group&& group) {
  std::map<decltype(group(size_t(0))), std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].numel()) groups[group(i)].push_back(i);
  return groups;
}

// The parts (pointer, bytes) on `device`, each at an 8-byte aligned offset. The device buffer returns to
// the caching allocator with this object; its reuse is ordered after the kernels queued on this stream.
class DeviceTable {
 public:
  DeviceTable(const std::vector<std::pair<const void*, size_t>>& parts, const at::Device& device) {
    size_t bytes = 0;
    for (const auto& part : parts) {
      offsets_.push_back(bytes);
      bytes += (part.second + 7) & ~size_t(7);
    }
    at::Tensor host = at::empty({(int64_t)(bytes ? bytes : 8)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    uint8_t* base = host.data_ptr<uint8_t>();
    for (size_t i = 0; i < parts.size(); ++i)
      if (parts[i].second) std::memcpy(base + offsets_[i], parts[i].first, parts[i].second);
    dev_ = host.to(device, /*non_blocking=*/true);
  }

  template <class T>
  const T* get(size_t part) const {
    return reinterpret_cast<const T*>(dev_.data_ptr<uint8_t>() + offsets_[part]);
  }

 private:
  at::Tensor dev_;
  std::vector<size_t> offsets_;
};

}  // namespace cuda
}  // namespace zo
