// The checker's in-memory refcount array: one counter per host cluster, widened on overflow.
//
// Starts as bytes (most images have refcounts far below 256) and is promoted to 16, 32 and
// 64-bit (float) counters only when an entry outgrows its width, so a 1 TiB file costs 16 MiB.

export type Counters = Uint8Array | Uint16Array | Uint32Array | Float64Array;

export class RefArray {
  a: Counters;
  /** Largest value the current element type holds. */
  limit: number;

  constructor(length: number) {
    this.a = new Uint8Array(length);
    this.limit = 0xff;
  }

  get length(): number {
    return this.a.length;
  }

  /** Switches to the next wider element type (the hot loop re-reads `a` afterwards). */
  promote(): void {
    const old = this.a;
    let next: Counters;
    if (old instanceof Uint8Array) {
      next = new Uint16Array(old.length);
      this.limit = 0xffff;
    } else if (old instanceof Uint16Array) {
      next = new Uint32Array(old.length);
      this.limit = 0xffffffff;
    } else {
      next = new Float64Array(old.length);
      this.limit = Number.MAX_SAFE_INTEGER;
    }
    next.set(old);
    this.a = next;
  }

  /** Makes room for index `n - 1` (keeps the element type). */
  ensure(n: number): void {
    if (n <= this.a.length) return;
    const len = Math.max(n, Math.ceil(this.a.length * 1.25) + 64);
    const C = this.a.constructor as new (n: number) => Counters;
    const next = new C(len);
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
}
