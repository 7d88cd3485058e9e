#include "errors.hpp"

namespace blob2gpu {

// The Python layer looks exception classes up by these names, so each must spell its enumerator.
const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::HeaderTooLarge:
      return "HeaderTooLarge";
    case ErrorKind::HeaderTruncated:
      return "HeaderTruncated";
    case ErrorKind::HeaderNotUtf8:
      return "HeaderNotUtf8";
    case ErrorKind::HeaderNotJson:
      return "HeaderNotJson";
    case ErrorKind::InvalidTensorEntry:
      return "InvalidTensorEntry";
    case ErrorKind::UnknownDType:
      return "UnknownDType";
    case ErrorKind::InvalidShape:
      return "InvalidShape";
    case ErrorKind::InvalidOffsets:
      return "InvalidOffsets";
    case ErrorKind::TensorSizeMismatch:
      return "TensorSizeMismatch";
    case ErrorKind::DuplicateTensor:
      return "DuplicateTensor";
    case ErrorKind::InvalidMetadata:
      return "InvalidMetadata";
    case ErrorKind::SourceUnavailable:
      return "SourceUnavailable";
    case ErrorKind::SourceReadError:
      return "SourceReadError";
    case ErrorKind::PinnedMemoryUnavailable:
      return "PinnedMemoryUnavailable";
    case ErrorKind::GPUOutOfMemory:
      return "GPUOutOfMemory";
    case ErrorKind::ChecksumMismatch:
      return "ChecksumMismatch";
    case ErrorKind::HostOutOfMemory:
      return "HostOutOfMemory";
    case ErrorKind::CudaDriverUnavailable:
      return "CudaDriverUnavailable";
    case ErrorKind::CudaError:
      return "CudaError";
    case ErrorKind::DTypeNotSupported:
      return "DTypeNotSupported";
    case ErrorKind::InvalidArgument:
      return "InvalidArgument";
    case ErrorKind::LoadCancelled:
      return "LoadCancelled";
  }
  // No default above, so -Wswitch flags a new enumerator left out; this only covers a value cast
  // from an out-of-range integer.
  return "UnknownErrorKind";
}

}  // namespace blob2gpu
