#include "staging_ring.hpp"

#include "errors.hpp"

namespace blob2gpu {

StagingRing::StagingRing(const std::shared_ptr<CudaContext>& ctx, size_t slots, size_t slot_bytes,
                         bool allow_pageable_fallback) {
  if (slots < 2) {
    // Invariant: a slot's DMA overlaps the next slot's fill, which needs two.
    throw CoreError(ErrorKind::InvalidArgument,
                    "staging_slots must be at least 2 (got " + std::to_string(slots) + ")");
  }
  if (slot_bytes < 4096) {
    throw CoreError(ErrorKind::InvalidArgument, "staging_slot_bytes must be at least 4096 (got " +
                                                    std::to_string(slot_bytes) + ")");
  }
  stats_.slots = slots;
  stats_.slot_bytes = slot_bytes;
  stats_.pinned = ctx != nullptr;
  for (size_t i = 0; i < slots; ++i) {
    auto slot = std::make_unique<Slot>();
    slot->index = i;
    if (ctx) slot->buffer = HostBuffer::pinned(ctx, slot_bytes);
    if (!slot->buffer) {
      // HostBuffer::pinned came back empty only for CUDA_ERROR_OUT_OF_MEMORY (other errors raise).
      // Not `ulimit -l`: as far as is known NVIDIA's driver page-locks cuMemHostAlloc memory in its
      // kernel module without RLIMIT_MEMLOCK (torch pins under Docker's 64 KiB default); to be
      // verified on the first real GPU (bench/gpu_check.sh prints `ulimit -l` beside the result).
      if (ctx && !allow_pageable_fallback) {
        throw CoreError(ErrorKind::PinnedMemoryUnavailable,
                        "cannot pin " + std::to_string(slots) + " x " + std::to_string(slot_bytes) +
                            " bytes of staging memory: slot " + std::to_string(i) +
                            " found the driver with no memory left to page-lock (cuMemHostAlloc: "
                            "CUDA_ERROR_OUT_OF_MEMORY); lower staging_slots / "
                            "staging_slot_bytes, leave more host memory free (a container's "
                            "memory limit counts)");
      }
      if (ctx) {
        stats_.pinned = false;
        stats_.pinned_fallback = true;
      }
      slot->buffer = HostBuffer::pageable(slot_bytes);
    }
    slots_.push_back(std::move(slot));
  }
  state_.assign(slots, State::Free);
}

Slot* StagingRing::take_free_locked() {
  if (stats_.retired == state_.size()) {
    throw CoreError(ErrorKind::CudaError,
                    "every staging slot was taken out of service after failed copies; close "
                    "the Loader and make a new one");
  }
  for (size_t i = 0; i < state_.size(); ++i) {
    if (state_[i] == State::Free) {
      state_[i] = State::Filling;
      ++busy_;
      return slots_[i].get();
    }
  }
  return nullptr;
}

Slot* StagingRing::acquire(const std::atomic<bool>* cancelled) {
  std::unique_lock<std::mutex> lock(mutex_);
  bool waited = false;
  for (;;) {
    if (cancelled && cancelled->load()) return nullptr;
    if (Slot* slot = take_free_locked()) {
      if (waited) ++stats_.acquire_waits;
      return slot;
    }
    waited = true;
    changed_.wait(lock);
  }
}

Slot* StagingRing::try_acquire(const std::atomic<bool>* cancelled, bool* none_free) {
  std::lock_guard<std::mutex> lock(mutex_);
  *none_free = false;
  if (cancelled && cancelled->load()) return nullptr;
  Slot* slot = take_free_locked();
  *none_free = slot == nullptr;
  return slot;
}

void StagingRing::mark_copying(Slot* slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  state_[slot->index] = State::Copying;
  ++copying_;
  if (copying_ > stats_.peak_copying) stats_.peak_copying = copying_;
}

void StagingRing::release(Slot* slot) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_[slot->index] == State::Retired) return;
    if (state_[slot->index] == State::Copying) --copying_;
    if (state_[slot->index] != State::Free) --busy_;
    state_[slot->index] = State::Free;
  }
  changed_.notify_all();
}

void StagingRing::retire(Slot* slot) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_[slot->index] == State::Copying) --copying_;
    if (state_[slot->index] != State::Free && state_[slot->index] != State::Retired) --busy_;
    if (state_[slot->index] != State::Retired) ++stats_.retired;
    state_[slot->index] = State::Retired;
  }
  changed_.notify_all();
}

void StagingRing::wake_all() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
  }
  changed_.notify_all();
}

void StagingRing::wait_idle() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] { return busy_ == 0; });
}

RingStats StagingRing::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void StagingRing::reset_peaks() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.peak_copying = copying_;
  stats_.acquire_waits = 0;
}

}  // namespace blob2gpu
