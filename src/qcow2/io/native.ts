// The optional native helper (native/qimg_native.c): fallocate(2), fcntl(F_GETLK) and convert's bulk
// I/O jobs, loaded once, absent when it was not built (no C compiler at `npm install`) or
// QIMG_NO_NATIVE is set.

import { createRequire } from 'node:module';
import { getSystemErrorMap } from 'node:util';
import { fileURLToPath } from 'node:url';

interface NativeHelper {
  /** 0, or -errno. */
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  /** [F_UNLCK], [type, start, length, pid], or -errno. */
  getlk(fd: number, type: number, start: number, length: number): number[] | number;
  readScan(buf: Uint8Array, segs: Float64Array, zero: Uint8Array | null, grain: number, first: number, end: number, cb: IoCallback): void;
  writeRuns(buf: Uint8Array, segs: Float64Array, allocate: boolean, cb: IoCallback): void;
}

type IoCallback = (errno: number, segment: number) => void;

/** A bulk job's failure, shaped as Node's fs errors are (code 'EIO', ...), and which segment met it. */
export interface BulkIoError {
  code: string;
  errno: number;
  message: string;
  segment: number;
}

/** A lock another process holds (fcntl's struct flock; length 0: to the end of the file). */
export interface HeldLock {
  type: number;
  start: number;
  length: number;
  /** -1 for an open-file-description (OFD) lock, which belongs to no process. */
  pid: number;
}

/** fallocate mode bits (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;

let helper: NativeHelper | null | undefined;

function load(): NativeHelper | null {
  if (helper !== undefined) return helper;
  helper = null;
  if (process.platform !== 'linux' || process.env.QIMG_NO_NATIVE) return helper;
  try {
    // From dist/src/qcow2/io/ (compiled) or src/qcow2/io/ (sources): the same build directory.
    const here = fileURLToPath(new URL('.', import.meta.url)); // a path with spaces stays a path
    const dir = here.includes('/dist/src/') ? here.replace('/dist/src/', '/src/') : here;
    helper = createRequire(import.meta.url)(`${dir}native/build/Release/qimg_native.node`) as NativeHelper;
  } catch {
    helper = null; // not built: every caller has a plain path
  }
  return helper;
}

/** Whether fallocate() can do anything here. */
export function haveFallocate(): boolean {
  return load() !== null;
}

/** fallocate(2): 0 on success, -errno on failure, null without the helper. */
export function fallocate(fd: number, mode: number, offset: number, length: number): number | null {
  const h = load();
  return h ? h.fallocate(fd, mode, offset, length) : null;
}

/**
 * fcntl(F_GETLK): a lock another process holds that conflicts with a `type` lock (fs-ext's
 * F_RDLCK/F_WRLCK) on [start, start+length), or null when none does; undefined when it cannot
 * tell (no helper, or the call failed).
 */
export function conflictingLock(fd: number, type: number, start: number, length: number): HeldLock | null | undefined {
  const h = load();
  if (!h) return undefined;
  const r = h.getlk(fd, type, start, length);
  if (typeof r === 'number' || r.length === 0) return undefined;
  if (r.length < 4) return null;
  return { type: r[0]!, start: r[1]!, length: r[2]!, pid: r[3]! };
}

/** Whether readScan()/writeRuns() run natively here. */
export function haveBulkIO(): boolean {
  return typeof load()?.readScan === 'function'; // a helper built before it had them has not
}

function bulkError(errno: number, segment: number): BulkIoError {
  const [code, text] = getSystemErrorMap().get(-errno) ?? [`errno ${errno}`, 'unknown error'];
  return { code, errno: -errno, message: `${code}: ${text}`, segment };
}

/** A job's promise; arguments the helper refuses throw here, before anything is queued. */
function job(start: (cb: IoCallback) => void): Promise<void> {
  let done: IoCallback = () => undefined;
  const p = new Promise<void>((resolve, reject) => {
    done = (errno, segment) => (errno === 0 ? resolve() : reject(bulkError(errno, segment)));
  });
  start((errno, segment) => done(errno, segment));
  return p;
}

/** Which blocks of a buffer readScan() checks: block k is [first + k*grain, first + (k+1)*grain), cut at `end`. */
export interface ZeroScan {
  /** One flag per block: 0 = not known to be zero; readScan sets 2 where all bytes are zero. */
  zero: Uint8Array;
  grain: number;
  first: number;
  end: number;
}

/**
 * One job on libuv's thread pool: each segment of `segs` ([fd, bufferOffset, length, filePosition]
 * quadruples) read into `buf` (zeros past a file's end), then, with `scan`, each all-zero block
 * whose flag is 0 flagged 2. Rejects with a BulkIoError. Null without the helper. The caller
 * leaves `buf` and the flags alone until it settles.
 *
 * Why: Node's fs makes one request per run (a promise, a thread wake-up and a callback on the main
 * thread each) and the zero scan ran on the main thread; a 1 GiB convert's copy is CPU-bound on
 * two vCPUs, so what the main thread spends the copying threads wait for.
 */
export function readScan(buf: Uint8Array, segs: Float64Array, scan: ZeroScan | null): Promise<void> | null {
  const h = load();
  return h && haveBulkIO() ? job((cb) => h.readScan(buf, segs, scan?.zero ?? null, scan?.grain ?? 1, scan?.first ?? 0, scan?.end ?? 0, cb)) : null;
}

/**
 * One job writing each segment ([fd, bufferOffset, length, filePosition]) of `buf`, in order; as
 * readScan. With `allocate` each segment's blocks are reserved (fallocate KEEP_SIZE, failures
 * ignored) just before its write: ext4 then writes into an unwritten extent
 * instead of doing delayed allocation page by page. A sparse raw target, whose data runs lie
 * between holes, cannot be reserved ahead in one call as a growing qcow2 image is; run by run a
 * 1 GiB qcow2 -> raw convert took ~20 ms less (287 -> 267 ms, paired medians).
 */
export function writeRuns(buf: Uint8Array, segs: Float64Array, allocate = false): Promise<void> | null {
  const h = load();
  return h && haveBulkIO() ? job((cb) => h.writeRuns(buf, segs, allocate, cb)) : null;
}
