#include "load_session.hpp"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "errors.hpp"

namespace blob2gpu {

namespace {

// Parses "cpu", "cuda", "cuda:N"; returns -1 for cpu.
int parse_device(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") {
    // The caller's current device, as torch means it: the Python layer resolves torch's own notion
    // first; here it is the device of the thread's current context, else cuda:0.
    const int current = current_device_ordinal();
    return current >= 0 ? current : 0;
  }
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 &&
      device.find_first_not_of("0123456789", 5) == std::string::npos && device.size() < 12) {
    return std::stoi(device.substr(5));
  }
  throw CoreError(ErrorKind::InvalidArgument,
                  "device '" + device + "' is not one of 'cpu', 'cuda', 'cuda:N'");
}

// CPU time of the calling thread.
int64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
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
  p->owner_pid_ = getpid();
  if (ordinal >= 0) {
    p->ctx_ = CudaContext::primary(ordinal);
    p->device_ = "cuda:" + std::to_string(ordinal);
    p->ring_ =
        std::make_unique<StagingRing>(p->ctx_, settings.staging_slots, settings.staging_slot_bytes,
                                      settings.use_pinned_host_fallback);
    p->engine_ = std::make_unique<CopyEngine>(p->ctx_, *p->ring_, settings.copy_streams);
  } else {
    p->device_ = "cpu";
  }
  p->threads_ = std::make_unique<IoThreads>(settings.io_threads, p->ctx_);
  return p;
}

LoadPipeline::~LoadPipeline() {
  close();
}

std::shared_ptr<LoadSession> LoadPipeline::start_local(std::vector<ShardSource> shards,
                                                       SessionOptions options) {
  if (options.mmap && is_cuda()) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "mmap applies to the cpu target only (device is " + device_ + ")");
  }
  options.fed = false;
  return start(std::move(shards), options);
}

std::shared_ptr<LoadSession> LoadPipeline::start_fed(std::vector<ShardSource> shards,
                                                     SessionOptions options) {
  options.fed = true;
  if (is_cuda()) options.mmap = false;  // mmap maps the local shards (cache hits) on cpu only
  return start(std::move(shards), options);
}

std::shared_ptr<LoadSession> LoadPipeline::start(std::vector<ShardSource> shards,
                                                 SessionOptions options) {
  if (!is_cuda()) options.host_staging = false;  // the cpu target is host memory already
  const bool fed = options.fed;
  std::shared_ptr<LoadSession> session(
      new LoadSession(shared_from_this(), std::move(shards), options));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) throw CoreError(ErrorKind::InvalidArgument, "the loader is closed");
    if (active_ != nullptr) {
      throw CoreError(ErrorKind::InvalidArgument,
                      "this loader is already running a load; close its checkpoint first or "
                      "use another Loader");
    }
    active_ = session.get();
    if (fed && !ring_) {
      // cpu target: data lands in the arena directly, but each shard's first range (header and
      // first data) needs a place before the arena exists. Pageable; untouched pages cost nothing.
      ring_ = std::make_unique<StagingRing>(nullptr, settings_.staging_slots,
                                            settings_.staging_slot_bytes, true);
    }
  }
  if (ring_) ring_->reset_peaks();
  session->begin();
  return session;
}

void LoadPipeline::session_ended() {
  std::lock_guard<std::mutex> lock(mutex_);
  active_ = nullptr;
}

bool LoadPipeline::forked_away() const {
  return getpid() != owner_pid_;
}

void LoadPipeline::close() {
  if (forked_away()) {
    // A forked child (a DataLoader worker, say) closing what it inherited: the threads and the
    // driver objects are the parent's. Joining threads that do not exist here would wait forever,
    // and a lock a parent thread held at fork() is never released, so the pipeline's parts are
    // deliberately leaked without touching either; the child's exit reclaims them.
    static_cast<void>(threads_.release());
    static_cast<void>(engine_.release());
    static_cast<void>(ring_.release());
    return;
  }
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
                         SessionOptions options)
    : pipeline_(std::move(pipeline)),
      mmap_(options.mmap),
      fed_(options.fed),
      host_staging_(options.host_staging),
      fail_on_checksum_mismatch_(options.fail_on_checksum_mismatch),
      direct_io_(options.direct_io),
      wanted_(std::move(options.wanted)),
      start_(std::chrono::steady_clock::now()) {
  for (auto& source : shards) {
    auto shard = std::make_unique<Shard>();
    shard->stats.name = source.name;
    shard->stats.file_bytes = source.size;
    shard->file_size = source.size;
    if (!source.checksums.empty()) {
      const ChunkChecksums& sums = source.checksums;
      shard->verifier = std::make_unique<ChunkVerifier>(source.name, source.size, sums.chunk_bytes,
                                                        sums.crc32c, sums.sha256);
    } else if (source.path.empty() && source.content_md5.size() == Md5::kDigestBytes && !wanted_) {
      Md5::Digest expected;
      std::copy(source.content_md5.begin(), source.content_md5.end(), expected.begin());
      shard->md5 = std::make_unique<ContentMd5Verifier>(source.name, source.size, expected);
    }
    shard->source = std::move(source);
    shards_.push_back(std::move(shard));
  }
}

LoadSession::~LoadSession() {
  close();
}

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
  // Shards with a local path are read by the io threads (in a fed session: cache hits); the
  // feeder fetches the others.
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (!shards_[i]->source.path.empty()) post([this, i] { run_header(i); }, /*urgent=*/false);
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
  ShardStats st;
  st.start_ns = now_ns();
  const std::string& label = shard.source.name;
  shard.file = std::make_unique<ShardFile>(shard.source.path, label);
  const uint64_t file_size = shard.file->size();
  if (shard.verifier && file_size != shard.file_size) {
    throw CoreError(ErrorKind::ChecksumMismatch,
                    "shard '" + label + "': the file has " + std::to_string(file_size) +
                        " bytes but the manifest says " + std::to_string(shard.file_size),
                    label);
  }

  uint8_t length_bytes[kHeaderLengthBytes] = {0};
  size_t have = static_cast<size_t>(std::min<uint64_t>(file_size, kHeaderLengthBytes));
  shard.file->read_exact(length_bytes, have, 0);
  uint64_t header_len = read_header_length(length_bytes, have, file_size, label);
  std::vector<uint8_t> json(header_len);
  shard.file->read_exact(json.data(), json.size(), kHeaderLengthBytes);
  bytes_read_ += kHeaderLengthBytes + header_len;
  if (shard.verifier) {
    verify(shard, 0, length_bytes, kHeaderLengthBytes);
    verify(shard, kHeaderLengthBytes, json.data(), json.size());
  }
  prepare_shard(index, json.data(), json.size(), file_size, st);
  const ShardHeader& h = shard.header;

  if (maps(shard) || shard.needed_bytes == 0) {
    if (maps(shard)) bytes_read_ += shard.needed_bytes;  // mapped: the first touch reads it
    if (maps(shard) && shard.verifier) {
      for (const Span& span : shard.spans) {
        verify(shard, h.data_offset + span.begin, shard.arena->host_data() + span.begin,
               span.end - span.begin);
      }
    }
    finish_shard(index);
    return;
  }
  uint64_t chunk = pipeline_->settings_.staging_slot_bytes;
  constexpr uint64_t kAlign = ShardFile::kDirectAlign;
  if (direct_io_ && !lands_on_host() && chunk >= 4 * kAlign && shard.file->open_direct()) {
    chunk -= 2 * kAlign;  // room to widen each read to aligned ends
  }
  for (const Span& span : shard.spans) {
    for (uint64_t begin = span.begin; begin < span.end; begin += chunk) {
      uint64_t end = std::min(span.end, begin + chunk);
      post([this, index, begin, end] { run_chunk(index, begin, end); }, /*urgent=*/true);
    }
  }
}

void LoadSession::plan_spans(Shard& shard) const {
  const ShardHeader& h = shard.header;
  shard.selected.clear();
  for (size_t t = 0; t < h.tensors.size(); ++t) {
    if (!wanted_ || wanted_->count(h.tensors[t].name) != 0) shard.selected.push_back(t);
  }
  std::vector<Span> ranges;
  if (!wanted_) {
    if (h.data_bytes > 0) ranges.push_back({0, h.data_bytes, 0});
  } else {
    // A verified shard is read in whole manifest chunks, so no byte reaches the target unchecked.
    const uint64_t grid = shard.verifier ? shard.verifier->chunk_bytes() : 0;
    for (size_t t : shard.selected) {
      const TensorEntry& e = h.tensors[t];
      if (e.end == e.begin) continue;
      uint64_t lo = e.begin, hi = e.end;
      if (grid > 0) {
        const uint64_t file_lo = (h.data_offset + lo) / grid * grid;
        const uint64_t file_hi = (h.data_offset + hi + grid - 1) / grid * grid;
        lo = file_lo > h.data_offset ? file_lo - h.data_offset : 0;
        hi = std::min(file_hi - h.data_offset, h.data_bytes);
      }
      ranges.push_back({lo, hi, 0});
    }
    std::sort(ranges.begin(), ranges.end(),
              [](const Span& a, const Span& b) { return a.begin < b.begin; });
  }
  shard.spans.clear();
  for (const Span& r : ranges) {
    if (!shard.spans.empty() && r.begin <= shard.spans.back().end) {
      shard.spans.back().end = std::max(shard.spans.back().end, r.end);
    } else {
      shard.spans.push_back(r);
    }
  }
  constexpr uint64_t kAlign = 256;
  uint64_t cursor = 0;
  shard.needed_bytes = 0;
  for (Span& span : shard.spans) {
    span.arena_offset =
        maps(shard) ? span.begin : (cursor + kAlign - 1) / kAlign * kAlign + span.begin % kAlign;
    cursor = span.arena_offset + (span.end - span.begin);
    shard.needed_bytes += span.end - span.begin;
  }
  shard.arena_bytes = maps(shard) ? h.data_bytes : cursor;
  shard.tensor_offset.assign(h.tensors.size(), 0);
  for (size_t t : shard.selected) {
    const TensorEntry& e = h.tensors[t];
    const Span* span = span_at(shard, e.begin);
    if (span != nullptr) shard.tensor_offset[t] = span->arena_offset + (e.begin - span->begin);
  }
}

std::vector<LoadSession::Span>::const_iterator LoadSession::spans_from(const Shard& shard,
                                                                       uint64_t pos) {
  auto it = std::upper_bound(shard.spans.begin(), shard.spans.end(), pos,
                             [](uint64_t p, const Span& s) { return p < s.begin; });
  if (it != shard.spans.begin() && std::prev(it)->end > pos) --it;
  return it;
}

const LoadSession::Span* LoadSession::span_at(const Shard& shard, uint64_t pos) {
  auto it = spans_from(shard, pos);
  return it != shard.spans.end() && it->begin <= pos ? &*it : nullptr;
}

void LoadSession::prepare_shard(size_t index, const uint8_t* json, size_t json_len,
                                uint64_t file_size, ShardStats st) {
  Shard& shard = *shards_[index];
  const std::string& label = shard.source.name;
  shard.header = parse_header(json, json_len, file_size, label);
  const ShardHeader& h = shard.header;
  st.name = label;
  st.file_bytes = file_size;
  st.header_bytes = h.header_bytes;
  st.data_bytes = h.data_bytes;
  plan_spans(shard);
  st.tensors = shard.selected.size();
  st.needed_bytes = shard.needed_bytes;

  const auto& ctx = pipeline_->ctx_;
  const std::string arena_label = "shard '" + label + "'";
  if (ctx) {
    shard.arena = DeviceArena::on_device(ctx, shard.arena_bytes, arena_label);
    if (host_staging_) {
      shard.staging = DeviceArena::on_host(shard.arena_bytes, arena_label + " (host staging)",
                                           /*populate=*/false);
    }
  } else if (maps(shard)) {
    shard.arena = DeviceArena::map_file(shard.file->fd(), file_size, h.data_offset, arena_label);
  } else {
    // Populated range by range as the bytes arrive (host_landing), not all at once here: making
    // a whole shard resident takes a fifth of a second per 250 MB where fresh memory is costly,
    // and here it would hold up the shard's first range.
    shard.arena = DeviceArena::on_host(shard.arena_bytes, arena_label, /*populate=*/false);
  }
  for (size_t t : shard.selected) {
    const TensorEntry& e = h.tensors[t];
    if ((shard.arena->address() + shard.tensor_offset[t]) % element_alignment(e.dtype) == 0) {
      continue;
    }
    const std::string tensor_label = arena_label + " tensor '" + e.name + "' (realigned)";
    shard.realigned.push_back({t, ctx ? DeviceArena::on_device(ctx, e.end - e.begin, tensor_label)
                                      : DeviceArena::on_host(e.end - e.begin, tensor_label)});
  }
  st.realigned_tensors = shard.realigned.size();
  st.header_ns = now_ns();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    st.checksum_failures = shard.stats.checksum_failures;  // chunks checked before the header
    shard.stats = st;  // under the lock: stats() may read concurrently
  }
  shard.header_ready = true;
}

void LoadSession::land_data(size_t index, Slot* slot, size_t slot_offset, uint64_t begin,
                            uint64_t bytes) {
  Shard& shard = *shards_[index];
  const ShardHeader& h = shard.header;
  const uint64_t end = begin + bytes;
  if (end > h.data_bytes) {
    if (slot) pipeline_->ring_->release(slot);
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shard.source.name + "': bytes [" + std::to_string(begin) + ", " +
                        std::to_string(end) + ") fall outside its data region of " +
                        std::to_string(h.data_bytes) + " bytes");
  }
  // The parts of the range this load needs (all of it without a tensor selection).
  std::vector<CopyRange> parts;
  uint64_t landed = 0;
  for (auto it = spans_from(shard, begin); it != shard.spans.end() && it->begin < end; ++it) {
    const uint64_t lo = std::max(it->begin, begin), hi = std::min(it->end, end);
    parts.push_back({it->arena_offset + (lo - it->begin), slot_offset + (lo - begin), hi - lo});
    landed += hi - lo;
  }
  if (!lands_on_host()) {
    std::vector<CopyRange> copies;
    try {
      for (const CopyRange& p : parts) {
        copies.push_back({shard.arena->address() + p.dst, p.src_offset, p.bytes});
      }
      for (const Realigned& r : shard.realigned) {
        const TensorEntry& e = h.tensors[r.tensor];
        uint64_t lo = std::max(e.begin, begin), hi = std::min(e.end, end);
        if (lo < hi) {
          copies.push_back(
              {r.arena->address() + (lo - e.begin), slot_offset + (lo - begin), hi - lo});
        }
      }
    } catch (...) {
      pipeline_->ring_->release(slot);
      throw;
    }
    if (copies.empty()) {
      pipeline_->ring_->release(slot);
    } else {
      pipeline_->engine_->submit(slot, copies);  // takes the slot, even when it throws
    }
  } else if (slot != nullptr) {
    for (const CopyRange& p : parts) {
      populate_host(host_destination(shard) + p.dst, p.bytes);
      std::memcpy(host_destination(shard) + p.dst, slot->data() + p.src_offset, p.bytes);
    }
    pipeline_->ring_->release(slot);
  }
  if (landed > 0 && shard.bytes_landed.fetch_add(landed) + landed == shard.needed_bytes) {
    finish_shard(index);
  }
}

void LoadSession::run_chunk(size_t index, uint64_t begin, uint64_t end) {
  Shard& shard = *shards_[index];
  const ShardHeader& h = shard.header;
  const uint64_t bytes = end - begin;
  Slot* slot = nullptr;
  size_t slot_offset = 0;
  if (lands_on_host()) {
    const Span* span = span_at(shard, begin);  // run_chunk ranges lie within one span
    read_and_verify(shard, host_landing(shard, *span, begin, bytes), h.data_offset + begin, bytes);
  } else {
    slot = pipeline_->ring_->acquire(&cancelled_);
    if (slot == nullptr) return;  // cancelled
    try {
      slot_offset = read_into_slot(shard, slot, h.data_offset + begin, bytes);
    } catch (...) {
      pipeline_->ring_->release(slot);
      throw;
    }
  }
  bytes_read_ += bytes;
  land_data(index, slot, slot_offset, begin, bytes);
}

// ---------------------------------------------------------------------------------------------
// Fed sessions: a caller (the Python Blob source) fetches byte ranges into landings.

std::optional<Landing> LoadSession::acquire(size_t index, uint64_t file_offset, size_t bytes) {
  check_shard_index(index);
  Shard& shard = *shards_[index];
  if (cancelled_) return std::nullopt;
  if (!shard.source.path.empty()) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shard.source.name + "' is read from a local file, not fed");
  }
  if (bytes == 0 || file_offset + bytes > shard.file_size) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shard.source.name + "': range [" + std::to_string(file_offset) +
                        ", " + std::to_string(file_offset + bytes) + ") is outside its " +
                        std::to_string(shard.file_size) + " bytes");
  }
  Landing landing;
  landing.shard = index;
  landing.file_offset = file_offset;
  landing.capacity = bytes;
  if (!shard.header_ready) {
    if (file_offset == 0) {
      int64_t expected = -1;
      shard.first_ns.compare_exchange_strong(expected, now_ns());
    } else if (!shard.header_buf.empty() && file_offset == shard.header_have &&
               file_offset + bytes == shard.header_buf.size()) {
      landing.data = shard.header_buf.data() + file_offset;  // the rest of a long header
      return landing;
    } else {
      throw CoreError(ErrorKind::InvalidArgument,
                      "shard '" + shard.source.name + "': range at offset " +
                          std::to_string(file_offset) + " requested before its header was read");
    }
  } else if (file_offset < shard.header.data_offset) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shard.source.name + "': header bytes requested twice");
  }
  if (lands_on_host() && shard.header_ready) {
    // cpu target (or host staging): the socket writes straight into host memory when the range
    // lies within what this load keeps; other ranges go through a slot.
    const uint64_t begin = file_offset - shard.header.data_offset;
    const Span* span = span_at(shard, begin);
    if (span != nullptr && begin + bytes <= span->end) {
      landing.data = host_landing(shard, *span, begin, bytes);
      return landing;
    }
  }
  if (bytes > pipeline_->settings_.staging_slot_bytes) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "a range of " + std::to_string(bytes) + " bytes exceeds staging_slot_bytes (" +
                        std::to_string(pipeline_->settings_.staging_slot_bytes) + ")");
  }
  landing.slot = pipeline_->ring_->acquire(&cancelled_);
  if (landing.slot == nullptr) return std::nullopt;
  landing.data = landing.slot->data();
  return landing;
}

void LoadSession::release(Landing& landing) {
  if (landing.slot) pipeline_->ring_->release(landing.slot);
  landing.slot = nullptr;
  landing.data = nullptr;
}

FeedStatus LoadSession::commit(Landing& landing) {
  try {
    // Feeder threads belong to the caller (Python), not to the io threads that bind the context.
    std::unique_ptr<ScopedContext> bind;
    if (pipeline_->ctx_) bind = std::make_unique<ScopedContext>(*pipeline_->ctx_);
    return commit_landing(landing);
  } catch (...) {
    fail(std::current_exception());
    throw;
  }
}

FeedStatus LoadSession::commit_landing(Landing& landing) {
  Shard& shard = *shards_[landing.shard];
  const std::string& label = shard.source.name;
  Slot* slot = landing.slot;
  landing.slot = nullptr;
  // Written straight into the arena (not a slot, not the rest of a long header): stays there.
  const bool in_arena = slot == nullptr && shard.header_ready;
  bytes_read_ += landing.capacity;
  try {
    if (shard.verifier) verify(shard, landing.file_offset, landing.data, landing.capacity);
    if (shard.md5) {
      auto mismatch = shard.md5->add(landing.file_offset, landing.data, landing.capacity, in_arena);
      verified_bytes_ += landing.capacity;
      if (mismatch && fail_on_checksum_mismatch_) {
        throw CoreError(ErrorKind::ChecksumMismatch, *mismatch, label);
      }
      if (mismatch) {
        std::lock_guard<std::mutex> lock(mutex_);
        checksum_failures_.push_back(*mismatch);
        ++shard.stats.checksum_failures;
      }
    }
  } catch (...) {
    if (slot) pipeline_->ring_->release(slot);
    throw;
  }
  if (!shard.header_ready) {
    if (landing.file_offset == 0) {
      const uint8_t* data = landing.data;
      uint64_t header_len = 0;
      try {
        header_len = read_header_length(data, landing.capacity, shard.file_size, label);
      } catch (...) {
        if (slot) pipeline_->ring_->release(slot);
        throw;
      }
      const uint64_t data_offset = kHeaderLengthBytes + header_len;
      if (data_offset > landing.capacity) {
        // A header longer than the first range: keep what arrived, ask for the rest.
        shard.header_buf.assign(data, data + landing.capacity);
        shard.header_buf.resize(data_offset);
        shard.header_have = landing.capacity;
        if (slot) pipeline_->ring_->release(slot);
        return status_of(shard);
      }
      ShardStats st;
      st.start_ns = shard.first_ns.load();
      try {
        prepare_shard(landing.shard, data + kHeaderLengthBytes, header_len, shard.file_size, st);
      } catch (...) {
        if (slot) pipeline_->ring_->release(slot);
        throw;
      }
      const uint64_t data_in_first = landing.capacity - data_offset;
      if (shard.needed_bytes == 0) {
        if (slot) pipeline_->ring_->release(slot);
        finish_shard(landing.shard);
      } else if (data_in_first > 0) {
        land_data(landing.shard, slot, data_offset, 0, data_in_first);
      } else if (slot) {
        pipeline_->ring_->release(slot);
      }
      return status_of(shard);
    }
    // The rest of a long header has landed in header_buf.
    shard.header_have = shard.header_buf.size();
    ShardStats st;
    st.start_ns = shard.first_ns.load();
    prepare_shard(landing.shard, shard.header_buf.data() + kHeaderLengthBytes,
                  shard.header_buf.size() - kHeaderLengthBytes, shard.file_size, st);
    std::vector<uint8_t>().swap(shard.header_buf);
    if (shard.needed_bytes == 0) finish_shard(landing.shard);
    return status_of(shard);
  }
  land_data(landing.shard, slot, 0, landing.file_offset - shard.header.data_offset,
            landing.capacity);
  return status_of(shard);
}

size_t LoadSession::read_into_slot(Shard& shard, Slot* slot, uint64_t file_offset, size_t bytes) {
  constexpr uint64_t kAlign = ShardFile::kDirectAlign;
  if (shard.file->direct() && reinterpret_cast<uintptr_t>(slot->data()) % kAlign == 0) {
    // The aligned blocks around the range, straight from the drive; the range starts at
    // file_offset - lo in the slot.
    const uint64_t lo = file_offset / kAlign * kAlign;
    const uint64_t hi = (file_offset + bytes + kAlign - 1) / kAlign * kAlign;
    const size_t skip = file_offset - lo;
    if (shard.file->read_direct(slot->data(), hi - lo, lo) >= skip + bytes) {
      if (shard.verifier) verify(shard, file_offset, slot->data() + skip, bytes);
      direct_io_bytes_ += bytes;
      return skip;
    }
  }
  read_and_verify(shard, slot->data(), file_offset, bytes);
  return 0;
}

void LoadSession::read_and_verify(Shard& shard, uint8_t* dest, uint64_t file_offset, size_t bytes) {
  if (!shard.verifier) {
    shard.file->read_exact(dest, bytes, file_offset);
    return;
  }
  // Checked piece by piece while each piece is still in the CPU cache: checking a whole slot
  // after reading it would read it from memory a second time. 256 KiB: with 1 MiB pieces the
  // kernel's copy had already pushed part of each piece out of L2 (+12% load time vs verify=none
  // on a 1 GB local load here; +0-2% at 256 KiB).
  constexpr size_t kPiece = 256u << 10;
  for (size_t done = 0; done < bytes; done += kPiece) {
    const size_t n = std::min(kPiece, bytes - done);
    shard.file->read_exact(dest + done, n, file_offset + done);
    verify(shard, file_offset + done, dest + done, n);
  }
}

void LoadSession::verify(Shard& shard, uint64_t file_offset, const uint8_t* data, size_t n) {
  std::vector<ChecksumFailure> failures = shard.verifier->add(file_offset, data, n);
  verified_bytes_ += n;
  if (failures.empty()) return;
  if (fail_on_checksum_mismatch_) {
    throw CoreError(ErrorKind::ChecksumMismatch, shard.verifier->describe(failures.front()),
                    shard.source.name, static_cast<int64_t>(failures.front().begin));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& f : failures) checksum_failures_.push_back(shard.verifier->describe(f));
  shard.stats.checksum_failures += failures.size();
}

uint8_t* LoadSession::host_landing(const Shard& shard, const Span& span, uint64_t begin,
                                   size_t bytes) const {
  uint8_t* dest = host_destination(shard) + span.arena_offset + (begin - span.begin);
  populate_host(dest, bytes);
  return dest;
}

void LoadSession::populate_host(uint8_t* p, size_t n) const {
  const int64_t start = thread_cpu_ns();
  HostBuffer::populate_for_write(p, n);
  populate_cpu_ns_ += static_cast<uint64_t>(thread_cpu_ns() - start);
}

uint8_t* LoadSession::host_destination(const Shard& shard) const {
  return host_staging_ ? shard.staging->host_data() : shard.arena->host_data();
}

FeedStatus LoadSession::status_of(const Shard& shard) const {
  FeedStatus s;
  s.header_ready = shard.header_ready;
  if (shard.header_ready) {
    s.data_offset = shard.header.data_offset;
  } else {
    s.header_have = shard.header_have;
    s.data_offset = shard.header_buf.size();
  }
  return s;
}

void LoadSession::check_shard_index(size_t index) const {
  if (index >= shards_.size()) {
    throw CoreError(ErrorKind::InvalidArgument, "shard index " + std::to_string(index) +
                                                    " out of range (" +
                                                    std::to_string(shards_.size()) + " shards)");
  }
}

void LoadSession::abort(ErrorKind kind, const std::string& message) {
  fail(std::make_exception_ptr(CoreError(kind, message)));
}

std::vector<std::pair<uint64_t, uint64_t>> LoadSession::needed_ranges(size_t index) const {
  check_shard_index(index);
  const Shard& shard = *shards_[index];
  if (!shard.header_ready) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shard.source.name + "': its header has not been read yet");
  }
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const Span& span : shard.spans) {
    out.emplace_back(shard.header.data_offset + span.begin, shard.header.data_offset + span.end);
  }
  return out;
}

void LoadSession::finish_shard(size_t index) {
  Shard& shard = *shards_[index];
  const ShardHeader& h = shard.header;
  std::vector<std::shared_ptr<CudaEvent>> fence;
  if (pipeline_->ctx_ && host_staging_) {
    // The baseline path: the whole shard is in host memory; copy it, then wait for it, so the
    // staging copy can go.
    CopyEngine& engine = *pipeline_->engine_;
    engine.copy_from_host(shard.arena->address(), shard.staging->host_data(), shard.arena_bytes);
    for (const Realigned& r : shard.realigned) {
      const TensorEntry& e = h.tensors[r.tensor];
      engine.copy_from_host(r.arena->address(),
                            shard.staging->host_data() + shard.tensor_offset[r.tensor],
                            e.end - e.begin);
    }
    fence = engine.record_fence();
    for (const auto& event : fence) event->synchronize();
    shard.arena->set_fence(fence);
    for (const Realigned& r : shard.realigned) r.arena->set_fence(fence);
    shard.staging.reset();
  } else if (pipeline_->ctx_) {
    // Every chunk of this shard is enqueued (bytes_landed counts after submit), so events recorded
    // now on every stream complete only after all of them.
    fence = pipeline_->engine_->record_fence();
    shard.arena->set_fence(fence);
    for (const Realigned& r : shard.realigned) r.arena->set_fence(fence);
  } else {
    for (const Realigned& r : shard.realigned) {
      const TensorEntry& e = h.tensors[r.tensor];
      std::memcpy(r.arena->host_data(), shard.arena->host_data() + shard.tensor_offset[r.tensor],
                  e.end - e.begin);
    }
  }
  PublishedShard out;
  out.index = index;
  out.metadata = h.metadata;
  size_t next_realigned = 0;
  for (size_t t : shard.selected) {
    const TensorEntry& e = h.tensors[t];
    std::shared_ptr<DeviceArena> arena = shard.arena;
    uint64_t offset = shard.tensor_offset[t];
    if (next_realigned < shard.realigned.size() && shard.realigned[next_realigned].tensor == t) {
      arena = shard.realigned[next_realigned++].arena;
      offset = 0;
    }
    out.tensors.push_back(
        std::make_shared<TensorView>(e.name, e.dtype, e.shape, arena, offset, e.end - e.begin));
  }
  if (pipeline_->ctx_) {
    size_t free_bytes = 0, total = 0;
    if (cuda_driver().cuMemGetInfo(&free_bytes, &total) == CUDA_SUCCESS) {
      int64_t seen = min_free_.load();
      const auto now_free = static_cast<int64_t>(free_bytes);
      while ((seen < 0 || now_free < seen) && !min_free_.compare_exchange_weak(seen, now_free)) {
      }
    }
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
  changed_.wait(
      lock, [this] { return error_ || !ready_.empty() || returned_ == shards_.size() || closed_; });
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

std::vector<PublishedShard> LoadSession::take_ready() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<PublishedShard> out(std::make_move_iterator(ready_.begin()),
                                  std::make_move_iterator(ready_.end()));
  returned_ += out.size();
  ready_.clear();
  return out;
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
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_ && returned_ < shards_.size()) {
      error_ = std::make_exception_ptr(
          CoreError(ErrorKind::LoadCancelled, "the load was cancelled before it finished"));
    }
  }
  cancelled_ = true;
  if (pipeline_->ring_) pipeline_->ring_->wake_all();
  changed_.notify_all();
}

void LoadSession::close() {
  // In a forked child nothing may wait for the parent's threads (see LoadPipeline::close).
  if (pipeline_->forked_away()) return;
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
  s.mmap = false;
  for (const auto& shard : shards_) s.mmap = s.mmap || maps(*shard);
  s.host_staging = host_staging_;
  s.min_free_device_bytes = min_free_.load();
  s.verified_bytes = verified_bytes_.load();
  s.direct_io_bytes = direct_io_bytes_.load();
  s.host_populate_seconds = static_cast<double>(populate_cpu_ns_.load()) / 1e9;
  std::lock_guard<std::mutex> lock(mutex_);
  s.all_published_ns = all_published_ns_;
  s.checksum_failures = checksum_failures_;
  for (const auto& shard : shards_) s.shards.push_back(shard->stats);
  return s;
}

}  // namespace blob2gpu
