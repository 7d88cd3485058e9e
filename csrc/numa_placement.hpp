// NumaPlacement: the host NUMA node nearest a GPU, and its CPUs this process may run on. A CUDA
// pipeline pins its staging ring there and binds its io threads there, so the bytes a thread
// reads and the DMA that copies them stay on the GPU's side of the socket interconnect.
//
// The node comes from the driver (CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID, CUDA 12.2+) where it answers,
// else from sysfs (/sys/bus/pci/devices/<the GPU's PCI bus id>/numa_node); -1 from either means
// the host has no NUMA node to choose (one socket, or NUMA off), and nothing is bound.
#pragma once

#include <string>
#include <vector>

namespace blob2gpu {

struct NumaPlacement {
  int node = -1;          // -1: none (nothing is bound)
  std::string source;     // "driver", "sysfs" or "none" (where the answer came from)
  std::vector<int> cpus;  // the node's CPUs within this process's affinity (empty: none)
};

// Where GPU `ordinal` belongs on the host. `sys_root` is where sysfs is mounted ("/sys"; tests
// give a directory of their own). Never throws: what cannot be read counts as no node.
NumaPlacement numa_placement(int ordinal, const std::string& sys_root = "/sys");

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}; malformed parts are skipped.
std::vector<int> parse_cpu_list(const std::string& text);

// Binds the calling thread to `cpus` (nothing when empty); returns whether it took.
bool bind_thread_to(const std::vector<int>& cpus);

// While alive, the calling thread runs on the placement's CPUs and its new pages come from the
// placement's node first (set_mempolicy MPOL_PREFERRED); both are restored after, to what they
// were (a thread started under numactl keeps its policy). A placement
// without a node changes nothing. Pinned memory allocated meanwhile (cuMemHostAlloc makes its
// pages resident in the calling thread) lands on that node.
class ScopedNumaPlacement {
 public:
  explicit ScopedNumaPlacement(const NumaPlacement& placement);
  ~ScopedNumaPlacement();
  ScopedNumaPlacement(const ScopedNumaPlacement&) = delete;
  ScopedNumaPlacement& operator=(const ScopedNumaPlacement&) = delete;
  bool memory_bound() const { return memory_bound_; }

 private:
  std::vector<int> previous_cpus_;
  std::vector<unsigned long> previous_nodes_;  // the memory policy's node mask before
  int previous_mode_ = 0;                      // and its mode (MPOL_DEFAULT: 0), flags included
  bool cpus_bound_ = false;
  bool memory_bound_ = false;
};

}  // namespace blob2gpu
