// Test-only fake of the CUDA driver API on host memory. blob2gpu's real CUDA backend dlopen()s this
// library instead of libcuda.so.1 (BLOB2GPU_CUDA_DRIVER=<path>), so its real code paths run on CPU:
// every stream has a worker thread that performs copies later, events complete when the worker
// reaches them, device pointers are synthetic addresses that fault if the host dereferences them,
// and misuse is recorded as a "violation" that tests read through the fake_cuda_* control API.
// See tests/fake_cuda/README.md.
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cuda_driver_api.h"

#define FAKE_CUDA_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kMaxDevices = 16;
constexpr int kDriverVersion = 12080;
constexpr uint64_t kDefaultVramBudget = 8ull << 30;

// Device addresses live above the 48-bit user address space (non-canonical on x86-64, beyond the
// VA range on aarch64), so a host dereference of a device pointer always faults instead of
// silently reading some host mapping. Each device gets its own 16 TiB span; addresses are handed
// out by a bump pointer and never reused, so a stale pointer never becomes valid again.
constexpr uint64_t kDeviceAddressBase = 1ull << 48;
constexpr uint64_t kDeviceAddressSpan = 1ull << 44;
constexpr uint64_t kDeviceAlignment = 256;
// Unused gap after every allocation, so an access just past the end is not inside a neighbour.
constexpr uint64_t kDeviceGuardGap = 64ull << 10;
// Fresh device memory is filled with this byte, like the garbage real VRAM holds: a tensor region
// the core never copied shows up as 0xA5 bytes instead of plausible zeros.
constexpr int kFreshDeviceByte = 0xA5;

// Opaque handles are tagged ids in the same non-canonical range, never host pointers: the core
// cannot dereference them, and ids are never reused, so a destroyed handle is always recognised.
constexpr uint64_t kHandleTagMask = 0xffff'f000'0000'0000ull;
constexpr uint64_t kHandleIdMask = ~kHandleTagMask;
constexpr uint64_t kContextTag = 0x0002'c000'0000'0000ull;
constexpr uint64_t kStreamTag = 0x0002'5000'0000'0000ull;
constexpr uint64_t kEventTag = 0x0002'e000'0000'0000ull;

constexpr size_t kViolationLogCapacity = 256;

uint64_t round_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void sleep_until_ns(int64_t when) {
  const int64_t left = when - steady_ns();
  if (left > 0) std::this_thread::sleep_for(std::chrono::nanoseconds(left));
}

// FAKE_CUDA_LINK_GBPS: the link model's rate at load (GB/s, 1e9 bytes a second; unset or 0: off).
double link_bytes_per_ns_from_env() {
  const char* text = std::getenv("FAKE_CUDA_LINK_GBPS");
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const double gbps = std::strtod(text, &end);
  return end != text && gbps > 0 ? gbps : 0;  // GB/s is bytes per ns
}

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<std::byte, FreeDeleter>;

// Host memory with the given alignment; null on failure. Large blocks are made resident at once
// (huge pages, populated in one call), as real device memory and page-locked host memory are on
// allocation: the first copy into them then does not pay the host's page faults, which a GPU
// never would.
AlignedBytes allocate_aligned(size_t alignment, size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, alignment, bytes) != 0) return AlignedBytes();
  constexpr uintptr_t kPage = 4096;
  if (bytes >= (2u << 20)) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kPage - 1);
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
    madvise(reinterpret_cast<void*>(begin), end - begin, 23 /* MADV_POPULATE_WRITE */);
  }
  return AlignedBytes(static_cast<std::byte*>(p));
}

// CPU time the fake spends doing what a GPU does in hardware (making its memory resident and
// poisoning it, moving copied bytes): benchmarks subtract it to estimate a real GPU's host cost.
std::atomic<uint64_t> g_emulation_cpu_ns{0};

uint64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// Adds the calling thread's CPU time over its lifetime to g_emulation_cpu_ns.
class EmulationClock {
 public:
  EmulationClock() : start_(thread_cpu_ns()) {}
  ~EmulationClock() { g_emulation_cpu_ns += thread_cpu_ns() - start_; }
  EmulationClock(const EmulationClock&) = delete;
  EmulationClock& operator=(const EmulationClock&) = delete;

 private:
  uint64_t start_;
};

// Keeps a T alive for the whole process without ever running its destructor: the driver state
// owns worker threads, and joining them from a global destructor could hang process exit.
template <typename T>
class NoDestructor {
 public:
  NoDestructor() { ::new (static_cast<void*>(storage_)) T(); }
  T& get() { return *std::launder(reinterpret_cast<T*>(storage_)); }

 private:
  alignas(T) unsigned char storage_[sizeof(T)];
};

// One cuMemAlloc_v2 allocation: a synthetic address range backed by host memory.
struct DeviceBlock {
  uint64_t address = 0;
  uint64_t size = 0;
  int device = 0;
  AlignedBytes memory;
  int64_t pending_ops = 0;  // queued copies that still reference this block
};

// One cuMemHostAlloc allocation (real, page-aligned host memory).
struct HostBlock {
  AlignedBytes memory;
  uint64_t size = 0;
  int64_t pending_ops = 0;
};

struct Stream;

// One queued stream operation. Copies hold shared_ptrs to the memory they touch, so a misused
// free (recorded as a violation) never leaves the worker writing into released memory.
struct StreamOp {
  enum class Kind { kCopyHtoD, kCopyDtoH, kCopyDtoD, kWaitEvent, kHostFunc };
  Kind kind = Kind::kCopyHtoD;
  std::shared_ptr<DeviceBlock> device_block;  // the destination of a DtoD copy
  uint64_t device_offset = 0;
  std::shared_ptr<DeviceBlock> source_block;  // DtoD: the source
  uint64_t source_offset = 0;
  uint64_t bytes = 0;
  std::shared_ptr<HostBlock> host_block;  // null when the host side is pageable memory
  std::byte* host = nullptr;              // copy source (HtoD) or destination (DtoH)
  std::vector<std::byte> staging;         // pageable HtoD: the source as it was at call time
  std::shared_ptr<Stream> wait_stream;
  uint64_t wait_position = 0;
  void (*host_fn)(void*) = nullptr;  // cuLaunchHostFunc's, called by the worker without the lock
  void* host_data = nullptr;
  int64_t enqueued_ns = 0;  // when the call queued it (the link model's earliest start)
};

struct Stream {
  uint64_t id = 0;  // 0 for a device's implicit stream (NULL / legacy / per-thread handles)
  int device = 0;
  std::deque<StreamOp> queue;
  uint64_t enqueued = 0;   // operations ever enqueued
  uint64_t completed = 0;  // operations the worker has finished
  bool stopping = false;
  bool held = false;     // fake_cuda_hold_stream: the worker starts no operation until released
  int64_t ready_ns = 0;  // when its last operation completed (a modelled copy: its link end)
  std::condition_variable work_ready;
  std::thread worker;
};

struct Event {
  uint64_t id = 0;
  int device = 0;
  unsigned flags = 0;  // cuEventCreate's: without CU_EVENT_BLOCKING_SYNC a wait spins a core
  std::shared_ptr<Stream> stream;  // null until first recorded: a never-recorded event is complete
  uint64_t position = 0;           // complete once stream->completed reaches this
};

struct Device {
  int64_t primary_refcount = 0;
  int64_t activations = 0;   // primary context retains that found it inactive (refcount 0 -> 1)
  uint64_t next_offset = 0;  // bump pointer inside this device's address span
  uint64_t live_bytes = 0;
  int64_t live_allocations = 0;
  int64_t live_streams = 0;
  int64_t live_events = 0;
  int64_t pending_copies = 0;  // copies queued on the device's streams and not executed yet
  std::shared_ptr<Stream> implicit_stream;
  int host_numa_id = -1;  // the host NUMA node nearest the device (-1: none)
  // The link model (DriverState::link_bytes_per_ns): when the link is next free, and what it
  // did since the counters were reset: busy time, and the first copy's start and the last one's
  // end (the span the busy fraction is over).
  int64_t link_free_ns = 0;
  int64_t link_busy_ns = 0;
  int64_t link_first_ns = -1;
  int64_t link_last_ns = -1;
  uint64_t link_copies = 0;
};

struct DriverState {
  std::mutex mu;
  std::condition_variable progress;  // notified whenever any stream completes an operation
  // Held shared by workers while they move bytes (without mu), exclusively by
  // fake_cuda_read_device, so a debug read never sees a half-done copy.
  std::shared_mutex copy_mu;

  bool initialized = false;
  int device_count = 1;
  uint64_t vram_budget = kDefaultVramBudget;
  uint64_t copy_delay_us = 0;
  // The copy-bandwidth model: host-to-device copies of a device share its link, which moves
  // link_bytes_per_ns (0: no model, copies take what the memcpy takes). See LinkModel.
  double link_bytes_per_ns = link_bytes_per_ns_from_env();
  // cuDeviceGetAttribute(CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID): answered only when on (a driver
  // before CUDA 12.2 refuses the attribute), with each device's host_numa_id.
  bool host_numa_attribute = false;
  int64_t host_alloc_fail_after = -1;
  CUresult host_alloc_error = CUDA_ERROR_OUT_OF_MEMORY;  // what the host-alloc switch returns
  int64_t device_alloc_fail_after = -1;
  bool sticky_faults = false;

  std::array<Device, kMaxDevices> devices;
  std::map<uint64_t, std::shared_ptr<DeviceBlock>> device_blocks;  // by address
  std::map<uintptr_t, std::shared_ptr<HostBlock>> host_blocks;     // by address
  std::unordered_map<uint64_t, std::shared_ptr<Stream>> streams;
  std::unordered_map<uint64_t, std::shared_ptr<Event>> events;
  uint64_t next_stream_id = 1;
  uint64_t next_event_id = 1;

  int64_t live_device_allocations = 0;
  uint64_t live_device_bytes = 0;
  uint64_t peak_device_bytes = 0;
  int64_t live_host_allocations = 0;
  uint64_t live_host_bytes = 0;
  int64_t live_streams = 0;
  int64_t live_events = 0;

  uint64_t h2d_copies = 0;
  uint64_t h2d_bytes = 0;
  uint64_t pageable_h2d_copies = 0;
  int64_t pending_h2d_copies = 0;
  int64_t max_pending_h2d_copies = 0;
  int64_t h2d_fail_after = -1;  // the copy fault switch (fake_cuda_fail_copy_after)
  // cuMemAlloc_v2 / cuMemFree_v2 calls made while copies were pending on the device: each is a
  // device-wide synchronization on a GPU (fake_cuda_device_syncs).
  uint64_t device_syncs = 0;

  int64_t violations = 0;
  std::deque<std::string> violation_log;  // deque: push/pop at the ends keep other c_str() valid
  bool has_last_violation = false;
};

DriverState& state() {
  static NoDestructor<DriverState> instance;
  return instance.get();
}

using Lock = std::unique_lock<std::mutex>;

// The calling thread's current context handle (cuCtxSetCurrent); 0 when none.
thread_local uint64_t t_current_context = 0;

std::string hex(uint64_t value) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(value));
  return buf;
}

void record_violation(DriverState& s, const Lock&, std::string message) {
  ++s.violations;
  std::fprintf(stderr, "[fake_cuda] violation: %s\n", message.c_str());
  s.violation_log.push_back(std::move(message));
  if (s.violation_log.size() > kViolationLogCapacity) s.violation_log.pop_front();
  s.has_last_violation = true;
}

// Whole-driver failure modes, checked before any lock is taken (in a forked child a lock may be
// held by a stream worker that did not survive the fork): 0 when calls run normally, otherwise the
// error every driver call returns. fake_cuda_set_deinitialized sets CUDA_ERROR_DEINITIALIZED (a
// driver shutting down); a fork, with fake_cuda_set_fail_in_forked_child on, sets
// CUDA_ERROR_NOT_INITIALIZED in the child, as the real driver answers a child of a process that
// had initialized CUDA.
std::atomic<int> g_failing_with{0};
std::atomic<bool> g_fail_in_forked_child{false};
// Sleeps before cuInit and cuDevicePrimaryCtxRetain do anything (no lock held), so a test can
// fork while another thread is inside them (fake_cuda_set_init_delay_us, ..._retain_delay_us).
std::atomic<uint64_t> g_init_delay_us{0};
std::atomic<uint64_t> g_retain_delay_us{0};

void sleep_us(const std::atomic<uint64_t>& us) {
  if (const uint64_t n = us.load(); n > 0)
    std::this_thread::sleep_for(std::chrono::microseconds(n));
}

void on_fork_child() {
  if (g_fail_in_forked_child.load()) g_failing_with = CUDA_ERROR_NOT_INITIALIZED;
}

const bool g_atfork_registered = [] {
  pthread_atfork(nullptr, nullptr, &on_fork_child);
  return true;
}();

// Runs a body, turning exceptions into driver error codes: nothing may unwind into C callers.
template <typename F>
CUresult caught(F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return CUDA_ERROR_OUT_OF_MEMORY;
  } catch (...) {
    return CUDA_ERROR_UNKNOWN;
  }
}

// An API entry point's body: the whole-driver failure modes first, then the body, caught.
template <typename F>
CUresult guarded(F&& body) noexcept {
  if (const int failing = g_failing_with.load(); failing != 0) return failing;
  return caught(std::forward<F>(body));
}

bool is_tagged(uint64_t handle, uint64_t tag) {
  return (handle & kHandleTagMask) == tag;
}

CUcontext context_handle(int device) {
  return reinterpret_cast<CUcontext>(static_cast<uintptr_t>(kContextTag | (device + 1)));
}

// Device of the calling thread's current context, or -1 with the error to return.
int current_device(DriverState& s, const Lock&, CUresult* error) {
  if (!s.initialized) {
    *error = CUDA_ERROR_NOT_INITIALIZED;
    return -1;
  }
  const uint64_t handle = t_current_context;
  if (handle == 0 || !is_tagged(handle, kContextTag)) {
    *error = CUDA_ERROR_INVALID_CONTEXT;
    return -1;
  }
  const int device = static_cast<int>((handle & kHandleIdMask) - 1);
  if (device < 0 || device >= kMaxDevices || s.devices[device].primary_refcount <= 0) {
    *error = CUDA_ERROR_INVALID_CONTEXT;  // the primary context was released to zero meanwhile
    return -1;
  }
  *error = CUDA_SUCCESS;
  return device;
}

void stream_worker(std::shared_ptr<Stream> stream);

std::shared_ptr<Stream> start_stream(int device, uint64_t id) {
  auto stream = std::make_shared<Stream>();
  stream->id = id;
  stream->device = device;
  // The worker owns its stream: a destroyed stream's queue still runs to its end (the real
  // driver's cuStreamDestroy returns at once and frees the stream when its work is done).
  stream->worker = std::thread(stream_worker, stream);
  return stream;
}

// Resolves a stream handle. NULL, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD all map to the current
// device's implicit stream. Handles that were destroyed or never issued are violations.
CUresult resolve_stream(DriverState& s, const Lock& lock, CUstream handle, int device,
                        const char* api, std::shared_ptr<Stream>* out) {
  const auto value = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(handle));
  if (handle == nullptr || handle == BLOB2GPU_CU_STREAM_LEGACY ||
      handle == BLOB2GPU_CU_STREAM_PER_THREAD) {
    Device& d = s.devices[device];
    if (!d.implicit_stream) d.implicit_stream = start_stream(device, 0);
    *out = d.implicit_stream;
    return CUDA_SUCCESS;
  }
  if (is_tagged(value, kStreamTag)) {
    const uint64_t id = value & kHandleIdMask;
    auto it = s.streams.find(id);
    if (it != s.streams.end()) {
      *out = it->second;
      return CUDA_SUCCESS;
    }
    if (id != 0 && id < s.next_stream_id) {
      record_violation(
          s, lock, std::string(api) + ": stream " + hex(value) + " used after cuStreamDestroy_v2");
      return CUDA_ERROR_INVALID_HANDLE;
    }
  }
  record_violation(s, lock, std::string(api) + ": unknown stream handle " + hex(value));
  return CUDA_ERROR_INVALID_HANDLE;
}

CUresult resolve_event(DriverState& s, const Lock& lock, CUevent handle, const char* api,
                       std::shared_ptr<Event>* out) {
  const auto value = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(handle));
  if (is_tagged(value, kEventTag)) {
    const uint64_t id = value & kHandleIdMask;
    auto it = s.events.find(id);
    if (it != s.events.end()) {
      *out = it->second;
      return CUDA_SUCCESS;
    }
    if (id != 0 && id < s.next_event_id) {
      record_violation(
          s, lock, std::string(api) + ": event " + hex(value) + " used after cuEventDestroy_v2");
      return CUDA_ERROR_INVALID_HANDLE;
    }
  }
  record_violation(s, lock, std::string(api) + ": unknown event handle " + hex(value));
  return CUDA_ERROR_INVALID_HANDLE;
}

// Work can only be queued on a stream of the current context (the real driver says "invalid
// resource handle" otherwise).
CUresult check_stream_device(DriverState& s, const Lock& lock, const Stream& stream, int device,
                             const char* api) {
  if (stream.device == device) return CUDA_SUCCESS;
  record_violation(s, lock,
                   std::string(api) + ": stream of device " + std::to_string(stream.device) +
                       " used while device " + std::to_string(device) + "'s context is current");
  return CUDA_ERROR_INVALID_HANDLE;
}

// The live allocation that contains [address, address + bytes) entirely, or null.
std::shared_ptr<DeviceBlock> find_device_range(DriverState& s, uint64_t address, uint64_t bytes) {
  auto it = s.device_blocks.upper_bound(address);
  if (it == s.device_blocks.begin()) return nullptr;
  --it;
  const DeviceBlock& block = *it->second;
  const uint64_t offset = address - block.address;
  if (offset >= block.size || bytes > block.size - offset) return nullptr;
  return it->second;
}

enum class HostKind { kPageable, kPinned, kStraddlesPinned };

// Classifies a host range: inside one cuMemHostAlloc block, pageable, or partly inside a block.
HostKind classify_host_range(DriverState& s, const void* p, uint64_t bytes,
                             std::shared_ptr<HostBlock>* block_out) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  auto it = s.host_blocks.upper_bound(address);
  if (it != s.host_blocks.begin()) {
    auto prev = std::prev(it);
    const uint64_t offset = address - prev->first;
    if (offset < prev->second->size) {
      if (bytes > prev->second->size - offset) return HostKind::kStraddlesPinned;
      *block_out = prev->second;
      return HostKind::kPinned;
    }
  }
  // A pageable range that runs into the next pinned block is also an overrun.
  if (it != s.host_blocks.end() && bytes > it->first - address) return HostKind::kStraddlesPinned;
  return HostKind::kPageable;
}

bool event_complete(const Event& event) {
  return !event.stream || event.stream->completed >= event.position;
}

bool is_copy(const StreamOp& op) {
  return op.kind == StreamOp::Kind::kCopyHtoD || op.kind == StreamOp::Kind::kCopyDtoH ||
         op.kind == StreamOp::Kind::kCopyDtoD;
}

uint64_t enqueue(DriverState& s, Stream& stream, StreamOp op) {
  if (op.device_block) ++op.device_block->pending_ops;
  if (op.source_block) ++op.source_block->pending_ops;
  if (op.host_block) ++op.host_block->pending_ops;
  if (is_copy(op)) ++s.devices[stream.device].pending_copies;
  if (op.kind == StreamOp::Kind::kCopyHtoD) {
    ++s.pending_h2d_copies;
    s.max_pending_h2d_copies = std::max(s.max_pending_h2d_copies, s.pending_h2d_copies);
  }
  op.enqueued_ns = steady_ns();
  stream.queue.push_back(std::move(op));
  ++stream.enqueued;
  stream.work_ready.notify_one();
  return stream.enqueued;
}

void finish_copy(DriverState& s, const Stream& stream, const StreamOp& op) {
  if (op.device_block) --op.device_block->pending_ops;
  if (op.source_block) --op.source_block->pending_ops;
  if (op.host_block) --op.host_block->pending_ops;
  --s.devices[stream.device].pending_copies;
  if (op.kind == StreamOp::Kind::kCopyHtoD) {
    --s.pending_h2d_copies;
    ++s.h2d_copies;
    s.h2d_bytes += op.bytes;
    if (!op.host_block) ++s.pageable_h2d_copies;
  }
}

// One per stream. Copies run without the lock held and read their source when they execute, so a
// caller that reuses a source buffer before the copy's event completed ships the wrong bytes.
void stream_worker(std::shared_ptr<Stream> stream) {
  DriverState& s = state();
  Lock lock(s.mu);
  for (;;) {
    stream->work_ready.wait(lock, [&] {
      return (!stream->queue.empty() && !stream->held) ||
             (stream->stopping && stream->queue.empty());
    });
    if (stream->queue.empty()) return;  // stopping, and everything queued has run
    StreamOp op = std::move(stream->queue.front());
    stream->queue.pop_front();
    int64_t link_done_ns = -1;  // a copy over the modelled link: when it ends
    if (op.kind == StreamOp::Kind::kWaitEvent) {
      s.progress.wait(lock, [&] { return op.wait_stream->completed >= op.wait_position; });
    } else if (op.kind == StreamOp::Kind::kHostFunc) {
      lock.unlock();
      op.host_fn(op.host_data);  // holds the stream for as long as it runs, as on a GPU
      lock.lock();
    } else {
      const uint64_t delay_us = s.copy_delay_us;
      // The modelled link: this copy has it from when it is free (or now) for bytes / rate, after
      // the copies of the device's other streams that took it first; the copy completes then.
      if (op.kind == StreamOp::Kind::kCopyHtoD && s.link_bytes_per_ns > 0) {
        Device& d = s.devices[stream->device];
        // From when the copy could have started on a GPU (queued, its stream's previous
        // operation done, the link free), not from when this worker thread got the CPU: the
        // fake's own scheduling delays are not the pipeline's.
        const int64_t start = std::max({op.enqueued_ns, stream->ready_ns, d.link_free_ns});
        const auto length =
            static_cast<int64_t>(static_cast<double>(op.bytes) / s.link_bytes_per_ns);
        link_done_ns = start + length;
        d.link_free_ns = link_done_ns;
        d.link_busy_ns += length;
        if (d.link_first_ns < 0) d.link_first_ns = start;
        d.link_last_ns = link_done_ns;
        ++d.link_copies;
      }
      lock.unlock();
      if (delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
      {
        EmulationClock clock;
        std::shared_lock<std::shared_mutex> copying(s.copy_mu);
        std::byte* device = op.device_block->memory.get() + op.device_offset;
        if (op.kind == StreamOp::Kind::kCopyHtoD) {
          const std::byte* src = op.staging.empty() ? op.host : op.staging.data();
          std::memcpy(device, src, op.bytes);
        } else if (op.kind == StreamOp::Kind::kCopyDtoD) {
          std::memmove(device, op.source_block->memory.get() + op.source_offset, op.bytes);
        } else {
          std::memcpy(op.host, device, op.bytes);
        }
      }
      if (link_done_ns >= 0) sleep_until_ns(link_done_ns);
      lock.lock();
      finish_copy(s, *stream, op);
    }
    stream->ready_ns = link_done_ns >= 0 ? link_done_ns : steady_ns();
    ++stream->completed;
    op = StreamOp();  // drop block references while the lock is held
    s.progress.notify_all();
  }
}

// A fault switch: -1 is off; otherwise the number of calls that still succeed. At 0 the next call
// fails, and the switch turns itself off again unless faults are sticky (then every later call
// fails, like real exhaustion, until the switch is reset).
bool fault_fires(DriverState& s, int64_t* switch_value) {
  if (*switch_value != 0) return false;
  if (!s.sticky_faults) *switch_value = -1;
  return true;
}
void count_success(int64_t* switch_value) {
  if (*switch_value > 0) --*switch_value;
}

// Validates and queues one copy; shared by the HtoD and DtoH entry points.
CUresult enqueue_copy(StreamOp::Kind kind, CUdeviceptr dptr, void* host, size_t bytes,
                      CUstream handle, const char* api) {
  DriverState& s = state();
  Lock lock(s.mu);
  CUresult error;
  const int device = current_device(s, lock, &error);
  if (device < 0) return error;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve_stream(s, lock, handle, device, api, &stream); r != CUDA_SUCCESS) {
    return r;
  }
  if (CUresult r = check_stream_device(s, lock, *stream, device, api); r != CUDA_SUCCESS) return r;
  if (bytes == 0) return CUDA_SUCCESS;
  if (host == nullptr) return CUDA_ERROR_INVALID_VALUE;

  if (kind == StreamOp::Kind::kCopyHtoD && fault_fires(s, &s.h2d_fail_after)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (kind == StreamOp::Kind::kCopyHtoD) count_success(&s.h2d_fail_after);
  StreamOp op;
  op.kind = kind;
  op.bytes = bytes;
  op.device_block = find_device_range(s, dptr, bytes);
  if (!op.device_block) {
    record_violation(s, lock,
                     std::string(api) + ": device range [" + hex(dptr) + ", +" +
                         std::to_string(bytes) +
                         ") is not inside one live cuMemAlloc_v2 allocation");
    return CUDA_ERROR_INVALID_VALUE;
  }
  op.device_offset = dptr - op.device_block->address;
  if (const auto h = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(host));
      h >= kDeviceAddressBase && h < kDeviceAddressBase + kMaxDevices * kDeviceAddressSpan) {
    record_violation(s, lock,
                     std::string(api) + ": host pointer " + hex(h) + " is a device address");
    return CUDA_ERROR_INVALID_VALUE;
  }
  const HostKind host_kind = classify_host_range(s, host, bytes, &op.host_block);
  if (host_kind == HostKind::kStraddlesPinned) {
    record_violation(s, lock,
                     std::string(api) + ": host range [" + hex(reinterpret_cast<uintptr_t>(host)) +
                         ", +" + std::to_string(bytes) +
                         ") runs past the end of a cuMemHostAlloc block");
    return CUDA_ERROR_INVALID_VALUE;
  }
  op.host = static_cast<std::byte*>(host);
  const bool pageable = host_kind == HostKind::kPageable;
  if (kind == StreamOp::Kind::kCopyHtoD && pageable) {
    // The real driver stages pageable memory before returning: the caller may reuse it at once.
    const auto* src = static_cast<const std::byte*>(host);
    op.staging.assign(src, src + bytes);
  }
  const uint64_t position = enqueue(s, *stream, std::move(op));
  if (kind == StreamOp::Kind::kCopyDtoH && pageable) {
    // The real driver returns from a DtoH copy into pageable memory only once it has completed.
    s.progress.wait(lock, [&] { return stream->completed >= position; });
  }
  return CUDA_SUCCESS;
}

const char* error_name(CUresult error) {
  switch (error) {
    case CUDA_SUCCESS:
      return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE:
      return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY:
      return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_NOT_INITIALIZED:
      return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_DEINITIALIZED:
      return "CUDA_ERROR_DEINITIALIZED";
    case CUDA_ERROR_OPERATING_SYSTEM:
      return "CUDA_ERROR_OPERATING_SYSTEM";
    case CUDA_ERROR_CONTEXT_IS_DESTROYED:
      return "CUDA_ERROR_CONTEXT_IS_DESTROYED";
    case CUDA_ERROR_LAUNCH_FAILED:
      return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_PERMITTED:
      return "CUDA_ERROR_NOT_PERMITTED";
    case CUDA_ERROR_NO_DEVICE:
      return "CUDA_ERROR_NO_DEVICE";
    case CUDA_ERROR_INVALID_DEVICE:
      return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_CONTEXT:
      return "CUDA_ERROR_INVALID_CONTEXT";
    case CUDA_ERROR_INVALID_HANDLE:
      return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_READY:
      return "CUDA_ERROR_NOT_READY";
    case CUDA_ERROR_ILLEGAL_ADDRESS:
      return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case CUDA_ERROR_NOT_SUPPORTED:
      return "CUDA_ERROR_NOT_SUPPORTED";
    case CUDA_ERROR_UNKNOWN:
      return "CUDA_ERROR_UNKNOWN";
    default:
      return nullptr;
  }
}

// The real driver's descriptions for the same codes.
const char* error_string(CUresult error) {
  switch (error) {
    case CUDA_SUCCESS:
      return "no error";
    case CUDA_ERROR_INVALID_VALUE:
      return "invalid argument";
    case CUDA_ERROR_OUT_OF_MEMORY:
      return "out of memory";
    case CUDA_ERROR_NOT_INITIALIZED:
      return "initialization error";
    case CUDA_ERROR_DEINITIALIZED:
      return "driver shutting down";
    case CUDA_ERROR_OPERATING_SYSTEM:
      return "OS call failed or operation not supported on this OS";
    case CUDA_ERROR_CONTEXT_IS_DESTROYED:
      return "context is destroyed";
    case CUDA_ERROR_LAUNCH_FAILED:
      return "unspecified launch failure";
    case CUDA_ERROR_NOT_PERMITTED:
      return "operation not permitted";
    case CUDA_ERROR_NO_DEVICE:
      return "no CUDA-capable device is detected";
    case CUDA_ERROR_INVALID_DEVICE:
      return "invalid device ordinal";
    case CUDA_ERROR_INVALID_CONTEXT:
      return "invalid device context";
    case CUDA_ERROR_INVALID_HANDLE:
      return "invalid resource handle";
    case CUDA_ERROR_NOT_READY:
      return "device not ready";
    case CUDA_ERROR_ILLEGAL_ADDRESS:
      return "an illegal memory access was encountered";
    case CUDA_ERROR_NOT_SUPPORTED:
      return "operation not supported";
    case CUDA_ERROR_UNKNOWN:
      return "unknown error";
    default:
      return nullptr;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Driver API entry points (the names cuda_driver.cpp looks up with dlsym).

FAKE_CUDA_EXPORT CUresult cuInit(unsigned int flags) {
  return guarded([&]() -> CUresult {
    sleep_us(g_init_delay_us);
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    DriverState& s = state();
    Lock lock(s.mu);
    if (s.device_count <= 0) return CUDA_ERROR_NO_DEVICE;
    s.initialized = true;
    return CUDA_SUCCESS;
  });
}

// Like the real driver, this one works before cuInit.
FAKE_CUDA_EXPORT CUresult cuDriverGetVersion(int* version) {
  if (version == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *version = kDriverVersion;
  return CUDA_SUCCESS;
}

FAKE_CUDA_EXPORT CUresult cuDeviceGetCount(int* count) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (count == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *count = s.device_count;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuDeviceGet(CUdevice* device, int ordinal) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (name == nullptr || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
    std::snprintf(name, static_cast<size_t>(len), "blob2gpu fake GPU %d", device);
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = s.vram_budget;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute attribute,
                                               CUdevice device) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
    // Only the attribute the core asks; a driver before 12.2 refuses it as an unknown one.
    if (attribute != CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID || !s.host_numa_attribute) {
      return CUDA_ERROR_INVALID_VALUE;
    }
    *value = s.devices[device].host_numa_id;
    return CUDA_SUCCESS;
  });
}

// "0000:1A:00.0" for device 0, "0000:1B:00.0" for device 1, ...: the form the real driver
// writes (upper-case hex), which sysfs spells in lower case.
FAKE_CUDA_EXPORT CUresult cuDeviceGetPCIBusId(char* bus_id, int len, CUdevice device) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (bus_id == nullptr || len < 13) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
    std::snprintf(bus_id, static_cast<size_t>(len), "0000:%02X:00.0", 0x1A + device);
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice device) {
  return guarded([&]() -> CUresult {
    sleep_us(g_retain_delay_us);
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
    if (s.devices[device].primary_refcount++ == 0) ++s.devices[device].activations;
    *ctx = context_handle(device);
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (device < 0 || device >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
    Device& d = s.devices[device];
    if (d.primary_refcount <= 0) {
      record_violation(s, lock,
                       "cuDevicePrimaryCtxRelease_v2: device " + std::to_string(device) +
                           " released more often than retained");
      return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (--d.primary_refcount == 0 &&
        (d.live_allocations > 0 || d.live_streams > 0 || d.live_events > 0)) {
      // The real driver destroys the context here, and every resource in it with it.
      record_violation(s, lock,
                       "cuDevicePrimaryCtxRelease_v2: last reference to device " +
                           std::to_string(device) + "'s context released with " +
                           std::to_string(d.live_allocations) + " allocations, " +
                           std::to_string(d.live_streams) + " streams and " +
                           std::to_string(d.live_events) + " events still alive");
    }
    return CUDA_SUCCESS;
  });
}

// Not used by the core: tests read whether a device's primary context is active (retained).
FAKE_CUDA_EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice device, unsigned int* flags,
                                                     int* active) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (flags == nullptr || active == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
    *flags = 0;  // CU_CTX_SCHED_AUTO, the primary context's default
    *active = s.devices[device].primary_refcount > 0 ? 1 : 0;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    const auto value = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ctx));
    if (value == 0) {
      t_current_context = 0;
      return CUDA_SUCCESS;
    }
    const int device = static_cast<int>((value & kHandleIdMask) - 1);
    if (!is_tagged(value, kContextTag) || device < 0 || device >= kMaxDevices ||
        s.devices[device].primary_refcount <= 0) {
      return CUDA_ERROR_INVALID_CONTEXT;
    }
    t_current_context = value;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuCtxGetCurrent(CUcontext* ctx) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *ctx = reinterpret_cast<CUcontext>(static_cast<uintptr_t>(t_current_context));
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuCtxGetDevice(CUdevice* device) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
    CUresult error;
    const int current = current_device(s, lock, &error);
    if (current < 0) return error;
    *device = current;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total_bytes) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    if (free_bytes == nullptr || total_bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const uint64_t live = s.devices[device].live_bytes;
    *free_bytes = s.vram_budget > live ? s.vram_budget - live : 0;
    *total_bytes = s.vram_budget;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytes) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    if (dptr == nullptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    Device& d = s.devices[device];
    // On a GPU an allocation between two streams' work keeps them from overlapping (the
    // programming guide's implicit synchronization): counted while copies are queued.
    if (d.pending_copies > 0) ++s.device_syncs;
    const uint64_t rounded = round_up(bytes, kDeviceAlignment);
    if (bytes > s.vram_budget || d.live_bytes > s.vram_budget - bytes ||
        d.next_offset + rounded + kDeviceGuardGap > kDeviceAddressSpan) {
      return CUDA_ERROR_OUT_OF_MEMORY;
    }
    // The fault switch counts this call now, under the lock: counted after the unlocked part
    // below, allocations made at once by several threads would all find the switch unmoved, and
    // the call that should fail would not.
    if (fault_fires(s, &s.device_alloc_fail_after)) return CUDA_ERROR_OUT_OF_MEMORY;
    count_success(&s.device_alloc_fail_after);
    // The address and the budget are reserved under the lock; the memory is made (and poisoned)
    // without it, so other threads' driver calls do not wait behind a large allocation, as they
    // do not on a GPU.
    const uint64_t address =
        kDeviceAddressBase + static_cast<uint64_t>(device) * kDeviceAddressSpan + d.next_offset;
    d.next_offset += rounded + kDeviceGuardGap;
    d.live_bytes += bytes;
    lock.unlock();
    std::shared_ptr<DeviceBlock> block;
    try {
      EmulationClock clock;
      block = std::make_shared<DeviceBlock>();
      block->memory = allocate_aligned(kDeviceAlignment, bytes);
      if (block->memory) std::memset(block->memory.get(), kFreshDeviceByte, bytes);
    } catch (const std::bad_alloc&) {
      block.reset();
    }
    lock.lock();
    if (!block || !block->memory) {
      d.live_bytes -= bytes;
      return CUDA_ERROR_OUT_OF_MEMORY;
    }
    block->address = address;
    block->size = bytes;
    block->device = device;
    ++d.live_allocations;
    s.device_blocks.emplace(block->address, block);
    ++s.live_device_allocations;
    s.live_device_bytes += bytes;
    s.peak_device_bytes = std::max(s.peak_device_bytes, s.live_device_bytes);
    *dptr = block->address;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    if (dptr == 0) return CUDA_SUCCESS;
    auto it = s.device_blocks.find(dptr);
    if (it == s.device_blocks.end()) {
      record_violation(
          s, lock,
          "cuMemFree_v2(" + hex(dptr) + "): not the start of a live cuMemAlloc_v2 allocation");
      return CUDA_ERROR_INVALID_VALUE;
    }
    const DeviceBlock& block = *it->second;
    if (block.pending_ops > 0) {
      // The free still takes effect; the queued copies keep the backing memory alive until they
      // ran.
      record_violation(s, lock,
                       "cuMemFree_v2(" + hex(dptr) + ") while " +
                           std::to_string(block.pending_ops) + " queued copies still use it");
    }
    Device& d = s.devices[block.device];
    if (d.pending_copies > 0) {
      // The real driver synchronizes the device: the call returns once its queued work is done.
      ++s.device_syncs;
      std::shared_ptr<DeviceBlock> keep = it->second;
      s.progress.wait(lock, [&] { return d.pending_copies == 0; });
      it = s.device_blocks.find(dptr);
      if (it == s.device_blocks.end()) return CUDA_ERROR_INVALID_VALUE;  // freed meanwhile
    }
    d.live_bytes -= block.size;
    --d.live_allocations;
    --s.live_device_allocations;
    s.live_device_bytes -= block.size;
    s.device_blocks.erase(it);
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuMemHostAlloc(void** pp, size_t bytes, unsigned int flags) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    if (current_device(s, lock, &error) < 0) return error;
    if (pp == nullptr || bytes == 0 || (flags & ~0x7u) != 0) return CUDA_ERROR_INVALID_VALUE;
    if (fault_fires(s, &s.host_alloc_fail_after)) return s.host_alloc_error;
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    auto block = std::make_shared<HostBlock>();
    {
      EmulationClock clock;  // page-locked memory is resident on allocation
      block->memory = allocate_aligned(page, bytes);
    }
    if (!block->memory) return CUDA_ERROR_OUT_OF_MEMORY;
    block->size = bytes;
    void* p = block->memory.get();
    s.host_blocks.emplace(reinterpret_cast<uintptr_t>(p), std::move(block));
    ++s.live_host_allocations;
    s.live_host_bytes += bytes;
    count_success(&s.host_alloc_fail_after);
    *pp = p;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuMemFreeHost(void* p) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    if (current_device(s, lock, &error) < 0) return error;
    if (p == nullptr) return CUDA_SUCCESS;
    auto it = s.host_blocks.find(reinterpret_cast<uintptr_t>(p));
    if (it == s.host_blocks.end()) {
      record_violation(s, lock,
                       "cuMemFreeHost(" + hex(reinterpret_cast<uintptr_t>(p)) +
                           "): not the start of a live cuMemHostAlloc block");
      return CUDA_ERROR_INVALID_VALUE;
    }
    const HostBlock& block = *it->second;
    if (block.pending_ops > 0) {
      // The free still takes effect; the queued copies keep the memory alive until they ran.
      record_violation(s, lock,
                       "cuMemFreeHost(" + hex(reinterpret_cast<uintptr_t>(p)) + ") while " +
                           std::to_string(block.pending_ops) + " queued copies still use it");
    }
    --s.live_host_allocations;
    s.live_host_bytes -= block.size;
    s.host_blocks.erase(it);
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes,
                                               CUstream stream) {
  return guarded([&]() -> CUresult {
    return enqueue_copy(StreamOp::Kind::kCopyHtoD, dst, const_cast<void*>(src), bytes, stream,
                        "cuMemcpyHtoDAsync_v2");
  });
}

FAKE_CUDA_EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes,
                                               CUstream stream) {
  return guarded([&]() -> CUresult {
    return enqueue_copy(StreamOp::Kind::kCopyDtoH, src, dst, bytes, stream, "cuMemcpyDtoHAsync_v2");
  });
}

// Not used by blob2gpu's core (it has no cuda_driver_api.h declaration): tests call it to play a
// framework that copies a loaded tensor into its own parameter on its stream.
FAKE_CUDA_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes,
                                               CUstream handle) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    std::shared_ptr<Stream> stream;
    const char* api = "cuMemcpyDtoDAsync_v2";
    if (CUresult r = resolve_stream(s, lock, handle, device, api, &stream); r != CUDA_SUCCESS) {
      return r;
    }
    if (CUresult r = check_stream_device(s, lock, *stream, device, api); r != CUDA_SUCCESS)
      return r;
    if (bytes == 0) return CUDA_SUCCESS;
    StreamOp op;
    op.kind = StreamOp::Kind::kCopyDtoD;
    op.bytes = bytes;
    op.device_block = find_device_range(s, dst, bytes);
    op.source_block = find_device_range(s, src, bytes);
    if (!op.device_block || !op.source_block) {
      record_violation(s, lock,
                       std::string(api) + ": [" + hex(src) + ", +" + std::to_string(bytes) +
                           ") -> [" + hex(dst) + ") is not inside live cuMemAlloc_v2 allocations");
      return CUDA_ERROR_INVALID_VALUE;
    }
    op.device_offset = dst - op.device_block->address;
    op.source_offset = src - op.source_block->address;
    enqueue(s, *stream, std::move(op));
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuStreamCreate(CUstream* stream, unsigned int flags) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    if (stream == nullptr || (flags & ~static_cast<unsigned>(CU_STREAM_NON_BLOCKING)) != 0) {
      return CUDA_ERROR_INVALID_VALUE;
    }
    const uint64_t id = s.next_stream_id++;
    s.streams.emplace(id, start_stream(device, id));
    ++s.live_streams;
    ++s.devices[device].live_streams;
    *stream = reinterpret_cast<CUstream>(static_cast<uintptr_t>(kStreamTag | id));
    return CUDA_SUCCESS;
  });
}

// Returns at once, as the real driver does: work queued on the stream still runs, and the stream
// goes when it is done (code that assumed the destroy drained the stream reads or frees memory
// too early).
FAKE_CUDA_EXPORT CUresult cuStreamDestroy_v2(CUstream handle) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    if (handle == nullptr || handle == BLOB2GPU_CU_STREAM_LEGACY ||
        handle == BLOB2GPU_CU_STREAM_PER_THREAD) {
      record_violation(s, lock,
                       "cuStreamDestroy_v2: the NULL/legacy/per-thread stream cannot "
                       "be destroyed");
      return CUDA_ERROR_INVALID_HANDLE;
    }
    std::shared_ptr<Stream> stream;
    if (CUresult r = resolve_stream(s, lock, handle, device, "cuStreamDestroy_v2", &stream);
        r != CUDA_SUCCESS) {
      return r;
    }
    s.streams.erase(stream->id);
    --s.live_streams;
    --s.devices[stream->device].live_streams;
    stream->stopping = true;
    stream->work_ready.notify_one();
    stream->worker.detach();  // it owns the stream and ends once the queue has run
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuStreamSynchronize(CUstream handle) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    std::shared_ptr<Stream> stream;
    if (CUresult r = resolve_stream(s, lock, handle, device, "cuStreamSynchronize", &stream);
        r != CUDA_SUCCESS) {
      return r;
    }
    const uint64_t target = stream->enqueued;
    if (stream->completed < target) {
      // Under the primary context's default scheduling (CU_CTX_SCHED_AUTO: spin while the
      // process has fewer active contexts than cores) the real driver spins the waiting thread.
      record_violation(s, lock,
                       "busy_wait: cuStreamSynchronize had to wait, spinning a CPU core on a real "
                       "GPU; wait on an event created with CU_EVENT_BLOCKING_SYNC instead");
    }
    s.progress.wait(lock, [&] { return stream->completed >= target; });
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuStreamWaitEvent(CUstream handle, CUevent event_handle,
                                            unsigned int flags) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    std::shared_ptr<Stream> stream;
    if (CUresult r = resolve_stream(s, lock, handle, device, "cuStreamWaitEvent", &stream);
        r != CUDA_SUCCESS) {
      return r;
    }
    // Unlike the calls that queue work, the real driver lets a stream wait on an event of another
    // context or device, whichever context is current ("hEvent may be from a different context
    // or device than hStream").
    std::shared_ptr<Event> event;
    if (CUresult r = resolve_event(s, lock, event_handle, "cuStreamWaitEvent", &event);
        r != CUDA_SUCCESS) {
      return r;
    }
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    // Later re-records of the event do not move this wait: it is bound to the position now.
    if (event_complete(*event) || event->stream == stream) return CUDA_SUCCESS;
    StreamOp op;
    op.kind = StreamOp::Kind::kWaitEvent;
    op.wait_stream = event->stream;
    op.wait_position = event->position;
    enqueue(s, *stream, std::move(op));
    return CUDA_SUCCESS;
  });
}

// Not used by the core: tests/gpu's stall library holds a stream with it.
FAKE_CUDA_EXPORT CUresult cuLaunchHostFunc(CUstream handle, void (*fn)(void*), void* data) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    if (fn == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::shared_ptr<Stream> stream;
    if (CUresult r = resolve_stream(s, lock, handle, device, "cuLaunchHostFunc", &stream);
        r != CUDA_SUCCESS) {
      return r;
    }
    StreamOp op;
    op.kind = StreamOp::Kind::kHostFunc;
    op.host_fn = fn;
    op.host_data = data;
    enqueue(s, *stream, std::move(op));
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuEventCreate(CUevent* event, unsigned int flags) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    const unsigned known = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING;
    if (event == nullptr || (flags & ~known) != 0) return CUDA_ERROR_INVALID_VALUE;
    auto created = std::make_shared<Event>();
    created->id = s.next_event_id++;
    created->device = device;
    created->flags = flags;
    s.events.emplace(created->id, created);
    ++s.live_events;
    ++s.devices[device].live_events;
    *event = reinterpret_cast<CUevent>(static_cast<uintptr_t>(kEventTag | created->id));
    return CUDA_SUCCESS;
  });
}

// Waits already queued on this event stay bound to its last position (the real driver defers).
FAKE_CUDA_EXPORT CUresult cuEventDestroy_v2(CUevent handle) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    if (current_device(s, lock, &error) < 0) return error;
    std::shared_ptr<Event> event;
    if (CUresult r = resolve_event(s, lock, handle, "cuEventDestroy_v2", &event);
        r != CUDA_SUCCESS) {
      return r;
    }
    s.events.erase(event->id);
    --s.live_events;
    --s.devices[event->device].live_events;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuEventRecord(CUevent event_handle, CUstream handle) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    const int device = current_device(s, lock, &error);
    if (device < 0) return error;
    std::shared_ptr<Event> event;
    if (CUresult r = resolve_event(s, lock, event_handle, "cuEventRecord", &event);
        r != CUDA_SUCCESS) {
      return r;
    }
    std::shared_ptr<Stream> stream;
    if (CUresult r = resolve_stream(s, lock, handle, device, "cuEventRecord", &stream);
        r != CUDA_SUCCESS) {
      return r;
    }
    if (CUresult r = check_stream_device(s, lock, *stream, device, "cuEventRecord");
        r != CUDA_SUCCESS) {
      return r;
    }
    if (event->device != stream->device) {
      record_violation(s, lock,
                       "cuEventRecord: event of device " + std::to_string(event->device) +
                           " recorded on a stream of " + "device " +
                           std::to_string(stream->device));
      return CUDA_ERROR_INVALID_HANDLE;
    }
    event->stream = stream;
    event->position = stream->enqueued;
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuEventQuery(CUevent handle) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    if (current_device(s, lock, &error) < 0) return error;
    std::shared_ptr<Event> event;
    if (CUresult r = resolve_event(s, lock, handle, "cuEventQuery", &event); r != CUDA_SUCCESS) {
      return r;
    }
    return event_complete(*event) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
  });
}

FAKE_CUDA_EXPORT CUresult cuEventSynchronize(CUevent handle) {
  return guarded([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    CUresult error;
    if (current_device(s, lock, &error) < 0) return error;
    std::shared_ptr<Event> event;
    if (CUresult r = resolve_event(s, lock, handle, "cuEventSynchronize", &event);
        r != CUDA_SUCCESS) {
      return r;
    }
    // Bound to the position at call time, so a concurrent re-record does not extend the wait.
    std::shared_ptr<Stream> stream = event->stream;
    const uint64_t position = event->position;
    if (stream && stream->completed < position && (event->flags & CU_EVENT_BLOCKING_SYNC) == 0) {
      // The real driver spins the calling thread until such an event completes.
      record_violation(s, lock,
                       "busy_wait: cuEventSynchronize had to wait on event " +
                           hex(kEventTag | event->id) +
                           ", created without CU_EVENT_BLOCKING_SYNC: on a real GPU the thread "
                           "spins a CPU core until the event completes");
    }
    if (stream) s.progress.wait(lock, [&] { return stream->completed >= position; });
    return CUDA_SUCCESS;
  });
}

FAKE_CUDA_EXPORT CUresult cuGetErrorName(CUresult error, const char** name) {
  if (name == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *name = error_name(error);
  return *name != nullptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

FAKE_CUDA_EXPORT CUresult cuGetErrorString(CUresult error, const char** text) {
  if (text == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *text = error_string(error);
  return *text != nullptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// ---------------------------------------------------------------------------------------------
// Control API for tests (see README.md). All of it is thread-safe.

FAKE_CUDA_EXPORT void fake_cuda_reset_faults(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.h2d_fail_after = -1;
  g_init_delay_us = 0;
  g_retain_delay_us = 0;
  s.host_alloc_fail_after = -1;
  s.host_alloc_error = CUDA_ERROR_OUT_OF_MEMORY;
  s.device_alloc_fail_after = -1;
  s.sticky_faults = false;
  s.copy_delay_us = 0;
  s.host_numa_attribute = false;
  for (Device& d : s.devices) d.host_numa_id = -1;
  s.link_bytes_per_ns = link_bytes_per_ns_from_env();
}

// The CUresult the host-alloc switch (fake_cuda_fail_host_alloc_after) fails cuMemHostAlloc with;
// CUDA_ERROR_OUT_OF_MEMORY until reset_faults.
FAKE_CUDA_EXPORT void fake_cuda_set_host_alloc_error(int code) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.host_alloc_error = code;
}

// On: every driver call returns CUDA_ERROR_DEINITIALIZED, as during the driver's own shutdown.
// The control API keeps working. No lock: the switch is read before any is taken.
FAKE_CUDA_EXPORT void fake_cuda_set_deinitialized(int on) {
  g_failing_with = on ? CUDA_ERROR_DEINITIALIZED : 0;
}

// On: in a child forked after this call, every driver call returns CUDA_ERROR_NOT_INITIALIZED, as
// the real driver answers a process forked from one that had initialized CUDA.
FAKE_CUDA_EXPORT void fake_cuda_set_fail_in_forked_child(int on) {
  g_fail_in_forked_child = on != 0;
}

// Primary context activations so far, all devices: retains that found the context inactive.
FAKE_CUDA_EXPORT int64_t fake_cuda_context_activations(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  int64_t total = 0;
  for (const Device& d : s.devices) total += d.activations;
  return total;
}

// The retain count of a device's primary context (0 when inactive), or -1 for no such device.
FAKE_CUDA_EXPORT int64_t fake_cuda_primary_context_refcount(int device) {
  DriverState& s = state();
  Lock lock(s.mu);
  if (device < 0 || device >= kMaxDevices) return -1;
  return s.devices[device].primary_refcount;
}

FAKE_CUDA_EXPORT void fake_cuda_set_device_count(int n) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.device_count = std::clamp(n, 0, kMaxDevices);
}

FAKE_CUDA_EXPORT void fake_cuda_set_vram_budget(uint64_t bytes) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.vram_budget = bytes;
}

// The link model's rate in GB/s (1e9 bytes a second); 0 turns it off. FAKE_CUDA_LINK_GBPS sets
// it when the library loads.
FAKE_CUDA_EXPORT void fake_cuda_set_link_gbps(double gbps) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.link_bytes_per_ns = gbps > 0 ? gbps : 0;
}

FAKE_CUDA_EXPORT double fake_cuda_link_gbps(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.link_bytes_per_ns;
}

// What a device's modelled link did since reset_counters: out[0] busy ns, out[1] ns from the
// first modelled copy's start to the last one's end, out[2] modelled copies. Returns
// CUDA_ERROR_INVALID_DEVICE for no such device.
FAKE_CUDA_EXPORT int fake_cuda_link_stats(int device, int64_t* out) {
  DriverState& s = state();
  Lock lock(s.mu);
  if (device < 0 || device >= kMaxDevices || out == nullptr) return CUDA_ERROR_INVALID_DEVICE;
  const Device& d = s.devices[device];
  out[0] = d.link_busy_ns;
  out[1] = d.link_first_ns < 0 ? 0 : d.link_last_ns - d.link_first_ns;
  out[2] = static_cast<int64_t>(d.link_copies);
  return CUDA_SUCCESS;
}

// on: cuDeviceGetAttribute answers CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID (off, the default: refuses
// it, as a driver before CUDA 12.2 does).
FAKE_CUDA_EXPORT void fake_cuda_set_host_numa_attribute(int on) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.host_numa_attribute = on != 0;
}

// The host NUMA node the attribute reports for a device (-1, the default: none).
FAKE_CUDA_EXPORT int fake_cuda_set_host_numa_id(int device, int node) {
  DriverState& s = state();
  Lock lock(s.mu);
  if (device < 0 || device >= kMaxDevices) return CUDA_ERROR_INVALID_DEVICE;
  s.devices[device].host_numa_id = node;
  return CUDA_SUCCESS;
}

FAKE_CUDA_EXPORT void fake_cuda_set_copy_delay_us(uint64_t us) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.copy_delay_us = us;
}

FAKE_CUDA_EXPORT void fake_cuda_fail_host_alloc_after(int64_t n) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.host_alloc_fail_after = n < 0 ? -1 : n;
}

// n more cuMemcpyHtoDAsync_v2 calls are accepted, the next returns CUDA_ERROR_INVALID_VALUE (-1:
// off); one-shot unless faults are sticky.
FAKE_CUDA_EXPORT void fake_cuda_fail_copy_after(int64_t n) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.h2d_fail_after = n < 0 ? -1 : n;
}

FAKE_CUDA_EXPORT void fake_cuda_set_init_delay_us(uint64_t us) {
  g_init_delay_us = us;
}

FAKE_CUDA_EXPORT void fake_cuda_set_retain_delay_us(uint64_t us) {
  g_retain_delay_us = us;
}

// cuMemAlloc_v2 / cuMemFree_v2 calls made while copies were queued on the device since
// reset_counters(): each synchronizes the device on a GPU.
FAKE_CUDA_EXPORT uint64_t fake_cuda_device_syncs(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.device_syncs;
}

FAKE_CUDA_EXPORT void fake_cuda_fail_device_alloc_after(int64_t n) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.device_alloc_fail_after = n < 0 ? -1 : n;
}

// With sticky faults, a switch that fired keeps failing every call until it is reset.
FAKE_CUDA_EXPORT void fake_cuda_set_sticky_faults(int sticky) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.sticky_faults = sticky != 0;
}

FAKE_CUDA_EXPORT int64_t fake_cuda_live_device_allocations(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.live_device_allocations;
}

FAKE_CUDA_EXPORT uint64_t fake_cuda_live_device_bytes(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.live_device_bytes;
}

FAKE_CUDA_EXPORT uint64_t fake_cuda_peak_device_bytes(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.peak_device_bytes;
}

FAKE_CUDA_EXPORT void fake_cuda_reset_peak(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.peak_device_bytes = s.live_device_bytes;
}

FAKE_CUDA_EXPORT int64_t fake_cuda_live_host_allocations(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.live_host_allocations;
}

FAKE_CUDA_EXPORT uint64_t fake_cuda_live_host_bytes(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.live_host_bytes;
}

FAKE_CUDA_EXPORT int64_t fake_cuda_live_streams(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.live_streams;
}

FAKE_CUDA_EXPORT int64_t fake_cuda_live_events(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.live_events;
}

FAKE_CUDA_EXPORT uint64_t fake_cuda_h2d_copies(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.h2d_copies;
}

FAKE_CUDA_EXPORT uint64_t fake_cuda_h2d_bytes(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.h2d_bytes;
}

FAKE_CUDA_EXPORT uint64_t fake_cuda_pageable_h2d_copies(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.pageable_h2d_copies;
}

FAKE_CUDA_EXPORT int64_t fake_cuda_max_pending_h2d_copies(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.max_pending_h2d_copies;
}

FAKE_CUDA_EXPORT double fake_cuda_emulation_cpu_seconds(void) {
  return static_cast<double>(g_emulation_cpu_ns.load()) / 1e9;
}

// Also clears the violation count, so each test can start from zero.
FAKE_CUDA_EXPORT void fake_cuda_reset_counters(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  s.h2d_copies = 0;
  s.h2d_bytes = 0;
  s.pageable_h2d_copies = 0;
  s.max_pending_h2d_copies = s.pending_h2d_copies;
  s.device_syncs = 0;
  for (Device& d : s.devices) {
    d.link_busy_ns = 0;
    d.link_first_ns = -1;
    d.link_last_ns = -1;
    d.link_copies = 0;
  }
  g_emulation_cpu_ns = 0;
  s.violations = 0;
  s.has_last_violation = false;  // the log itself stays, so returned pointers remain valid
}

FAKE_CUDA_EXPORT int64_t fake_cuda_violations(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  return s.violations;
}

FAKE_CUDA_EXPORT const char* fake_cuda_last_violation(void) {
  DriverState& s = state();
  Lock lock(s.mu);
  if (!s.has_last_violation || s.violation_log.empty()) return "";
  return s.violation_log.back().c_str();
}

// While held, a created stream's worker starts no queued operation (hold 0 releases it): a test
// plays a consumer whose kernels are still queued. Returns CUDA_ERROR_INVALID_HANDLE for a handle
// that names no live created stream.
FAKE_CUDA_EXPORT int fake_cuda_hold_stream(uint64_t handle, int hold) {
  DriverState& s = state();
  Lock lock(s.mu);
  if (!is_tagged(handle, kStreamTag)) return CUDA_ERROR_INVALID_HANDLE;
  auto it = s.streams.find(handle & kHandleIdMask);
  if (it == s.streams.end()) return CUDA_ERROR_INVALID_HANDLE;
  it->second->held = hold != 0;
  it->second->work_ready.notify_one();
  return CUDA_SUCCESS;
}

// Synchronous debug read of device memory: no context needed; waits only for copies already
// moving bytes, not for queued ones.
FAKE_CUDA_EXPORT int fake_cuda_read_device(uint64_t dptr, void* dst, uint64_t bytes) {
  return caught([&]() -> CUresult {
    DriverState& s = state();
    Lock lock(s.mu);
    if (bytes == 0) return CUDA_SUCCESS;
    if (dst == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::shared_ptr<DeviceBlock> block = find_device_range(s, dptr, bytes);
    if (!block) return CUDA_ERROR_INVALID_VALUE;
    std::unique_lock<std::shared_mutex> no_copy_in_flight(s.copy_mu);
    std::memcpy(dst, block->memory.get() + (dptr - block->address), bytes);
    return CUDA_SUCCESS;
  });
}
