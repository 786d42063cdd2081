// The optional native helper (native/qimg_native.c): fallocate(2), loaded once, absent when it
// was not built (no C compiler at `npm install`) or QIMG_NO_NATIVE is set.

import { createRequire } from 'node:module';

interface NativeHelper {
  /** 0, or -errno. */
  fallocate(fd: number, mode: number, offset: number, length: number): number;
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
    const here = new URL('.', import.meta.url).pathname;
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
