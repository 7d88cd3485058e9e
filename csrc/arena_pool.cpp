#include "arena_pool.hpp"

#include <algorithm>
#include <cstdio>

#include "device_arena.hpp"
#include "errors.hpp"
#include "teardown_failures.hpp"

namespace blob2gpu {

namespace {

constexpr uint64_t kArenaAlign = 256;

uint64_t align_up(uint64_t value) {
  return (value + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
}

std::string mib(uint64_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

// `from` appended to `into`, without duplicates (the same event often marks adjacent blocks).
void merge_waits(std::vector<std::shared_ptr<CudaEvent>>& into,
                 const std::vector<std::shared_ptr<CudaEvent>>& from) {
  for (const auto& event : from) {
    if (std::find(into.begin(), into.end(), event) == into.end()) into.push_back(event);
  }
}

// cuMemAlloc of a pool region; GPUOutOfMemory names the setting that sizes the pool.
uint64_t allocate_region(const CudaContext& ctx, uint64_t bytes, const std::string& what) {
  ScopedContext bind(ctx);
  CUdeviceptr ptr = 0;
  const CUresult rc = cuda_driver().cuMemAlloc(&ptr, bytes);
  if (rc == CUDA_ERROR_OUT_OF_MEMORY) {
    size_t free_bytes = 0, total = 0;
    cuda_driver().cuMemGetInfo(&free_bytes, &total);
    throw CoreError(ErrorKind::GPUOutOfMemory,
                    what + " (" + mib(bytes) +
                        ") does not fit on cuda:" + std::to_string(ctx.ordinal()) + " (" +
                        mib(free_bytes) + " free of " + mib(total) + ")")
        .with_hint("lower streamed_device_bytes or free GPU memory");
  }
  check_cuda(rc, "cuMemAlloc of " + what + " (" + mib(bytes) + ")");
  return ptr;
}

}  // namespace

std::shared_ptr<ArenaPool> ArenaPool::create(std::shared_ptr<CudaContext> ctx, uint64_t cap,
                                             uint64_t slab_bytes) {
  std::shared_ptr<ArenaPool> pool(new ArenaPool(ctx, cap));
  // Rounded down: the slab never exceeds the cap it was sized from.
  slab_bytes = std::max(kArenaAlign, slab_bytes / kArenaAlign * kArenaAlign);
  const uint64_t slab = allocate_region(
      *ctx, slab_bytes, "the streamed load's device memory (streamed_device_bytes)");
  pool->regions_.push_back(Region{slab, slab_bytes});
  pool->free_[slab] = FreeBlock{slab + slab_bytes, 0, {}};
  pool->allocated_ = slab_bytes;
  pool->stats_.cap = cap;
  pool->stats_.slab_bytes = slab_bytes;
  pool->stats_.peak_allocated = slab_bytes;
  return pool;
}

ArenaPool::~ArenaPool() {
  if (cuda_driver_inherited_by_fork()) return;  // the parent's memory (see return_to_pool)
  // Every arena is gone. Copies into freed blocks, or consumers' kernels reading them, may still
  // be queued: the regions are freed after them.
  std::vector<std::pair<Region, std::vector<std::shared_ptr<CudaEvent>>>> gone;
  for (size_t i = 0; i < regions_.size(); ++i) {
    if (regions_[i].bytes == 0) continue;
    std::vector<std::shared_ptr<CudaEvent>> waits;
    for (const auto& block : free_) {
      if (block.second.region == i) merge_waits(waits, block.second.waits);
    }
    gone.emplace_back(regions_[i], std::move(waits));
  }
  free_regions(std::move(gone));
}

void ArenaPool::free_regions(
    std::vector<std::pair<Region, std::vector<std::shared_ptr<CudaEvent>>>> gone) noexcept {
  if (gone.empty()) return;
  ScopedContext bind(*ctx_, std::nothrow);
  if (!bind.bound()) return;  // a forked child, or the driver shutting down: the driver's now
  for (const auto& [region, waits] : gone) {
    for (const auto& event : waits) event->synchronize_for_teardown();
    check_teardown(cuda_driver_if_loaded()->cuMemFree(region.address), "cuMemFree (pool region)");
  }
}

std::shared_ptr<PoolClaim> ArenaPool::claim(uint64_t bytes) {
  auto claim = std::make_shared<PoolClaim>();
  claim->bytes = align_up(std::max<uint64_t>(bytes, 1));
  std::lock_guard<std::mutex> lock(mutex_);
  queue_.push_back(claim);
  admit_locked();
  return claim;
}

bool ArenaPool::wait(const PoolClaim& claim, const std::atomic<bool>* cancelled) {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] {
    return claim.admitted || claim.cancelled || (cancelled != nullptr && cancelled->load());
  });
  return claim.admitted;
}

void ArenaPool::wake() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
  }
  changed_.notify_all();
}

void ArenaPool::cancel_waiting() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& claim : queue_) claim->cancelled = true;
    queue_.clear();
  }
  changed_.notify_all();
}

void ArenaPool::abandon(PoolClaim& claim) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!claim.admitted) {
      claim.cancelled = true;
    } else if (!claim.opened) {
      claim.opened = true;
      held_ -= claim.bytes;
      counted_ -= claim.bytes;
      if (!claim.grow) free_locked(claim.address, claim.bytes, std::move(claim.waits));
    }
    admit_locked();
  }
  changed_.notify_all();
}

bool ArenaPool::blocked() const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& claim : queue_) {
    if (!claim->cancelled) return true;
  }
  return false;
}

bool ArenaPool::admitted(const PoolClaim& claim) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return claim.admitted;
}

std::vector<std::shared_ptr<DeviceArena>> ArenaPool::open(
    PoolClaim& claim, const std::vector<std::pair<uint64_t, uint64_t>>& pieces,
    const std::string& label) {
  bool placed = !claim.grow;  // the claim has its bytes in the pool
  uint64_t covered = 0;       // claim bytes handed to arenas so far
  // Whatever happens, the claim's bytes that no arena took go back.
  struct Settle {
    ArenaPool* pool;
    PoolClaim& claim;
    const bool& placed;
    const uint64_t& covered;
    ~Settle() {
      std::lock_guard<std::mutex> lock(pool->mutex_);
      claim.opened = true;
      const uint64_t rest = claim.bytes - covered;
      if (rest == 0) return;
      pool->held_ -= rest;
      pool->counted_ -= rest;
      if (placed) pool->free_locked(claim.address + covered, rest, claim.waits);
      pool->admit_locked();
      pool->changed_.notify_all();
    }
  } settle{this, claim, placed, covered};
  if (claim.grow) {
    // No room while nothing counted will come back: the pool grows by a region of its own, which
    // later claims reuse like the slab.
    const uint64_t address = allocate_region(*ctx_, claim.bytes, label + ": more device memory");
    std::lock_guard<std::mutex> lock(mutex_);
    regions_.push_back(Region{address, claim.bytes});
    allocated_ += claim.bytes;
    stats_.peak_allocated = std::max(stats_.peak_allocated, allocated_);
    ++stats_.grown;
    claim.address = address;
    placed = true;
  }
  std::vector<std::shared_ptr<DeviceArena>> out;
  auto self = shared_from_this();
  for (const auto& [at, bytes] : pieces) {
    const uint64_t accounted = align_up(std::max<uint64_t>(bytes, 1));
    if (at != covered || covered + accounted > claim.bytes) {
      throw CoreError(ErrorKind::InvalidArgument, label + ": arena pieces do not tile the claim");
    }
    std::shared_ptr<DeviceArena> arena = DeviceArena::pool_view(ctx_, claim.address + at, bytes);
    arena->pool_ = self;
    arena->pool_bytes_ = accounted;
    covered += accounted;
    out.push_back(std::move(arena));
  }
  return out;
}

void ArenaPool::keep(DeviceArena& arena) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (arena.pool_.get() != this || arena.kept_) return;
    arena.kept_ = true;
    held_ -= arena.pool_bytes_;
    counted_ -= arena.pool_bytes_;
    stats_.kept_bytes += arena.pool_bytes_;
    admit_locked();
  }
  changed_.notify_all();
}

void ArenaPool::end_load() noexcept {
  std::vector<std::pair<Region, std::vector<std::shared_ptr<CudaEvent>>>> gone;
  try {
    std::lock_guard<std::mutex> lock(mutex_);
    load_ended_ = true;
    // Regions grown mid-load that no arena uses any more (one free block spans each).
    for (size_t i = 1; i < regions_.size(); ++i) {
      Region& region = regions_[i];
      auto it = free_.find(region.address);
      if (region.bytes == 0 || it == free_.end() ||
          it->second.end != region.address + region.bytes) {
        continue;
      }
      gone.emplace_back(region, std::move(it->second.waits));
      free_.erase(it);
      allocated_ -= region.bytes;
      region.bytes = 0;
    }
  } catch (...) {  // std::bad_alloc: the regions go with the pool
  }
  free_regions(std::move(gone));
}

void ArenaPool::give_back(DeviceArena& arena, std::vector<std::shared_ptr<CudaEvent>> waits,
                          bool reusable) noexcept {
  try {
    bool ended = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!arena.kept_) {
        held_ -= arena.pool_bytes_;
        counted_ -= arena.pool_bytes_;
      }
      if (reusable) {
        free_locked(arena.address_, arena.pool_bytes_, std::move(waits));
      } else {
        stats_.unreused_bytes += arena.pool_bytes_;
      }
      admit_locked();
      ended = load_ended_;
    }
    changed_.notify_all();
    if (ended) end_load();  // a grown region this arena kept may be wholly free now
  } catch (...) {
    // Only allocation can fail here (a free block's event list); the bytes stay out of use.
  }
}

PoolStats ArenaPool::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void ArenaPool::admit_locked() {
  while (!queue_.empty()) {
    PoolClaim& claim = *queue_.front();
    if (claim.cancelled) {
      queue_.pop_front();
      continue;
    }
    // One claim larger than the cap is admitted alone: the cap is raised to it.
    if (held_ != 0 && held_ + claim.bytes > cap_) return;
    if (!take_locked(claim.bytes, &claim.address, &claim.waits)) {
      if (counted_ > 0) return;  // the room comes back as the load's own arenas are dropped
      claim.grow = true;
    }
    if (claim.bytes > cap_) stats_.cap_raised_to = std::max(stats_.cap_raised_to, claim.bytes);
    held_ += claim.bytes;
    counted_ += claim.bytes;
    stats_.peak_held = std::max(stats_.peak_held, held_);
    claim.admitted = true;
    queue_.pop_front();
    changed_.notify_all();
  }
}

size_t ArenaPool::region_of_locked(uint64_t address) const {
  for (size_t i = 0; i < regions_.size(); ++i) {
    const Region& r = regions_[i];
    if (address >= r.address && address < r.address + r.bytes) return i;
  }
  return regions_.size();  // not reached for an address the pool handed out
}

bool ArenaPool::take_locked(uint64_t bytes, uint64_t* address,
                            std::vector<std::shared_ptr<CudaEvent>>* waits) {
  // First fit by address: the load frees arenas roughly in the order it made them, so this walks
  // the slab like a ring.
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    const uint64_t begin = it->first, end = it->second.end;
    if (end - begin < bytes) continue;
    *address = begin;
    *waits = it->second.waits;
    if (end - begin > bytes) {
      free_[begin + bytes] = FreeBlock{end, it->second.region, it->second.waits};
    }
    free_.erase(it);
    return true;
  }
  return false;
}

void ArenaPool::free_locked(uint64_t address, uint64_t bytes,
                            std::vector<std::shared_ptr<CudaEvent>> waits) {
  const size_t region = region_of_locked(address);
  uint64_t begin = address, end = address + bytes;
  // Events that completed need no wait: drop them while the list is short.
  waits.erase(std::remove_if(
                  waits.begin(), waits.end(),
                  [](const std::shared_ptr<CudaEvent>& e) { return e->completed_for_teardown(); }),
              waits.end());
  // Coalesced with its neighbours in the same region (two regions are never one block).
  auto next = free_.lower_bound(begin);
  if (next != free_.end() && next->first == end && next->second.region == region) {
    end = next->second.end;
    merge_waits(waits, next->second.waits);
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->second.end == begin && prev->second.region == region) {
      begin = prev->first;
      merge_waits(waits, prev->second.waits);
      free_.erase(prev);
    }
  }
  free_[begin] = FreeBlock{end, region, std::move(waits)};
}

}  // namespace blob2gpu
