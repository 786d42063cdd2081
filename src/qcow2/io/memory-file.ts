// The BlockFile interface over memory: for tests, fuzzing and crash simulation.

import { QimgError } from '../errors.js';
import type { BlockFile } from './file.js';

export class MemoryFile implements BlockFile {
  readonly fd = null;
  private data: Uint8Array;
  private length: number;
  /** Writes performed so far; crash simulation stops when it reaches `crashAfter`. */
  writes = 0;
  flushes = 0;
  /** Throw (simulating power loss) on the write that would exceed this count. */
  crashAfter = Infinity;

  constructor(
    initial: Uint8Array = new Uint8Array(0),
    readonly path = 'memory',
    readonly writable = true,
  ) {
    this.data = new Uint8Array(Math.max(initial.length, 4096));
    this.data.set(initial);
    this.length = initial.length;
  }

  /** The current file contents (a copy). */
  bytes(): Uint8Array {
    return this.data.slice(0, this.length);
  }

  read(buf: Uint8Array, pos: number): number {
    if (pos >= this.length) return 0;
    const n = Math.min(buf.length, this.length - pos);
    buf.set(this.data.subarray(pos, pos + n));
    return n;
  }

  write(buf: Uint8Array, pos: number): void {
    if (!this.writable) throw new QimgError('READ_ONLY', `'${this.path}' is open read-only`);
    if (this.writes >= this.crashAfter) throw new SimulatedCrash(this.writes);
    this.writes++;
    this.ensure(pos + buf.length);
    this.data.set(buf, pos);
    this.length = Math.max(this.length, pos + buf.length);
  }

  flush(): void {
    this.flushes++;
  }

  size(): number {
    return this.length;
  }

  truncate(size: number): void {
    this.ensure(size);
    if (size < this.length) this.data.fill(0, size, this.length);
    this.length = size;
  }

  allocatedBytes(): number {
    return this.length;
  }

  close(): void {}

  private ensure(n: number): void {
    if (n <= this.data.length) return;
    const next = new Uint8Array(Math.max(n, this.data.length * 2));
    next.set(this.data.subarray(0, this.length));
    this.data = next;
  }
}

export class SimulatedCrash extends Error {
  constructor(readonly atWrite: number) {
    super(`simulated crash before write ${atWrite + 1}`);
  }
}
