#include "shard_layout.hpp"

#include <algorithm>

namespace blob2gpu {

namespace {

constexpr uint64_t kArenaAlign = 256;

uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Alignment a consumer may assume for an element of this dtype.
uint64_t element_alignment(DType dtype) {
  const uint32_t bits = dtype_info(dtype).bits;
  if (bits % 8 != 0) return 1;
  return std::min<uint64_t>(bits / 8, 8);
}

// The manifest's chunk grid is in file coordinates; these round data-region positions to it.
struct ChunkGrid {
  uint64_t data_offset;
  uint64_t data_bytes;
  uint64_t chunk;  // 0: no grid

  uint64_t up(uint64_t pos) const {
    if (chunk == 0) return pos;
    const uint64_t file = (data_offset + pos + chunk - 1) / chunk * chunk;
    return std::min(file - data_offset, data_bytes);
  }
  uint64_t down(uint64_t pos) const {
    if (chunk == 0) return pos;
    const uint64_t file = (data_offset + pos) / chunk * chunk;
    return file > data_offset ? file - data_offset : 0;
  }
};

// `spans` clipped to [lo, hi).
std::vector<Span> clip(const std::vector<Span>& spans, uint64_t lo, uint64_t hi) {
  std::vector<Span> out;
  for (auto it = spans_from(spans, lo); it != spans.end() && it->begin < hi; ++it) {
    const uint64_t b = std::max(it->begin, lo), e = std::min(it->end, hi);
    if (b < e) out.push_back({b, e, 0});
  }
  return out;
}

// Places spans one after another in an arena, each at the same offset modulo 256 as in the file;
// returns the arena's size.
uint64_t pack(std::vector<Span>& spans) {
  uint64_t cursor = 0;
  for (Span& span : spans) {
    span.arena_offset = align_up(cursor, kArenaAlign) + span.begin % kArenaAlign;
    cursor = span.arena_offset + (span.end - span.begin);
  }
  return cursor;
}

uint64_t sum(const std::vector<Span>& spans) {
  uint64_t total = 0;
  for (const Span& s : spans) total += s.end - s.begin;
  return total;
}

// The selected tensors' ranges (rounded out to the grid, so every byte read is checked), merged.
std::vector<Span> plan_spans(const ShardHeader& h, const std::vector<size_t>& selected,
                             bool everything, const ChunkGrid& grid) {
  std::vector<Span> ranges;
  if (everything) {
    if (h.data_bytes > 0) ranges.push_back({0, h.data_bytes, 0});
  } else {
    for (size_t t : selected) {
      const TensorEntry& e = h.tensors[t];
      if (e.end == e.begin) continue;
      ranges.push_back({grid.down(e.begin), grid.up(e.end), 0});
    }
    std::sort(ranges.begin(), ranges.end(),
              [](const Span& a, const Span& b) { return a.begin < b.begin; });
  }
  std::vector<Span> spans;
  for (const Span& r : ranges) {
    if (!spans.empty() && r.begin <= spans.back().end) {
      spans.back().end = std::max(spans.back().end, r.end);
    } else {
      spans.push_back(r);
    }
  }
  return spans;
}

}  // namespace

std::vector<Span>::const_iterator spans_from(const std::vector<Span>& spans, uint64_t pos) {
  auto it = std::upper_bound(spans.begin(), spans.end(), pos,
                             [](uint64_t p, const Span& s) { return p < s.begin; });
  if (it != spans.begin() && std::prev(it)->end > pos) --it;
  return it;
}

const Span* span_at(const std::vector<Span>& spans, uint64_t pos) {
  auto it = spans_from(spans, pos);
  return it != spans.end() && it->begin <= pos ? &*it : nullptr;
}

uint64_t bytes_within(const std::vector<Span>& spans, uint64_t begin, uint64_t end) {
  uint64_t total = 0;
  for (auto it = spans_from(spans, begin); it != spans.end() && it->begin < end; ++it) {
    total += std::min(it->end, end) - std::max(it->begin, begin);
  }
  return total;
}

ShardLayout plan_layout(const ShardHeader& h, const LayoutOptions& options) {
  ShardLayout out;
  for (size_t t = 0; t < h.tensors.size(); ++t) {
    if (!options.wanted || options.wanted->count(h.tensors[t].name) != 0) out.selected.push_back(t);
  }
  const ChunkGrid grid{h.data_offset, h.data_bytes, options.verify_chunk};
  // Without a selection every byte is read, so there is nothing to round.
  out.spans = plan_spans(h, out.selected, options.wanted == nullptr,
                         options.wanted ? grid : ChunkGrid{h.data_offset, h.data_bytes, 0});
  out.needed_bytes = sum(out.spans);
  // The unbounded layout's arena offsets (one arena per shard), kept on the shard's spans.
  uint64_t shard_arena = options.mapped ? h.data_bytes : 0;
  if (options.mapped) {
    for (Span& span : out.spans) span.arena_offset = span.begin;
  } else {
    shard_arena = pack(out.spans);
  }
  out.tensor_offset.assign(h.tensors.size(), 0);
  out.tensor_group.assign(h.tensors.size(), 0);
  if (out.selected.empty()) return out;

  // Cut the selected tensors into groups.
  std::vector<GroupLayout> groups;
  if (options.group_target == 0) {
    GroupLayout g;
    g.tensors = out.selected;
    g.lo = out.spans.empty() ? 0 : out.spans.front().begin;
    g.hi = out.spans.empty() ? 0 : out.spans.back().end;
    g.spans = out.spans;
    g.arena_bytes = shard_arena;
    groups.push_back(std::move(g));
  } else {
    for (size_t t : out.selected) {
      const TensorEntry& e = h.tensors[t];
      if (!groups.empty() && !groups.back().tensors.empty() &&
          bytes_within(out.spans, groups.back().lo, e.end) > options.group_target) {
        groups.emplace_back();
      }
      if (groups.empty()) groups.emplace_back();
      GroupLayout& g = groups.back();
      if (g.tensors.empty()) g.lo = e.begin;
      g.tensors.push_back(t);
      g.hi = std::max(g.hi, e.end);
    }
    for (GroupLayout& g : groups) {
      g.spans = clip(out.spans, g.lo, g.hi);
      g.arena_bytes = pack(g.spans);
    }
  }

  // Reads: a partition of the data region, its boundaries after each group's last chunk.
  uint64_t boundary = 0;
  for (size_t k = 0; k < groups.size(); ++k) {
    GroupLayout& g = groups[k];
    g.read_begin = boundary;
    g.read_end = k + 1 == groups.size() ? h.data_bytes : std::max(boundary, grid.up(g.hi));
    boundary = g.read_end;
    g.cover = clip(out.spans, grid.down(g.lo), grid.up(g.hi));
    g.copy_bytes = sum(g.spans);
    g.cover_bytes = sum(g.cover);
  }

  // Where each tensor sits, and which ones need an arena of their own to be aligned.
  for (size_t k = 0; k < groups.size(); ++k) {
    GroupLayout& g = groups[k];
    uint64_t claim = align_up(std::max<uint64_t>(g.arena_bytes, 1), kArenaAlign);
    for (size_t t : g.tensors) {
      const TensorEntry& e = h.tensors[t];
      out.tensor_group[t] = k;
      const Span* span = span_at(g.spans, e.begin);
      if (span != nullptr) out.tensor_offset[t] = span->arena_offset + (e.begin - span->begin);
      if ((options.base_mod + out.tensor_offset[t]) % element_alignment(e.dtype) != 0) {
        g.realigned.push_back({t, claim});
        claim += align_up(std::max<uint64_t>(e.end - e.begin, 1), kArenaAlign);
      }
    }
    g.claim_bytes = claim;
  }
  out.groups = std::move(groups);
  return out;
}

}  // namespace blob2gpu
