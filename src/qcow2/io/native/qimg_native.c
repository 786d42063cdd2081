// qimg's native code: fallocate(2) and fcntl(F_GETLK), which Node's fs (and fs-ext) do not offer,
// and convert's bulk I/O jobs.
//
// Why fallocate is worth a C file: a buffered write into blocks the file system has not allocated yet
// pays ext4's delayed-allocation bookkeeping page by page; into blocks reserved beforehand
// (unwritten extents) it does not. On a 1 GiB convert that is ~0.1 s of kernel time, about what
// qemu-img saves the same way (it issues fallocate for the clusters it allocates).
//
// F_GETLK asks the kernel whether a byte-range lock could be placed, naming a lock in the way: the
// question QEMU's own lock check asks. Without it qimg reads /proc/locks, whose first read in a
// process waits for an RCU grace period (5-25 ms measured here), on every read-only open.
//
// The bulk copy of `convert` (readScan/writeRuns) runs a whole chunk's preads, its zero scan and its
// pwrites as one job on libuv's threads, where Node's fs would make one request (one promise, one
// wake-up, one callback on the main thread) per run: see src/qcow2/io/native.ts for the measurements.
//
// Optional by design: `npm install` builds it with node-gyp when a C compiler is there, and qimg
// works the same without it (src/qcow2/io/native.ts falls back to doing nothing / /proc/locks).

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>

// fallocate(fd, mode, offset, length) -> 0, or -errno (never throws: callers treat every
// failure as "no reservation" and go on with plain writes).
static napi_value Fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_value result;
  int32_t fd = -1;
  int32_t mode = 0;
  int64_t offset = -1;
  int64_t length = -1;
  int rc = -EINVAL;

  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) == napi_ok && argc == 4 &&
      napi_get_value_int32(env, argv[0], &fd) == napi_ok &&
      napi_get_value_int32(env, argv[1], &mode) == napi_ok &&
      napi_get_value_int64(env, argv[2], &offset) == napi_ok &&
      napi_get_value_int64(env, argv[3], &length) == napi_ok && fd >= 0 && offset >= 0 && length > 0) {
#ifdef __linux__
    int r;
    do {
      r = fallocate(fd, mode, (off_t)offset, (off_t)length);
    } while (r < 0 && errno == EINTR);
    rc = r < 0 ? -errno : 0;
#else
    rc = -ENOSYS;
#endif
  }
  napi_create_int32(env, rc, &result);
  return result;
}

// getlk(fd, type, start, length) -> [type, start, length, pid] of a POSIX or OFD lock another
// process holds that conflicts with a `type` lock on [start, start+length) (length 0: to EOF), or
// [F_UNLCK] when none does, or -errno. This process's own POSIX locks never conflict (fcntl(2)).
static napi_value GetLk(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_value result;
  int32_t fd = -1;
  int32_t type = -1;
  int64_t start = -1;
  int64_t length = -1;

  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 4 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int32(env, argv[1], &type) != napi_ok ||
      napi_get_value_int64(env, argv[2], &start) != napi_ok || napi_get_value_int64(env, argv[3], &length) != napi_ok ||
      fd < 0 || start < 0 || length < 0 || (type != F_RDLCK && type != F_WRLCK)) {
    napi_create_int32(env, -EINVAL, &result);
    return result;
  }
  struct flock fl = {0};
  fl.l_type = (short)type;
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)start;
  fl.l_len = (off_t)length;
  if (fcntl(fd, F_GETLK, &fl) < 0) {
    napi_create_int32(env, -errno, &result);
    return result;
  }
  int64_t fields[4] = {fl.l_type, (int64_t)fl.l_start, (int64_t)fl.l_len, fl.l_pid};
  size_t n = fl.l_type == F_UNLCK ? 1 : 4;
  napi_create_array_with_length(env, n, &result);
  for (size_t i = 0; i < n; i++) {
    napi_value v;
    napi_create_int64(env, fields[i], &v);
    napi_set_element(env, result, (uint32_t)i, v);
  }
  return result;
}


// ---- Bulk I/O jobs: readScan(buf, segs, zero, grain, first, end, callback) and
// writeRuns(buf, segs, [allocate,] callback).
//
// segs is a Float64Array of [fd, bufferOffset, length, fileOffset] quadruples, checked against the
// buffer before anything runs. A read stopping at the end of its file fills the rest of its segment
// with zeros. writeRuns with `allocate` reserves each segment's blocks first (fallocate
// KEEP_SIZE; a failure is ignored: the write decides). After the reads, readScan flags in `zero` each block of buf[first, end) (block k:
// [first + k*grain, first + (k+1)*grain), the last one cut at `end`) whose bytes are all zero and
// whose flag is still 0, by setting it to 2. The callback gets (errno, segment): (0, -1) on
// success, else the first failure. The job holds references to every array it uses until it
// calls back.

typedef struct {
  napi_async_work work;
  napi_ref refs[4]; // buffer, segs, zero (or NULL), callback
  uint8_t *buf;
  double *segs;
  size_t nsegs;
  int write;
  int allocate;
  uint8_t *zero;
  size_t grain;
  size_t first;
  size_t end;
  int err;
  int64_t err_seg;
} IoJob;

static int all_zero(const uint8_t *p, size_t n) {
  size_t i = 0;
  // The first and last bytes decide most data blocks.
  if (n == 0) return 1;
  if (p[0] != 0 || p[n - 1] != 0) return 0;
  for (; i + 64 <= n; i += 64) {
    uint64_t w[8];
    memcpy(w, p + i, 64);
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return 0;
  }
  for (; i < n; i++)
    if (p[i] != 0) return 0;
  return 1;
}

static void io_execute(napi_env env, void *data) {
  (void)env;
  IoJob *j = (IoJob *)data;
  for (size_t s = 0; s < j->nsegs && j->err == 0; s++) {
    int fd = (int)j->segs[4 * s];
    uint8_t *p = j->buf + (size_t)j->segs[4 * s + 1];
    size_t len = (size_t)j->segs[4 * s + 2];
    off_t pos = (off_t)j->segs[4 * s + 3];
    size_t done = 0;
#ifdef __linux__
    if (j->allocate && len > 0) {
      int r;
      do {
        r = fallocate(fd, FALLOC_FL_KEEP_SIZE, pos, (off_t)len);
      } while (r < 0 && errno == EINTR);
      (void)r; // only a hint: the write below is what counts
    }
#endif
    while (done < len) {
      ssize_t n = j->write ? pwrite(fd, p + done, len - done, pos + (off_t)done) : pread(fd, p + done, len - done, pos + (off_t)done);
      if (n < 0) {
        if (errno == EINTR) continue;
        j->err = errno;
        j->err_seg = (int64_t)s;
        break;
      }
      if (n == 0) {
        if (j->write) {
          j->err = EIO; // pwrite(2) never writes nothing without an error; do not spin
          j->err_seg = (int64_t)s;
        } else memset(p + done, 0, len - done); // past the end of the file reads as zeros
        break;
      }
      done += (size_t)n;
    }
  }
  if (j->err != 0 || j->zero == NULL) return;
  for (size_t k = 0; j->first + k * j->grain < j->end; k++) {
    if (j->zero[k] != 0) continue;
    size_t from = j->first + k * j->grain;
    size_t n = j->end - from < j->grain ? j->end - from : j->grain;
    if (all_zero(j->buf + from, n)) j->zero[k] = 2;
  }
}

static void io_complete(napi_env env, napi_status status, void *data) {
  IoJob *j = (IoJob *)data;
  napi_value cb, global, argv[2];
  if (napi_get_reference_value(env, j->refs[3], &cb) == napi_ok && napi_get_global(env, &global) == napi_ok) {
    napi_create_int32(env, status == napi_ok ? j->err : ECANCELED, &argv[0]);
    napi_create_int64(env, j->err_seg, &argv[1]);
    napi_call_function(env, global, cb, 2, argv, NULL); // an exception it throws stays pending for Node to report
  }
  for (int i = 0; i < 4; i++)
    if (j->refs[i]) napi_delete_reference(env, j->refs[i]);
  napi_delete_async_work(env, j->work);
  free(j);
}

// A typed array's bytes: a Uint8Array (want 1) or a Float64Array (want 8); 0 when it is neither.
static int typed_bytes(napi_env env, napi_value v, int want, void **data, size_t *count) {
  napi_typedarray_type type;
  napi_value ab;
  size_t offset;
  if (napi_get_typedarray_info(env, v, &type, count, data, &ab, &offset) != napi_ok) return 0;
  return want == 1 ? type == napi_uint8_array : type == napi_float64_array;
}

static napi_value start_io(napi_env env, napi_callback_info info, int write) {
  size_t argc = 7;
  napi_value argv[7], undefined, name;
  napi_get_undefined(env, &undefined);
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return undefined;
  size_t want = write ? (argc == 4 ? 4 : 3) : 7;
  napi_valuetype t;
  if (argc != want || napi_typeof(env, argv[want - 1], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, NULL, "qimg_native: bad arguments");
    return undefined;
  }
  IoJob *j = (IoJob *)calloc(1, sizeof(IoJob));
  if (!j) {
    napi_throw_error(env, NULL, "qimg_native: out of memory");
    return undefined;
  }
  j->write = write;
  j->err_seg = -1;
  size_t buf_len = 0, seg_count = 0;
  int ok = typed_bytes(env, argv[0], 1, (void **)&j->buf, &buf_len) && typed_bytes(env, argv[1], 8, (void **)&j->segs, &seg_count) && seg_count % 4 == 0;
  j->nsegs = seg_count / 4;
  for (size_t s = 0; ok && s < j->nsegs; s++) {
    double fd = j->segs[4 * s], off = j->segs[4 * s + 1], len = j->segs[4 * s + 2], pos = j->segs[4 * s + 3];
    ok = fd >= 0 && fd <= 2147483647.0 && fd == (double)(int)fd && off >= 0 && len >= 0 && pos >= 0 && off + len <= (double)buf_len &&
         pos + len <= 9007199254740992.0 && off == (double)(size_t)off && len == (double)(size_t)len && pos == (double)(int64_t)pos;
  }
  if (ok && !write) {
    napi_valuetype zt;
    ok = napi_typeof(env, argv[2], &zt) == napi_ok;
    if (ok && zt != napi_null && zt != napi_undefined) {
      size_t nzero = 0;
      double grain = 0, first = 0, end = 0;
      ok = typed_bytes(env, argv[2], 1, (void **)&j->zero, &nzero) && napi_get_value_double(env, argv[3], &grain) == napi_ok &&
           napi_get_value_double(env, argv[4], &first) == napi_ok && napi_get_value_double(env, argv[5], &end) == napi_ok &&
           grain >= 1 && grain <= (double)buf_len && first >= 0 && end <= (double)buf_len && grain == (double)(size_t)grain &&
           first == (double)(size_t)first && end == (double)(size_t)end;
      if (ok) {
        j->grain = (size_t)grain;
        j->first = (size_t)first;
        j->end = (size_t)end < j->first ? j->first : (size_t)end;
        ok = (j->end - j->first + j->grain - 1) / j->grain <= nzero;
      }
    }
  }
  int nrefs = write ? 2 : 3;
  for (int i = 0; ok && i < nrefs; i++) {
    napi_valuetype vt;
    napi_typeof(env, argv[i], &vt);
    if (vt == napi_object) ok = napi_create_reference(env, argv[i], 1, &j->refs[i]) == napi_ok;
  }
  if (ok && write && want == 4) {
    bool b = false;
    ok = napi_get_value_bool(env, argv[2], &b) == napi_ok;
    j->allocate = b;
  }
  ok = ok && napi_create_reference(env, argv[want - 1], 1, &j->refs[3]) == napi_ok;
  ok = ok && napi_create_string_utf8(env, write ? "qimg.writeRuns" : "qimg.readScan", NAPI_AUTO_LENGTH, &name) == napi_ok;
  ok = ok && napi_create_async_work(env, NULL, name, io_execute, io_complete, j, &j->work) == napi_ok;
  if (!ok) {
    for (int i = 0; i < 4; i++)
      if (j->refs[i]) napi_delete_reference(env, j->refs[i]);
    free(j);
    napi_throw_range_error(env, NULL, "qimg_native: bad buffer, segments or zero map");
    return undefined;
  }
  if (napi_queue_async_work(env, j->work) != napi_ok) {
    napi_delete_async_work(env, j->work);
    for (int i = 0; i < 4; i++)
      if (j->refs[i]) napi_delete_reference(env, j->refs[i]);
    free(j);
    napi_throw_error(env, NULL, "qimg_native: could not queue a job");
  }
  return undefined;
}

static napi_value ReadScan(napi_env env, napi_callback_info info) { return start_io(env, info, 0); }
static napi_value WriteRuns(napi_env env, napi_callback_info info) { return start_io(env, info, 1); }

NAPI_MODULE_INIT() {
  napi_value fn;
  if (napi_create_function(env, "fallocate", NAPI_AUTO_LENGTH, Fallocate, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "fallocate", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "getlk", NAPI_AUTO_LENGTH, GetLk, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "getlk", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "readScan", NAPI_AUTO_LENGTH, ReadScan, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "readScan", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "writeRuns", NAPI_AUTO_LENGTH, WriteRuns, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "writeRuns", fn) != napi_ok) return NULL;
  return exports;
}
