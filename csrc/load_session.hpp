// LoadPipeline owns what outlives one load (the target's context, the staging ring, the copy
// engine and the io threads); LoadSession is one load of a set of shards through it.
//
// Flow of one shard (cuda target): header read and parsed -> one DeviceArena sized to the data
// region -> data chunks pread into ring slots -> one async H2D copy per slot -> when every chunk
// is enqueued, a fence (one event per stream) is recorded and the shard's tensors are published.
// On the host target chunks are read straight into the arena (no staging copy), or the file is
// mapped when mmap is asked.
#pragma once

#include <sys/types.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "chunk_verifier.hpp"
#include "content_md5_verifier.hpp"
#include "copy_engine.hpp"
#include "cuda_device.hpp"
#include "device_arena.hpp"
#include "errors.hpp"
#include "io_threads.hpp"
#include "safetensors_header.hpp"
#include "shard_file.hpp"
#include "staging_ring.hpp"
#include "tensor_export.hpp"

namespace blob2gpu {

struct PipelineSettings {
  size_t staging_slots = 8;
  size_t staging_slot_bytes = 32u << 20;
  size_t copy_streams = 2;
  size_t io_threads = 4;
  bool use_pinned_host_fallback = true;
};

struct SessionOptions {
  bool mmap = false;  // cpu target, local files (in a fed session: cache hits): map, not read
  bool host_staging = false;  // cuda target: whole shard into host memory, then one copy (baseline)
  bool fed = false;           // a caller fetches the bytes (acquire/commit) instead of io threads
  bool fail_on_checksum_mismatch = true;  // false: the load completes and the stats list them
  // Fed sessions: read the local files (NVMe cache hits) with O_DIRECT into staging slots where
  // the filesystem allows it (cuda targets; the cpu target reads into its arena, buffered).
  bool direct_io = false;
  // The tensors to load; null: all of them. Only their bytes are read (rounded out to the
  // manifest's chunks when the shard is verified, so every byte read is checked) and the arenas
  // hold only them.
  std::shared_ptr<const std::unordered_set<std::string>> wanted;
};

struct ShardSource {
  std::string path;          // local file; empty for a fed shard
  std::string name;          // how errors and reports name it
  uint64_t size = 0;         // fed shards: the size the source listed
  ChunkChecksums checksums;  // empty: not verified
  // Blob shards without a manifest: the blob's Content-MD5 (16 bytes; empty: none), checked over
  // the whole file in order once every byte has been fed, or read from `path` (an NVMe cache
  // hit), before the shard is published (not with a tensor selection).
  std::vector<uint8_t> content_md5;
};

// A place where a feeder writes the bytes [file_offset, file_offset + capacity) of one shard: a
// staging slot, the tail of a long header, or (cpu target) the shard's arena itself.
struct Landing {
  size_t shard = 0;
  uint64_t file_offset = 0;
  size_t capacity = 0;
  uint8_t* data = nullptr;
  Slot* slot = nullptr;  // owned by the landing until commit() or release()
};

// What a feeder needs to know after a commit: where the data region starts (the header's end)
// once the header is known, or how much header is still missing.
struct FeedStatus {
  bool header_ready = false;
  uint64_t data_offset = 0;  // header ready: 8 + N; else the header's total length (8 + N)
  uint64_t header_have = 0;  // header not ready: bytes of it received so far
};

struct ShardStats {
  std::string name;
  uint64_t file_bytes = 0;
  uint64_t header_bytes = 0;
  uint64_t data_bytes = 0;
  size_t tensors = 0;            // tensors this load hands out (a selection may skip some)
  uint64_t needed_bytes = 0;     // data bytes this load reads (all of them without a selection)
  size_t realigned_tensors = 0;  // tensors copied into their own aligned allocation
  int64_t start_ns = -1;         // first work on the shard, from the session start
  int64_t header_ns = -1;        // header parsed and arena allocated
  int64_t published_ns = -1;     // every byte read and enqueued; tensors handed out
  size_t checksum_failures = 0;  // chunks (or the whole blob) that failed their checksum
};

struct SessionStats {
  std::string device;
  uint64_t bytes_read = 0;  // bytes read from sources (headers included)
  int64_t elapsed_ns = 0;
  int64_t all_published_ns = -1;
  bool pinned = false;
  bool pinned_fallback = false;
  size_t staging_slots = 0;
  size_t staging_slot_bytes = 0;
  size_t copy_streams = 0;
  size_t io_threads = 0;
  size_t peak_slots_in_flight = 0;  // most slots whose copies were in flight at once
  uint64_t slot_waits = 0;
  bool mmap = false;
  bool host_staging = false;
  int64_t min_free_device_bytes = -1;  // lowest free GPU memory seen at a shard's end (-1: none)
  uint64_t verified_bytes = 0;         // bytes checked against a manifest
  uint64_t direct_io_bytes = 0;        // bytes read with O_DIRECT (page cache bypassed)
  double host_populate_seconds = 0;    // CPU time making new host memory resident for writing
  std::vector<std::string> checksum_failures;  // mismatches let through (fail_on_... = false)
  std::vector<ShardStats> shards;
};

struct PublishedShard {
  size_t index = 0;
  std::vector<std::shared_ptr<TensorView>> tensors;  // in file order
  std::vector<std::pair<std::string, std::string>> metadata;
};

class LoadSession;

class LoadPipeline : public std::enable_shared_from_this<LoadPipeline> {
 public:
  // device: "cpu", "cuda" or "cuda:N"; "cuda" is the device of the calling thread's current
  // context (cuda:0 when none is current). Allocates the ring (pinned on CUDA), starts the threads.
  static std::shared_ptr<LoadPipeline> create(const std::string& device,
                                              const PipelineSettings& settings);
  ~LoadPipeline();

  // Starts loading the shards in the background and returns at once. One session at a time.
  std::shared_ptr<LoadSession> start_local(std::vector<ShardSource> shards, SessionOptions options);
  // Starts a load whose bytes a caller fetches and commits (see LoadSession::acquire).
  std::shared_ptr<LoadSession> start_fed(std::vector<ShardSource> shards, SessionOptions options);
  void close();  // cancels a running session and releases the ring, streams and threads

  const std::string& device() const { return device_; }
  bool is_cuda() const { return ctx_ != nullptr; }
  const std::shared_ptr<CudaContext>& context() const { return ctx_; }
  RingStats ring_stats() const;
  const PipelineSettings& settings() const { return settings_; }

 private:
  friend class LoadSession;
  LoadPipeline() = default;
  void session_ended();
  std::shared_ptr<LoadSession> start(std::vector<ShardSource> shards, SessionOptions options);

  // Whether this process is a fork of the one that built the pipeline: its threads were the
  // parent's and do not exist here, so nothing may wait for or join them.
  bool forked_away() const;

  std::string device_;
  PipelineSettings settings_;
  pid_t owner_pid_ = 0;  // the process that built the pipeline (and started its threads)
  std::shared_ptr<CudaContext> ctx_;
  std::unique_ptr<StagingRing> ring_;
  std::unique_ptr<CopyEngine> engine_;
  std::unique_ptr<IoThreads> threads_;
  std::mutex mutex_;
  LoadSession* active_ = nullptr;
  bool closed_ = false;
};

class LoadSession {
 public:
  ~LoadSession();
  LoadSession(const LoadSession&) = delete;
  LoadSession& operator=(const LoadSession&) = delete;

  // The next shard whose tensors are ready to hand out, in arrival order; nullopt when all were
  // returned. Blocks; rethrows the load's first error.
  std::optional<PublishedShard> next_shard();
  // Shards published but not yet returned by next_shard(), even after the load failed (their
  // bytes are complete): a restarted load may keep them. Does not block.
  std::vector<PublishedShard> take_ready();
  // Blocks until every byte handed out so far has landed on the device (waits on fence events).
  void wait_landed();
  // Stops the load: pending reads are skipped, in-flight copies drain, unpublished arenas are
  // freed.
  void cancel();
  // cancel() and wait until no task of this session runs; idempotent.
  void close();
  SessionStats stats() const;
  size_t shard_count() const { return shards_.size(); }

  // --- fed sessions ---
  // A landing for [file_offset, file_offset + bytes) of a shard: blocks for a free slot on CUDA;
  // nullopt once the load is cancelled. The first range of a shard must start at offset 0 and
  // carry the header; data ranges may be requested once commit() reported the header ready.
  std::optional<Landing> acquire(size_t shard, uint64_t file_offset, size_t bytes);
  // The landing's bytes are all there: parse the header or hand the data to the device.
  // Throws (and fails the load) for a bad header or a bad range.
  FeedStatus commit(Landing& landing);
  // Gives an unfilled landing back (the feeder gave up on it).
  void release(Landing& landing);
  // Fails the load with an error the feeder met; next_shard() rethrows it.
  void abort(ErrorKind kind, const std::string& message);
  // The file byte ranges [begin, end) of a shard's data that this load needs, in order, once its
  // header is ready (commit() said so): the whole data region, or a selection's tensors.
  std::vector<std::pair<uint64_t, uint64_t>> needed_ranges(size_t shard) const;

 private:
  friend class LoadPipeline;
  struct Realigned {
    size_t tensor;  // index in header.tensors
    std::shared_ptr<DeviceArena> arena;
  };
  // A run of the data region this load needs and where it sits in the arena. Without a selection
  // there is one span, [0, data_bytes) at offset 0; with one, the spans are packed, each placed at
  // the same offset modulo 256 as in the file, so tensors keep their alignment.
  struct Span {
    uint64_t begin = 0;  // data-region coordinates
    uint64_t end = 0;
    uint64_t arena_offset = 0;
  };
  struct Shard {
    ShardSource source;
    uint64_t file_size = 0;
    std::unique_ptr<ShardFile> file;
    std::vector<uint8_t> header_buf;  // fed: a header longer than the first range
    uint64_t header_have = 0;
    std::atomic<bool> header_ready{false};
    std::atomic<int64_t> first_ns{-1};
    ShardHeader header;
    std::shared_ptr<DeviceArena> arena;
    std::shared_ptr<DeviceArena> staging;  // host-staging: the whole data region in host memory
    std::vector<Realigned> realigned;
    std::vector<Span> spans;              // sorted, disjoint
    std::vector<size_t> selected;         // indices in header.tensors handed out, in file order
    std::vector<uint64_t> tensor_offset;  // per header tensor: its offset in the arena
    uint64_t arena_bytes = 0;
    uint64_t needed_bytes = 0;                // sum of the spans
    std::unique_ptr<ChunkVerifier> verifier;  // null: no manifest for this shard
    std::unique_ptr<ContentMd5Verifier> md5;  // null: no Content-MD5 to check
    std::atomic<uint64_t> bytes_landed{0};
    ShardStats stats;
  };

  LoadSession(std::shared_ptr<LoadPipeline> pipeline, std::vector<ShardSource> shards,
              SessionOptions options);
  // Where host-landing bytes of a shard's data region go: the arena (cpu) or the staging copy.
  uint8_t* host_destination(const Shard& shard) const;
  // Where bytes [begin, begin + bytes) of the shard's data (within `span`) land on the host, made
  // resident for the write that follows.
  uint8_t* host_landing(const Shard& shard, const Span& span, uint64_t begin, size_t bytes) const;
  // HostBuffer::populate_for_write, its CPU time counted (stats().host_populate_seconds).
  void populate_host(uint8_t* p, size_t n) const;
  bool lands_on_host() const { return !pipeline_->ctx_ || host_staging_; }
  // The shard's data is its local file mapped copy-on-write (cpu target, mmap asked, a path).
  bool maps(const Shard& shard) const { return mmap_ && !shard.source.path.empty(); }
  void begin();
  void prepare_shard(size_t shard, const uint8_t* json, size_t json_len, uint64_t file_size,
                     ShardStats st);
  // Hands [begin, begin + bytes) of the data region to the target. With a slot (bytes at
  // slot_offset) the slot is consumed; without one the bytes are already in the arena.
  void land_data(size_t shard, Slot* slot, size_t slot_offset, uint64_t begin, uint64_t bytes);
  FeedStatus commit_landing(Landing& landing);
  FeedStatus status_of(const Shard& shard) const;
  void check_shard_index(size_t shard) const;
  // Chooses the tensors and spans of a parsed shard and sizes its arena.
  void plan_spans(Shard& shard) const;
  // The span holding data-region byte `pos`, else the first span after it (end() when none).
  static std::vector<Span>::const_iterator spans_from(const Shard& shard, uint64_t pos);
  // The span holding data-region byte `pos`, or null.
  static const Span* span_at(const Shard& shard, uint64_t pos);
  // Checks landed file bytes against the shard's manifest: throws ChecksumMismatch (or records
  // it when mismatches are let through).
  void verify(Shard& shard, uint64_t file_offset, const uint8_t* data, size_t n);
  // Adds landed file bytes to the shard's Content-MD5 (`stays`: they remain at `data` until the
  // shard is finished); throws ChecksumMismatch (or records it) once the digest differs.
  void check_md5(Shard& shard, uint64_t file_offset, const uint8_t* data, size_t n, bool stays);
  // pread of a local shard's bytes, verified as they arrive when the shard has a manifest (or a
  // Content-MD5: `stays` as for check_md5).
  void read_and_verify(Shard& shard, uint8_t* dest, uint64_t file_offset, size_t bytes, bool stays);
  // Reads (and verifies) a range of a local shard into a staging slot: with O_DIRECT when the
  // shard allows it (returns where the range starts in the slot), else buffered (returns 0).
  size_t read_into_slot(Shard& shard, Slot* slot, uint64_t file_offset, size_t bytes);
  void post(std::function<void()> task, bool urgent);
  void run_header(size_t shard);
  void run_chunk(size_t shard, uint64_t begin, uint64_t end);
  void finish_shard(size_t shard);
  void fail(std::exception_ptr error);
  int64_t now_ns() const;

  std::shared_ptr<LoadPipeline> pipeline_;
  std::vector<std::unique_ptr<Shard>> shards_;
  bool mmap_;
  bool fed_;
  bool host_staging_;
  bool fail_on_checksum_mismatch_;
  bool direct_io_;
  std::atomic<uint64_t> direct_io_bytes_{0};
  mutable std::atomic<uint64_t> populate_cpu_ns_{0};
  std::shared_ptr<const std::unordered_set<std::string>> wanted_;
  std::atomic<uint64_t> verified_bytes_{0};
  std::vector<std::string> checksum_failures_;  // under mutex_
  std::atomic<int64_t> min_free_{-1};
  std::chrono::steady_clock::time_point start_;
  std::atomic<bool> cancelled_{false};
  std::atomic<uint64_t> bytes_read_{0};

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  size_t outstanding_ = 0;  // tasks posted and not finished
  std::deque<PublishedShard> ready_;
  size_t published_ = 0;
  size_t returned_ = 0;
  std::exception_ptr error_;
  int64_t all_published_ns_ = -1;
  std::vector<std::shared_ptr<CudaEvent>> fences_;  // of every shard handed out, for wait_landed
  bool closed_ = false;
};

}  // namespace blob2gpu
