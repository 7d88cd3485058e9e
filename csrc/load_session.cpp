#include "load_session.hpp"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <iterator>

#include "errors.hpp"

namespace blob2gpu {

constexpr size_t kNoGroup = static_cast<size_t>(-1);

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
    if (settings.bind_numa_node) p->placement_ = numa_placement(ordinal);
    {
      // The ring's pages are made resident (pinned) on this thread: on the GPU's node.
      ScopedNumaPlacement on_node(p->placement_);
      p->ring_on_node_ = on_node.memory_bound();
      p->ring_ = std::make_unique<StagingRing>(p->ctx_, settings.staging_slots,
                                               settings.staging_slot_bytes,
                                               settings.use_pinned_host_fallback);
    }
    p->engine_ = std::make_unique<CopyEngine>(p->ctx_, *p->ring_, settings.copy_streams);
  } else {
    p->device_ = "cpu";
  }
  p->threads_ = std::make_unique<IoThreads>(settings.io_threads, p->ctx_, p->placement_.cpus);
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
  if (!is_cuda() || options.host_staging) options.device_cap = 0;  // bounds device memory only
  const bool fed = options.fed;
  std::shared_ptr<LoadSession> session(
      new LoadSession(shared_from_this(), std::move(shards), options));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) throw CoreError(ErrorKind::InvalidArgument, "the loader is closed");
    if (running_) {
      throw CoreError(ErrorKind::InvalidArgument,
                      "this loader is already running a load; close its checkpoint first or "
                      "use another Loader");
    }
    running_ = true;
    active_ = session;
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
  running_ = false;
  ended_.notify_all();
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
  std::shared_ptr<LoadSession> active;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (closed_) return;
    closed_ = true;
    active = active_.lock();
    // A session that cannot be held any more is being destroyed, and its destructor closes it:
    // wait for that to end rather than touch the dying object.
    if (!active) ended_.wait(lock, [this] { return !running_; });
  }
  if (active) active->close();
  active.reset();  // if the caller's reference was the last, the session goes here, closed
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
  uint64_t total = 0, whole = 0;  // every shard's bytes; the largest checked by Content-MD5
  for (auto& source : shards) {
    auto shard = std::make_unique<Shard>();
    shard->stats.name = source.name;
    shard->stats.file_bytes = source.size;
    shard->file_size = source.size;
    if (!source.checksums.empty()) {
      const ChunkChecksums& sums = source.checksums;
      shard->verifier = std::make_unique<ChunkVerifier>(source.name, source.size, sums.chunk_bytes,
                                                        sums.crc32c, sums.sha256);
    } else if (source.content_md5.size() == Md5::kDigestBytes && !wanted_) {
      // A fed shard, or a local file read in its stead (an NVMe cache hit): the blob's MD5.
      Md5::Digest expected;
      std::copy(source.content_md5.begin(), source.content_md5.end(), expected.begin());
      shard->md5 =
          std::make_unique<ContentMd5Verifier>(source.name, source.size, expected, &md5_gauge_);
      whole = std::max(whole, source.size);
    }
    total += source.size;
    shard->source = std::move(source);
    shards_.push_back(std::move(shard));
  }
  if (options.device_cap > 0 && pipeline_->ctx_ && !host_staging_) {
    // The slab: the cap, or less when the whole load needs less; at least a shard that is handed
    // out only whole (Content-MD5 is checked over the whole blob before any tensor of it goes).
    const uint64_t cap = options.device_cap;
    uint64_t slab = total > 0 ? std::min(cap, total + (64u << 10)) : cap;
    if (whole > 0) slab = std::max(slab, (whole + 255) / 256 * 256);  // the file holds its arena
    pool_ = ArenaPool::create(pipeline_->ctx_, cap, slab);
    streamed_ = true;
    // Four groups fit under the cap: one the consumer holds while it asks for the next, the next
    // landing, and room to keep the copies going.
    group_target_ = std::max<uint64_t>(cap / 4, 1);
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
    if (!shards_[i]->source.path.empty()) post([this, i] { run_header(i); }, TaskPriority::kHeader);
  }
}

void LoadSession::post(std::function<void()> task, TaskPriority priority) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_) return;  // close() no longer waits for tasks: none may start
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
      priority);
}

void LoadSession::fail(std::exception_ptr error) {
  std::shared_ptr<ArenaPool> pool;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_) error_ = error;
    pool = pool_;
  }
  cancelled_ = true;
  if (pipeline_->ring_) pipeline_->ring_->wake_all();
  if (pool) pool->wake();
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
  if (shard.md5) {
    check_md5(shard, 0, length_bytes, kHeaderLengthBytes, /*stays=*/false);
    check_md5(shard, kHeaderLengthBytes, json.data(), json.size(), /*stays=*/false);
  }
  prepare_shard(index, json.data(), json.size(), file_size, st);
  const ShardHeader& h = shard.header;

  if (maps(shard)) {
    bytes_read_ += shard.layout.needed_bytes;  // mapped: the first touch reads it
    if (shard.verifier) {
      for (const Span& span : shard.layout.spans) {
        verify(shard, h.data_offset + span.begin, shard.groups[0]->arena->host_data() + span.begin,
               span.end - span.begin);
      }
    }
    if (shard.md5) {
      for (const Span& span : shard.layout.spans) {
        check_md5(shard, h.data_offset + span.begin,
                  shard.groups[0]->arena->host_data() + span.begin, span.end - span.begin,
                  /*stays=*/true);
      }
    }
    for (size_t g = 0; g < shard.groups.size(); ++g) {
      Group& group = *shard.groups[g];
      group_landed(index, g,
                   static_cast<int64_t>(group.layout.copy_bytes + group.layout.cover_bytes));
    }
    release_open_tokens(index);
    return;
  }
  uint64_t chunk = pipeline_->settings_.staging_slot_bytes;
  constexpr uint64_t kAlign = ShardFile::kDirectAlign;
  if (direct_io_ && !lands_on_host() && chunk >= 4 * kAlign && shard.file->open_direct()) {
    chunk -= 2 * kAlign;  // room to widen each read to aligned ends
  }
  shard.read_chunk = chunk;
  if (streamed()) {
    sequence_shard(index);  // each group's reads are posted when it has its memory
    return;
  }
  post_reads(index, 0, h.data_bytes);
  release_open_tokens(index);
}

void LoadSession::post_reads(size_t index, uint64_t begin, uint64_t end) {
  const Shard& shard = *shards_[index];
  if (shard.md5) {
    // Content-MD5 is one sequential hash over the file: the shard's chunks are read one after
    // another (each read posts the next), so each thread hashes its own shard in order and the
    // threads hash shards side by side, instead of all of them queueing on one shard's hash.
    post_chained_read(index, begin, end);
    return;
  }
  const uint64_t chunk = shard.read_chunk;
  for (auto it = spans_from(shard.layout.spans, begin);
       it != shard.layout.spans.end() && it->begin < end; ++it) {
    const uint64_t lo = std::max(it->begin, begin), hi = std::min(it->end, end);
    for (uint64_t b = lo; b < hi; b += chunk) {
      const uint64_t e = std::min(hi, b + chunk);
      post([this, index, b, e] { run_chunk(index, b, e); }, TaskPriority::kData);
    }
  }
}

void LoadSession::post_chained_read(size_t index, uint64_t begin, uint64_t end) {
  const Shard& shard = *shards_[index];
  auto it = spans_from(shard.layout.spans, begin);
  if (it == shard.layout.spans.end() || it->begin >= end) return;
  const uint64_t lo = std::max(it->begin, begin);
  const uint64_t hi = std::min({it->end, end, lo + shard.read_chunk});
  post(
      [this, index, lo, hi, end] {
        run_chunk(index, lo, hi);
        post_chained_read(index, hi, end);
      },
      TaskPriority::kData);
}

void LoadSession::prepare_shard(size_t index, const uint8_t* json, size_t json_len,
                                uint64_t file_size, ShardStats st) {
  Shard& shard = *shards_[index];
  const std::string& label = shard.source.name;
  shard.header = parse_header(json, json_len, file_size, label);
  const ShardHeader& h = shard.header;
  LayoutOptions layout;
  layout.wanted = wanted_.get();
  layout.verify_chunk = shard.verifier ? shard.verifier->chunk_bytes() : 0;
  layout.mapped = maps(shard);
  layout.base_mod = layout.mapped ? h.data_offset % 256 : 0;
  // A shard checked against its Content-MD5 is handed out only whole: one group.
  layout.group_target = streamed() && !shard.md5 ? group_target_ : 0;
  shard.layout = plan_layout(h, layout);
  claim_tensor_names(index);
  st.name = label;
  st.file_bytes = file_size;
  st.header_bytes = h.header_bytes;
  st.data_bytes = h.data_bytes;
  st.tensors = shard.layout.selected.size();
  st.needed_bytes = shard.layout.needed_bytes;
  st.groups = shard.layout.groups.size();
  for (GroupLayout& g : shard.layout.groups) {
    auto group = std::make_unique<Group>();
    group->layout = g;
    group->remaining = static_cast<int64_t>(g.copy_bytes + g.cover_bytes) + 1;
    st.realigned_tensors += g.realigned.size();
    shard.groups.push_back(std::move(group));
  }
  if (!streamed()) {
    for (auto& group : shard.groups) open_now(shard, *group);
  }
  st.header_ns = now_ns();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    st.checksum_failures = shard.stats.checksum_failures;  // chunks checked before the header
    shard.stats = st;  // under the lock: stats() may read concurrently
  }
  shard.header_ready = true;
}

void LoadSession::claim_tensor_names(size_t index) {
  const Shard& shard = *shards_[index];
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t t : shard.layout.selected) {
    const std::string& name = shard.header.tensors[t].name;
    auto [it, claimed] = tensor_shards_.emplace(name, index);
    if (!claimed && it->second != index) {
      throw CoreError(ErrorKind::DuplicateTensor,
                      "tensor '" + name + "' is in shard '" + shards_[it->second]->source.name +
                          "' and in shard '" + shard.source.name + "'",
                      shard.source.name)
          .with_hint(
              "load one of the shards (its own path or URI), or publish a "
              "model.safetensors.index.json that maps each tensor to one shard");
    }
  }
}

void LoadSession::open_now(Shard& shard, Group& group) {
  const auto& ctx = pipeline_->ctx_;
  const std::string arena_label = "shard '" + shard.source.name + "'";
  const GroupLayout& g = group.layout;
  std::shared_ptr<DeviceArena> arena;
  if (ctx) {
    arena = DeviceArena::on_device(ctx, g.arena_bytes, arena_label);
    if (host_staging_) {
      shard.staging = DeviceArena::on_host(g.arena_bytes, arena_label + " (host staging)",
                                           /*populate=*/false);
    }
  } else if (maps(shard)) {
    arena = DeviceArena::map_file(shard.file->fd(), shard.file->size(), shard.header.data_offset,
                                  arena_label);
  } else {
    // Populated range by range as the bytes arrive (host_landing), not all at once here: making
    // a whole shard resident takes a fifth of a second per 250 MB where fresh memory is costly,
    // and here it would hold up the shard's first range.
    arena = DeviceArena::on_host(g.arena_bytes, arena_label, /*populate=*/false);
  }
  std::vector<std::shared_ptr<DeviceArena>> realigned;
  for (const GroupLayout::Realigned& r : g.realigned) {
    const TensorEntry& e = shard.header.tensors[r.tensor];
    const std::string tensor_label = arena_label + " tensor '" + e.name + "' (realigned)";
    realigned.push_back(ctx ? DeviceArena::on_device(ctx, e.end - e.begin, tensor_label)
                            : DeviceArena::on_host(e.end - e.begin, tensor_label));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  group.arena = std::move(arena);
  group.realigned = std::move(realigned);
  group.open = true;
}

void LoadSession::release_open_tokens(size_t index) {
  Shard& shard = *shards_[index];
  if (shard.groups.empty()) {
    publish_empty(index);
    return;
  }
  for (size_t g = 0; g < shard.groups.size(); ++g) group_landed(index, g, 1);
}

void LoadSession::sequence_shard(size_t index) {
  Shard& shard = *shards_[index];
  {
    std::lock_guard<std::mutex> order(sequence_mutex_);
    if (shard.sequenced || cancelled_) return;  // cancelled: close() may have let the pool go
    shard.sequenced = true;
    if (shard.groups.empty()) {
      publish_empty(index);
      return;
    }
    for (size_t g = 0; g < shard.groups.size(); ++g) {
      Group& group = *shard.groups[g];
      std::shared_ptr<PoolClaim> claim = pool_->claim(group.layout.claim_bytes);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        group.claim = std::move(claim);
      }
      post([this, index, g] { run_open(index, g); }, TaskPriority::kOpen);
    }
  }
  changed_.notify_all();  // a consumer waiting may now be stuck behind these claims
}

void LoadSession::run_open(size_t index, size_t g) {
  Shard& shard = *shards_[index];
  Group& group = *shard.groups[g];
  if (!pool_->wait(*group.claim, &cancelled_)) return;
  if (cancelled_) {
    pool_->abandon(*group.claim);
    return;
  }
  const GroupLayout& layout = group.layout;
  std::vector<std::pair<uint64_t, uint64_t>> pieces{{0, layout.arena_bytes}};
  for (const GroupLayout::Realigned& r : layout.realigned) {
    const TensorEntry& e = shard.header.tensors[r.tensor];
    pieces.emplace_back(r.claim_offset, e.end - e.begin);
  }
  std::vector<std::shared_ptr<DeviceArena>> arenas =
      pool_->open(*group.claim, pieces, "shard '" + shard.source.name + "'");
  // Bytes reused from tensors the consumer dropped: copies into them wait for its streams.
  pipeline_->engine_->wait_for(group.claim->waits);
  std::vector<Spill> spills;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    group.arena = std::move(arenas[0]);
    group.realigned.assign(std::make_move_iterator(arenas.begin() + 1),
                           std::make_move_iterator(arenas.end()));
    group.open = true;
    spills.swap(group.spills);
  }
  // The group holds its arenas now, and lets them go when it publishes (finish_group): none may
  // stay held here, or a consumer that dropped every tensor of the group would still seem to
  // keep it (relieve_locked), and the pool would grow past its cap.
  arenas.clear();
  changed_.notify_all();  // feeders waiting for this group's memory
  for (const Spill& spill : spills) land_spill(index, g, spill);
  if (!shard.source.path.empty()) post_reads(index, layout.read_begin, layout.read_end);
  group_landed(index, g, 1);
}

size_t LoadSession::read_group(const Shard& shard, uint64_t pos) {
  const auto& groups = shard.groups;
  auto it = std::upper_bound(
      groups.begin(), groups.end(), pos,
      [](uint64_t p, const std::unique_ptr<Group>& g) { return p < g->layout.read_begin; });
  while (it != groups.begin()) {
    --it;
    if ((*it)->layout.read_end > pos) return static_cast<size_t>(it - groups.begin());
    if ((*it)->layout.read_begin < pos) break;  // an empty read range ends here: look no further
  }
  return kNoGroup;
}

uint64_t LoadSession::group_copies(const Shard& shard, const Group& group, size_t slot_offset,
                                   uint64_t begin, uint64_t bytes,
                                   std::vector<CopyRange>& out) const {
  const uint64_t end = begin + bytes;
  const GroupLayout& layout = group.layout;
  uint64_t copied = 0;
  for (auto it = spans_from(layout.spans, begin); it != layout.spans.end() && it->begin < end;
       ++it) {
    const uint64_t lo = std::max(it->begin, begin), hi = std::min(it->end, end);
    out.push_back({group.arena->address() + it->arena_offset + (lo - it->begin),
                   slot_offset + (lo - begin), hi - lo});
    copied += hi - lo;
  }
  for (size_t i = 0; i < layout.realigned.size(); ++i) {
    const TensorEntry& e = shard.header.tensors[layout.realigned[i].tensor];
    const uint64_t lo = std::max(e.begin, begin), hi = std::min(e.end, end);
    if (lo < hi) {
      out.push_back(
          {group.realigned[i]->address() + (lo - e.begin), slot_offset + (lo - begin), hi - lo});
    }
  }
  return copied;
}

void LoadSession::land_data(size_t index, Slot* slot, size_t slot_offset, uint64_t begin,
                            uint64_t bytes, bool count) {
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
  // Each group these bytes touch: its span bytes are copied into its arena (or, while it has none,
  // spilled to wait on the host), and its cover bytes have landed, verified.
  std::vector<std::pair<size_t, int64_t>> landed;
  std::vector<CopyRange> copies;
  const auto& groups = shard.groups;
  try {
    // A few groups per shard: a scan. Covers are in file order (an empty one covers nothing).
    for (size_t g = 0; g < groups.size(); ++g) {
      Group& group = *groups[g];
      const GroupLayout& layout = group.layout;
      if (layout.cover.empty() || layout.cover.back().end <= begin) continue;
      if (layout.cover.front().begin >= end) break;
      int64_t landed_bytes = static_cast<int64_t>(bytes_within(layout.cover, begin, end));
      const uint64_t span_bytes = bytes_within(layout.spans, begin, end);
      if (span_bytes > 0 && lands_on_host()) {
        // Unbounded loads: the group is open; bytes from a slot are copied into host memory
        // (without a slot they were written there already).
        for (auto s = spans_from(layout.spans, begin);
             slot != nullptr && s != layout.spans.end() && s->begin < end; ++s) {
          const uint64_t lo = std::max(s->begin, begin), hi = std::min(s->end, end);
          uint8_t* dest = host_destination(shard) + s->arena_offset + (lo - s->begin);
          populate_host(dest, hi - lo);
          std::memcpy(dest, slot->data() + slot_offset + (lo - begin), hi - lo);
        }
        landed_bytes += static_cast<int64_t>(span_bytes);
      } else if (span_bytes > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (group.open) {
          landed_bytes +=
              static_cast<int64_t>(group_copies(shard, group, slot_offset, begin, bytes, copies));
        } else if (!count) {
          throw CoreError(ErrorKind::InvalidArgument,
                          "shard '" + shard.source.name +
                              "': exchanged bytes landed before their destinations were opened");
        } else {
          for (auto s = spans_from(layout.spans, begin); s != layout.spans.end() && s->begin < end;
               ++s) {
            const uint64_t lo = std::max(s->begin, begin), hi = std::min(s->end, end);
            const uint8_t* src = slot->data() + slot_offset + (lo - begin);
            group.spills.push_back({lo, std::vector<uint8_t>(src, src + (hi - lo))});
          }
        }
      }
      landed.emplace_back(g, landed_bytes);
    }
  } catch (...) {
    if (slot) pipeline_->ring_->release(slot);
    throw;
  }
  if (slot != nullptr) {
    if (!copies.empty()) {
      pipeline_->engine_->submit(slot, copies);  // takes the slot, even when it throws
    } else {
      pipeline_->ring_->release(slot);
    }
  }
  if (!count) return;
  for (const auto& [g, n] : landed) group_landed(index, g, n);
}

void LoadSession::land_spill(size_t index, size_t g, const Spill& spill) {
  Shard& shard = *shards_[index];
  Group& group = *shard.groups[g];
  const size_t slot_bytes = pipeline_->settings_.staging_slot_bytes;
  for (size_t done = 0; done < spill.bytes.size(); done += slot_bytes) {
    const size_t n = std::min(slot_bytes, spill.bytes.size() - done);
    Slot* slot = pipeline_->ring_->acquire(&cancelled_);
    if (slot == nullptr) return;  // cancelled
    std::memcpy(slot->data(), spill.bytes.data() + done, n);
    std::vector<CopyRange> copies;
    uint64_t copied = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      copied = group_copies(shard, group, 0, spill.begin + done, n, copies);
    }
    pipeline_->engine_->submit(slot, copies);
    group_landed(index, g, static_cast<int64_t>(copied));
  }
}

void LoadSession::group_landed(size_t index, size_t g, int64_t bytes) {
  if (bytes == 0) return;
  Group& group = *shards_[index]->groups[g];
  if (group.remaining.fetch_sub(bytes) == bytes) finish_group(index, g);
}

void LoadSession::run_chunk(size_t index, uint64_t begin, uint64_t end) {
  Shard& shard = *shards_[index];
  const ShardHeader& h = shard.header;
  const uint64_t bytes = end - begin;
  Slot* slot = nullptr;
  size_t slot_offset = 0;
  if (lands_on_host()) {
    const Span* span = span_at(shard.layout.spans, begin);  // reads lie within one span
    read_and_verify(shard, host_landing(shard, *span, begin, bytes), h.data_offset + begin, bytes,
                    /*stays=*/true);
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
  std::optional<Landing> out;
  acquire_landing(index, file_offset, bytes, /*wait=*/true, out);
  return out;
}

bool LoadSession::try_acquire(size_t index, uint64_t file_offset, size_t bytes,
                              std::optional<Landing>& out) {
  return acquire_landing(index, file_offset, bytes, /*wait=*/false, out);
}

bool LoadSession::acquire_landing(size_t index, uint64_t file_offset, size_t bytes, bool wait,
                                  std::optional<Landing>& out) {
  out.reset();
  check_shard_index(index);
  Shard& shard = *shards_[index];
  if (cancelled_) return true;
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
      out = landing;
      return true;
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
    const Span* span = span_at(shard.layout.spans, begin);
    if (span != nullptr && begin + bytes <= span->end) {
      // Populating the range's pages is the kernel's work, milliseconds for a large range: a
      // caller that holds the GIL (try_acquire) gives it up for it.
      if (!wait) return false;
      landing.data = host_landing(shard, *span, begin, bytes);
      out = landing;
      return true;
    }
  }
  if (bytes > pipeline_->settings_.staging_slot_bytes) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "a range of " + std::to_string(bytes) + " bytes exceeds staging_slot_bytes (" +
                        std::to_string(pipeline_->settings_.staging_slot_bytes) + ")");
  }
  if (streamed() && shard.header_ready) {
    // A streamed load's data range waits, holding nothing, until the group whose reads it
    // starts has memory; the shard's groups claim memory (in hand-out order) at its first.
    sequence_shard(index);
    const size_t g = read_group(shard, file_offset - shard.header.data_offset);
    if (g != kNoGroup) {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto opened = [&] { return shard.groups[g]->open || cancelled_.load(); };
      if (!wait && !opened()) return false;
      changed_.wait(lock, opened);
      if (cancelled_) return true;
    }
  }
  if (wait) {
    landing.slot = pipeline_->ring_->acquire(&cancelled_);
  } else {
    bool none_free = false;
    landing.slot = pipeline_->ring_->try_acquire(&cancelled_, &none_free);
    if (none_free) return false;
  }
  if (landing.slot == nullptr) return true;  // cancelled
  landing.data = landing.slot->data();
  out = landing;
  return true;
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

void LoadSession::after_header(size_t index, uint64_t landed_to) {
  Shard& shard = *shards_[index];
  if (!streamed()) {
    release_open_tokens(index);
  } else if (shard.layout.spans.empty() || shard.layout.spans.back().end <= landed_to) {
    sequence_shard(index);  // no data range will follow to do it
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
    if (shard.md5) check_md5(shard, landing.file_offset, landing.data, landing.capacity, in_arena);
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
      if (data_in_first > 0) {
        land_data(landing.shard, slot, data_offset, 0, data_in_first);
      } else if (slot) {
        pipeline_->ring_->release(slot);
      }
      after_header(landing.shard, data_in_first);
      return status_of(shard);
    }
    // The rest of a long header has landed in header_buf.
    shard.header_have = shard.header_buf.size();
    ShardStats st;
    st.start_ns = shard.first_ns.load();
    prepare_shard(landing.shard, shard.header_buf.data() + kHeaderLengthBytes,
                  shard.header_buf.size() - kHeaderLengthBytes, shard.file_size, st);
    std::vector<uint8_t>().swap(shard.header_buf);
    after_header(landing.shard, 0);
    return status_of(shard);
  }
  land_data(landing.shard, slot, 0, landing.file_offset - shard.header.data_offset,
            landing.capacity);
  return status_of(shard);
}

// ---------------------------------------------------------------------------------------------
// A tensor-parallel group's exchange (see the header): bytes that reach a fed shard's memory
// from this process's fetch (land_from_host) or from a peer (a communicator writing the views of
// open_destinations), counted by arrived().

bool LoadSession::exchangeable(size_t index) const {
  check_shard_index(index);
  const Shard& shard = *shards_[index];
  return fed_ && shard.source.path.empty() && shard.header_ready && !shard.md5 && !host_staging_;
}

void LoadSession::check_exchangeable(size_t index) const {
  if (!exchangeable(index)) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shards_[index]->source.name +
                        "' cannot be exchanged: its header is not read, or it is checked by "
                        "Content-MD5, read from a file, or staged in host memory");
  }
}

std::pair<uint64_t, uint64_t> LoadSession::data_range(const Shard& shard, uint64_t begin,
                                                      uint64_t end) const {
  const ShardHeader& h = shard.header;
  if (begin < h.data_offset || end < begin || end > h.data_offset + h.data_bytes) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shard.source.name + "': bytes [" + std::to_string(begin) + ", " +
                        std::to_string(end) + ") are not within its data region");
  }
  return {begin - h.data_offset, end - h.data_offset};
}

std::vector<std::pair<uint64_t, uint64_t>> LoadSession::exchange_steps(size_t index) const {
  check_exchangeable(index);
  const Shard& shard = *shards_[index];
  const uint64_t d = shard.header.data_offset;
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const auto& group : shard.groups) {
    const GroupLayout& g = group->layout;
    if (g.hi > g.lo) out.emplace_back(d + g.lo, d + g.hi);
  }
  return out;
}

void LoadSession::check_fetched(size_t index, uint64_t file_offset, const uint8_t* data, size_t n) {
  try {
    check_exchangeable(index);
    Shard& shard = *shards_[index];
    data_range(shard, file_offset, file_offset + n);
    bytes_read_ += n;
    if (shard.verifier) verify(shard, file_offset, data, n);
  } catch (...) {
    fail(std::current_exception());
    throw;
  }
}

void LoadSession::exchange_checked(size_t index) {
  try {
    check_exchangeable(index);
    Shard& shard = *shards_[index];
    std::unique_ptr<ScopedContext> bind;  // a group may publish: its fence is recorded
    if (pipeline_->ctx_) bind = std::make_unique<ScopedContext>(*pipeline_->ctx_);
    for (size_t g = 0; g < shard.groups.size(); ++g) {
      group_landed(index, g, static_cast<int64_t>(shard.groups[g]->layout.cover_bytes));
    }
  } catch (...) {
    fail(std::current_exception());
    throw;
  }
}

std::vector<std::pair<uint64_t, uint64_t>> LoadSession::destinations(size_t index) const {
  check_exchangeable(index);
  const Shard& shard = *shards_[index];
  const uint64_t d = shard.header.data_offset;
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const auto& group : shard.groups) {
    for (const Span& span : group->layout.spans) out.emplace_back(d + span.begin, d + span.end);
    // On the host a realigned tensor is copied from the arena when its group publishes.
    if (lands_on_host()) continue;
    for (const GroupLayout::Realigned& r : group->layout.realigned) {
      const TensorEntry& e = shard.header.tensors[r.tensor];
      out.emplace_back(d + e.begin, d + e.end);
    }
  }
  return out;
}

std::optional<std::vector<std::shared_ptr<TensorView>>> LoadSession::open_destinations(
    size_t index, uint64_t begin, uint64_t end) {
  check_exchangeable(index);
  Shard& shard = *shards_[index];
  const auto [lo, hi] = data_range(shard, begin, end);
  auto touches = [&](const Group& group) {
    if (bytes_within(group.layout.spans, lo, hi) > 0) return true;
    for (const GroupLayout::Realigned& r : group.layout.realigned) {
      const TensorEntry& e = shard.header.tensors[r.tensor];
      if (std::max(e.begin, lo) < std::min(e.end, hi)) return true;
    }
    return false;
  };
  if (streamed()) sequence_shard(index);
  std::vector<std::shared_ptr<TensorView>> out;
  std::unique_lock<std::mutex> lock(mutex_);
  for (const auto& group : shard.groups) {
    if (!touches(*group)) continue;
    changed_.wait(lock, [&] { return group->open || cancelled_.load(); });
    if (cancelled_) return std::nullopt;
    auto view = [&](const std::shared_ptr<DeviceArena>& arena, uint64_t offset, uint64_t a,
                    uint64_t b) {
      const uint64_t n = b - a;
      out.push_back(std::make_shared<TensorView>(
          shard.source.name + " bytes [" + std::to_string(shard.header.data_offset + a) + ", " +
              std::to_string(shard.header.data_offset + b) + ")",
          DType::U8, std::vector<int64_t>{static_cast<int64_t>(n)}, arena, offset, n));
    };
    for (auto s = spans_from(group->layout.spans, lo);
         s != group->layout.spans.end() && s->begin < hi; ++s) {
      const uint64_t a = std::max(s->begin, lo), b = std::min(s->end, hi);
      if (a < b) view(group->arena, s->arena_offset + (a - s->begin), a, b);
    }
    if (lands_on_host()) continue;
    for (size_t i = 0; i < group->layout.realigned.size(); ++i) {
      const TensorEntry& e = shard.header.tensors[group->layout.realigned[i].tensor];
      const uint64_t a = std::max(e.begin, lo), b = std::min(e.end, hi);
      if (a < b) view(group->realigned[i], a - e.begin, a, b);
    }
  }
  return out;
}

bool LoadSession::land_from_host(size_t index, uint64_t file_offset, const uint8_t* data,
                                 size_t n) {
  try {
    check_exchangeable(index);
    Shard& shard = *shards_[index];
    const auto [lo, hi] = data_range(shard, file_offset, file_offset + n);
    std::unique_ptr<ScopedContext> bind;
    if (pipeline_->ctx_) bind = std::make_unique<ScopedContext>(*pipeline_->ctx_);
    const size_t slot_bytes = pipeline_->settings_.staging_slot_bytes;
    for (uint64_t b = lo; b < hi; b += slot_bytes) {
      const size_t len = static_cast<size_t>(std::min<uint64_t>(slot_bytes, hi - b));
      Slot* slot = pipeline_->ring_->acquire(&cancelled_);
      if (slot == nullptr) return false;  // cancelled
      std::memcpy(slot->data(), data + (b - lo), len);
      land_data(index, slot, 0, b, len, /*count=*/false);
    }
    group_landed_bytes_ += bytes_within(shard.layout.spans, lo, hi);
    return true;
  } catch (...) {
    fail(std::current_exception());
    throw;
  }
}

void LoadSession::order_writes(CUstream stream) {
  if (!pipeline_->ctx_) return;
  ScopedContext bind(*pipeline_->ctx_);
  for (const auto& event : pipeline_->engine_->record_fence()) event->make_stream_wait(stream);
}

void LoadSession::arrived(size_t index, uint64_t begin, uint64_t end,
                          std::optional<CUstream> stream, bool from_peer) {
  try {
    check_exchangeable(index);
    Shard& shard = *shards_[index];
    const auto [lo, hi] = data_range(shard, begin, end);
    // Publishing a group records its fence on the copy streams: the context is needed here.
    std::unique_ptr<ScopedContext> bind;
    if (pipeline_->ctx_) bind = std::make_unique<ScopedContext>(*pipeline_->ctx_);
    std::shared_ptr<CudaEvent> event;
    if (pipeline_->ctx_ && stream) {
      event = std::make_shared<CudaEvent>(pipeline_->ctx_);
      event->record(*stream);
    }
    if (from_peer) group_received_bytes_ += bytes_within(shard.layout.spans, lo, hi);
    for (size_t g = 0; g < shard.groups.size(); ++g) {
      Group& group = *shard.groups[g];
      const GroupLayout& layout = group.layout;
      const auto n = static_cast<int64_t>(bytes_within(layout.spans, lo, hi));
      if (n == 0) continue;
      if (event) {
        std::lock_guard<std::mutex> lock(mutex_);
        group.arrived.push_back(event);
      }
      group_landed(index, g, n);
    }
  } catch (...) {
    fail(std::current_exception());
    throw;
  }
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
      if (shard.md5) check_md5(shard, file_offset, slot->data() + skip, bytes, /*stays=*/false);
      direct_io_bytes_ += bytes;
      return skip;
    }
  }
  read_and_verify(shard, slot->data(), file_offset, bytes, /*stays=*/false);
  return 0;
}

void LoadSession::read_and_verify(Shard& shard, uint8_t* dest, uint64_t file_offset, size_t bytes,
                                  bool stays) {
  if (!shard.verifier) {
    shard.file->read_exact(dest, bytes, file_offset);
    if (shard.md5) check_md5(shard, file_offset, dest, bytes, stays);
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

void LoadSession::check_md5(Shard& shard, uint64_t file_offset, const uint8_t* data, size_t n,
                            bool stays) {
  auto mismatch = shard.md5->add(file_offset, data, n, stays);
  verified_bytes_ += n;
  if (!mismatch) return;
  if (fail_on_checksum_mismatch_) {
    throw CoreError(ErrorKind::ChecksumMismatch, *mismatch, shard.source.name);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  checksum_failures_.push_back(*mismatch);
  ++shard.stats.checksum_failures;
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
  // Host landings happen in unbounded loads only: one group per shard.
  return host_staging_ ? shard.staging->host_data() : shard.groups[0]->arena->host_data();
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
  for (const Span& span : shard.layout.spans) {
    out.emplace_back(shard.header.data_offset + span.begin, shard.header.data_offset + span.end);
  }
  return out;
}

void LoadSession::finish_group(size_t index, size_t g) {
  Shard& shard = *shards_[index];
  Group& group = *shard.groups[g];
  const ShardHeader& h = shard.header;
  const GroupLayout& layout = group.layout;
  std::shared_ptr<DeviceArena> arena;
  std::vector<std::shared_ptr<DeviceArena>> realigned;
  std::vector<std::shared_ptr<CudaEvent>> arrived;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    arena = group.arena;
    realigned = group.realigned;
    arrived.swap(group.arrived);
  }
  std::vector<std::shared_ptr<CudaEvent>> fence;
  if (pipeline_->ctx_ && host_staging_) {
    // The baseline path: the whole shard is in host memory; copy it, then wait for it, so the
    // staging copy can go.
    CopyEngine& engine = *pipeline_->engine_;
    engine.copy_from_host(arena->address(), shard.staging->host_data(), layout.arena_bytes);
    for (size_t i = 0; i < layout.realigned.size(); ++i) {
      const TensorEntry& e = h.tensors[layout.realigned[i].tensor];
      engine.copy_from_host(
          realigned[i]->address(),
          shard.staging->host_data() + shard.layout.tensor_offset[layout.realigned[i].tensor],
          e.end - e.begin);
    }
    fence = engine.record_fence();
    for (const auto& event : fence) event->synchronize();
    arena->set_fence(fence);
    for (const auto& r : realigned) r->set_fence(fence);
    shard.staging.reset();
  } else if (pipeline_->ctx_) {
    // Every byte of this group is enqueued (landings count after submitting), so events recorded
    // now on every stream complete only after all of them.
    fence = pipeline_->engine_->record_fence();
    fence.insert(fence.end(), arrived.begin(), arrived.end());  // exchanged bytes (arrived())
    arena->set_fence(fence);
    for (const auto& r : realigned) r->set_fence(fence);
  } else {
    for (size_t i = 0; i < layout.realigned.size(); ++i) {
      const size_t t = layout.realigned[i].tensor;
      const TensorEntry& e = h.tensors[t];
      std::memcpy(realigned[i]->host_data(), arena->host_data() + shard.layout.tensor_offset[t],
                  e.end - e.begin);
    }
  }
  PublishedShard out;
  out.index = index;
  out.metadata = h.metadata;
  size_t next_realigned = 0;
  for (size_t t : layout.tensors) {
    const TensorEntry& e = h.tensors[t];
    std::shared_ptr<DeviceArena> holder = arena;
    uint64_t offset = shard.layout.tensor_offset[t];
    if (next_realigned < layout.realigned.size() && layout.realigned[next_realigned].tensor == t) {
      holder = realigned[next_realigned++];
      offset = 0;
    }
    out.tensors.push_back(
        std::make_shared<TensorView>(e.name, e.dtype, e.shape, holder, offset, e.end - e.begin));
  }
  out.arenas.push_back(arena);
  for (const auto& r : realigned) out.arenas.push_back(r);
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
  arena.reset();
  realigned.clear();
  bool complete = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    group.published = true;
    group.arena.reset();
    group.realigned.clear();
    complete = ++shard.groups_published == shard.groups.size();
    out.complete = complete;
    if (complete) {
      shard.stats.published_ns = now_ns();
      if (++published_ == shards_.size()) all_published_ns_ = now_ns();
    }
    ready_.push_back(std::move(out));
    fences_.insert(fences_.end(), fence.begin(), fence.end());
  }
  if (complete) shard.file.reset();  // every read of the shard is done
  changed_.notify_all();
}

void LoadSession::publish_empty(size_t index) {
  Shard& shard = *shards_[index];
  PublishedShard out;
  out.index = index;
  out.metadata = shard.header.metadata;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    shard.stats.published_ns = now_ns();
    ready_.push_back(std::move(out));
    if (++published_ == shards_.size()) all_published_ns_ = now_ns();
  }
  shard.file.reset();
  changed_.notify_all();
}

void LoadSession::hand_out_locked(const PublishedShard& group, bool keep) {
  if (!pool_) return;
  for (const auto& weak : group.arenas) {
    std::shared_ptr<DeviceArena> arena = weak.lock();
    if (!arena) continue;
    if (keep) {
      pool_->keep(*arena);
    } else {
      handed_out_.push_back(weak);
    }
  }
  if (handed_out_.size() > 256) {
    handed_out_.erase(std::remove_if(handed_out_.begin(), handed_out_.end(),
                                     [](const auto& w) { return w.expired(); }),
                      handed_out_.end());
  }
}

bool LoadSession::stuck_locked() const {
  if (!ready_.empty() || !pool_->blocked()) return false;
  for (const auto& shard : shards_) {
    // An io thread fills a shard's groups while it prepares the header, without this lock: a
    // shard whose header is not ready has no claim yet, and its vector may be growing.
    if (!shard->header_ready.load()) continue;
    for (const auto& group : shard->groups) {
      // A group with memory and not yet published will publish: the consumer is not stuck.
      if (group->claim && !group->published && pool_->admitted(*group->claim)) return false;
    }
  }
  return true;
}

size_t LoadSession::relieve_locked() {
  size_t relieved = 0;
  for (const auto& weak : handed_out_) {
    if (std::shared_ptr<DeviceArena> arena = weak.lock()) {
      kept_beyond_cap_ += arena->size();
      pool_->keep(*arena);
      ++relieved;
    }
  }
  handed_out_.clear();
  return relieved;
}

bool LoadSession::next_shard_locked(bool keep, std::optional<PublishedShard>& out) {
  if (error_) std::rethrow_exception(error_);
  if (!ready_.empty()) {
    out = std::move(ready_.front());
    ready_.pop_front();
    hand_out_locked(*out, keep);
    return true;
  }
  if (handed_out_all_locked()) {
    out.reset();
    return true;
  }
  if (closed_) {
    throw CoreError(ErrorKind::LoadCancelled, "the load was closed before all shards arrived");
  }
  return false;
}

std::optional<PublishedShard> LoadSession::next_shard(bool keep) {
  std::unique_lock<std::mutex> lock(mutex_);
  std::optional<PublishedShard> out;
  for (;;) {
    if (next_shard_locked(keep, out)) return out;
    // A streamed consumer that keeps what it was handed, beyond the cap: stop counting it rather
    // than wait forever for memory only it can give back.
    if (pool_ && stuck_locked() && relieve_locked() > 0) continue;
    changed_.wait(lock);
  }
}

bool LoadSession::try_next_shard(bool keep, std::optional<PublishedShard>& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  return next_shard_locked(keep, out);
}

std::vector<PublishedShard> LoadSession::take_ready() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<PublishedShard> out(std::make_move_iterator(ready_.begin()),
                                  std::make_move_iterator(ready_.end()));
  ready_.clear();
  for (const PublishedShard& group : out) hand_out_locked(group, /*keep=*/true);
  return out;
}

bool LoadSession::landed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& event : fences_) {
    if (!event->is_complete()) return false;
  }
  return true;
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
  std::shared_ptr<ArenaPool> pool;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_ && !handed_out_all_locked()) {
      error_ = std::make_exception_ptr(
          CoreError(ErrorKind::LoadCancelled, "the load was cancelled before it finished"));
    }
    pool = pool_;
  }
  cancelled_ = true;
  if (pipeline_->ring_) pipeline_->ring_->wake_all();
  if (pool) pool->wake();
  changed_.notify_all();
}

void LoadSession::close() {
  // In a forked child nothing may wait for the parent's threads (see LoadPipeline::close).
  if (pipeline_->forked_away()) return;
  std::lock_guard<std::mutex> one_at_a_time(close_mutex_);
  bool finished;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return;
    finished = handed_out_all_locked() && !error_;
  }
  if (!finished) cancel();
  {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [this] { return outstanding_ == 0; });
    closing_ = true;  // a feeder thread may still sequence a shard: its tasks do not start
  }
  // Copies already enqueued may still read slots or write arenas: let them land before the
  // arenas of unpublished groups go and the ring is reused.
  if (pipeline_->ring_) pipeline_->ring_->wait_idle();
  std::deque<PublishedShard> unclaimed;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    unclaimed.swap(ready_);
    closed_ = true;
  }
  unclaimed.clear();
  for (auto& shard : shards_) {
    for (auto& group : shard->groups) {
      std::lock_guard<std::mutex> lock(mutex_);
      group->arena.reset();
      group->realigned.clear();
      group->spills.clear();
      if (group->claim && pool_) pool_->abandon(*group->claim);
    }
    shard->staging.reset();
    shard->file.reset();
  }
  if (pool_) {
    pool_->cancel_waiting();
    pool_->end_load();
    // The slab goes as soon as the last tensor cut from it does, not with this session object.
    std::lock_guard<std::mutex> lock(mutex_);
    pool_stats_ = pool_->stats();
    pool_.reset();
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
  if (pipeline_->ctx_) {
    const NumaPlacement& placement = pipeline_->placement_;
    s.numa_node = placement.node;
    s.numa_source = placement.source.empty() ? "none" : placement.source;
    s.numa_cpus = placement.cpus.size();
    s.ring_on_node = pipeline_->ring_on_node_;
  }
  s.mmap = false;
  for (const auto& shard : shards_) s.mmap = s.mmap || maps(*shard);
  s.host_staging = host_staging_;
  s.min_free_device_bytes = min_free_.load();
  s.verified_bytes = verified_bytes_.load();
  s.peak_md5_shards = md5_gauge_.peak.load();
  for (const auto& shard : shards_) {
    if (shard->md5) s.md5_parked_bytes += shard->md5->parked_bytes();
  }
  s.direct_io_bytes = direct_io_bytes_.load();
  s.host_populate_seconds = static_cast<double>(populate_cpu_ns_.load()) / 1e9;
  s.group_landed_bytes = group_landed_bytes_.load();
  s.group_received_bytes = group_received_bytes_.load();
  std::lock_guard<std::mutex> lock(mutex_);
  if (streamed_) {
    const PoolStats pool = pool_ ? pool_->stats() : pool_stats_;
    s.device_cap = pool.cap;
    s.stream_buffer_bytes = pool.slab_bytes;
    s.peak_device_bytes = pool.peak_allocated;
    s.cap_raised_to = pool.cap_raised_to;
    s.mid_load_allocations = pool.grown;
  }
  s.kept_beyond_cap = kept_beyond_cap_;
  s.all_published_ns = all_published_ns_;
  s.checksum_failures = checksum_failures_;
  for (const auto& shard : shards_) s.shards.push_back(shard->stats);
  return s;
}

}  // namespace blob2gpu
