// IoThreads: the core's worker threads. They read shards and feed the ring without the GIL, each
// with the target's CUDA context current. Tasks run by priority: data (a shard's chunks) first,
// then group openings (a streamed load's tensor group waiting for device memory, which may block),
// then headers, so copying starts as soon as the first header is parsed while later headers are
// parsed in the gaps. Data tasks never wait for device memory and always run before an opening,
// so an opening that blocks never holds up the groups that will give memory back. On a GPU with
// a NUMA node the threads run on its CPUs (numa_placement.hpp).
#pragma once

#include <array>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_device.hpp"
#include "numa_placement.hpp"

namespace blob2gpu {

enum class TaskPriority { kData, kOpen, kHeader };

class IoThreads {
 public:
  // cpus: where each thread runs (the GPU's NUMA node; empty: wherever the OS puts it).
  IoThreads(size_t threads, std::shared_ptr<CudaContext> ctx, std::vector<int> cpus = {}) {
    for (size_t i = 0; i < threads; ++i) {
      workers_.emplace_back([this, ctx, cpus] {
        bind_thread_to(cpus);  // best effort: unbound, it still works
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

  void post(std::function<void()> task, TaskPriority priority) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queues_[static_cast<size_t>(priority)].push_back(std::move(task));
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
        ready_.wait(lock, [this] { return stopping_ || pending(); });
        for (auto& queue : queues_) {
          if (queue.empty()) continue;
          task = std::move(queue.front());
          queue.pop_front();
          break;
        }
        if (!task) return;  // stopping and nothing left
      }
      task();  // tasks catch their own errors
    }
  }

  bool pending() const {
    for (const auto& queue : queues_) {
      if (!queue.empty()) return true;
    }
    return false;
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::array<std::deque<std::function<void()>>, 3> queues_;  // by TaskPriority
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace blob2gpu
