/* tensor.c - DLTensor checks, dtypes, element access for the CPU backends. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

const DLDataType DT_F16 = {kDLFloat, 16, 1}, DT_BF16 = {kDLBfloat, 16, 1}, DT_F32 = {kDLFloat, 32, 1},
                 DT_F64 = {kDLFloat, 64, 1}, DT_I32 = {kDLInt, 32, 1}, DT_U8 = {kDLUInt, 8, 1},
                 DT_E4M3 = {kDLFloat8_e4m3fn, 8, 1}, DT_E5M2 = {kDLFloat8_e5m2, 8, 1};

int dtype_eq(DLDataType a, DLDataType b) { return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes; }
int dtype_is_unset(DLDataType a) { return a.code == 0 && a.bits == 0 && a.lanes == 0; }

size_t dtype_size(DLDataType a) {
  if (a.lanes != 1 || a.bits == 0 || a.bits % 8) return 0;
  return a.bits / 8;
}

const char *dtype_name(DLDataType a) {
  if (dtype_eq(a, DT_F16)) return "float16";
  if (dtype_eq(a, DT_BF16)) return "bfloat16";
  if (dtype_eq(a, DT_F32)) return "float32";
  if (dtype_eq(a, DT_F64)) return "float64";
  if (dtype_eq(a, DT_I32)) return "int32";
  if (dtype_eq(a, DT_U8)) return "uint8";
  if (dtype_eq(a, DT_E4M3)) return "float8_e4m3fn";
  if (dtype_eq(a, DT_E5M2)) return "float8_e5m2";
  static _Thread_local char buf[64];
  snprintf(buf, sizeof buf, "(code=%d, bits=%d, lanes=%d)", a.code, a.bits, a.lanes);
  return buf;
}

float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: value = man * 2^-24 */
      float f = (float)man * 5.9604644775390625e-8f;
      return sign ? -f : f;
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to >= 65520: inf */
  if (absx < 0x38800000u) { /* subnormal half or zero: round(value / 2^-24) to nearest even */
    float a;
    memcpy(&a, &absx, 4);
    float scaled = a * 16777216.0f; /* exact: power of two */
    uint32_t m = (uint32_t)scaled;
    float rem = scaled - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1))) m++;
    return (uint16_t)(sign | m);
  }
  uint32_t exp = ((absx >> 23) - 112) << 10, man = (absx >> 13) & 0x3ff;
  uint32_t h = exp | man, rest = absx & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
  return (uint16_t)(sign | h);
}

float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
  x += 0x7fff + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

double tview_get(const tview *t, int64_t off) {
  const char *p = t->data;
  switch (t->dtype.code) {
    case kDLFloat:
      if (t->dtype.bits == 16) return half_to_float(((const uint16_t *)p)[off]);
      if (t->dtype.bits == 32) return ((const float *)p)[off];
      return ((const double *)p)[off];
    case kDLBfloat: return bf16_to_float(((const uint16_t *)p)[off]);
    case kDLInt: return ((const int32_t *)p)[off];
    default: return NAN;
  }
}

void tview_set(const tview *t, int64_t off, double v) {
  char *p = t->data;
  switch (t->dtype.code) {
    case kDLFloat:
      if (t->dtype.bits == 16) ((uint16_t *)p)[off] = float_to_half((float)v);
      else if (t->dtype.bits == 32) ((float *)p)[off] = (float)v;
      else ((double *)p)[off] = v;
      break;
    case kDLBfloat: ((uint16_t *)p)[off] = float_to_bf16((float)v); break;
    default: break;
  }
}

/* The byte span [lo, hi) a view can touch. */
static void tview_span(const tview *t, uintptr_t *lo, uintptr_t *hi) {
  int64_t first = 0, last = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] == 0) { *lo = *hi = (uintptr_t)t->data; return; }
    int64_t e = (t->shape[i] - 1) * t->stride[i];
    if (e < 0) first += e; else last += e;
  }
  size_t es = dtype_size(t->dtype);
  *lo = (uintptr_t)t->data + (intptr_t)(first * (int64_t)es);
  *hi = (uintptr_t)t->data + (uintptr_t)((last + 1) * (int64_t)es);
}

int tview_overlap(const tview *a, const tview *b) {
  if (!a->data || !b->data) return 0;
  uintptr_t alo, ahi, blo, bhi;
  tview_span(a, &alo, &ahi);
  tview_span(b, &blo, &bhi);
  if (alo == ahi || blo == bhi) return 0;
  return alo < bhi && blo < ahi;
}

static const char *device_name(int type) {
  switch (type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda_host";
    case kDLCUDAManaged: return "cuda_managed";
    default: return "other";
  }
}

kvattn_status tensor_check(const DLTensor *t, const tensor_spec *sp, tview *out) {
  memset(out, 0, sizeof *out);
  RETURN_IF(!t, KVATTN_ERROR_INVALID_ARGUMENT, "%s: %s is NULL", sp->fn, sp->name);
  RETURN_IF(!dtype_eq(t->dtype, sp->dtype), KVATTN_ERROR_INVALID_DTYPE, "%s: %s has dtype %s, expected %s",
            sp->fn, sp->name, dtype_name(t->dtype), dtype_name(sp->dtype));
  RETURN_IF(t->ndim != sp->ndim, KVATTN_ERROR_INVALID_SHAPE, "%s: %s has ndim=%d, expected %d", sp->fn,
            sp->name, t->ndim, sp->ndim);
  RETURN_IF(t->ndim > 0 && !t->shape, KVATTN_ERROR_INVALID_SHAPE, "%s: %s has shape=NULL", sp->fn, sp->name);
  int64_t numel = 1;
  for (int i = 0; i < t->ndim; i++) {
    RETURN_IF(t->shape[i] < 0, KVATTN_ERROR_INVALID_SHAPE, "%s: %s.shape[%d]=%lld is negative", sp->fn,
              sp->name, i, (long long)t->shape[i]);
    RETURN_IF(sp->shape[i] >= 0 && t->shape[i] != sp->shape[i], KVATTN_ERROR_INVALID_SHAPE,
              "%s: %s.shape[%d]=%lld, expected %lld", sp->fn, sp->name, i, (long long)t->shape[i],
              (long long)sp->shape[i]);
    RETURN_IF(t->shape[i] > 0 && numel > INT64_MAX / t->shape[i], KVATTN_ERROR_INVALID_SHAPE,
              "%s: %s has more than 2^63 elements", sp->fn, sp->name);
    numel *= t->shape[i];
  }
  /* Device: CUDA tensors must be on the context's device; host tensors may be plain or pinned. */
  int dt = t->device.device_type;
  int ok_dev = sp->device_type == kDLCUDA ? (dt == kDLCUDA || dt == kDLCUDAManaged) && t->device.device_id == sp->device_id
                                          : (dt == kDLCPU || dt == kDLCUDAHost);
  RETURN_IF(!ok_dev, KVATTN_ERROR_DEVICE_MISMATCH, "%s: %s is on %s:%d, the context is on %s:%d", sp->fn,
            sp->name, device_name(dt), t->device.device_id, device_name(sp->device_type),
            sp->device_type == kDLCUDA ? sp->device_id : 0);
  out->dtype = t->dtype;
  out->ndim = t->ndim;
  out->device_type = dt;
  out->device_id = t->device.device_id;
  int64_t compact = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    out->shape[i] = t->shape[i];
    int64_t s = t->strides ? t->strides[i] : compact;
    /* A size-1 dimension is never stepped over: its stride is irrelevant (DLPack producers
     * disagree on what to put there). */
    if (t->shape[i] == 1) s = compact;
    RETURN_IF(s < 0, KVATTN_ERROR_INVALID_STRIDE, "%s: %s.strides[%d]=%lld is negative", sp->fn, sp->name, i,
              (long long)s);
    out->stride[i] = s;
    compact *= t->shape[i] ? t->shape[i] : 1;
  }
  if (numel > 0 && sp->inner_contiguous && t->ndim > 0 && t->shape[t->ndim - 1] > 1)
    RETURN_IF(out->stride[t->ndim - 1] != 1, KVATTN_ERROR_INVALID_STRIDE,
              "%s: %s.strides[%d]=%lld: the last dimension must be contiguous (stride 1)", sp->fn, sp->name,
              t->ndim - 1, (long long)out->stride[t->ndim - 1]);
  /* Strides of 0 over a dimension > 1 would alias elements; outputs must not. Inputs may
   * broadcast, but no serving system does that for KV, so reject for clarity. */
  for (int i = 0; i < t->ndim; i++)
    RETURN_IF(t->shape[i] > 1 && out->stride[i] == 0 && numel > 0, KVATTN_ERROR_INVALID_STRIDE,
              "%s: %s.strides[%d]=0 over a dimension of size %lld", sp->fn, sp->name, i, (long long)t->shape[i]);
  /* The farthest element, sum (shape-1)*stride elements, must be addressable in int64 bytes: a
   * stride past that is never a real view, and the address arithmetic would overflow. */
  if (numel > 0) {
    int64_t es = dtype_size(t->dtype) ? (int64_t)dtype_size(t->dtype) : 1, reach = 0;
    for (int i = 0; i < t->ndim; i++) {
      int64_t n = out->shape[i] - 1;
      RETURN_IF(n > 0 && out->stride[i] > (INT64_MAX / es - reach) / n, KVATTN_ERROR_INVALID_STRIDE,
                "%s: %s.strides[%d]=%lld reaches past 2^63 bytes", sp->fn, sp->name, i, (long long)out->stride[i]);
      reach += n * out->stride[i];
    }
  }
  if (numel == 0) {
    out->data = t->data ? (char *)t->data + t->byte_offset : NULL;
    return KVATTN_SUCCESS;
  }
  RETURN_IF(!t->data, KVATTN_ERROR_INVALID_ARGUMENT, "%s: %s.data is NULL for a tensor of %lld elements",
            sp->fn, sp->name, (long long)numel);
  char *p = (char *)t->data + t->byte_offset;
  size_t align = sp->align_bytes > 0 ? (size_t)sp->align_bytes : dtype_size(t->dtype);
  if (align > 1)
    RETURN_IF((uintptr_t)p % align != 0, KVATTN_ERROR_INVALID_STRIDE,
              "%s: %s data+byte_offset=%p is not aligned to %zu bytes", sp->fn, sp->name, (void *)p, align);
  out->data = p;
  return KVATTN_SUCCESS;
}
