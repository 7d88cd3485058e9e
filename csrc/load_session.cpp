#include "load_session.hpp"

#include <algorithm>
#include <cstring>

#include "errors.hpp"

namespace blob2gpu {

namespace {

// Parses "cpu", "cuda", "cuda:N"; returns -1 for cpu.
int parse_device(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 &&
      device.find_first_not_of("0123456789", 5) == std::string::npos && device.size() < 12) {
    return std::stoi(device.substr(5));
  }
  throw CoreError(ErrorKind::InvalidArgument,
                  "device '" + device + "' is not one of 'cpu', 'cuda', 'cuda:N'");
}

// Alignment a consumer may assume for an element of this dtype.
uint64_t element_alignment(DType dtype) {
  uint32_t bits = dtype_info(dtype).bits;
  if (bits % 8 != 0) return 1;
  return std::min<uint64_t>(bits / 8, 8);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// LoadPipeline

std::shared_ptr<LoadPipeline> LoadPipeline::create(const std::string& device,
                                                   const PipelineSettings& settings) {
  int ordinal = parse_device(device);
  if (settings.io_threads < 1) {
    throw CoreError(ErrorKind::InvalidArgument, "io_threads must be at least 1");
  }
  std::shared_ptr<LoadPipeline> p(new LoadPipeline());
  p->settings_ = settings;
  if (ordinal >= 0) {
    p->ctx_ = CudaContext::retain(ordinal);
    p->device_ = "cuda:" + std::to_string(ordinal);
    p->ring_ = std::make_unique<StagingRing>(p->ctx_, settings.staging_slots,
                                             settings.staging_slot_bytes,
                                             settings.use_pinned_host_fallback);
    p->engine_ = std::make_unique<CopyEngine>(p->ctx_, *p->ring_, settings.copy_streams);
  } else {
    p->device_ = "cpu";
  }
  p->threads_ = std::make_unique<IoThreads>(settings.io_threads, p->ctx_);
  return p;
}

LoadPipeline::~LoadPipeline() { close(); }

std::shared_ptr<LoadSession> LoadPipeline::start_local(std::vector<ShardSource> shards,
                                                       bool mmap) {
  if (mmap && is_cuda()) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "mmap applies to the cpu target only (device is " + device_ + ")");
  }
  std::shared_ptr<LoadSession> session(
      new LoadSession(shared_from_this(), std::move(shards), mmap));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) throw CoreError(ErrorKind::InvalidArgument, "the loader is closed");
    if (active_ != nullptr) {
      throw CoreError(ErrorKind::InvalidArgument,
                      "this loader is already running a load; close its checkpoint first or "
                      "use another Loader");
    }
    active_ = session.get();
  }
  if (ring_) ring_->reset_peaks();
  session->begin();
  return session;
}

void LoadPipeline::session_ended() {
  std::lock_guard<std::mutex> lock(mutex_);
  active_ = nullptr;
}

void LoadPipeline::close() {
  LoadSession* active = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return;
    closed_ = true;
    active = active_;
  }
  // A session keeps its pipeline alive, so an active one is still valid here.
  if (active) active->close();
  threads_.reset();
  engine_.reset();  // drains the reaper: every slot's copies have completed
  ring_.reset();
}

RingStats LoadPipeline::ring_stats() const {
  if (ring_) return ring_->stats();
  RingStats s;
  return s;
}

// ---------------------------------------------------------------------------------------------
// LoadSession

LoadSession::LoadSession(std::shared_ptr<LoadPipeline> pipeline, std::vector<ShardSource> shards,
                         bool mmap)
    : pipeline_(std::move(pipeline)), mmap_(mmap), start_(std::chrono::steady_clock::now()) {
  for (auto& source : shards) {
    auto shard = std::make_unique<Shard>();
    shard->stats.name = source.name;
    shard->source = std::move(source);
    shards_.push_back(std::move(shard));
  }
}

LoadSession::~LoadSession() { close(); }

int64_t LoadSession::now_ns() const {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                              start_)
      .count();
}

void LoadSession::begin() {
  if (shards_.empty()) {
    std::lock_guard<std::mutex> lock(mutex_);
    all_published_ns_ = now_ns();
    return;
  }
  for (size_t i = 0; i < shards_.size(); ++i) {
    post([this, i] { run_header(i); }, /*urgent=*/false);
  }
}

void LoadSession::post(std::function<void()> task, bool urgent) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++outstanding_;
  }
  pipeline_->threads_->post(
      [this, task = std::move(task)] {
        if (!cancelled_.load()) {
          try {
            task();
          } catch (...) {
            fail(std::current_exception());
          }
        }
        std::lock_guard<std::mutex> lock(mutex_);
        --outstanding_;
        changed_.notify_all();
      },
      urgent);
}

void LoadSession::fail(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_) error_ = error;
  }
  cancelled_ = true;
  if (pipeline_->ring_) pipeline_->ring_->wake_all();
  changed_.notify_all();
}

void LoadSession::run_header(size_t index) {
  Shard& shard = *shards_[index];
  ShardStats st;  // published under the lock at the end: stats() may read concurrently
  st.name = shard.source.name;
  st.start_ns = now_ns();
  const std::string& label = shard.source.name;
  shard.file = std::make_unique<ShardFile>(shard.source.path, label);
  const uint64_t file_size = shard.file->size();
  st.file_bytes = file_size;

  uint8_t length_bytes[kHeaderLengthBytes] = {0};
  size_t have = static_cast<size_t>(std::min<uint64_t>(file_size, kHeaderLengthBytes));
  shard.file->read_exact(length_bytes, have, 0);
  uint64_t header_len = read_header_length(length_bytes, have, file_size, label);
  std::vector<uint8_t> json(header_len);
  shard.file->read_exact(json.data(), json.size(), kHeaderLengthBytes);
  bytes_read_ += kHeaderLengthBytes + header_len;
  shard.header = parse_header(json.data(), json.size(), file_size, label);
  const ShardHeader& h = shard.header;
  st.header_bytes = h.header_bytes;
  st.data_bytes = h.data_bytes;
  st.tensors = h.tensors.size();

  const auto& ctx = pipeline_->ctx_;
  const std::string arena_label = "shard '" + label + "'";
  if (ctx) {
    shard.arena = DeviceArena::on_device(ctx, h.data_bytes, arena_label);
  } else if (mmap_) {
    shard.arena = DeviceArena::map_file(shard.file->fd(), file_size, h.data_offset, arena_label);
  } else {
    shard.arena = DeviceArena::on_host(h.data_bytes, arena_label);
  }
  for (size_t t = 0; t < h.tensors.size(); ++t) {
    const TensorEntry& e = h.tensors[t];
    if ((shard.arena->address() + e.begin) % element_alignment(e.dtype) == 0) continue;
    const std::string tensor_label = arena_label + " tensor '" + e.name + "' (realigned)";
    shard.realigned.push_back(
        {t, ctx ? DeviceArena::on_device(ctx, e.end - e.begin, tensor_label)
                : DeviceArena::on_host(e.end - e.begin, tensor_label)});
  }
  st.realigned_tensors = shard.realigned.size();
  st.header_ns = now_ns();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    shard.stats = st;
  }

  if (mmap_ || h.data_bytes == 0) {
    if (mmap_) bytes_read_ += h.data_bytes;  // mapped: the consumer's first touch reads it
    finish_shard(index);
    return;
  }
  const uint64_t chunk = pipeline_->settings_.staging_slot_bytes;
  for (uint64_t begin = 0; begin < h.data_bytes; begin += chunk) {
    uint64_t end = std::min(h.data_bytes, begin + chunk);
    post([this, index, begin, end] { run_chunk(index, begin, end); }, /*urgent=*/true);
  }
}

void LoadSession::run_chunk(size_t index, uint64_t begin, uint64_t end) {
  Shard& shard = *shards_[index];
  const ShardHeader& h = shard.header;
  const uint64_t bytes = end - begin;
  if (!pipeline_->ctx_) {
    shard.file->read_exact(shard.arena->host_data() + begin, bytes, h.data_offset + begin);
  } else {
    StagingRing& ring = *pipeline_->ring_;
    Slot* slot = ring.acquire(&cancelled_);
    if (slot == nullptr) return;  // cancelled
    try {
      shard.file->read_exact(slot->data(), bytes, h.data_offset + begin);
      std::vector<CopyRange> copies{{shard.arena->address() + begin, 0, bytes}};
      for (const Realigned& r : shard.realigned) {
        const TensorEntry& e = h.tensors[r.tensor];
        uint64_t lo = std::max(e.begin, begin), hi = std::min(e.end, end);
        if (lo < hi) copies.push_back({r.arena->address() + (lo - e.begin), lo - begin, hi - lo});
      }
      pipeline_->engine_->submit(slot, copies);
    } catch (...) {
      ring.release(slot);
      throw;
    }
  }
  bytes_read_ += bytes;
  if (shard.bytes_landed.fetch_add(bytes) + bytes == h.data_bytes) finish_shard(index);
}

void LoadSession::finish_shard(size_t index) {
  Shard& shard = *shards_[index];
  const ShardHeader& h = shard.header;
  std::vector<std::shared_ptr<CudaEvent>> fence;
  if (pipeline_->ctx_) {
    // Every chunk of this shard is enqueued (bytes_landed counts after submit), so events recorded
    // now on every stream complete only after all of them.
    fence = pipeline_->engine_->record_fence();
    shard.arena->set_fence(fence);
    for (const Realigned& r : shard.realigned) r.arena->set_fence(fence);
  } else {
    for (const Realigned& r : shard.realigned) {
      const TensorEntry& e = h.tensors[r.tensor];
      std::memcpy(r.arena->host_data(), shard.arena->host_data() + e.begin, e.end - e.begin);
    }
  }
  PublishedShard out;
  out.index = index;
  out.metadata = h.metadata;
  size_t next_realigned = 0;
  for (size_t t = 0; t < h.tensors.size(); ++t) {
    const TensorEntry& e = h.tensors[t];
    std::shared_ptr<DeviceArena> arena = shard.arena;
    uint64_t offset = e.begin;
    if (next_realigned < shard.realigned.size() && shard.realigned[next_realigned].tensor == t) {
      arena = shard.realigned[next_realigned++].arena;
      offset = 0;
    }
    out.tensors.push_back(
        std::make_shared<TensorView>(e.name, e.dtype, e.shape, arena, offset, e.end - e.begin));
  }
  // The session no longer needs the arenas: the published views own them now.
  shard.arena.reset();
  shard.realigned.clear();
  shard.file.reset();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    shard.stats.published_ns = now_ns();
    ready_.push_back(std::move(out));
    fences_.insert(fences_.end(), fence.begin(), fence.end());
    if (++published_ == shards_.size()) all_published_ns_ = now_ns();
  }
  changed_.notify_all();
}

std::optional<PublishedShard> LoadSession::next_shard() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] {
    return error_ || !ready_.empty() || returned_ == shards_.size() || closed_;
  });
  if (error_) std::rethrow_exception(error_);
  if (!ready_.empty()) {
    PublishedShard out = std::move(ready_.front());
    ready_.pop_front();
    ++returned_;
    return out;
  }
  if (closed_ && returned_ < shards_.size()) {
    throw CoreError(ErrorKind::LoadCancelled, "the load was closed before all shards arrived");
  }
  return std::nullopt;
}

void LoadSession::wait_landed() {
  std::vector<std::shared_ptr<CudaEvent>> fences;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fences = fences_;
  }
  for (const auto& event : fences) event->synchronize();
  if (pipeline_->engine_) {
    if (auto error = pipeline_->engine_->async_error()) std::rethrow_exception(error);
  }
}

void LoadSession::cancel() {
  cancelled_ = true;
  if (pipeline_->ring_) pipeline_->ring_->wake_all();
  changed_.notify_all();
}

void LoadSession::close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return;
  }
  bool finished;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    finished = returned_ == shards_.size() && !error_;
  }
  if (!finished) cancel();
  {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [this] { return outstanding_ == 0; });
  }
  // Copies already enqueued may still read slots or write arenas: let them land before the
  // arenas of unpublished shards are freed and the ring is reused.
  if (pipeline_->ring_) pipeline_->ring_->wait_idle();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ready_.clear();
    closed_ = true;
  }
  for (auto& shard : shards_) {
    shard->arena.reset();
    shard->realigned.clear();
    shard->file.reset();
  }
  changed_.notify_all();
  pipeline_->session_ended();
}

SessionStats LoadSession::stats() const {
  SessionStats s;
  s.device = pipeline_->device_;
  s.bytes_read = bytes_read_.load();
  s.elapsed_ns = now_ns();
  RingStats ring = pipeline_->ring_stats();
  s.pinned = ring.pinned;
  s.pinned_fallback = ring.pinned_fallback;
  s.staging_slots = ring.slots;
  s.staging_slot_bytes = ring.slot_bytes;
  s.peak_slots_in_flight = ring.peak_copying;
  s.slot_waits = ring.acquire_waits;
  s.copy_streams = pipeline_->engine_ ? pipeline_->engine_->stream_count() : 0;
  s.io_threads = pipeline_->settings_.io_threads;
  s.mmap = mmap_;
  std::lock_guard<std::mutex> lock(mutex_);
  s.all_published_ns = all_published_ns_;
  for (const auto& shard : shards_) s.shards.push_back(shard->stats);
  return s;
}

}  // namespace blob2gpu
