// CopyEngine: turns filled staging slots into asynchronous host-to-device copies on K streams.
// Each submission records the slot's event right after its copies; a reaper thread waits on those
// events in submission order and only then returns the slot to the ring. Producers never wait on
// a copy, and nothing here synchronizes the device or a whole stream.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_device.hpp"
#include "staging_ring.hpp"

namespace blob2gpu {

struct CopyRange {
  uint64_t dst;       // device address
  size_t src_offset;  // offset in the slot
  size_t bytes;
};

class CopyEngine {
 public:
  CopyEngine(std::shared_ptr<CudaContext> ctx, StagingRing& ring, size_t streams);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Enqueues the slot's copies on the next stream and hands the slot to the reaper; takes the slot
  // in every case. Must be called with the context current. When a copy is refused (throws
  // CudaError) after earlier copies of the slot were enqueued, those may still be reading it: the
  // slot still goes to the reaper and returns to the ring only after its event (or, if no event
  // can be recorded, never), not at once. With nothing enqueued it goes back to the ring.
  void submit(Slot* slot, const std::vector<CopyRange>& ranges);
  // Makes every copy stream wait (on the device) for the events that have not completed: the
  // bytes an arena reuses may still be read by a consumer's kernel or written by an earlier copy.
  // Must be called with the context current.
  void wait_for(const std::vector<std::shared_ptr<CudaEvent>>& events);
  // Enqueues one copy from host memory the caller keeps alive until a later fence completes
  // (host-staging shards). Must be called with the context current.
  void copy_from_host(uint64_t dst, const uint8_t* src, size_t bytes);
  // One event per stream, recorded now: they complete once everything submitted before completes.
  std::vector<std::shared_ptr<CudaEvent>> record_fence();
  // The first error the reaper saw while waiting on an event (a failed asynchronous copy), or null.
  std::exception_ptr async_error() const;
  size_t stream_count() const { return streams_.size(); }

 private:
  void reap();
  // Records the slot's event on `stream` after its enqueued copies and hands the slot to the
  // reaper; when the event cannot be recorded the slot is retired (returns false).
  bool hand_to_reaper(Slot* slot, CUstream stream);

  std::shared_ptr<CudaContext> ctx_;
  StagingRing& ring_;
  std::vector<std::unique_ptr<CudaStream>> streams_;
  std::vector<std::unique_ptr<CudaEvent>> slot_events_;  // indexed by slot index
  std::atomic<size_t> next_stream_{0};

  mutable std::mutex mutex_;
  std::condition_variable pending_changed_;
  std::deque<Slot*> pending_;
  bool stopping_ = false;
  std::exception_ptr async_error_;
  std::thread reaper_;
};

}  // namespace blob2gpu
