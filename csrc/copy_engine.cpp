#include "copy_engine.hpp"

#include "errors.hpp"

namespace blob2gpu {

CopyEngine::CopyEngine(std::shared_ptr<CudaContext> ctx, StagingRing& ring, size_t streams)
    : ctx_(std::move(ctx)), ring_(ring) {
  if (streams < 1) {
    throw CoreError(ErrorKind::InvalidArgument, "copy_streams must be at least 1");
  }
  for (size_t i = 0; i < streams; ++i) streams_.push_back(std::make_unique<CudaStream>(ctx_));
  for (size_t i = 0; i < ring.stats().slots; ++i) {
    slot_events_.push_back(std::make_unique<CudaEvent>(ctx_));
  }
  reaper_ = std::thread([this] { reap(); });
}

CopyEngine::~CopyEngine() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  pending_changed_.notify_all();
  reaper_.join();
}

void CopyEngine::submit(Slot* slot, const std::vector<CopyRange>& ranges) {
  const CudaDriver& d = cuda_driver();
  CUstream stream = streams_[next_stream_.fetch_add(1) % streams_.size()]->handle();
  size_t enqueued = 0;
  for (const CopyRange& r : ranges) {
    if (r.bytes == 0) continue;
    const CUresult rc = d.cuMemcpyHtoDAsync(r.dst, slot->data() + r.src_offset, r.bytes, stream);
    if (rc != CUDA_SUCCESS) {
      // The slot's earlier copies may still be reading it: it goes back after its event.
      if (enqueued > 0) {
        hand_to_reaper(slot, stream);
      } else {
        ring_.release(slot);
      }
      check_cuda(rc, "cuMemcpyHtoDAsync of " + std::to_string(r.bytes) + " bytes");
    }
    ++enqueued;
  }
  if (!hand_to_reaper(slot, stream)) {
    throw CoreError(ErrorKind::CudaError,
                    "cuEventRecord after a staging slot's copies failed; the slot is out of use");
  }
}

bool CopyEngine::hand_to_reaper(Slot* slot, CUstream stream) {
  if (cuda_driver().cuEventRecord(slot_events_[slot->index]->handle(), stream) != CUDA_SUCCESS) {
    ring_.retire(slot);  // no event says when its copies end: never reused
    return false;
  }
  ring_.mark_copying(slot);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back(slot);
  }
  pending_changed_.notify_all();
  return true;
}

void CopyEngine::wait_for(const std::vector<std::shared_ptr<CudaEvent>>& events) {
  for (const auto& event : events) {
    if (event->completed_for_teardown()) continue;
    for (const auto& stream : streams_) {
      check_cuda(cuda_driver().cuStreamWaitEvent(stream->handle(), event->handle(), 0),
                 "cuStreamWaitEvent (an arena's bytes reused)");
    }
  }
}

void CopyEngine::copy_from_host(uint64_t dst, const uint8_t* src, size_t bytes) {
  if (bytes == 0) return;
  CUstream stream = streams_[next_stream_.fetch_add(1) % streams_.size()]->handle();
  check_cuda(cuda_driver().cuMemcpyHtoDAsync(dst, src, bytes, stream),
             "cuMemcpyHtoDAsync of " + std::to_string(bytes) + " staged bytes");
}

std::vector<std::shared_ptr<CudaEvent>> CopyEngine::record_fence() {
  std::vector<std::shared_ptr<CudaEvent>> fence;
  for (const auto& stream : streams_) {
    auto event = std::make_shared<CudaEvent>(ctx_);
    event->record(stream->handle());
    fence.push_back(std::move(event));
  }
  return fence;
}

std::exception_ptr CopyEngine::async_error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return async_error_;
}

void CopyEngine::reap() {
  // An exception must not leave a thread function (std::terminate): a context that cannot be bound
  // (a driver shutting down) fails every wait below instead, and slots are still handed back so
  // the producers and close() are never left waiting.
  std::unique_ptr<ScopedContext> bind;
  std::exception_ptr bind_error;
  try {
    bind = std::make_unique<ScopedContext>(*ctx_);
  } catch (...) {
    bind_error = std::current_exception();
  }
  for (;;) {
    Slot* slot = nullptr;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      pending_changed_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
      if (pending_.empty()) return;  // stopping and drained
      slot = pending_.front();
    }
    try {
      if (bind_error) std::rethrow_exception(bind_error);
      slot_events_[slot->index]->synchronize();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!async_error_) async_error_ = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_.pop_front();
    }
    ring_.release(slot);
  }
}

}  // namespace blob2gpu
