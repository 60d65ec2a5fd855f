/*
 * jit_cache.c - the disk cache of compiled kernels (cubins), and the hash that keys it.
 *
 * One file per specialization, named by its 128-bit key: <dir>/<32 hex digits>.cubin. Each file is
 * a 64-byte header then the cubin:
 *   magic "KVATTNJC" | format 1 (u32) | header bytes 64 (u32) | key lo, hi (u64 x2) |
 *   payload bytes (u64) | payload hash lo, hi (u64 x2) | hash of the 56 bytes before (u64)
 * so a truncated file (size mismatch), a flipped byte (hash mismatch) or a file that landed under
 * the wrong name (key mismatch) reads as a miss, and the entry is compiled and written again.
 *
 * Writers never expose a partial file: they write a temp file in the same directory, fsync it and
 * rename() it over the entry (atomic on POSIX filesystems), so readers see the old entry or the new
 * one. Processes compiling the same key take an OFD byte-range lock on <dir>/.lock (the byte is
 * chosen by the key), so the first compiles and the others wait and then read its entry. A
 * read-only or missing directory only disables storing: compiling still works.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gpu_internal.h"

/* ---------------------------------------------------------------- hash128 */

/* Two 64-bit lanes, each absorbing 8-byte words through xor/add, an odd multiply and an xor-shift
 * (each step a bijection of the lane, so no input word is lost), then a finalizer that mixes the
 * lanes into each other. Not cryptographic: it guards against accidents, not adversaries. */
#define H_K1 0x9e3779b97f4a7c15ull
#define H_K2 0xc2b2ae3d27d4eb4full
#define H_K3 0xd6e8feb86659fd93ull

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t avalanche64(uint64_t x) {
  x ^= x >> 32;
  x *= H_K3;
  x ^= x >> 29;
  x *= H_K1;
  x ^= x >> 32;
  return x;
}

static inline void absorb(hash128 *h, uint64_t w) {
  h->a = (h->a ^ w) * H_K1;
  h->a ^= h->a >> 31;
  h->b = (h->b + rotl64(w, 23)) * H_K2;
  h->b ^= h->b >> 29;
  h->b += rotl64(h->a, 17);
}

void hash128_init(hash128 *h, uint64_t seed) {
  h->a = seed ^ 0x243f6a8885a308d3ull;
  h->b = rotl64(seed, 32) ^ 0x13198a2e03707344ull;
  h->tail = 0;
  h->tail_len = 0;
  h->total_len = 0;
}

void hash128_update(hash128 *h, const void *data, size_t n) {
  const unsigned char *p = data;
  h->total_len += n;
  while (n > 0 && h->tail_len != 0) { /* finish a partial word first */
    h->tail |= (uint64_t)*p++ << (8 * h->tail_len);
    n--;
    if (++h->tail_len == 8) {
      absorb(h, h->tail);
      h->tail = 0;
      h->tail_len = 0;
    }
  }
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w = 0;
    for (int i = 0; i < 8; i++) w |= (uint64_t)p[i] << (8 * i); /* little-endian on every host */
    absorb(h, w);
  }
  while (n > 0) {
    h->tail |= (uint64_t)*p++ << (8 * h->tail_len);
    h->tail_len++;
    n--;
  }
}

jit_key hash128_final(const hash128 *in) {
  hash128 h = *in;
  /* The pending bytes and the length, so "ab" + "" and "a" + "b" differ only through the
   * caller's framing, and zero tails of different lengths differ. */
  absorb(&h, h.tail ^ ((uint64_t)h.tail_len << 56));
  absorb(&h, h.total_len);
  jit_key k;
  k.lo = avalanche64(h.a ^ rotl64(h.b, 31));
  k.hi = avalanche64(h.b + k.lo * H_K2);
  return k;
}

static jit_key hash_bytes(const void *p, size_t n, uint64_t seed) {
  hash128 h;
  hash128_init(&h, seed);
  hash128_update(&h, p, n);
  return hash128_final(&h);
}

/* ---------------------------------------------------------------- the directory */

static int mkdir_p(const char *path) {
  char tmp[1024];
  size_t n = strlen(path);
  if (n == 0 || n >= sizeof tmp) return 0;
  memcpy(tmp, path, n + 1);
  for (char *s = tmp + 1; *s; s++) {
    if (*s != '/') continue;
    *s = 0;
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return 0;
    *s = '/';
  }
  if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return 0;
  struct stat st;
  return stat(tmp, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The location, without creating it. */
static int cache_dir_path(const char *explicit_dir, char *out, size_t size) {
  const char *e;
  int n;
  if (explicit_dir && explicit_dir[0]) {
    n = snprintf(out, size, "%s", explicit_dir);
  } else if ((e = getenv("KVATTN_CACHE_DIR")) && e[0]) {
    n = snprintf(out, size, "%s", e);
  } else if ((e = getenv("XDG_CACHE_HOME")) && e[0] == '/') { /* XDG: relative values are ignored */
    n = snprintf(out, size, "%s/kvattn", e);
  } else {
    const char *home = getenv("HOME");
    if (!home || !home[0]) {
      struct passwd *pw = getpwuid(getuid());
      home = pw ? pw->pw_dir : NULL;
    }
    if (!home || !home[0]) return 0;
    n = snprintf(out, size, "%s/.cache/kvattn", home);
  }
  if (n <= 0 || (size_t)n >= size) return 0;
  while (n > 1 && out[n - 1] == '/') out[--n] = 0; /* "dir/" and "dir" are one cache */
  return 1;
}

int jit_cache_dir(const char *explicit_dir, char *out, size_t size) {
  if (!cache_dir_path(explicit_dir, out, size)) return 0;
  mkdir_p(out); /* may fail (read-only parent): lookups then miss and stores are skipped */
  return 1;
}

/* ---------------------------------------------------------------- entries */

#define ENTRY_MAGIC "KVATTNJC"
#define ENTRY_FORMAT 1u
#define ENTRY_HEADER_BYTES 64u
#define HEADER_HASH_SEED 0x6b7661747468ull /* "kvatth" */
#define PAYLOAD_HASH_SEED 0x6b7661747470ull /* "kvattp" */

typedef struct entry_header {
  char magic[8];
  uint32_t format;
  uint32_t header_bytes;
  uint64_t key_lo, key_hi;
  uint64_t payload_bytes;
  uint64_t payload_hash_lo, payload_hash_hi;
  uint64_t header_hash; /* of the 56 bytes above */
} entry_header;
_Static_assert(sizeof(entry_header) == ENTRY_HEADER_BYTES, "the entry header is 64 bytes");

static void entry_path(const char *dir, jit_key key, char *out, size_t size) {
  snprintf(out, size, "%s/%016llx%016llx.cubin", dir, (unsigned long long)key.hi, (unsigned long long)key.lo);
}

static int read_all(int fd, void *buf, size_t n) {
  char *p = buf;
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return 0;
    p += r;
    n -= (size_t)r;
  }
  return 1;
}

static int write_all(int fd, const void *buf, size_t n) {
  const char *p = buf;
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return 0;
    p += r;
    n -= (size_t)r;
  }
  return 1;
}

int jit_cache_load(const char *dir, jit_key key, void **cubin, size_t *size) {
  char path[1200];
  entry_path(dir, key, path, sizeof path);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  int ok = 0;
  void *payload = NULL;
  entry_header h;
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < (off_t)ENTRY_HEADER_BYTES) goto done;
  if (!read_all(fd, &h, sizeof h)) goto done;
  if (memcmp(h.magic, ENTRY_MAGIC, 8) != 0 || h.format != ENTRY_FORMAT || h.header_bytes != ENTRY_HEADER_BYTES)
    goto done;
  if (hash_bytes(&h, offsetof(entry_header, header_hash), HEADER_HASH_SEED).lo != h.header_hash) goto done;
  if (h.key_lo != key.lo || h.key_hi != key.hi) goto done;
  if (h.payload_bytes == 0 || (uint64_t)st.st_size != ENTRY_HEADER_BYTES + h.payload_bytes) goto done; /* truncated */
  payload = malloc(h.payload_bytes);
  if (!payload || !read_all(fd, payload, h.payload_bytes)) goto done;
  jit_key ph = hash_bytes(payload, h.payload_bytes, PAYLOAD_HASH_SEED);
  if (ph.lo != h.payload_hash_lo || ph.hi != h.payload_hash_hi) goto done; /* corrupted */
  *cubin = payload;
  *size = h.payload_bytes;
  payload = NULL;
  ok = 1;
done:
  free(payload);
  close(fd);
  return ok;
}

int jit_cache_store(const char *dir, jit_key key, const void *cubin, size_t size) {
  static atomic_uint counter;
  char path[1200], tmp[1300];
  entry_path(dir, key, path, sizeof path);
  /* Unique per process and per call, hidden (leading dot), in the same directory so rename() is
   * atomic and never crosses filesystems. */
  snprintf(tmp, sizeof tmp, "%s/.%016llx%016llx.tmp.%ld.%u", dir, (unsigned long long)key.hi,
           (unsigned long long)key.lo, (long)getpid(), atomic_fetch_add(&counter, 1u));
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return 0; /* read-only or missing directory: not an error */

  entry_header h;
  memset(&h, 0, sizeof h);
  memcpy(h.magic, ENTRY_MAGIC, 8);
  h.format = ENTRY_FORMAT;
  h.header_bytes = ENTRY_HEADER_BYTES;
  h.key_lo = key.lo;
  h.key_hi = key.hi;
  h.payload_bytes = size;
  jit_key ph = hash_bytes(cubin, size, PAYLOAD_HASH_SEED);
  h.payload_hash_lo = ph.lo;
  h.payload_hash_hi = ph.hi;
  h.header_hash = hash_bytes(&h, offsetof(entry_header, header_hash), HEADER_HASH_SEED).lo;

  int ok = write_all(fd, &h, sizeof h) && write_all(fd, cubin, size) && fsync(fd) == 0;
  ok = close(fd) == 0 && ok;
  if (ok) ok = rename(tmp, path) == 0;
  if (!ok) {
    unlink(tmp);
    return 0;
  }
  /* Make the rename itself durable (a crash could otherwise leave the directory without it). */
  int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  return 1;
}

/* ---------------------------------------------------------------- locks */

int jit_cache_lock(const char *dir, jit_key key) {
  char path[1200];
  snprintf(path, sizeof path, "%s/.lock", dir);
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return -1; /* read-only directory: everyone compiles, no one stores */
#ifdef F_OFD_SETLKW
  /* An OFD lock belongs to this open file description, so two threads of one process exclude each
   * other too (a classic fcntl lock would not), and it is released if the holder dies. One byte
   * per key (2^30 bytes to choose from): different keys compile in parallel. */
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)(key.lo & ((1ull << 30) - 1));
  fl.l_len = 1;
  for (;;) {
    if (fcntl(fd, F_OFD_SETLKW, &fl) == 0) return fd;
    if (errno != EINTR) break;
  }
#endif
  /* Old kernels (no OFD locks): one lock for the whole cache. Correct, coarser. */
  for (;;) {
    if (flock(fd, LOCK_EX) == 0) return fd;
    if (errno != EINTR) break;
  }
  close(fd);
  return -1;
}

void jit_cache_unlock(int handle) {
  if (handle >= 0) close(handle); /* closing the description releases its OFD lock / flock */
}

/* ---------------------------------------------------------------- kvattn_cache_info */

static int is_entry_name(const char *name) {
  size_t n = strlen(name);
  if (n != 32 + 6 || strcmp(name + 32, ".cubin") != 0) return 0;
  for (int i = 0; i < 32; i++)
    if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f'))) return 0;
  return 1;
}

KVATTN_API kvattn_status kvattn_cache_info(const char *cache_dir, char *buf, size_t size) {
  RETURN_IF(!buf || size == 0, KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_cache_info: buf is NULL or size is 0 (size=%zu)", size);
  char dir[1024];
  char line[1400];
  size_t used = 0;
  buf[0] = 0;
#define APPEND(...)                                                 \
  do {                                                              \
    int n_ = snprintf(line, sizeof line, __VA_ARGS__);              \
    if (n_ > 0 && used + 1 < size) {                                \
      snprintf(buf + used, size - used, "%s", line);                \
      used += (size_t)n_ < size - used ? (size_t)n_ : size - used - 1; \
    }                                                               \
  } while (0)

  if (!cache_dir_path(cache_dir, dir, sizeof dir)) {
    APPEND("cache: no location (no cache_dir, KVATTN_CACHE_DIR, XDG_CACHE_HOME or home directory)\n");
  } else {
    DIR *d = opendir(dir);
    if (!d) {
      APPEND("cache: %s (does not exist yet: %s)\n", dir, strerror(errno));
    } else {
      long entries = 0, temps = 0;
      unsigned long long bytes = 0;
      struct dirent *de;
      while ((de = readdir(d)) != NULL) {
        int entry = is_entry_name(de->d_name);
        int temp = !entry && de->d_name[0] == '.' && strstr(de->d_name, ".tmp.") != NULL;
        if (!entry && !temp) continue;
        char p[1400];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        if (stat(p, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        if (entry) {
          entries++;
          bytes += (unsigned long long)st.st_size;
        } else {
          temps++;
        }
      }
      closedir(d);
      int writable = access(dir, W_OK) == 0;
      APPEND("cache: %s (%ld entries, %llu bytes, %s", dir, entries, bytes, writable ? "writable" : "read-only");
      if (temps) APPEND(", %ld leftover temp files", temps);
      APPEND(")\n");
    }
  }
  char nvrtc[700];
  if (jit_nvrtc_load(nvrtc, sizeof nvrtc) == KVATTN_SUCCESS) {
    APPEND("nvrtc: %s\n", nvrtc);
  } else {
    APPEND("nvrtc: not available: %s\n", kvattn_last_error());
  }
#undef APPEND
  clear_error();
  return KVATTN_SUCCESS;
}
