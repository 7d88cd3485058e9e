#include "numa_placement.hpp"

#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "shim/cuda_driver.hpp"

namespace blob2gpu {

namespace {

constexpr int kMpolDefault = 0;
constexpr int kMpolPreferred = 1;
constexpr int kMaxNodes = 1024;  // nodes a memory-policy mask can name

// The first line of a small sysfs file, or "" when it cannot be read.
std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) return "";
  return line;
}

// A NUMA node number as sysfs writes it ("-1" for none); -1 for anything else.
int parse_node(const std::string& text) {
  int node = -1;
  char extra = 0;
  if (std::sscanf(text.c_str(), "%d %c", &node, &extra) != 1) return -1;
  return node >= 0 && node < kMaxNodes ? node : -1;
}

// The driver's bus id ("0000:1A:00.0", or with an 8-digit domain) as sysfs names the device.
std::string sysfs_bus_id(const char* bus_id) {
  unsigned domain = 0, bus = 0, device = 0, function = 0;
  if (std::sscanf(bus_id, "%x:%x:%x.%x", &domain, &bus, &device, &function) != 4) return "";
  char out[32];
  // The whole domain: VMD-style domains past 0xffff name their devices with all of it.
  std::snprintf(out, sizeof(out), "%04x:%02x:%02x.%x", domain, bus & 0xff, device & 0xff,
                function & 0xf);
  return out;
}

std::vector<int> thread_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (pthread_getaffinity_np(pthread_self(), sizeof(set), &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

long set_mempolicy(int mode, const unsigned long* mask, unsigned long max_node) {
  return syscall(SYS_set_mempolicy, mode, mask, max_node);
}

long get_mempolicy(int* mode, unsigned long* mask, unsigned long max_node) {
  return syscall(SYS_get_mempolicy, mode, mask, max_node, nullptr, 0ul);
}

}  // namespace

std::vector<int> parse_cpu_list(const std::string& text) {
  std::vector<int> cpus;
  std::stringstream parts(text);
  std::string part;
  while (std::getline(parts, part, ',')) {
    int lo = -1, hi = -1;
    const int got = std::sscanf(part.c_str(), "%d-%d", &lo, &hi);
    if (got == 1) hi = lo;
    if (got < 1) continue;
    if (lo < 0 || hi < lo || hi >= CPU_SETSIZE) continue;
    for (int c = lo; c <= hi; ++c) cpus.push_back(c);
  }
  return cpus;
}

NumaPlacement numa_placement(int ordinal, const std::string& sys_root) {
  NumaPlacement p;
  p.source = "none";
  try {
    const CudaDriver& d = cuda_driver();
    CUdevice device = 0;
    if (d.cuDeviceGet(&device, ordinal) != CUDA_SUCCESS) return p;
    int node = -1;
    if (d.cuDeviceGetAttribute(&node, CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID, device) == CUDA_SUCCESS) {
      p.source = "driver";  // -1 here is the driver saying the host has no NUMA node
      p.node = node >= 0 && node < kMaxNodes ? node : -1;
    } else {
      char bus_id[64] = {0};
      if (d.cuDeviceGetPCIBusId(bus_id, sizeof(bus_id) - 1, device) != CUDA_SUCCESS) return p;
      const std::string id = sysfs_bus_id(bus_id);
      if (id.empty()) return p;
      const std::string text = read_line(sys_root + "/bus/pci/devices/" + id + "/numa_node");
      if (text.empty()) return p;
      p.source = "sysfs";
      p.node = parse_node(text);
    }
  } catch (...) {
    return p;  // no driver: no node
  }
  if (p.node < 0) return p;
  const std::vector<int> node_cpus = parse_cpu_list(
      read_line(sys_root + "/devices/system/node/node" + std::to_string(p.node) + "/cpulist"));
  const std::vector<int> allowed = thread_cpus();
  for (int c : node_cpus) {
    for (int a : allowed) {
      if (a == c) p.cpus.push_back(c);
    }
  }
  return p;
}

bool bind_thread_to(const std::vector<int>& cpus) {
  if (cpus.empty()) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) CPU_SET(c, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

ScopedNumaPlacement::ScopedNumaPlacement(const NumaPlacement& placement) {
  if (placement.node < 0) return;
  if (!placement.cpus.empty()) {
    previous_cpus_ = thread_cpus();
    cpus_bound_ = bind_thread_to(placement.cpus);
  }
  unsigned long mask[kMaxNodes / (8 * sizeof(unsigned long))] = {0};
  const auto bits = 8 * sizeof(unsigned long);
  previous_nodes_.assign(kMaxNodes / bits, 0);
  if (get_mempolicy(&previous_mode_, previous_nodes_.data(), kMaxNodes) != 0) {
    previous_mode_ = kMpolDefault;  // unknown: the default is what a thread starts with
  }
  mask[static_cast<size_t>(placement.node) / bits] |=
      1ul << (static_cast<size_t>(placement.node) % bits);
  // Fails where the kernel has no NUMA support or a sandbox forbids it: the pages then come from
  // where the CPU binding (first touch) puts them.
  memory_bound_ = set_mempolicy(kMpolPreferred, mask, kMaxNodes) == 0;
}

ScopedNumaPlacement::~ScopedNumaPlacement() {
  if (memory_bound_) {
    if (previous_mode_ == kMpolDefault ||
        set_mempolicy(previous_mode_, previous_nodes_.data(), kMaxNodes) != 0) {
      set_mempolicy(kMpolDefault, nullptr, 0);
    }
  }
  if (cpus_bound_) bind_thread_to(previous_cpus_);
}

}  // namespace blob2gpu
