// StagingRing: N host slots of S bytes that carry bytes from a source to the device.
// A slot cycles free -> filling -> copying -> free. It returns to `free` only when the copy
// engine has seen the event recorded after its copies complete, so a slot whose bytes are still
// being read by DMA is never handed out again.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "host_buffer.hpp"

namespace blob2gpu {

class CudaContext;

struct Slot {
  size_t index = 0;
  HostBuffer buffer;
  uint8_t* data() const { return buffer.data(); }
  size_t capacity() const { return buffer.size(); }
};

struct RingStats {
  size_t slots = 0;
  size_t slot_bytes = 0;
  bool pinned = false;           // every slot is page-locked
  bool pinned_fallback = false;  // pinning was refused and pageable memory is used instead
  size_t peak_copying = 0;       // most slots whose copies were in flight at one time
  uint64_t acquire_waits = 0;    // times a filler had to wait for a slot
  size_t retired = 0;            // slots out of service (see StagingRing::retire)
};

class StagingRing {
 public:
  // With a context the slots are pinned through the driver; when pinning is refused they fall
  // back to pageable memory if allow_pageable_fallback, else PinnedMemoryUnavailable is thrown.
  // Without a context (host target) the slots are pageable.
  StagingRing(const std::shared_ptr<CudaContext>& ctx, size_t slots, size_t slot_bytes,
              bool allow_pageable_fallback);

  // Blocks until a slot is free, or returns nullptr once *cancelled becomes true (callers that
  // cancel must call wake_all()).
  Slot* acquire(const std::atomic<bool>* cancelled);
  // acquire() without waiting: a free slot, or nullptr with *none_free set when every slot is
  // busy (nullptr with it clear once *cancelled is true).
  Slot* try_acquire(const std::atomic<bool>* cancelled, bool* none_free);
  void mark_copying(Slot* slot);  // the copy engine has enqueued the slot's copies
  void release(Slot* slot);       // back to free: after its event completed, or never submitted
  // Out of service for the ring's life: copies from it may be in flight and no event can say when
  // they end (the driver refused to record one). Not counted as busy: wait_idle() does not wait
  // for it.
  void retire(Slot* slot);
  void wake_all();
  // Blocks until no slot is filling or copying.
  void wait_idle();

  RingStats stats() const;
  void reset_peaks();

 private:
  enum class State { Free, Filling, Copying, Retired };
  // A free slot, now filling, or nullptr; throws when every slot was retired.
  Slot* take_free_locked();
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<State> state_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  size_t copying_ = 0;
  size_t busy_ = 0;  // filling + copying
  RingStats stats_;
};

}  // namespace blob2gpu
