/*
 * test_tensor.c - dtypes, the f16/bf16 conversions, and the DLTensor checks (src/tensor.c).
 *
 * The conversions are pinned down against independent oracles: exact powers of two computed with
 * ldexp, the midpoint between every pair of adjacent representable values (round-to-nearest-even
 * must pick the even one, and the next float either side must go to its side), the compiler's
 * _Float16 where it has one, and an exhaustive round trip of all 65536 bit patterns.
 * The tensor checks: strides NULL vs explicit, size-1 dimensions with any stride, zero-size tensors
 * with data NULL, and each bad tensor's status.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"
#include "test.h"

static uint32_t f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static float u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* ---------------------------------------------------------------- dtypes */

TEST(dtype_names_of_known_types) {
  CHECK(strcmp(dtype_name(DT_F16), "float16") == 0);
  CHECK(strcmp(dtype_name(DT_BF16), "bfloat16") == 0);
  CHECK(strcmp(dtype_name(DT_F32), "float32") == 0);
  CHECK(strcmp(dtype_name(DT_F64), "float64") == 0);
  CHECK(strcmp(dtype_name(DT_I32), "int32") == 0);
  CHECK(strcmp(dtype_name(DT_U8), "uint8") == 0);
  CHECK(strcmp(dtype_name(DT_E4M3), "float8_e4m3fn") == 0);
  CHECK(strcmp(dtype_name(DT_E5M2), "float8_e5m2") == 0);
}

TEST(dtype_name_of_unknown_type_spells_out_its_fields) {
  DLDataType odd = {kDLComplex, 64, 1}, lanes = {kDLFloat, 16, 4};
  CHECK(strcmp(dtype_name(odd), "(code=5, bits=64, lanes=1)") == 0);
  CHECK(strcmp(dtype_name(lanes), "(code=2, bits=16, lanes=4)") == 0);
}

TEST(dtype_sizes) {
  CHECK(dtype_size(DT_F16) == 2 && dtype_size(DT_BF16) == 2);
  CHECK(dtype_size(DT_F32) == 4 && dtype_size(DT_I32) == 4);
  CHECK(dtype_size(DT_F64) == 8);
  CHECK(dtype_size(DT_U8) == 1 && dtype_size(DT_E4M3) == 1);
  CHECK(dtype_size((DLDataType){kDLFloat, 32, 2}) == 0);  /* vector lanes are not supported */
  CHECK(dtype_size((DLDataType){kDLInt, 4, 1}) == 0);     /* sub-byte */
  CHECK(dtype_size((DLDataType){kDLFloat, 0, 1}) == 0);
}

TEST(dtype_equality_and_unset) {
  CHECK(dtype_eq(DT_F16, (DLDataType){kDLFloat, 16, 1}));
  CHECK(!dtype_eq(DT_F16, DT_BF16));
  CHECK(!dtype_eq(DT_F32, (DLDataType){kDLFloat, 32, 2}));
  CHECK(dtype_is_unset((DLDataType){0, 0, 0}));
  CHECK(!dtype_is_unset((DLDataType){kDLInt, 8, 1}));
}

TEST(dlpack_structs_have_the_standard_abi) {
  /* callers hand us DLTensors built by other libraries (and by ctypes): the layout is the
   * interchange standard's, on LP64 */
  CHECK(sizeof(DLDataType) == 4 && sizeof(DLDevice) == 8);
  CHECK(sizeof(DLTensor) == 48);
  CHECK(offsetof(DLTensor, data) == 0 && offsetof(DLTensor, device) == 8 && offsetof(DLTensor, ndim) == 16);
  CHECK(offsetof(DLTensor, dtype) == 20 && offsetof(DLTensor, shape) == 24 && offsetof(DLTensor, strides) == 32);
  CHECK(offsetof(DLTensor, byte_offset) == 40);
  CHECK(kDLCPU == 1 && kDLCUDA == 2 && kDLCUDAHost == 3 && kDLCUDAManaged == 13 && kDLROCM == 10);
  CHECK(kDLInt == 0 && kDLUInt == 1 && kDLFloat == 2 && kDLBfloat == 4);
  CHECK(kDLFloat8_e4m3fn == 10 && kDLFloat8_e5m2 == 12);
}

/* ---------------------------------------------------------------- half precision */

/* The value of a half bit pattern, computed independently with ldexp (finite patterns only). */
static double half_value(uint16_t h) {
  int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  double v = exp ? ldexp(1.0 + man / 1024.0, exp - 15) : ldexp(man, -24);
  return sign ? -v : v;
}

TEST(half_to_float_matches_the_format_definition_for_every_pattern) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = half_to_float((uint16_t)h);
    int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) {
      CHECK_MSG(man ? isnan(f) : isinf(f), "pattern 0x%04x gave %g", h, f);
      CHECK(!!signbit(f) == ((h & 0x8000) != 0));
    } else {
      CHECK_MSG((double)f == half_value((uint16_t)h), "pattern 0x%04x gave %.9g, want %.9g", h, f,
                half_value((uint16_t)h));
      CHECK(!!signbit(f) == ((h & 0x8000) != 0)); /* -0 stays -0 */
    }
  }
}

TEST(half_round_trip_of_all_65536_patterns) {
  int nans = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    uint16_t back = float_to_half(half_to_float((uint16_t)h));
    int is_nan = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff);
    if (is_nan) {
      /* NaN stays NaN (payload may be quieted) with its sign */
      CHECK_MSG(((back >> 10) & 0x1f) == 0x1f && (back & 0x3ff) && (back & 0x8000) == (h & 0x8000),
                "NaN 0x%04x came back as 0x%04x", h, back);
      nans++;
    } else {
      CHECK_MSG(back == h, "0x%04x came back as 0x%04x", h, back);
    }
  }
  CHECK(nans == 2 * 1023);
}

TEST(half_rounds_midpoints_to_even_and_neighbours_to_their_side) {
  /* every adjacent pair of finite non-negative halves (a, b = a+1 in bits), subnormals included,
   * and the pair (max finite, infinity) whose midpoint is 65520 */
  for (uint32_t a = 0; a < 0x7c00; a++) {
    uint32_t b = a + 1;
    double lo = half_value((uint16_t)a), hi = b == 0x7c00 ? 65536.0 : half_value((uint16_t)b);
    float mid = (float)((lo + hi) / 2); /* exact: 12 significant bits */
    CHECK((double)mid == (lo + hi) / 2);
    uint16_t even = (a & 1) ? (uint16_t)b : (uint16_t)a;
    CHECK_MSG(float_to_half(mid) == even, "midpoint %.10g of 0x%04x/0x%04x gave 0x%04x", mid, a, b,
              float_to_half(mid));
    CHECK_MSG(float_to_half(nextafterf(mid, 0.0f)) == a, "just below the midpoint of 0x%04x", a);
    CHECK_MSG(float_to_half(nextafterf(mid, INFINITY)) == b, "just above the midpoint of 0x%04x", a);
    /* and the negative side mirrors it */
    CHECK(float_to_half(-mid) == (even | 0x8000));
  }
}

TEST(half_special_values) {
  CHECK(float_to_half(0.0f) == 0x0000);
  CHECK(float_to_half(-0.0f) == 0x8000);
  CHECK(float_to_half(INFINITY) == 0x7c00);
  CHECK(float_to_half(-INFINITY) == 0xfc00);
  CHECK(float_to_half(65504.0f) == 0x7bff);
  CHECK(float_to_half(65519.99f) == 0x7bff);
  CHECK(float_to_half(65520.0f) == 0x7c00); /* the midpoint to "65536" rounds to even: infinity */
  CHECK(float_to_half(1e30f) == 0x7c00);
  CHECK(float_to_half(-FLT_MAX) == 0xfc00);
  CHECK(float_to_half(ldexpf(1.0f, -24)) == 0x0001); /* smallest subnormal */
  CHECK(float_to_half(ldexpf(1.0f, -25)) == 0x0000); /* half of it: ties to even (0) */
  CHECK(float_to_half(ldexpf(1.5f, -25)) == 0x0001);
  CHECK(float_to_half(ldexpf(1.0f, -14)) == 0x0400); /* smallest normal */
  CHECK(float_to_half(ldexpf(1023.0f, -24)) == 0x03ff); /* largest subnormal */
  CHECK(float_to_half(1e-30f) == 0x0000);
  CHECK(float_to_half(-1e-30f) == 0x8000);
  CHECK(float_to_half(FLT_TRUE_MIN) == 0x0000);
  uint16_t n = float_to_half(NAN), sn = float_to_half(u2f(0x7f800001u)), neg = float_to_half(-NAN);
  CHECK((n & 0x7c00) == 0x7c00 && (n & 0x3ff));
  CHECK_MSG((sn & 0x7c00) == 0x7c00 && (sn & 0x3ff), "signalling NaN with a low payload became 0x%04x", sn);
  CHECK((neg & 0x8000) && (neg & 0x3ff));
  CHECK(float_to_half(1.0f) == 0x3c00 && float_to_half(-2.0f) == 0xc000);
  CHECK(float_to_half(0.1f) == 0x2e66);
}

#if defined(__FLT16_MAX__) && !defined(__cplusplus)
TEST(half_agrees_with_the_compilers_float16_on_sampled_floats) {
  /* 2^22 float bit patterns spread over the whole range (both signs) plus every float whose
   * exponent is near the half range, exhaustively in the low mantissa bits */
  uint32_t state = 2463534242u;
  for (int i = 0; i < (1 << 22); i++) {
    state ^= state << 13, state ^= state >> 17, state ^= state << 5;
    float f = u2f(state);
    if (isnan(f)) continue;
    _Float16 c = (_Float16)f;
    uint16_t want;
    memcpy(&want, &c, 2);
    CHECK_MSG(float_to_half(f) == want, "float 0x%08x (%.9g): got 0x%04x, compiler 0x%04x", state, f,
              float_to_half(f), want);
  }
  for (uint32_t e = 100; e < 145; e++)
    for (uint32_t m = 0; m < (1u << 23); m += 97) {
      float f = u2f(e << 23 | m);
      _Float16 c = (_Float16)f;
      uint16_t want;
      memcpy(&want, &c, 2);
      CHECK_MSG(float_to_half(f) == want, "float 0x%08x: got 0x%04x, compiler 0x%04x", e << 23 | m, float_to_half(f),
                want);
    }
}
#endif

/* ---------------------------------------------------------------- bfloat16 */

TEST(bf16_round_trip_of_all_65536_patterns) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = bf16_to_float((uint16_t)h);
    CHECK(f2u(f) == h << 16); /* bf16 is the top half of a float */
    uint16_t back = float_to_bf16(f);
    int is_nan = ((h >> 7) & 0xff) == 0xff && (h & 0x7f);
    if (is_nan)
      CHECK_MSG(((back >> 7) & 0xff) == 0xff && (back & 0x7f) && (back & 0x8000) == (h & 0x8000),
                "NaN 0x%04x came back as 0x%04x", h, back);
    else
      CHECK_MSG(back == h, "0x%04x came back as 0x%04x", h, back);
  }
}

TEST(bf16_rounds_midpoints_to_even_and_neighbours_to_their_side) {
  for (uint32_t a = 0; a < 0x7f80; a++) {
    uint32_t b = a + 1; /* b == 0x7f80 is infinity: the midpoint past the max rounds up to it */
    float mid = u2f((a << 16) | 0x8000); /* exactly halfway between a and b */
    uint16_t even = (a & 1) ? (uint16_t)b : (uint16_t)a;
    CHECK_MSG(float_to_bf16(mid) == even, "midpoint of 0x%04x/0x%04x gave 0x%04x", a, b, float_to_bf16(mid));
    CHECK(float_to_bf16(u2f((a << 16) | 0x7fff)) == a);
    CHECK(float_to_bf16(u2f((a << 16) | 0x8001)) == b);
    CHECK(float_to_bf16(u2f((a << 16) | 0x8000 | 0x80000000u)) == (even | 0x8000));
  }
}

TEST(bf16_special_values) {
  CHECK(float_to_bf16(0.0f) == 0x0000 && float_to_bf16(-0.0f) == 0x8000);
  CHECK(float_to_bf16(INFINITY) == 0x7f80 && float_to_bf16(-INFINITY) == 0xff80);
  CHECK(float_to_bf16(FLT_MAX) == 0x7f80); /* beyond bf16's max + half an ulp */
  CHECK(float_to_bf16(u2f(0x7f7f7fffu)) == 0x7f7f);
  CHECK(float_to_bf16(FLT_TRUE_MIN) == 0x0000); /* float subnormals round like the rest */
  CHECK(float_to_bf16(u2f(0x00008000u)) == 0x0000);
  CHECK(float_to_bf16(u2f(0x00018000u)) == 0x0002);
  uint16_t sn = float_to_bf16(u2f(0x7f800001u)); /* a NaN whose payload lives in the dropped half */
  CHECK_MSG((sn & 0x7f80) == 0x7f80 && (sn & 0x7f), "signalling NaN became 0x%04x (infinity?)", sn);
  uint16_t nn = float_to_bf16(u2f(0xffc00000u));
  CHECK((nn & 0x8000) && (nn & 0x7f));
  CHECK(float_to_bf16(1.0f) == 0x3f80 && float_to_bf16(3.140625f) == 0x4049);
}

/* ---------------------------------------------------------------- element access */

TEST(tview_get_and_set_in_every_float_dtype) {
  const DLDataType types[] = {DT_F16, DT_BF16, DT_F32, DT_F64};
  for (int t = 0; t < 4; t++) {
    double buf[4] = {0};
    tview v;
    memset(&v, 0, sizeof v);
    v.data = (char *)buf;
    v.dtype = types[t];
    v.ndim = 1;
    v.shape[0] = 4;
    v.stride[0] = 1;
    tview_set(&v, 0, 1.5);
    tview_set(&v, 1, -0.25);
    tview_set(&v, 2, 1.0 / 3.0);
    tview_set(&v, 3, -INFINITY);
    CHECK(tview_get(&v, 0) == 1.5 && tview_get(&v, 1) == -0.25);
    CHECK(tview_get(&v, 3) == -INFINITY);
    double third = tview_get(&v, 2), err = fabs(third - 1.0 / 3.0);
    double tol = t == 0 ? 1.0 / 4096 : t == 1 ? 1.0 / 512 : t == 2 ? 1e-7 : 0;
    CHECK_MSG(err <= tol, "%s: 1/3 read back as %.17g", dtype_name(types[t]), third);
  }
}

/* ---------------------------------------------------------------- tensor_check */

static tensor_spec spec3(int64_t d0, int64_t d1, int64_t d2) {
  tensor_spec sp;
  memset(&sp, 0, sizeof sp);
  sp.fn = "test";
  sp.name = "x";
  sp.ndim = 3;
  for (int i = 0; i < TVIEW_MAX_DIMS; i++) sp.shape[i] = -1;
  sp.shape[0] = d0;
  sp.shape[1] = d1;
  sp.shape[2] = d2;
  sp.dtype = DT_F32;
  sp.device_type = kDLCPU;
  return sp;
}

static float store[4096] __attribute__((aligned(64)));

static DLTensor tensor3(int64_t *shape, int64_t *strides) {
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = store;
  t.device.device_type = kDLCPU;
  t.ndim = 3;
  t.dtype = DT_F32;
  t.shape = shape;
  t.strides = strides;
  return t;
}

TEST(null_strides_mean_compact_row_major) {
  int64_t shape[] = {3, 4, 5}, strides[] = {20, 5, 1};
  DLTensor a = tensor3(shape, NULL), b = tensor3(shape, strides);
  tensor_spec sp = spec3(3, 4, 5);
  tview va, vb;
  CHECK_OK(tensor_check(&a, &sp, &va));
  CHECK_OK(tensor_check(&b, &sp, &vb));
  CHECK(va.stride[0] == 20 && va.stride[1] == 5 && va.stride[2] == 1);
  CHECK(memcmp(&va, &vb, sizeof va) == 0);
  CHECK(va.data == (char *)store && va.ndim == 3 && va.shape[1] == 4);
}

TEST(explicit_non_compact_strides_are_kept) {
  int64_t shape[] = {3, 4, 5}, strides[] = {1, 3, 12}; /* column-major view */
  DLTensor a = tensor3(shape, strides);
  tensor_spec sp = spec3(-1, -1, -1);
  tview v;
  CHECK_OK(tensor_check(&a, &sp, &v));
  CHECK(v.stride[0] == 1 && v.stride[1] == 3 && v.stride[2] == 12);
  /* with inner_contiguous the same view is refused (the GPU's vector loads) */
  sp.inner_contiguous = 1;
  CHECK_STATUS(tensor_check(&a, &sp, &v), KVATTN_ERROR_INVALID_STRIDE);
  CHECK(strstr(kvattn_last_error(), "x.strides[2]=12"));
}

TEST(size_one_dimensions_accept_any_stride) {
  int64_t shape[] = {3, 1, 5}, odd[] = {5, 12345, 1}, neg[] = {5, -7, 1}, zero[] = {5, 0, 1};
  tensor_spec sp = spec3(3, 1, 5);
  tview v;
  int64_t *all[] = {odd, neg, zero};
  for (int i = 0; i < 3; i++) {
    DLTensor t = tensor3(shape, all[i]);
    CHECK_OK(tensor_check(&t, &sp, &v));
    CHECK(v.stride[0] == 5 && v.stride[2] == 1);
  }
  /* a size-1 last dimension with an odd stride passes inner_contiguous too */
  int64_t shape2[] = {4, 2, 1}, st2[] = {2, 1, 99};
  DLTensor t = tensor3(shape2, st2);
  tensor_spec sp2 = spec3(4, 2, 1);
  sp2.inner_contiguous = 1;
  CHECK_OK(tensor_check(&t, &sp2, &v));
}

TEST(zero_size_tensor_with_null_data_is_accepted) {
  int64_t shape[] = {0, 4, 8};
  DLTensor t = tensor3(shape, NULL);
  t.data = NULL;
  tensor_spec sp = spec3(0, 4, 8);
  tview v;
  CHECK_OK(tensor_check(&t, &sp, &v));
  CHECK(v.data == NULL && v.shape[0] == 0);
  /* with data and an offset given, the offset is applied even though nothing is read */
  t.data = store;
  t.byte_offset = 8;
  CHECK_OK(tensor_check(&t, &sp, &v));
  CHECK(v.data == (char *)store + 8);
  /* an empty tensor may even carry a zero stride or odd alignment: nothing is addressed */
  int64_t st[] = {32, 0, 1};
  t.strides = st;
  t.byte_offset = 1;
  CHECK_OK(tensor_check(&t, &sp, &v));
}

TEST(byte_offset_is_added_to_data) {
  int64_t shape[] = {2, 2, 2};
  DLTensor t = tensor3(shape, NULL);
  t.byte_offset = 64;
  tensor_spec sp = spec3(2, 2, 2);
  tview v;
  CHECK_OK(tensor_check(&t, &sp, &v));
  CHECK(v.data == (char *)store + 64);
  t.byte_offset = 6; /* not a multiple of 4 */
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_STRIDE);
  CHECK(strstr(kvattn_last_error(), "not aligned to 4 bytes"));
  sp.align_bytes = 16; /* a spec may ask for more (vector loads) */
  t.byte_offset = 8;
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_STRIDE);
  CHECK(strstr(kvattn_last_error(), "16 bytes"));
}

TEST(tensor_check_statuses) {
  int64_t shape[] = {2, 3, 4};
  tensor_spec sp = spec3(2, 3, 4);
  tview v;
  CHECK_STATUS(tensor_check(NULL, &sp, &v), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(kvattn_last_error(), "test: x is NULL"));

  DLTensor t = tensor3(shape, NULL);
  t.dtype = DT_F16;
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_DTYPE);
  CHECK(strstr(kvattn_last_error(), "x has dtype float16, expected float32"));

  t = tensor3(shape, NULL);
  t.ndim = 2;
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_SHAPE);

  t = tensor3(NULL, NULL);
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_SHAPE);
  CHECK(strstr(kvattn_last_error(), "shape=NULL"));

  int64_t neg[] = {2, -3, 4};
  t = tensor3(neg, NULL);
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_SHAPE);
  CHECK(strstr(kvattn_last_error(), "x.shape[1]=-3 is negative"));

  int64_t huge[] = {(int64_t)1 << 40, (int64_t)1 << 40, 4};
  tensor_spec any = spec3(-1, -1, -1);
  t = tensor3(huge, NULL);
  CHECK_STATUS(tensor_check(&t, &any, &v), KVATTN_ERROR_INVALID_SHAPE);
  CHECK(strstr(kvattn_last_error(), "2^63"));

  int64_t st[] = {12, -4, 1};
  t = tensor3(shape, st);
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_STRIDE);
  int64_t zero[] = {0, 4, 1};
  t = tensor3(shape, zero);
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_STRIDE);
  CHECK(strstr(kvattn_last_error(), "x.strides[0]=0 over a dimension of size 2"));

  t = tensor3(shape, NULL);
  t.data = NULL;
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(kvattn_last_error(), "x.data is NULL for a tensor of 24 elements"));
}

TEST(strides_reaching_past_2_to_the_63_bytes_are_invalid_stride) {
  /* such a stride is never a real view, and the address arithmetic would overflow int64 */
  int64_t shape[] = {5, 4, 8}, st[] = {(int64_t)1 << 62, 8, 1};
  tensor_spec sp = spec3(5, 4, 8);
  tview v;
  DLTensor t = tensor3(shape, st);
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_STRIDE);
  CHECK(strstr(kvattn_last_error(), "x.strides[0]=4611686018427387904 reaches past 2^63 bytes"));
  /* the sum over dimensions counts too, and the element size */
  int64_t st2[] = {(int64_t)1 << 59, (int64_t)1 << 59, 1};
  t = tensor3(shape, st2);
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_INVALID_STRIDE);
  /* the largest addressable reach still passes: 4 * (INT64_MAX/4/4) bytes over dimension 0 */
  int64_t shape1[] = {5, 1, 1}, st3[] = {INT64_MAX / 4 / 4, 1, 1};
  t = tensor3(shape1, st3);
  tensor_spec sp1 = spec3(5, 1, 1);
  CHECK_OK(tensor_check(&t, &sp1, &v));
  st3[0] += 1;
  CHECK_STATUS(tensor_check(&t, &sp1, &v), KVATTN_ERROR_INVALID_STRIDE);
  /* a huge stride over a size-1 dimension is never stepped over: fine */
  int64_t shape2[] = {1, 4, 8}, st4[] = {INT64_MAX, 8, 1};
  t = tensor3(shape2, st4);
  tensor_spec sp2 = spec3(1, 4, 8);
  CHECK_OK(tensor_check(&t, &sp2, &v));
}

TEST(devices_host_specs_take_cpu_and_pinned_memory_only) {
  int64_t shape[] = {2, 3, 4};
  tensor_spec sp = spec3(2, 3, 4);
  tview v;
  const int ok[] = {kDLCPU, kDLCUDAHost}, bad[] = {kDLCUDA, kDLCUDAManaged, kDLOpenCL, kDLROCM, kDLMetal};
  for (int i = 0; i < 2; i++) {
    DLTensor t = tensor3(shape, NULL);
    t.device.device_type = (DLDeviceType)ok[i];
    CHECK_OK(tensor_check(&t, &sp, &v));
    CHECK(v.device_type == ok[i]);
  }
  for (int i = 0; i < 5; i++) {
    DLTensor t = tensor3(shape, NULL);
    t.device.device_type = (DLDeviceType)bad[i];
    CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_DEVICE_MISMATCH);
  }
}

TEST(devices_gpu_specs_want_the_contexts_device) {
  /* RELIABILITY.md class 2: a tensor on cuda:1 while the context is cuda:0 */
  int64_t shape[] = {2, 3, 4};
  tensor_spec sp = spec3(2, 3, 4);
  sp.device_type = kDLCUDA;
  sp.device_id = 0;
  tview v;
  DLTensor t = tensor3(shape, NULL);
  t.device = (DLDevice){kDLCUDA, 0};
  CHECK_OK(tensor_check(&t, &sp, &v));
  t.device = (DLDevice){kDLCUDAManaged, 0};
  CHECK_OK(tensor_check(&t, &sp, &v));
  t.device = (DLDevice){kDLCUDA, 1};
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_DEVICE_MISMATCH);
  CHECK(strstr(kvattn_last_error(), "x is on cuda:1, the context is on cuda:0"));
  t.device = (DLDevice){kDLCPU, 0};
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_DEVICE_MISMATCH);
  t.device = (DLDevice){kDLCUDAHost, 0};
  CHECK_STATUS(tensor_check(&t, &sp, &v), KVATTN_ERROR_DEVICE_MISMATCH);
}

TEST(tensor_check_never_reads_the_data) {
  /* a wild (but aligned) pointer passes: the check looks at metadata only */
  int64_t shape[] = {2, 3, 4};
  DLTensor t = tensor3(shape, NULL);
  t.data = (void *)(uintptr_t)0x1000;
  tensor_spec sp = spec3(2, 3, 4);
  tview v;
  CHECK_OK(tensor_check(&t, &sp, &v));
  CHECK(v.data == (char *)(uintptr_t)0x1000);
}

/* ---------------------------------------------------------------- overlap */

static tview view1(char *data, int64_t n, int64_t stride) {
  tview v;
  memset(&v, 0, sizeof v);
  v.data = data;
  v.dtype = DT_F32;
  v.ndim = 1;
  v.shape[0] = n;
  v.stride[0] = stride;
  return v;
}

TEST(overlap_of_views) {
  char *b = (char *)store;
  tview a = view1(b, 4, 1), next = view1(b + 16, 4, 1), inside = view1(b + 8, 1, 1), far = view1(b + 1024, 4, 1);
  CHECK(!tview_overlap(&a, &next)); /* adjacent: [0,16) and [16,32) */
  CHECK(tview_overlap(&a, &inside) && tview_overlap(&inside, &a));
  CHECK(!tview_overlap(&a, &far));
  tview empty = view1(b, 0, 1), none = view1(NULL, 4, 1);
  CHECK(!tview_overlap(&a, &empty));
  CHECK(!tview_overlap(&a, &none));
  /* strided: a spans [0, 3*8*4 + 4) — conservative: an interleaved view counts as overlapping */
  tview strided = view1(b, 4, 8), between = view1(b + 4, 1, 1);
  CHECK(tview_overlap(&strided, &between));
}

TEST_MAIN()
