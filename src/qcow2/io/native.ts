// The optional native helper (native/qimg_native.c): fallocate(2) and fcntl(F_GETLK), loaded once,
// absent when it was not built (no C compiler at `npm install`) or QIMG_NO_NATIVE is set.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

interface NativeHelper {
  /** 0, or -errno. */
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  /** [F_UNLCK], [type, start, length, pid], or -errno. */
  getlk(fd: number, type: number, start: number, length: number): number[] | number;
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
