// Big-endian integer access on raw bytes; 64-bit values as exact JS numbers or an error.

import { QimgError } from '../errors.js';

export function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

export function u16(buf: Uint8Array, off: number): number {
  return (buf[off]! << 8) | buf[off + 1]!;
}

export function u32(buf: Uint8Array, off: number): number {
  return ((buf[off]! << 24) | (buf[off + 1]! << 16) | (buf[off + 2]! << 8) | buf[off + 3]!) >>> 0;
}

const ZERO_SPAN = new Uint8Array(4096);

/**
 * Indices of the 8-byte entries of `table` (a refcount or L1 table) that are not all zero, in
 * order. All-zero 4 KiB stretches are passed over with one native compare each: a new image's
 * refcount table is a cluster of entries of which one or two are set, and every writer walks it.
 */
export function nonZeroEntries(table: Uint8Array): number[] {
  const out: number[] = [];
  for (let base = 0; base < table.length; base += ZERO_SPAN.length) {
    const end = Math.min(table.length, base + ZERO_SPAN.length);
    if (Buffer.compare(table.subarray(base, end), ZERO_SPAN.subarray(0, end - base)) === 0) continue;
    for (let e = base; e + 8 <= end; e += 8) if (u32(table, e) !== 0 || u32(table, e + 4) !== 0) out.push(e / 8);
  }
  return out;
}

/** A 64-bit field that must be an exact number; `what` names it in the error. */
export function u64(buf: Uint8Array, off: number, what: string): number {
  const hi = u32(buf, off);
  const lo = u32(buf, off + 4);
  if (hi > 0x1fffff) {
    throw new QimgError('BAD_IMAGE', `${what} is too large (0x${hi.toString(16).padStart(8, '0')}${lo.toString(16).padStart(8, '0')})`);
  }
  return hi * 0x100000000 + lo;
}

/** A 64-bit field kept whole (feature masks, icount -1). */
export function u64n(buf: Uint8Array, off: number): bigint {
  return (BigInt(u32(buf, off)) << 32n) | BigInt(u32(buf, off + 4));
}

export function setU16(buf: Uint8Array, off: number, v: number): void {
  buf[off] = (v >>> 8) & 0xff;
  buf[off + 1] = v & 0xff;
}

export function setU32(buf: Uint8Array, off: number, v: number): void {
  buf[off] = (v >>> 24) & 0xff;
  buf[off + 1] = (v >>> 16) & 0xff;
  buf[off + 2] = (v >>> 8) & 0xff;
  buf[off + 3] = v & 0xff;
}

export function setU64(buf: Uint8Array, off: number, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new QimgError('USAGE', `cannot encode ${v} as an unsigned 64-bit field`);
  setU32(buf, off, Math.floor(v / 0x100000000));
  setU32(buf, off + 4, v >>> 0);
}

export function setU64n(buf: Uint8Array, off: number, v: bigint): void {
  setU32(buf, off, Number((v >> 32n) & 0xffffffffn));
  setU32(buf, off + 4, Number(v & 0xffffffffn));
}

const utf8 = new TextDecoder('utf-8');
const utf8Strict = new TextDecoder('utf-8', { fatal: true });
const utf8Enc = new TextEncoder();

/** Bytes -> string; invalid UTF-8 falls back to latin1 so every byte still shows. */
export function decodeString(buf: Uint8Array): string {
  try {
    return utf8Strict.decode(buf);
  } catch {
    return utf8.decode(buf);
  }
}

export function encodeString(s: string): Uint8Array {
  return utf8Enc.encode(s);
}

export function align(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

export function isAligned(n: number, a: number): boolean {
  return n % a === 0;
}

export const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/**
 * A Uint32Array over `buf` (which must be 4-byte aligned) for hot loops over table entries;
 * its words are in host order, so pass each through `be32` before use.
 */
export function words32(buf: Uint8Array): Uint32Array | null {
  return buf.byteOffset % 4 === 0 && buf.length % 4 === 0 ? new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2) : null;
}

/**
 * The same words as int32s. Hot loops that only mask, compare and store words prefer these: a
 * uint32 at or above 2^31 is not a small integer to V8 and takes slower paths.
 */
export function ints32(buf: Uint8Array): Int32Array | null {
  return buf.byteOffset % 4 === 0 && buf.length % 4 === 0 ? new Int32Array(buf.buffer, buf.byteOffset, buf.length >>> 2) : null;
}

/** A big-endian word read through words32(), as a uint32. */
export const be32: (w: number) => number = LITTLE_ENDIAN_HOST
  ? (w) => (((w & 0xff) << 24) | ((w & 0xff00) << 8) | ((w >>> 8) & 0xff00) | (w >>> 24)) >>> 0
  : (w) => w >>> 0;
