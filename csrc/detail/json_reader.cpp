#include "detail/json_reader.hpp"

#include <cstdio>
#include <cstring>
#include <limits>

namespace blob2gpu::detail {
namespace {

constexpr uint8_t kIsObject = 1;
constexpr uint8_t kHasMember = 2;

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

bool is_whitespace(char c) {
  return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

// A byte as a message shows it: printable ASCII in quotes, anything else (control bytes, UTF-8
// lead bytes) in hex, so messages stay readable whatever the header holds.
std::string describe_byte(char c) {
  const auto b = static_cast<unsigned char>(c);
  if (b >= 0x20 && b < 0x7F) return std::string("'") + c + "'";
  char buf[16];
  std::snprintf(buf, sizeof(buf), "byte 0x%02X", b);
  return buf;
}

void append_utf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

JsonSyntaxError::JsonSyntaxError(const std::string& description, size_t offset)
    : std::runtime_error(description + " at byte " + std::to_string(offset)),
      description_(description),
      offset_(offset) {}

const char* json_type_name(JsonType type) {
  switch (type) {
    case JsonType::kObject:
      return "an object";
    case JsonType::kArray:
      return "an array";
    case JsonType::kString:
      return "a string";
    case JsonType::kNumber:
      return "a number";
    case JsonType::kBool:
      return "a boolean";
    case JsonType::kNull:
      return "null";
  }
  return "an unknown value";
}

std::optional<size_t> find_invalid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    // Headers are almost all ASCII: test eight bytes at a time for a set high bit.
    if (i + 8 <= n) {
      uint64_t word;
      std::memcpy(&word, s + i, 8);
      if ((word & 0x8080808080808080ULL) == 0) {
        i += 8;
        continue;
      }
    }
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    // Unicode table 3-7 (well-formed sequences): the lead byte fixes the length and the range of
    // the second byte, which is what excludes overlong forms, surrogates and values > U+10FFFF.
    size_t len = 0;
    unsigned char lo = 0x80;
    unsigned char hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c == 0xE0) {
      len = 3;
      lo = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
      len = 3;
    } else if (c == 0xED) {
      len = 3;
      hi = 0x9F;
    } else if (c == 0xF0) {
      len = 4;
      lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
      len = 4;
    } else if (c == 0xF4) {
      len = 4;
      hi = 0x8F;
    } else {
      return i;  // continuation byte without a lead, C0/C1 (overlong), or F5..FF
    }
    if (n - i < len || s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
    }
    i += len;
  }
  return std::nullopt;
}

void JsonReader::fail(const std::string& description, size_t offset) const {
  throw JsonSyntaxError(description, offset);
}

void JsonReader::skip_whitespace() {
  while (pos_ < text_.size() && is_whitespace(text_[pos_])) ++pos_;
}

JsonType JsonReader::peek() {
  skip_whitespace();
  if (pos_ >= text_.size()) fail("unexpected end of text, expected a value", pos_);
  const char c = text_[pos_];
  switch (c) {
    case '{':
      return JsonType::kObject;
    case '[':
      return JsonType::kArray;
    case '"':
      return JsonType::kString;
    case 't':
    case 'f':
      return JsonType::kBool;
    case 'n':
      return JsonType::kNull;
    default:
      if (c == '-' || is_digit(c)) return JsonType::kNumber;
      fail("unexpected " + describe_byte(c) + ", expected a value", pos_);
  }
}

void JsonReader::expect_type(JsonType want) {
  const JsonType got = peek();
  if (got != want) {
    fail(std::string("expected ") + json_type_name(want) + ", got " + json_type_name(got), pos_);
  }
}

void JsonReader::open_container(bool is_object) {
  if (depth_ >= kMaxJsonDepth) {
    fail("nesting deeper than " + std::to_string(kMaxJsonDepth) + " levels", pos_);
  }
  containers_[static_cast<size_t>(depth_)] = is_object ? kIsObject : 0;
  ++depth_;
  ++pos_;
}

void JsonReader::begin_object() {
  expect_type(JsonType::kObject);
  open_container(true);
}

void JsonReader::begin_array() {
  expect_type(JsonType::kArray);
  open_container(false);
}

bool JsonReader::next_key(std::string* key) {
  return next_member(true, key);
}

bool JsonReader::next_item() {
  return next_member(false, nullptr);
}

bool JsonReader::next_member(bool is_object, std::string* key) {
  if (depth_ == 0 || ((innermost() & kIsObject) != 0) != is_object) {
    // A caller bug, not bad input: the walk does not match the containers it opened.
    throw std::logic_error(is_object ? "JsonReader::next_key outside an object"
                                     : "JsonReader::next_item outside an array");
  }
  uint8_t& state = innermost();
  const char close = is_object ? '}' : ']';
  skip_whitespace();
  if (pos_ >= text_.size()) {
    fail(std::string("unexpected end of text inside ") + (is_object ? "an object" : "an array"),
         pos_);
  }
  if (text_[pos_] == close) {
    ++pos_;
    --depth_;
    return false;
  }
  if ((state & kHasMember) != 0) {
    if (text_[pos_] != ',') {
      fail("unexpected " + describe_byte(text_[pos_]) + ", expected ',' or '" + close + "'", pos_);
    }
    ++pos_;
    skip_whitespace();
  }
  state |= kHasMember;
  if (!is_object) return true;  // a trailing comma shows up as a missing value when it is read

  if (pos_ >= text_.size() || text_[pos_] != '"') {
    fail(pos_ >= text_.size()
             ? std::string("unexpected end of text, expected an object key")
             : "unexpected " + describe_byte(text_[pos_]) + ", expected a string as object key",
         pos_);
  }
  if (key != nullptr) key->clear();
  scan_string(key);
  skip_whitespace();
  if (pos_ >= text_.size() || text_[pos_] != ':') {
    fail("expected ':' after an object key", pos_);
  }
  ++pos_;
  return true;
}

uint32_t JsonReader::read_hex4(size_t at) {
  if (text_.size() - at < 4) fail("truncated \\u escape", at);
  uint32_t value = 0;
  for (size_t k = 0; k < 4; ++k) {
    const char c = text_[at + k];
    uint32_t digit;
    if (c >= '0' && c <= '9') {
      digit = static_cast<uint32_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      digit = static_cast<uint32_t>(c - 'a' + 10);
    } else if (c >= 'A' && c <= 'F') {
      digit = static_cast<uint32_t>(c - 'A' + 10);
    } else {
      fail("invalid hex digit " + describe_byte(c) + " in a \\u escape", at + k);
    }
    value = value * 16 + digit;
  }
  return value;
}

void JsonReader::scan_string(std::string* out) {
  const size_t start = pos_;
  const size_t n = text_.size();
  ++pos_;  // the opening quote, checked by the caller
  while (true) {
    // Copy runs of plain bytes in one append: names are long and escapes are rare.
    const size_t run = pos_;
    while (pos_ < n) {
      const auto c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"' || c == '\\' || c < 0x20) break;
      ++pos_;
    }
    if (out != nullptr) out->append(text_.data() + run, pos_ - run);
    if (pos_ >= n) fail("unterminated string", start);
    const char c = text_[pos_];
    if (c == '"') {
      ++pos_;
      return;
    }
    if (c != '\\') fail("raw control character " + describe_byte(c) + " in a string", pos_);

    const size_t escape = pos_;
    if (n - pos_ < 2) fail("unterminated string", start);
    const char e = text_[pos_ + 1];
    pos_ += 2;
    char simple = 0;
    switch (e) {
      case '"':
        simple = '"';
        break;
      case '\\':
        simple = '\\';
        break;
      case '/':
        simple = '/';
        break;
      case 'b':
        simple = '\b';
        break;
      case 'f':
        simple = '\f';
        break;
      case 'n':
        simple = '\n';
        break;
      case 'r':
        simple = '\r';
        break;
      case 't':
        simple = '\t';
        break;
      case 'u': {
        uint32_t cp = read_hex4(pos_);
        pos_ += 4;
        if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate in a \\u escape", escape);
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          // UTF-16 pair: the high half must be followed at once by an escaped low half.
          if (n - pos_ < 2 || text_[pos_] != '\\' || text_[pos_ + 1] != 'u') {
            fail("unpaired high surrogate in a \\u escape", escape);
          }
          const uint32_t low = read_hex4(pos_ + 2);
          if (low < 0xDC00 || low > 0xDFFF) {
            fail("high surrogate not followed by a low surrogate in a \\u escape", escape);
          }
          pos_ += 6;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        }
        if (out != nullptr) append_utf8(out, cp);
        continue;
      }
      default:
        fail("invalid escape '\\' followed by " + describe_byte(e), escape);
    }
    if (out != nullptr) out->push_back(simple);
  }
}

std::string JsonReader::read_string() {
  expect_type(JsonType::kString);
  std::string out;
  scan_string(&out);
  return out;
}

JsonNumber JsonReader::read_number() {
  expect_type(JsonType::kNumber);
  const size_t n = text_.size();
  const size_t start = pos_;
  const bool negative = text_[pos_] == '-';
  if (negative) ++pos_;
  if (pos_ >= n || !is_digit(text_[pos_])) fail("expected a digit after '-'", pos_);

  uint64_t magnitude = 0;
  bool overflow = false;
  if (text_[pos_] == '0') {
    ++pos_;
    if (pos_ < n && is_digit(text_[pos_])) fail("leading zeros are not allowed in numbers", start);
  } else {
    while (pos_ < n && is_digit(text_[pos_])) {
      const auto digit = static_cast<uint64_t>(text_[pos_] - '0');
      // Keep scanning after an overflow so the literal is consumed whole.
      if (!overflow && magnitude > (std::numeric_limits<uint64_t>::max() - digit) / 10) {
        overflow = true;
      }
      if (!overflow) magnitude = magnitude * 10 + digit;
      ++pos_;
    }
  }
  bool is_float = false;
  if (pos_ < n && text_[pos_] == '.') {
    is_float = true;
    ++pos_;
    if (pos_ >= n || !is_digit(text_[pos_])) fail("expected a digit after the decimal point", pos_);
    while (pos_ < n && is_digit(text_[pos_])) ++pos_;
  }
  if (pos_ < n && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
    is_float = true;
    ++pos_;
    if (pos_ < n && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
    if (pos_ >= n || !is_digit(text_[pos_])) fail("expected a digit in the exponent", pos_);
    while (pos_ < n && is_digit(text_[pos_])) ++pos_;
  }

  JsonNumber number;
  number.text = text_.substr(start, pos_ - start);
  number.offset = start;
  constexpr uint64_t kMinInt64Magnitude = uint64_t{1} << 63;
  if (is_float) {
    number.kind = JsonNumber::Kind::kFloat;
  } else if (overflow || (negative && magnitude > kMinInt64Magnitude)) {
    number.kind = JsonNumber::Kind::kOverflow;
  } else if (negative) {
    number.kind = JsonNumber::Kind::kNegative;
    // -2^63 has no positive int64 counterpart, so negate in unsigned arithmetic.
    number.i = magnitude == kMinInt64Magnitude ? std::numeric_limits<int64_t>::min()
                                               : -static_cast<int64_t>(magnitude);
  } else {
    number.kind = JsonNumber::Kind::kUnsigned;
    number.u = magnitude;
  }
  return number;
}

void JsonReader::read_literal(std::string_view literal) {
  if (text_.substr(pos_, literal.size()) != literal) {
    fail("invalid literal, expected '" + std::string(literal) + "'", pos_);
  }
  pos_ += literal.size();
}

bool JsonReader::read_bool() {
  expect_type(JsonType::kBool);
  if (text_[pos_] == 't') {
    read_literal("true");
    return true;
  }
  read_literal("false");
  return false;
}

void JsonReader::read_null() {
  expect_type(JsonType::kNull);
  read_literal("null");
}

void JsonReader::skip_value() {
  const int base = depth_;
  do {
    switch (peek()) {
      case JsonType::kObject:
        open_container(true);
        break;
      case JsonType::kArray:
        open_container(false);
        break;
      case JsonType::kString:
        scan_string(nullptr);
        break;
      case JsonType::kNumber:
        read_number();
        break;
      case JsonType::kBool:
        read_bool();
        break;
      case JsonType::kNull:
        read_null();
        break;
    }
    // Move to the next value still inside what we are skipping, closing finished containers.
    while (depth_ > base) {
      const bool in_object = (innermost() & kIsObject) != 0;
      if (next_member(in_object, nullptr)) break;
    }
  } while (depth_ > base);
}

void JsonReader::finish() {
  skip_whitespace();
  if (pos_ < text_.size()) {
    fail("unexpected " + describe_byte(text_[pos_]) + " after the end of the JSON value", pos_);
  }
}

}  // namespace blob2gpu::detail
