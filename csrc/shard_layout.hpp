// ShardLayout: where the bytes of one parsed shard go. Pure planning, no allocation: which bytes of
// the data region this load reads (spans), how the tensors it hands out are cut into tensor groups,
// and where each group's bytes sit in the group's arena.
//
// A tensor group is a run of a shard's tensors, in file order, that shares one arena (one device
// allocation) and is handed out at once. A load that keeps what it returns (load()) makes one group
// per shard: the arena mirrors the shard's data region, so every staging slot is one contiguous
// copy whatever the tensor boundaries. A streamed load (its device memory bounded, see
// arena_pool.hpp) cuts a shard into groups of at most `group_target` bytes (one tensor larger than
// that is a group alone), so a shard larger than the bound still loads and memory comes back group
// by group as the consumer drops them; a slot then becomes one copy per group it touches.
//
// Reads are partitioned among the groups: group k reads [read_begin, read_end) of the data region
// (within the spans), and the partition boundaries are rounded up to the manifest's chunks, so the
// chunks that hold a group's bytes are verified by the reads of that group and the ones before it,
// never by a later group's. Bytes a group's reads cover that belong to the next group wait on the
// host (spilled) until that group has its arena.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

#include "safetensors_header.hpp"

namespace blob2gpu {

// A run of the data region this load needs, and where it sits in its arena. Without a selection
// the spans are the whole data region; with one, the selected tensors' ranges (rounded out to the
// manifest's chunks when the shard is verified), merged. In an arena each span is placed at the
// same offset modulo 256 as in the file, so tensors keep their alignment.
struct Span {
  uint64_t begin = 0;  // data-region coordinates
  uint64_t end = 0;
  uint64_t arena_offset = 0;  // in the arena of the group holding it (or the shard's, unbounded)
};

struct GroupLayout {
  std::vector<size_t> tensors;  // indices in header.tensors, file order (selected ones only)
  uint64_t lo = 0, hi = 0;      // the data bytes the arena mirrors (within the spans)
  uint64_t read_begin = 0, read_end = 0;  // this group's part of the reads (data coordinates)
  std::vector<Span> spans;                // the shard's spans clipped to [lo, hi), arena offsets
  std::vector<Span> cover;  // the spans whose bytes must have landed (and been verified) first
  uint64_t arena_bytes = 0;
  uint64_t copy_bytes = 0;   // sum of `spans`: bytes copied into the arena
  uint64_t cover_bytes = 0;  // sum of `cover`
  // Tensors whose offset in the arena breaks their element alignment: each gets an arena of its
  // own, placed after the group's arena in the group's claim (claim_offset, 256-aligned).
  struct Realigned {
    size_t tensor;
    uint64_t claim_offset;
  };
  std::vector<Realigned> realigned;
  uint64_t claim_bytes = 0;  // the group's arena and its realigned tensors' arenas, 256-aligned
};

struct ShardLayout {
  std::vector<Span> spans;       // sorted, disjoint; arena offsets of the unbounded layout
  std::vector<size_t> selected;  // indices in header.tensors handed out, in file order
  uint64_t needed_bytes = 0;     // sum of the spans
  std::vector<GroupLayout> groups;
  std::vector<uint64_t> tensor_offset;  // per header tensor: its offset in its group's arena
  std::vector<size_t> tensor_group;     // per header tensor: its group (selected tensors only)
};

struct LayoutOptions {
  const std::unordered_set<std::string>* wanted = nullptr;  // null: every tensor
  uint64_t verify_chunk = 0;  // the manifest's chunk bytes (file coordinates); 0: not verified
  // The arena is the file mapped (cpu, mmap): spans sit at their file offsets.
  bool mapped = false;
  // 0: one group per shard. Else groups of at most this many bytes (one larger tensor alone).
  uint64_t group_target = 0;
  // Address of data-region byte 0 modulo 256 in the arena's memory: 0 for allocated arenas; for a
  // mapped file, the data offset (the mapping is page-aligned). Decides which tensors to realign.
  uint64_t base_mod = 0;
};

// Plans a parsed shard. Never throws for a valid header.
ShardLayout plan_layout(const ShardHeader& header, const LayoutOptions& options);

// The span holding data-region byte `pos`, else the first span after it (end() when none).
std::vector<Span>::const_iterator spans_from(const std::vector<Span>& spans, uint64_t pos);
// The span holding data-region byte `pos`, or null.
const Span* span_at(const std::vector<Span>& spans, uint64_t pos);
// Bytes of `spans` within [begin, end).
uint64_t bytes_within(const std::vector<Span>& spans, uint64_t begin, uint64_t end);

}  // namespace blob2gpu
