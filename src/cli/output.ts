// Writing command output straight to fd 1/2: process.stdout loads Node's stream machinery,
// which costs a noticeable share of a short command's start-up.

import { writeSync } from 'node:fs';

function writeAll(fd: number, text: string): void {
  const buf = Buffer.from(text, 'utf8');
  let off = 0;
  while (off < buf.length) {
    try {
      off += writeSync(fd, buf, off);
    } catch (err) {
      // A non-blocking pipe that is full: wait briefly and retry.
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
    }
  }
}

export function writeStdout(text: string): void {
  writeAll(1, text);
}

export function writeStderr(text: string): void {
  writeAll(2, text);
}
