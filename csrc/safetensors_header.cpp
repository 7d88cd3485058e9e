#include "safetensors_header.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string_view>

#include "detail/json_reader.hpp"
#include "errors.hpp"

namespace blob2gpu {
namespace {

using detail::JsonNumber;
using detail::JsonReader;
using detail::JsonType;

constexpr std::string_view kMetadataKey = "__metadata__";

// Names come from hostile input: a message shows at most this many bytes of one.
constexpr size_t kMaxQuotedBytes = 200;
// ... and at most this many dimensions of a shape.
constexpr size_t kMaxShownDims = 16;

// Cuts a string for a message at a UTF-8 boundary and shows control bytes as \xNN, so a name made
// of megabytes or of terminal escapes cannot flood or garble a log line.
std::string clip(std::string_view s) {
  size_t limit = s.size();
  if (limit > kMaxQuotedBytes) {
    limit = kMaxQuotedBytes;
    while (limit > 0 && (static_cast<unsigned char>(s[limit]) & 0xC0) == 0x80) --limit;
  }
  std::string out;
  out.reserve(limit + 8);
  for (size_t i = 0; i < limit; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F) {
      static const char kHex[] = "0123456789ABCDEF";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (limit < s.size()) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string quoted(std::string_view s) {
  return "'" + clip(s) + "'";
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size() && i < kMaxShownDims; ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  if (shape.size() > kMaxShownDims) out += ", ... (" + std::to_string(shape.size()) + " dims)";
  return out + "]";
}

std::string format_offsets(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// "tensor 'a' (data_offsets [0, 16])": how the offset checks name a tensor.
std::string describe_span(const TensorEntry& t) {
  return "tensor " + quoted(t.name) + " (data_offsets " + format_offsets(t.begin, t.end) + ")";
}

std::string describe_number(const JsonNumber& number) {
  switch (number.kind) {
    case JsonNumber::Kind::kUnsigned:
    case JsonNumber::Kind::kNegative:
      return clip(number.text);
    case JsonNumber::Kind::kOverflow:
      return clip(number.text) + ", which does not fit in 64 bits";
    case JsonNumber::Kind::kFloat:
      return clip(number.text) + ", not an integer";
  }
  return clip(number.text);
}

// Every message starts by naming the shard, so a failed multi-shard load says which file is bad;
// the error's shard field names it too (a load tells a damaged cache entry's shard by it).
[[noreturn]] void fail_shard(ErrorKind kind, const std::string& shard, const std::string& detail) {
  throw CoreError(kind, "shard " + quoted(shard) + ": " + detail, shard);
}

// Walks one header and builds its ShardHeader. Every check that concerns a single entry runs as
// the entry is read; the checks across entries (names, offsets) run once all are in.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, uint64_t data_bytes, const std::string& shard)
      : reader_(text), data_bytes_(data_bytes), shard_(shard) {}

  void parse(ShardHeader* out) {
    const JsonType top = reader_.peek();
    if (top != JsonType::kObject) {
      fail(ErrorKind::HeaderNotJson, std::string("header is ") + detail::json_type_name(top) +
                                         ", expected an object mapping tensor names to entries");
    }
    reader_.begin_object();
    bool seen_metadata = false;
    std::string key;
    while (reader_.next_key(&key)) {
      if (key == kMetadataKey) {
        if (seen_metadata) fail(ErrorKind::InvalidMetadata, "__metadata__ appears twice");
        seen_metadata = true;
        parse_metadata(&out->metadata);
      } else {
        out->tensors.push_back(parse_tensor(std::move(key)));
      }
    }
    reader_.finish();
    check_unique_names(out->tensors);
    check_coverage(&out->tensors);
  }

 private:
  [[noreturn]] void fail(ErrorKind kind, const std::string& detail) const {
    fail_shard(kind, shard_, detail);
  }

  [[noreturn]] void fail_tensor(ErrorKind kind, const std::string& name,
                                const std::string& detail) const {
    fail(kind, "tensor " + quoted(name) + ": " + detail);
  }

  void parse_metadata(std::vector<std::pair<std::string, std::string>>* metadata) {
    const JsonType type = reader_.peek();
    if (type == JsonType::kNull) {  // the reference reads a null __metadata__ as none
      reader_.read_null();
      return;
    }
    if (type != JsonType::kObject) {
      fail(ErrorKind::InvalidMetadata, std::string("__metadata__ is ") +
                                           detail::json_type_name(type) +
                                           ", expected an object mapping strings to strings");
    }
    reader_.begin_object();
    std::string key;
    while (reader_.next_key(&key)) {
      const JsonType value_type = reader_.peek();
      if (value_type != JsonType::kString) {
        fail(ErrorKind::InvalidMetadata, "__metadata__ key " + quoted(key) + " maps to " +
                                             detail::json_type_name(value_type) +
                                             ", expected a string");
      }
      std::string value = reader_.read_string();
      metadata->emplace_back(std::move(key), std::move(value));
    }
    if (const std::string* dup = find_duplicate(
            *metadata, [](const auto& item) -> const std::string& { return item.first; })) {
      fail(ErrorKind::InvalidMetadata, "__metadata__ has the key " + quoted(*dup) + " twice");
    }
  }

  TensorEntry parse_tensor(std::string name) {
    const JsonType type = reader_.peek();
    if (type != JsonType::kObject) {
      fail_tensor(ErrorKind::InvalidTensorEntry, name,
                  std::string("entry is ") + detail::json_type_name(type) +
                      ", expected an object with dtype, shape and data_offsets");
    }
    TensorEntry entry;
    entry.name = std::move(name);
    bool has_dtype = false;
    bool has_shape = false;
    bool has_offsets = false;
    uint64_t numel = 1;
    std::string field;
    reader_.begin_object();
    while (reader_.next_key(&field)) {
      if (field == "dtype") {
        mark_seen(&has_dtype, entry.name, field);
        entry.dtype = parse_dtype(entry.name);
      } else if (field == "shape") {
        mark_seen(&has_shape, entry.name, field);
        numel = parse_shape(entry.name, &entry.shape);
      } else if (field == "data_offsets") {
        mark_seen(&has_offsets, entry.name, field);
        parse_offsets(entry.name, &entry.begin, &entry.end);
      } else {
        reader_.skip_value();  // the reference ignores fields it does not know
      }
    }
    if (!has_dtype || !has_shape || !has_offsets) {
      std::string missing;
      for (const auto& [present, label] :
           {std::pair{has_dtype, "dtype"}, std::pair{has_shape, "shape"},
            std::pair{has_offsets, "data_offsets"}}) {
        if (present) continue;
        if (!missing.empty()) missing += ", ";
        missing += label;
      }
      fail_tensor(ErrorKind::InvalidTensorEntry, entry.name, "entry has no " + missing);
    }
    check_size(entry, numel);
    return entry;
  }

  // serde, in the reference, rejects a struct field given twice; so do we.
  void mark_seen(bool* seen, const std::string& name, const std::string& field) const {
    if (*seen) fail_tensor(ErrorKind::InvalidTensorEntry, name, "'" + field + "' appears twice");
    *seen = true;
  }

  DType parse_dtype(const std::string& name) {
    const JsonType type = reader_.peek();
    if (type != JsonType::kString) {
      fail_tensor(ErrorKind::InvalidTensorEntry, name,
                  std::string("dtype is ") + detail::json_type_name(type) +
                      ", expected a string such as \"F32\"");
    }
    const std::string text = reader_.read_string();
    if (std::optional<DType> dtype = dtype_from_name(text)) return *dtype;
    std::string known;
    for (const DTypeInfo& info : dtype_table()) {
      if (!known.empty()) known += ", ";
      known += info.name;
    }
    fail_tensor(ErrorKind::UnknownDType, name,
                "unknown dtype " + quoted(text) + " (known: " + known + ")");
  }

  // Reads the dimensions and returns their product. Every dimension must fit in int64 (DLPack's
  // shape type), and so must the product of the non-zero ones, which bounds numel and every
  // contiguous stride. The reference checks the product of all dimensions in usize instead; the
  // two differ only for zero-size tensors with absurd dimensions, which we reject.
  uint64_t parse_shape(const std::string& name, std::vector<int64_t>* shape) {
    const JsonType type = reader_.peek();
    if (type != JsonType::kArray) {
      fail_tensor(ErrorKind::InvalidTensorEntry, name,
                  std::string("shape is ") + detail::json_type_name(type) +
                      ", expected an array of non-negative integers");
    }
    constexpr auto kMaxDim = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    uint64_t nonzero_product = 1;
    bool has_zero = false;
    reader_.begin_array();
    while (reader_.next_item()) {
      // Built only for a message: shapes can have millions of items.
      const auto item = [&] { return "shape item " + std::to_string(shape->size()); };
      const JsonType item_type = reader_.peek();
      if (item_type != JsonType::kNumber) {
        fail_tensor(ErrorKind::InvalidShape, name,
                    item() + " is " + detail::json_type_name(item_type) +
                        ", expected a non-negative integer");
      }
      const JsonNumber dim = reader_.read_number();
      if (dim.kind == JsonNumber::Kind::kNegative) {
        fail_tensor(ErrorKind::InvalidShape, name,
                    item() + " is " + clip(dim.text) + ", dimensions must be non-negative");
      }
      if (dim.kind != JsonNumber::Kind::kUnsigned || dim.u > kMaxDim) {
        fail_tensor(
            ErrorKind::InvalidShape, name,
            item() + " is " + describe_number(dim) +
                (dim.kind == JsonNumber::Kind::kUnsigned ? ", over the int64 maximum" : ""));
      }
      shape->push_back(static_cast<int64_t>(dim.u));
      if (dim.u == 0) {
        has_zero = true;
      } else if (nonzero_product > kMaxDim / dim.u) {
        fail_tensor(
            ErrorKind::InvalidShape, name,
            "shape starting " + format_shape(*shape) + " has more elements than int64 can count");
      } else {
        nonzero_product *= dim.u;
      }
    }
    return has_zero ? 0 : nonzero_product;
  }

  void parse_offsets(const std::string& name, uint64_t* begin, uint64_t* end) {
    const JsonType type = reader_.peek();
    if (type != JsonType::kArray) {
      fail_tensor(ErrorKind::InvalidTensorEntry, name,
                  std::string("data_offsets is ") + detail::json_type_name(type) +
                      ", expected [begin, end]");
    }
    uint64_t values[2] = {0, 0};
    size_t count = 0;
    reader_.begin_array();
    while (reader_.next_item()) {
      if (count == 2) {
        fail_tensor(ErrorKind::InvalidTensorEntry, name,
                    "data_offsets has more than 2 items, expected [begin, end]");
      }
      const auto item = [&] { return "data_offsets item " + std::to_string(count); };
      const JsonType item_type = reader_.peek();
      if (item_type != JsonType::kNumber) {
        fail_tensor(ErrorKind::InvalidTensorEntry, name,
                    item() + " is " + detail::json_type_name(item_type) +
                        ", expected a non-negative integer");
      }
      const JsonNumber number = reader_.read_number();
      if (number.kind != JsonNumber::Kind::kUnsigned) {
        fail_tensor(
            ErrorKind::InvalidTensorEntry, name,
            item() + " is " + describe_number(number) +
                (number.kind == JsonNumber::Kind::kNegative ? ", offsets must be non-negative"
                                                            : ""));
      }
      values[count++] = number.u;
    }
    if (count != 2) {
      fail_tensor(ErrorKind::InvalidTensorEntry, name,
                  "data_offsets has " + std::to_string(count) + " item" + (count == 1 ? "" : "s") +
                      ", expected [begin, end]");
    }
    *begin = values[0];
    *end = values[1];
  }

  void check_size(const TensorEntry& entry, uint64_t numel) const {
    const DTypeInfo& info = dtype_info(entry.dtype);
    const std::string what = "shape " + format_shape(entry.shape) + " x " + std::string(info.name);
    if (entry.begin > entry.end) {
      fail_tensor(
          ErrorKind::InvalidOffsets, entry.name,
          "data_offsets " + format_offsets(entry.begin, entry.end) + " end before they begin");
    }
    if (numel > std::numeric_limits<uint64_t>::max() / info.bits) {
      fail_tensor(ErrorKind::InvalidShape, entry.name, what + " is more than 2^64 bits");
    }
    const uint64_t bits = numel * info.bits;
    if (bits % 8 != 0) {
      // Sub-byte dtypes pack elements; a tensor that ends mid-byte cannot be addressed.
      fail_tensor(ErrorKind::TensorSizeMismatch, entry.name,
                  what + " is " + std::to_string(bits) + " bits, not a whole number of bytes");
    }
    const uint64_t needed = bits / 8;
    const uint64_t held = entry.end - entry.begin;
    if (needed != held) {
      fail_tensor(ErrorKind::TensorSizeMismatch, entry.name,
                  what + " needs " + std::to_string(needed) + " bytes but data_offsets " +
                      format_offsets(entry.begin, entry.end) + " hold " + std::to_string(held));
    }
  }

  // Sorting, not hashing: a header full of colliding names cannot make this quadratic.
  template <typename Item, typename GetName>
  static const std::string* find_duplicate(const std::vector<Item>& items, GetName get_name) {
    std::vector<const std::string*> names;
    names.reserve(items.size());
    for (const Item& item : items) names.push_back(&get_name(item));
    std::sort(names.begin(), names.end(),
              [](const std::string* a, const std::string* b) { return *a < *b; });
    const auto dup =
        std::adjacent_find(names.begin(), names.end(),
                           [](const std::string* a, const std::string* b) { return *a == *b; });
    return dup == names.end() ? nullptr : *dup;
  }

  void check_unique_names(const std::vector<TensorEntry>& tensors) const {
    if (const std::string* dup = find_duplicate(
            tensors, [](const TensorEntry& t) -> const std::string& { return t.name; })) {
      fail(ErrorKind::DuplicateTensor, "tensor " + quoted(*dup) + " appears more than once");
    }
  }

  // The reference's layout rule: sorted by offsets, the tensors tile the data region exactly,
  // from byte 0 to its last byte, without gaps or overlaps.
  void check_coverage(std::vector<TensorEntry>* tensors) const {
    if (tensors->empty()) {
      if (data_bytes_ != 0) {
        fail(ErrorKind::InvalidOffsets, "the header lists no tensors, but " +
                                            std::to_string(data_bytes_) +
                                            " bytes of data follow it");
      }
      return;
    }
    // Stable, so zero-size tensors sharing an offset keep their file order.
    std::stable_sort(tensors->begin(), tensors->end(),
                     [](const TensorEntry& a, const TensorEntry& b) {
                       return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                     });
    const TensorEntry& first = tensors->front();
    if (first.begin != 0) {
      fail(ErrorKind::InvalidOffsets, "the data region starts with " + std::to_string(first.begin) +
                                          " unused bytes: the first " + describe_span(first) +
                                          " should begin at 0");
    }
    for (size_t i = 1; i < tensors->size(); ++i) {
      const TensorEntry& prev = (*tensors)[i - 1];
      const TensorEntry& cur = (*tensors)[i];
      if (cur.begin < prev.end) {
        fail(ErrorKind::InvalidOffsets, describe_span(cur) + " overlaps " + describe_span(prev));
      }
      if (cur.begin > prev.end) {
        fail(ErrorKind::InvalidOffsets, std::to_string(cur.begin - prev.end) +
                                            " unused bytes between " + describe_span(prev) +
                                            " and " + describe_span(cur));
      }
    }
    const TensorEntry& last = tensors->back();
    if (last.end < data_bytes_) {
      fail(ErrorKind::InvalidOffsets, "the tensors end at byte " + std::to_string(last.end) +
                                          " of the data region, but it holds " +
                                          std::to_string(data_bytes_) + " bytes (" +
                                          std::to_string(data_bytes_ - last.end) +
                                          " trailing bytes after " + describe_span(last) + ")");
    }
    if (last.end > data_bytes_) {
      fail(ErrorKind::InvalidOffsets, describe_span(last) +
                                          " ends past the data region, which holds " +
                                          std::to_string(data_bytes_) + " bytes (the file is " +
                                          std::to_string(last.end - data_bytes_) + " bytes short)");
    }
  }

  JsonReader reader_;
  uint64_t data_bytes_;
  const std::string& shard_;
};

// What a file whose first bytes are no safetensors length is, when they are a weights format's
// signature (what users load by mistake), else nullptr.
const char* other_weights_format(const uint8_t* prefix) {
  auto starts = [prefix](std::string_view magic) {
    return std::memcmp(prefix, magic.data(), magic.size()) == 0;
  };
  if (starts("PK\x03\x04")) return "a zip archive (PyTorch's torch.save format, or .npz)";
  if (prefix[0] == 0x80 && prefix[1] >= 2 && prefix[1] <= 5) {
    return "a Python pickle (PyTorch's legacy torch.save format)";
  }
  if (starts("GGUF")) return "a GGUF file (llama.cpp)";
  if (starts("\x93NUMPY")) return "a NumPy .npy file";
  if (starts("\x89HDF")) return "an HDF5 file (Keras .h5)";
  return nullptr;
}

void check_header_fits(uint64_t header_len, uint64_t file_size, const std::string& shard) {
  if (header_len > kMaxHeaderBytes) {
    fail_shard(ErrorKind::HeaderTooLarge, shard,
               "header length is " + std::to_string(header_len) + " bytes, over the " +
                   std::to_string(kMaxHeaderBytes) +
                   "-byte cap (not a safetensors file, or a corrupt one)");
  }
  // header_len is capped above, so the sum cannot wrap.
  const uint64_t needed = kHeaderLengthBytes + header_len;
  if (needed > file_size) {
    fail_shard(ErrorKind::HeaderTruncated, shard,
               "header length " + std::to_string(header_len) +
                   " points past the end of the file: 8 + " + std::to_string(header_len) + " = " +
                   std::to_string(needed) + " bytes needed, the file has " +
                   std::to_string(file_size));
  }
}

std::string header_position(size_t offset) {
  return "byte " + std::to_string(offset) + " of the header (file offset " +
         std::to_string(kHeaderLengthBytes + offset) + ")";
}

}  // namespace

uint64_t read_header_length(const uint8_t* prefix, size_t prefix_len, uint64_t file_size,
                            const std::string& shard) {
  if (file_size < kHeaderLengthBytes) {
    fail_shard(
        ErrorKind::HeaderTruncated, shard,
        "file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
  }
  if (prefix_len < kHeaderLengthBytes) {
    fail_shard(ErrorKind::HeaderTruncated, shard,
               "only " + std::to_string(prefix_len) + " of the 8 header-length bytes were read");
  }
  // Assembled byte by byte: the format is little-endian whatever the host is.
  uint64_t header_len = 0;
  for (size_t i = 0; i < kHeaderLengthBytes; ++i) {
    header_len |= static_cast<uint64_t>(prefix[i]) << (8 * i);
  }
  try {
    check_header_fits(header_len, file_size, shard);
  } catch (CoreError& e) {
    const char* format = other_weights_format(prefix);
    if (format == nullptr) throw;
    throw CoreError(
        e.kind(), "shard " + quoted(shard) + ": the file is " + format + ", not safetensors", shard)
        .with_hint("convert it to safetensors first (safetensors.torch.save_file of its tensors)");
  }
  return header_len;
}

ShardHeader parse_header(const uint8_t* json, size_t json_len, uint64_t file_size,
                         const std::string& shard) {
  check_header_fits(json_len, file_size, shard);
  const std::string_view text(reinterpret_cast<const char*>(json), json_len);

  if (const std::optional<size_t> bad = detail::find_invalid_utf8(text)) {
    char byte[8];
    std::snprintf(byte, sizeof(byte), "0x%02X", static_cast<unsigned>(json[*bad]));
    fail_shard(ErrorKind::HeaderNotUtf8, shard,
               std::string("header is not valid UTF-8: ") + byte + " at " + header_position(*bad) +
                   " does not start a well-formed sequence");
  }
  if (text.find_first_not_of(" \t\r\n") == std::string_view::npos) {
    fail_shard(ErrorKind::HeaderNotJson, shard,
               "header is empty (" + std::to_string(json_len) + " bytes of whitespace)");
  }

  // Syntax first, in a pass that keeps nothing: a header that is not JSON is reported as such,
  // whatever its first entries say.
  try {
    JsonReader syntax(text);
    syntax.skip_value();
    syntax.finish();
  } catch (const detail::JsonSyntaxError& e) {
    fail_shard(
        ErrorKind::HeaderNotJson, shard,
        "header is not valid JSON: " + e.description() + " at " + header_position(e.offset()));
  }

  ShardHeader header;
  header.header_bytes = json_len;
  header.data_offset = kHeaderLengthBytes + json_len;
  header.data_bytes = file_size - header.data_offset;
  try {
    HeaderParser(text, header.data_bytes, shard).parse(&header);
  } catch (const detail::JsonSyntaxError& e) {
    // Unreachable after the syntax pass; kept so a reader bug still surfaces as a typed error.
    fail_shard(
        ErrorKind::HeaderNotJson, shard,
        "header is not valid JSON: " + e.description() + " at " + header_position(e.offset()));
  }
  return header;
}

}  // namespace blob2gpu
