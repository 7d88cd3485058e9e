// A small, strict pull reader for the JSON that safetensors headers are made of. The caller walks
// the document value by value (begin_object / next_key / read_string / ...), so the header is never
// held as a tree: memory stays proportional to what the caller keeps, and members it does not need
// are skipped without being stored. Headers are hostile input: nesting is capped at
// kMaxJsonDepth, nothing recurses, and every error carries the byte offset where it was found.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace blob2gpu::detail {

// serde_json, which the reference implementation uses, allows 128; real headers need 3.
constexpr int kMaxJsonDepth = 64;

// The text is not JSON: a syntax error, a bad escape, or nesting deeper than kMaxJsonDepth.
class JsonSyntaxError : public std::runtime_error {
 public:
  JsonSyntaxError(const std::string& description, size_t offset);
  // What is wrong, without the position.
  const std::string& description() const { return description_; }
  // Byte offset into the text given to JsonReader.
  size_t offset() const { return offset_; }

 private:
  std::string description_;
  size_t offset_;
};

enum class JsonType : uint8_t { kObject, kArray, kString, kNumber, kBool, kNull };

// "an object", "an array", ...: for messages such as "expected an object, got a string".
const char* json_type_name(JsonType type);

// A number as written. Integers are kept exactly; anything with a fraction or an exponent is a
// float and kept only as text, since no safetensors field holds one.
struct JsonNumber {
  enum class Kind : uint8_t {
    kUnsigned,  // integer without a minus sign, in [0, 2^64): value in `u`
    kNegative,  // integer with a minus sign, in [-2^63, 0] ("-0" included): value in `i`
    kOverflow,  // integer outside both ranges
    kFloat,     // has a fraction or an exponent
  };
  Kind kind = Kind::kUnsigned;
  uint64_t u = 0;
  int64_t i = 0;
  std::string_view text;  // the literal, a view into the reader's text
  size_t offset = 0;      // where the literal starts
};

// Offset of the first byte that does not start a well-formed UTF-8 sequence (overlong forms,
// surrogates and code points above U+10FFFF are all ill-formed), or nullopt if the whole text is
// valid.
std::optional<size_t> find_invalid_utf8(std::string_view text);

// Reads one JSON document from `text`, which must be valid UTF-8 (check with find_invalid_utf8
// first: string contents are copied through as they are). Every method throws JsonSyntaxError
// when the text at the current position does not fit what it was asked to read.
//
// Walking an object:   r.begin_object(); while (r.next_key(&key)) { <read or skip one value> }
// Walking an array:    r.begin_array();  while (r.next_item())    { <read or skip one value> }
// A whole document:    <read or skip one value>; r.finish();
class JsonReader {
 public:
  explicit JsonReader(std::string_view text) : text_(text) {}

  // Type of the value that starts at the next non-whitespace byte, without consuming it.
  JsonType peek();
  // Byte offset of the next unread byte; after peek(), where the value starts.
  size_t offset() const { return pos_; }

  void begin_object();
  // Moves to the next member of the innermost object and stores its key (unless key is null);
  // returns false, having consumed the closing brace, when there is none.
  bool next_key(std::string* key);
  void begin_array();
  // Moves to the next item of the innermost array; returns false, having consumed the closing
  // bracket, when there is none.
  bool next_item();

  // Decodes a string value, escapes included.
  std::string read_string();
  JsonNumber read_number();
  bool read_bool();
  void read_null();
  // Consumes one value of any type, checking its syntax; iterative, so depth costs no stack.
  void skip_value();
  // Checks that only whitespace follows the top-level value.
  void finish();

 private:
  [[noreturn]] void fail(const std::string& description, size_t offset) const;
  void skip_whitespace();
  // Throws unless the next value is of type `want` (what a typed read needs before consuming).
  void expect_type(JsonType want);
  void open_container(bool is_object);
  // Scans a string starting at the opening quote; decodes it into out unless out is null.
  void scan_string(std::string* out);
  uint32_t read_hex4(size_t at);
  void read_literal(std::string_view literal);
  bool next_member(bool is_object, std::string* key);
  uint8_t& innermost() { return containers_[static_cast<size_t>(depth_ - 1)]; }

  std::string_view text_;
  size_t pos_ = 0;
  int depth_ = 0;
  // Per open container: bit 0 set for an object, bit 1 set once it has had a member, so that
  // next_key / next_item know whether a comma is due.
  std::array<uint8_t, kMaxJsonDepth> containers_{};
};

}  // namespace blob2gpu::detail
