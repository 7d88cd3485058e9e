// ArenaPool: the device memory of a streamed load, and the budget that paces it.
//
// A streamed load (tensors consumed as they arrive: Checkpoint.stream(), the vLLM loader) holds at
// most `cap` bytes of device memory beside what its consumer already has: the arenas of tensor
// groups (shard_layout.hpp) being copied, landed and not yet handed out, or handed out and not yet
// dropped. The pool takes that memory once, as one slab allocated before the load's first copy,
// and cuts each group's arena out of it. Groups claim their bytes in the order the load will hand
// them out, and a claim is admitted only in that order (first in, first out), once the memory held
// by earlier claims leaves room for it: a later group never overtakes an earlier one, so the groups
// that hold memory are always the ones that complete next.
//
// Giving memory back never synchronizes the device. When a handed-out group's last tensor goes
// (the DLPack deleter, which torch runs as soon as it drops the tensor, with kernels that read it
// possibly still queued), its arena's bytes return to the pool marked with events: the copies into
// it (its fence) and, recorded at that moment, one event on each stream the consumer imported it
// on (`__dlpack__(stream=...)`, where the consumer's work on it was queued). An arena later cut
// from those bytes makes every copy stream wait for the events (cuStreamWaitEvent) before the first
// copy into it: the pipeline never writes memory a consumer may still read, and no cuMemFree or
// cuMemAlloc runs mid-load. Memory of a tensor imported without a stream (stream=-1, or the
// per-thread default stream, which names no stream in another thread) is not reused by the load.
//
// Why a slab and not stream-ordered allocation (cuMemAllocAsync/cuMemFreeAsync): it works on every
// driver blob2gpu supports, behaves the same on the fake driver and a GPU (so the tests see reuse
// hazards: the same addresses are written again), and the bytes a later device-to-device exchange
// (tensor parallelism) receives into are an arena like any other. Its cost: a tensor the consumer
// keeps from a streamed load keeps the slab allocated until it goes.
//
// The bound gives way in two cases, each counted in the load's statistics. A claim larger than the
// cap (one tensor, or a shard checked by Content-MD5, which is handed out only whole) is admitted
// alone: the cap is raised to it. And when the consumer waits for the next group while holding the
// memory the load needs (its last tensor as it asks for the next, when two tensors do not fit
// under the cap; or a streamed consumer keeping every tensor), the load stops counting what the
// consumer holds (LoadSession's relief) rather than wait forever. A claim the budget admits that
// finds no room in the pool while nothing the budget counts will come back makes the pool grow: a
// region of its own (cuMemAlloc, mid-load), reused by later claims like the slab and freed once
// the load has ended.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_device.hpp"

namespace blob2gpu {

class DeviceArena;

// One tensor group's claim on the pool: its arena and its realigned tensors' arenas, one block.
struct PoolClaim {
  uint64_t bytes = 0;
  // Set under the pool's mutex once the claim is admitted.
  bool admitted = false;
  bool cancelled = false;
  bool opened = false;   // open() or abandon() has taken its bytes
  bool grow = false;     // no room in the pool: open() allocates a region for it
  uint64_t address = 0;  // where its bytes start (set by open() when it grows the pool)
  // Events the copies into the claim's bytes must wait for: the previous occupants' fences and
  // their consumers' streams.
  std::vector<std::shared_ptr<CudaEvent>> waits;
};

struct PoolStats {
  uint64_t cap = 0;
  uint64_t slab_bytes = 0;
  uint64_t peak_held = 0;       // most bytes the budget counted at once
  uint64_t peak_allocated = 0;  // most device bytes the pool had allocated at once
  uint64_t cap_raised_to = 0;   // largest claim admitted beyond the cap (0: none)
  uint64_t grown = 0;           // regions allocated mid-load
  uint64_t kept_bytes = 0;      // bytes the budget stopped counting (kept by consumers)
  uint64_t unreused_bytes = 0;  // bytes given back that the load will not reuse
};

class ArenaPool : public std::enable_shared_from_this<ArenaPool> {
 public:
  // Allocates the slab (cuMemAlloc) now. Throws GPUOutOfMemory naming the setting to lower.
  static std::shared_ptr<ArenaPool> create(std::shared_ptr<CudaContext> ctx, uint64_t cap,
                                           uint64_t slab_bytes);
  ~ArenaPool();  // frees the regions once every arena cut from them is gone; never throws
  ArenaPool(const ArenaPool&) = delete;
  ArenaPool& operator=(const ArenaPool&) = delete;

  // Appends a claim of `bytes` to the queue; it may be admitted at once.
  std::shared_ptr<PoolClaim> claim(uint64_t bytes);
  // Blocks until the claim is admitted (true), or it or the load is cancelled (false; callers
  // that cancel must call wake()).
  bool wait(const PoolClaim& claim, const std::atomic<bool>* cancelled);
  void wake();
  // Drops every claim not admitted yet (the load is ending).
  void cancel_waiting();
  // An admitted claim that will not be opened (its load was cancelled) gives its bytes back; a
  // waiting one leaves the queue.
  void abandon(PoolClaim& claim);

  // The arenas of an admitted claim: one per (offset in the claim, bytes), at 256-aligned
  // offsets, views of the pool's memory (a claim that grows the pool allocates its region first:
  // cuMemAlloc, throws GPUOutOfMemory). The claim's bytes not covered go back at once. The caller
  // makes its copies wait for claim.waits first (CopyEngine::wait_for).
  std::vector<std::shared_ptr<DeviceArena>> open(
      PoolClaim& claim, const std::vector<std::pair<uint64_t, uint64_t>>& pieces,
      const std::string& label);
  // The budget stops counting an arena (its tensors are kept by the consumer); its bytes return
  // to the pool only when the arena goes.
  void keep(DeviceArena& arena);
  // The load has ended: regions allocated mid-load that are wholly free are freed now (after
  // their events; no load is left to overlap). The rest go with the pool.
  void end_load() noexcept;
  // Whether the first claim in the queue waits for memory.
  bool blocked() const;
  bool admitted(const PoolClaim& claim) const;

  const std::shared_ptr<CudaContext>& context() const { return ctx_; }
  uint64_t cap() const { return cap_; }
  PoolStats stats() const;

 private:
  friend class DeviceArena;
  struct Region {
    uint64_t address;
    uint64_t bytes;
  };
  struct FreeBlock {
    uint64_t end;
    size_t region;
    std::vector<std::shared_ptr<CudaEvent>> waits;
  };
  ArenaPool(std::shared_ptr<CudaContext> ctx, uint64_t cap) : ctx_(std::move(ctx)), cap_(cap) {}
  // From ~DeviceArena of an arena of this pool: its bytes go back (to be reused, unless
  // `reusable` is false: a consumer stream could not be named), with the events writes must
  // wait for.
  void give_back(DeviceArena& arena, std::vector<std::shared_ptr<CudaEvent>> waits,
                 bool reusable) noexcept;
  void admit_locked();
  bool take_locked(uint64_t bytes, uint64_t* address, std::vector<std::shared_ptr<CudaEvent>>* w);
  void free_locked(uint64_t address, uint64_t bytes, std::vector<std::shared_ptr<CudaEvent>> w);
  size_t region_of_locked(uint64_t address) const;
  // Frees regions after the events of their free blocks (teardown form); no lock held.
  void free_regions(
      std::vector<std::pair<Region, std::vector<std::shared_ptr<CudaEvent>>>> gone) noexcept;

  std::shared_ptr<CudaContext> ctx_;
  uint64_t cap_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::shared_ptr<PoolClaim>> queue_;  // claims not admitted yet, in order
  std::vector<Region> regions_;                   // [0]: the slab; then regions grown mid-load
  std::map<uint64_t, FreeBlock> free_;            // free bytes by address
  uint64_t held_ = 0;                             // bytes the budget counts
  uint64_t counted_ = 0;  // pool bytes held by counted claims and arenas (they come back)
  uint64_t allocated_ = 0;
  bool load_ended_ = false;
  PoolStats stats_;
};

}  // namespace blob2gpu
