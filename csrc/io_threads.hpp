// IoThreads: the core's worker threads. They read shards and feed the ring without the GIL, each
// with the target's CUDA context current. Urgent tasks (a shard's data chunks) run before normal
// ones (the next shard's header), so copying starts as soon as the first header is parsed while
// later headers are parsed in the gaps.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_device.hpp"

namespace blob2gpu {

class IoThreads {
 public:
  IoThreads(size_t threads, std::shared_ptr<CudaContext> ctx) {
    for (size_t i = 0; i < threads; ++i) {
      workers_.emplace_back([this, ctx] {
        std::unique_ptr<ScopedContext> bind;
        try {
          if (ctx) bind = std::make_unique<ScopedContext>(*ctx);
        } catch (...) {
          // Nothing may leave a thread function. Unbound, the tasks' own driver calls fail and
          // each task reports its error to its load.
        }
        run();
      });
    }
  }
  ~IoThreads() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    ready_.notify_all();
    for (auto& w : workers_) w.join();
  }
  IoThreads(const IoThreads&) = delete;
  IoThreads& operator=(const IoThreads&) = delete;

  void post(std::function<void()> task, bool urgent) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      (urgent ? urgent_ : normal_).push_back(std::move(task));
    }
    ready_.notify_one();
  }
  size_t size() const { return workers_.size(); }

 private:
  void run() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stopping_ || !urgent_.empty() || !normal_.empty(); });
        if (!urgent_.empty()) {
          task = std::move(urgent_.front());
          urgent_.pop_front();
        } else if (!normal_.empty()) {
          task = std::move(normal_.front());
          normal_.pop_front();
        } else {
          return;  // stopping and nothing left
        }
      }
      task();  // tasks catch their own errors
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> urgent_;
  std::deque<std::function<void()>> normal_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace blob2gpu
