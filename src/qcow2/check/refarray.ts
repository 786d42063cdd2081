// The checker's in-memory refcount array: one counter per host cluster, widened on overflow.
//
// Starts as bytes (most images have refcounts far below 256) and is promoted to 16, 32 and
// 64-bit (float) counters only when an entry outgrows its width, so a 1 TiB file costs 16 MiB.

import { CheckAbort } from './image.js';

export type Counters = Uint8Array | Uint16Array | Uint32Array | Float64Array;

/**
 * A counter array of `n` entries. An allocation that cannot succeed (past V8's typed array
 * length, or more memory than the machine gives) ends the check as QEMU's failed refcount array
 * (re)allocation ends it: "Check failed: Cannot allocate memory". The sizes come from the file's
 * length and the offsets a repair grows it to, so a damaged image can ask for terabytes.
 */
function counters(C: new (n: number) => Counters, n: number): Counters {
  try {
    return new C(n);
  } catch (err) {
    if (err instanceof RangeError) throw new CheckAbort('Cannot allocate memory');
    throw err;
  }
}

export class RefArray {
  a: Counters;
  /** Largest value the current element type holds. */
  limit: number;

  constructor(length: number) {
    this.a = counters(Uint8Array, length);
    this.limit = 0xff;
  }

  get length(): number {
    return this.a.length;
  }

  /** Switches to the next wider element type (the hot loop re-reads `a` afterwards). */
  promote(): void {
    const old = this.a;
    const [C, limit] = old instanceof Uint8Array ? [Uint16Array, 0xffff] : old instanceof Uint16Array ? [Uint32Array, 0xffffffff] : [Float64Array, Number.MAX_SAFE_INTEGER];
    const next = counters(C, old.length);
    this.limit = limit;
    next.set(old);
    this.a = next;
  }

  /** Makes room for index `n - 1` (keeps the element type). */
  ensure(n: number): void {
    if (n <= this.a.length) return;
    const len = Math.max(n, Math.ceil(this.a.length * 1.25) + 64);
    const C = this.a.constructor as new (n: number) => Counters;
    const next = counters(C, len);
    next.set(this.a as never);
    this.a = next;
  }

  add(i: number, v: number): void {
    while (this.a[i]! + v > this.limit) this.promote();
    this.a[i] = this.a[i]! + v;
  }

  set(i: number, v: number): void {
    while (v > this.limit) this.promote();
    this.a[i] = v;
  }

  clear(): void {
    this.a.fill(0);
  }

  /** `a`'s bytes as 32-bit words (counters are never negative: a zero word is zero counters). */
  private words: Uint32Array | null = null;

  /**
   * The first index in [from, to) whose counter is not zero, or `to`. Skips zero counters eight
   * bytes at a time: a repair's passes over a file grown to terabytes are mostly zeros (2^31
   * clusters took 40 s one counter at a time).
   */
  nextNonZero(from: number, to: number): number {
    const a = this.a;
    const end = Math.min(to, a.length);
    const bpe = a.BYTES_PER_ELEMENT;
    const group = 8 / bpe; // counters per 8 bytes
    let i = from;
    while (i < end && i % group !== 0) {
      if (a[i]) return i;
      i++;
    }
    if (this.words === null || this.words.buffer !== a.buffer) this.words = new Uint32Array(a.buffer, a.byteOffset, a.byteLength >>> 2);
    const w = this.words;
    const wordsEnd = Math.floor(end / group) * 2;
    let k = (i / group) * 2;
    while (k < wordsEnd && (w[k]! | w[k + 1]!) === 0) k += 2;
    for (i = (k / 2) * group; i < end; i++) if (a[i]) return i;
    return to;
  }
}
