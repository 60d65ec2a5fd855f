/*
 * kvattn_dlpack.h - the DLPack tensor ABI as kvattn reads it.
 *
 * kvattn takes tensors as DLPack `DLTensor` (DLPack 1.x ABI: the struct layout and the enum values
 * below are the interchange standard). If the including program already has the official
 * <dlpack/dlpack.h>, define KVATTN_USE_SYSTEM_DLPACK before including kvattn.h and that header is
 * used instead; both describe the same bytes.
 */
#ifndef KVATTN_DLPACK_H
#define KVATTN_DLPACK_H

#ifdef KVATTN_USE_SYSTEM_DLPACK
#include <dlpack/dlpack.h>
#elif !defined(DLPACK_EXTERN_C) && !defined(DLPACK_VERSION) && !defined(DLPACK_MAJOR_VERSION)

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Device types (values fixed by the DLPack standard). */
typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3, /* pinned host memory */
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17,
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

/* Type codes (values fixed by the DLPack standard, 1.1). */
typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
  kDLFloat8_e3m4 = 7U,
  kDLFloat8_e4m3 = 8U,
  kDLFloat8_e4m3b11fnuz = 9U,
  kDLFloat8_e4m3fn = 10U,
  kDLFloat8_e4m3fnuz = 11U,
  kDLFloat8_e5m2 = 12U,
  kDLFloat8_e5m2fnuz = 13U,
} DLDataTypeCode;

typedef struct {
  uint8_t code;   /* a DLDataTypeCode */
  uint8_t bits;
  uint16_t lanes; /* kvattn accepts lanes == 1 only */
} DLDataType;

typedef struct {
  void *data;             /* may be NULL when the tensor has no elements */
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t *shape;         /* [ndim] */
  int64_t *strides;       /* [ndim] in elements; NULL = compact row-major */
  uint64_t byte_offset;   /* added to data before use */
} DLTensor;

#ifdef __cplusplus
}
#endif

#endif /* system dlpack */
#endif /* KVATTN_DLPACK_H */
