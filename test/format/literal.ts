// Byte-literal builders for the format tests, independent of src/qcow2/format/bytes.ts so a
// bug there cannot hide in both the code and its test.

/** Concatenates arrays of byte values into one Uint8Array. */
export function bytes(...parts: ArrayLike<number>[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(Array.from(p), off);
    off += p.length;
  }
  return out;
}

/** The UTF-8 bytes of a string. */
export const text = (s: string): number[] => Array.from(Buffer.from(s, 'utf8'));

export const zeros = (n: number): number[] => new Array<number>(n).fill(0);
