// LoadPipeline owns what outlives one load (the target's context, the staging ring, the copy
// engine and the io threads); LoadSession is one load of a set of shards through it.
//
// Flow of one shard (cuda target): header read and parsed -> the shard's tensors planned into
// tensor groups (shard_layout.hpp) -> each group's arena made -> data chunks pread (or fed) into
// ring slots -> one async H2D copy per slot and group -> when every byte of a group is enqueued
// (and verified), a fence (one event per stream) is recorded and the group's tensors are
// published. On the host target chunks are read straight into the arena (no staging copy), or the
// file is mapped when mmap is asked.
//
// A load that keeps what it returns has one group per shard, its arena allocated when the header
// parses (as many arenas as shards, the whole checkpoint). A streamed load (SessionOptions::
// device_cap, cuda) cuts shards into groups whose arenas come from an ArenaPool in the order they
// will be handed out, at most device_cap bytes at a time (arena_pool.hpp): a group waits for its
// memory in an "open" task on the io threads, which then posts the group's reads (local shards) or
// lets the feeder's landings for it through (fed shards); bytes that land for a group before it
// has memory wait on the host (spilled: a fed shard's first range, or the tail of the manifest
// chunk a group's reads end in) and are copied when it opens.
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
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "arena_pool.hpp"
#include "chunk_verifier.hpp"
#include "content_md5_verifier.hpp"
#include "copy_engine.hpp"
#include "cuda_device.hpp"
#include "device_arena.hpp"
#include "errors.hpp"
#include "io_threads.hpp"
#include "numa_placement.hpp"
#include "safetensors_header.hpp"
#include "shard_file.hpp"
#include "shard_layout.hpp"
#include "staging_ring.hpp"
#include "tensor_export.hpp"

namespace blob2gpu {

struct PipelineSettings {
  size_t staging_slots = 8;
  size_t staging_slot_bytes = 32u << 20;
  size_t copy_streams = 2;
  size_t io_threads = 4;
  bool use_pinned_host_fallback = true;
  // cuda: the ring pinned on the GPU's NUMA node and the io threads bound to its CPUs.
  bool bind_numa_node = true;
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
  // cuda target, direct (not host staging): the load is streamed (its consumer drops tensors as
  // it goes) and holds at most this many bytes of device memory for tensors not yet dropped;
  // 0: not bounded (the load keeps what it returns). See arena_pool.hpp.
  uint64_t device_cap = 0;
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
  size_t groups = 0;             // tensor groups (arenas) the shard was cut into
  int64_t start_ns = -1;         // first work on the shard, from the session start
  int64_t header_ns = -1;        // header parsed (unbounded: and its arena allocated)
  int64_t published_ns = -1;     // every byte read and enqueued; its last tensors handed out
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
  int numa_node = -1;         // the GPU's host NUMA node the pipeline was placed on (-1: none)
  std::string numa_source;    // where that came from: "driver", "sysfs", "none"; "" on cpu
  size_t numa_cpus = 0;       // CPUs the io threads are bound to (0: not bound)
  bool ring_on_node = false;  // the ring was allocated under the node's memory policy
  size_t peak_slots_in_flight = 0;  // most slots whose copies were in flight at once
  uint64_t slot_waits = 0;
  bool mmap = false;
  bool host_staging = false;
  int64_t min_free_device_bytes = -1;  // lowest free GPU memory seen at a shard's end (-1: none)
  uint64_t verified_bytes = 0;         // bytes checked against a manifest
  int peak_md5_shards = 0;             // most shards whose Content-MD5 was computed at once
  uint64_t md5_parked_bytes = 0;       // bytes copied aside to wait for their shard's hash
  uint64_t direct_io_bytes = 0;        // bytes read with O_DIRECT (page cache bypassed)
  double host_populate_seconds = 0;    // CPU time making new host memory resident for writing
  std::vector<std::string> checksum_failures;  // mismatches let through (fail_on_... = false)
  std::vector<ShardStats> shards;
  // A group's exchange: data bytes this process fetched and landed in its own memory (sent to the
  // peers from there), and bytes the peers wrote into it (span bytes, not realigned copies).
  uint64_t group_landed_bytes = 0;
  uint64_t group_received_bytes = 0;
  // Streamed loads (device_cap > 0): the bound and what the load's device memory did.
  uint64_t device_cap = 0;            // 0: not bounded
  uint64_t stream_buffer_bytes = 0;   // the pool's slab
  uint64_t peak_device_bytes = 0;     // most device bytes its pool had allocated at once
  uint64_t cap_raised_to = 0;         // largest group admitted beyond the cap (0: none)
  uint64_t mid_load_allocations = 0;  // regions the pool grew by mid-load (cuMemAlloc)
  uint64_t kept_beyond_cap = 0;       // bytes the consumer kept that the bound stopped counting
};

// One tensor group ready to hand out: a whole shard when the load keeps what it returns, a run of
// its tensors when it is streamed.
struct PublishedShard {
  size_t index = 0;
  std::vector<std::shared_ptr<TensorView>> tensors;  // in file order
  std::vector<std::pair<std::string, std::string>> metadata;
  bool complete = true;  // every tensor of the shard has now been published
  // The group's arenas, for the streamed load's budget (not exposed to Python).
  std::vector<std::weak_ptr<DeviceArena>> arenas;
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
  // Where the pipeline sits on the host (cuda, bind_numa_node): the GPU's node and CPUs.
  const NumaPlacement& placement() const { return placement_; }
  bool ring_on_node() const { return ring_on_node_; }

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
  NumaPlacement placement_;
  bool ring_on_node_ = false;
  pid_t owner_pid_ = 0;  // the process that built the pipeline (and started its threads)
  std::shared_ptr<CudaContext> ctx_;
  std::unique_ptr<StagingRing> ring_;
  std::unique_ptr<CopyEngine> engine_;
  std::unique_ptr<IoThreads> threads_;
  std::mutex mutex_;
  std::condition_variable ended_;  // running_ went back to false
  bool running_ = false;           // a session runs (one at a time) until it has closed
  // The running session, to close it from close(): the pipeline owns no share of its sessions
  // (they own it). Expired while the session's destructor closes it; close() then waits for that.
  std::weak_ptr<LoadSession> active_;
  bool closed_ = false;
};

class LoadSession {
 public:
  ~LoadSession();
  LoadSession(const LoadSession&) = delete;
  LoadSession& operator=(const LoadSession&) = delete;

  // The next tensor group ready to hand out, in arrival order; nullopt when all were returned.
  // Blocks; rethrows the load's first error. keep: the consumer keeps the tensors (a streamed
  // load's budget stops counting them); else it drops them as it goes, and the budget counts
  // them until they go.
  std::optional<PublishedShard> next_shard(bool keep = true);
  // next_shard() without waiting: false when it would wait (no group ready, the load going on);
  // else true, with `out` what next_shard() returns. Rethrows the load's first error.
  bool try_next_shard(bool keep, std::optional<PublishedShard>& out);
  // Groups published but not yet returned by next_shard(), even after the load failed (their
  // bytes are complete): a restarted load may keep them (they count as kept). Does not block.
  std::vector<PublishedShard> take_ready();
  // Blocks until every byte handed out so far has landed on the device (waits on fence events).
  void wait_landed();
  // Whether every byte handed out so far has landed (wait_landed() would not wait). Queries the
  // fence events; does not block.
  bool landed() const;
  // Stops the load: pending reads are skipped, in-flight copies drain, unpublished arenas are
  // freed (or given back to the pool).
  void cancel();
  // cancel() and wait until no task of this session runs; idempotent. Concurrent calls (two
  // Python threads, or one and the pipeline's close, which holds a reference to the session
  // while it closes it) take turns: each returns once it is closed.
  void close();
  SessionStats stats() const;
  size_t shard_count() const { return shards_.size(); }

  // --- fed sessions ---
  // A landing for [file_offset, file_offset + bytes) of a shard: blocks for a free slot on CUDA;
  // nullopt once the load is cancelled. The first range of a shard must start at offset 0 and
  // carry the header; data ranges may be requested once commit() reported the header ready.
  std::optional<Landing> acquire(size_t shard, uint64_t file_offset, size_t bytes);
  // acquire() without waiting: false when it would wait (for a staging slot or a streamed
  // group's memory) or populate host memory; else true, with `out` what acquire() returns.
  // Throws as acquire() does.
  bool try_acquire(size_t shard, uint64_t file_offset, size_t bytes, std::optional<Landing>& out);
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

  // --- a tensor-parallel group's exchange (a fed session; integrations/distributed.py) ---
  // Each rank fetches a part of a shard from storage, lands it with land_from_host, and the
  // group's communicator broadcasts it from the fetcher's destinations into the others' (device
  // to device on a GPU). Every rank feeds the shard's header itself (acquire/commit); its data
  // then arrives only this way. Bytes that came from a peer were checked against the manifest by
  // the peer that fetched them (check_fetched), not here.
  //
  // Whether a shard's data may be exchanged so: its header is ready, it is fed, lands in device
  // or cpu-target memory (not host staging) and is not checked by Content-MD5 (its digest needs
  // every byte, in order, in one process).
  bool exchangeable(size_t shard) const;
  // The file ranges [begin, end) that the shard's tensor groups mirror, in order: a step of the
  // exchange lies within one, so it needs that group's memory only.
  std::vector<std::pair<uint64_t, uint64_t>> exchange_steps(size_t shard) const;
  // This process fetched bytes [file_offset, file_offset + n) of the shard's data (its whole
  // part, before any of it is landed or sent): checks them against the manifest. Throws
  // ChecksumMismatch (and fails the load) for a chunk that differs.
  void check_fetched(size_t shard, uint64_t file_offset, const uint8_t* data, size_t n);
  // Every rank checked its part (check_fetched; the group agreed none failed): the bytes each
  // group's publication waits to have been checked count as checked. Once per shard.
  void exchange_checked(size_t shard);
  // The file ranges where the shard's data lands, each contiguous in one allocation: its groups'
  // spans and (GPU) the realigned tensors' own allocations, which hold a second copy of theirs.
  // Two ranks whose lists are equal can exchange the shard piece by piece.
  std::vector<std::pair<uint64_t, uint64_t>> destinations(size_t shard) const;
  // Uint8 views of the destinations' bytes within file range [begin, end), in destinations()
  // order: what a communicator writes (peers) or sends (the fetcher). Blocks until their groups
  // have memory (a streamed load's claim it in hand-out order); nullopt once the load is
  // cancelled.
  std::optional<std::vector<std::shared_ptr<TensorView>>> open_destinations(size_t shard,
                                                                            uint64_t begin,
                                                                            uint64_t end);
  // Copies bytes [file_offset, file_offset + n) of the shard's data, fetched (and checked) by
  // this process, into their open destinations: through the staging ring (GPU: one async copy
  // per slot) or into host memory. Not counted until arrived(); false once the load is
  // cancelled.
  bool land_from_host(size_t shard, uint64_t file_offset, const uint8_t* data, size_t n);
  // Makes `stream` (a communicator's, about to send or write destinations; null is the legacy
  // default stream) wait on the device for every copy this session has enqueued: land_from_host's
  // copies, and the waits for the earlier users of a streamed load's reused memory. No-op on the
  // cpu target.
  void order_writes(CUstream stream);
  // Bytes [begin, end) of the shard are in its destinations: written (or, by their fetcher,
  // sent) on `stream`, whose event now joins each group's fence, so consumers and the reuse of
  // the memory wait for it; none: done already (host memory). `from_peer`: another rank fetched
  // them (stats().group_received_bytes). Groups whose bytes are all in publish.
  void arrived(size_t shard, uint64_t begin, uint64_t end, std::optional<CUstream> stream,
               bool from_peer);

 private:
  friend class LoadPipeline;
  // Bytes of a group that landed before it had its arena (data coordinates, the group's span
  // bytes only); copied in when it opens.
  struct Spill {
    uint64_t begin = 0;
    std::vector<uint8_t> bytes;
  };
  struct Group {
    GroupLayout layout;
    std::shared_ptr<PoolClaim> claim;  // streamed loads
    // Span bytes not yet copied + cover bytes not yet landed + 1 until the group is open: the
    // landing (or opening) that takes it to zero publishes the group.
    std::atomic<int64_t> remaining{0};
    // Under the session's mutex_:
    bool open = false;  // its arenas exist: bytes are copied, not spilled
    bool published = false;
    std::shared_ptr<DeviceArena> arena;
    std::vector<std::shared_ptr<DeviceArena>> realigned;  // parallel to layout.realigned
    std::vector<Spill> spills;
    // Events on the streams that wrote its memory from outside the ring, or sent it (arrived()):
    // part of its fence.
    std::vector<std::shared_ptr<CudaEvent>> arrived;
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
    ShardLayout layout;
    std::vector<std::unique_ptr<Group>> groups;
    std::shared_ptr<DeviceArena> staging;  // host-staging: the whole data region in host memory
    uint64_t read_chunk = 0;               // local shards: bytes per read
    bool sequenced = false;                // streamed: its groups claimed memory (sequence_mutex_)
    size_t groups_published = 0;           // under mutex_
    std::unique_ptr<ChunkVerifier> verifier;  // null: no manifest for this shard
    std::unique_ptr<ContentMd5Verifier> md5;  // null: no Content-MD5 to check
    ShardStats stats;
  };

  LoadSession(std::shared_ptr<LoadPipeline> pipeline, std::vector<ShardSource> shards,
              SessionOptions options);
  // Where host-landing bytes of a shard's data region go: the arena (cpu) or the staging copy
  // (unbounded loads: one group per shard).
  uint8_t* host_destination(const Shard& shard) const;
  // Where bytes [begin, begin + bytes) of the shard's data (within `span`) land on the host, made
  // resident for the write that follows.
  uint8_t* host_landing(const Shard& shard, const Span& span, uint64_t begin, size_t bytes) const;
  // HostBuffer::populate_for_write, its CPU time counted (stats().host_populate_seconds).
  void populate_host(uint8_t* p, size_t n) const;
  bool lands_on_host() const { return !pipeline_->ctx_ || host_staging_; }
  bool streamed() const { return streamed_; }
  // The shard's data is its local file mapped copy-on-write (cpu target, mmap asked, a path).
  bool maps(const Shard& shard) const { return mmap_ && !shard.source.path.empty(); }
  void begin();
  // Parses the header and plans the shard; an unbounded load makes its arenas now.
  void prepare_shard(size_t shard, const uint8_t* json, size_t json_len, uint64_t file_size,
                     ShardStats st);
  // Records the shard's handed-out tensor names; DuplicateTensor when another shard has one.
  void claim_tensor_names(size_t index);
  // Unbounded loads: allocates a group's arenas (device, host or the mapped file).
  void open_now(Shard& shard, Group& group);
  // After a shard's groups are ready for landings (unbounded) or its reads are posted: the
  // opening token of each group goes, publishing those with nothing left to land; a shard without
  // tensors to hand out is published empty.
  void release_open_tokens(size_t shard);
  // Streamed loads: each group of the shard claims its memory, in order, and an open task waits
  // for it. Once per shard; the order of calls is the order of hand-out.
  void sequence_shard(size_t shard);
  void run_open(size_t shard, size_t group);
  // The group whose reads cover data-region byte `pos` (npos: none).
  static size_t read_group(const Shard& shard, uint64_t pos);
  // Posts the chunk reads of a local shard's spans within [begin, end).
  void post_reads(size_t shard, uint64_t begin, uint64_t end);
  // Posts the read of the first chunk of a shard's spans within [begin, end); that read posts
  // the next (a shard checked by Content-MD5: its bytes arrive in order).
  void post_chained_read(size_t shard, uint64_t begin, uint64_t end);
  // Hands [begin, begin + bytes) of the data region to the target. With a slot (bytes at
  // slot_offset) the slot is consumed; without one the bytes are already in the arena.
  // count=false (land_from_host): the groups' remaining bytes are not counted down, and a group
  // without memory is an error, not a spill.
  void land_data(size_t shard, Slot* slot, size_t slot_offset, uint64_t begin, uint64_t bytes,
                 bool count = true);
  // The copies of the group's bytes [begin, begin + bytes), at slot_offset in a slot, into its
  // open arenas; returns the span bytes they cover. Under mutex_.
  uint64_t group_copies(const Shard& shard, const Group& group, size_t slot_offset, uint64_t begin,
                        uint64_t bytes, std::vector<CopyRange>& out) const;
  void land_spill(size_t shard, size_t group, const Spill& spill);
  // `bytes` of the group's remaining count landed; publishes it at zero.
  void group_landed(size_t shard, size_t group, int64_t bytes);
  void finish_group(size_t shard, size_t group);
  // Publishes a shard that hands out no tensor.
  void publish_empty(size_t shard);
  FeedStatus commit_landing(Landing& landing);
  // Throws InvalidArgument unless exchangeable(shard).
  void check_exchangeable(size_t shard) const;
  // Data-region coordinates of file range [begin, end) of an exchangeable shard (checked).
  std::pair<uint64_t, uint64_t> data_range(const Shard& shard, uint64_t begin, uint64_t end) const;
  // A fed shard's header is parsed and its first `landed_to` data bytes handed over: an
  // unbounded load's groups are ready; a streamed one's claim memory now when no data range
  // will follow.
  void after_header(size_t shard, uint64_t landed_to);
  FeedStatus status_of(const Shard& shard) const;
  void check_shard_index(size_t shard) const;
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
  void post(std::function<void()> task, TaskPriority priority);
  void run_header(size_t shard);
  void run_chunk(size_t shard, uint64_t begin, uint64_t end);
  void fail(std::exception_ptr error);
  int64_t now_ns() const;
  // Under mutex_: every shard published and every group handed out.
  bool handed_out_all_locked() const { return published_ == shards_.size() && ready_.empty(); }
  // Streamed loads, under mutex_: the consumer waits for a group that cannot get memory while
  // nothing of the load is in flight, because the memory is held by tensors it was handed (a
  // streamed consumer keeping them). relieve_locked() stops counting those; returns how many.
  bool stuck_locked() const;
  size_t relieve_locked();
  void hand_out_locked(const PublishedShard& group, bool keep);
  // next_shard's step under mutex_: true with `out` set (a group, or nullopt when all were
  // returned), false when the consumer must wait. Rethrows the load's first error.
  bool next_shard_locked(bool keep, std::optional<PublishedShard>& out);
  // acquire() and try_acquire(): with wait false, returns false where acquire() would wait.
  bool acquire_landing(size_t shard, uint64_t file_offset, size_t bytes, bool wait,
                       std::optional<Landing>& out);

  std::shared_ptr<LoadPipeline> pipeline_;
  std::vector<std::unique_ptr<Shard>> shards_;
  bool mmap_;
  bool fed_;
  bool host_staging_;
  bool fail_on_checksum_mismatch_;
  bool direct_io_;
  bool streamed_ = false;
  std::shared_ptr<ArenaPool> pool_;  // streamed loads, until close() (then pool_stats_)
  PoolStats pool_stats_;
  uint64_t group_target_ = 0;  // streamed loads: bytes per tensor group
  std::atomic<uint64_t> direct_io_bytes_{0};
  mutable std::atomic<uint64_t> populate_cpu_ns_{0};
  std::shared_ptr<const std::unordered_set<std::string>> wanted_;
  std::atomic<uint64_t> verified_bytes_{0};
  std::atomic<uint64_t> group_landed_bytes_{0};    // land_from_host: this rank's part
  std::atomic<uint64_t> group_received_bytes_{0};  // arrived(from_peer): the peers' parts
  Md5Gauge md5_gauge_;                             // the shards' ContentMd5Verifiers count into it
  std::vector<std::string> checksum_failures_;     // under mutex_
  // Under mutex_: each handed-out tensor name's shard (claim_tensor_names).
  std::unordered_map<std::string, size_t> tensor_shards_;
  std::atomic<int64_t> min_free_{-1};
  std::chrono::steady_clock::time_point start_;
  std::atomic<bool> cancelled_{false};
  std::atomic<uint64_t> bytes_read_{0};

  std::mutex close_mutex_;     // one close() at a time: a second waits for the first
  std::mutex sequence_mutex_;  // the order of claims and open tasks (taken before mutex_)
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  size_t outstanding_ = 0;  // tasks posted and not finished
  bool closing_ = false;    // no task is posted any more
  std::deque<PublishedShard> ready_;
  size_t published_ = 0;  // shards whose every group is published
  std::exception_ptr error_;
  int64_t all_published_ns_ = -1;
  std::vector<std::shared_ptr<CudaEvent>> fences_;  // of every group handed out, for wait_landed
  std::vector<std::weak_ptr<DeviceArena>> handed_out_;  // streamed groups handed out, not kept
  uint64_t kept_beyond_cap_ = 0;
  bool closed_ = false;
};

}  // namespace blob2gpu
