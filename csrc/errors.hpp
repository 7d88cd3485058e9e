// The one exception type the core throws. Its kind names the diagnosis; the Python layer maps each
// kind to a class under blob2gpu.errors.Blob2GpuError (see python/blob2gpu/errors.py).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace blob2gpu {

enum class ErrorKind {
  // The safetensors header (all are InvalidHeader in Python).
  HeaderTooLarge,      // declared length over the cap
  HeaderTruncated,     // file shorter than 8 bytes, or length points past the end of the file
  HeaderNotUtf8,       // header bytes are not valid UTF-8
  HeaderNotJson,       // not JSON, or JSON that is not an object
  InvalidTensorEntry,  // entry is not an object with dtype, shape, data_offsets of the right types
  UnknownDType,        // dtype string not in the table
  InvalidShape,        // shape not a list of non-negative integers, or numel overflows
  InvalidOffsets,      // offsets unsorted, overlapping, gapped, or not covering the data region
  TensorSizeMismatch,  // end - begin != numel x dtype size
  DuplicateTensor,     // the same name twice
  InvalidMetadata,     // __metadata__ not a map of strings
  // Sources.
  SourceUnavailable,  // a file could not be opened or stat'ed
  SourceReadError,    // a read failed or came back short
  // Memory and devices.
  PinnedMemoryUnavailable,  // pinned staging could not be allocated and fallback is off
  GPUOutOfMemory,           // a device allocation failed during the load
  HostOutOfMemory,          // a host allocation for a cpu-target arena failed
  CudaDriverUnavailable,    // libcuda could not be loaded or has no device
  CudaError,                // any other driver error
  // Integrity.
  ChecksumMismatch,  // bytes differ from the manifest's checksum
  // Export and arguments.
  DTypeNotSupported,  // a consumer cannot take this dtype
  InvalidArgument,    // a caller error (bad setting, bad device string, ...)
  LoadCancelled,      // the load was cancelled or the pipeline was closed under it
};

const char* error_kind_name(ErrorKind kind);

// Besides the message (for people), an error names what code needs: the shard it concerns (empty
// when none), the byte offset in that shard (-1 when none) and, for the kinds that have one, a
// code (-1 when none; CudaDriverUnavailable: its DriverStatus, shim/cuda_driver.hpp). Python reads
// them as the error's `shard`, `offset` and `driver_status` fields.
class CoreError : public std::runtime_error {
 public:
  CoreError(ErrorKind kind, const std::string& message, std::string shard = {}, int64_t offset = -1,
            int code = -1)
      : std::runtime_error(message),
        kind_(kind),
        shard_(std::move(shard)),
        offset_(offset),
        code_(code) {}
  // What to check or change, said after the message (Python's error.hint): `throw
  // CoreError(...).with_hint("free GPU memory")`.
  CoreError& with_hint(std::string hint) {
    hint_ = std::move(hint);
    return *this;
  }
  ErrorKind kind() const { return kind_; }
  const std::string& shard() const { return shard_; }
  int64_t offset() const { return offset_; }
  int code() const { return code_; }
  const std::string& hint() const { return hint_; }

 private:
  ErrorKind kind_;
  std::string shard_;
  int64_t offset_;
  int code_;
  std::string hint_;
};

}  // namespace blob2gpu
