// qimg's native code: fallocate(2) and fcntl(F_GETLK), which Node's fs (and fs-ext) do not offer.
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
// Optional by design: `npm install` builds it with node-gyp when a C compiler is there, and qimg
// works the same without it (src/qcow2/io/native.ts falls back to doing nothing / /proc/locks).

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
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

NAPI_MODULE_INIT() {
  napi_value fn;
  if (napi_create_function(env, "fallocate", NAPI_AUTO_LENGTH, Fallocate, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "fallocate", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "getlk", NAPI_AUTO_LENGTH, GetLk, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "getlk", fn) != napi_ok) return NULL;
  return exports;
}
