// Refcount block entries of any width (refcount_order 0..6: 1 to 64 bits) on raw bytes.
// Sub-byte widths pack from the least significant bit of each byte (spec: "bit 0 means the
// least significant bit"); 16/32/64-bit entries are big-endian.

import { QimgError } from '../errors.js';
import { u32 } from './bytes.js';

/** Entries per refcount block. */
export function refblockEntries(clusterBits: number, refcountOrder: number): number {
  return 2 ** (clusterBits + 3 - refcountOrder);
}

/** Largest refcount the width can hold (capped to exact JS integers for 64-bit). */
const MAX_BY_ORDER = [1, 3, 15, 255, 65535, 4294967295, Number.MAX_SAFE_INTEGER];

export function maxRefcount(refcountOrder: number): number {
  return MAX_BY_ORDER[refcountOrder] ?? Number.MAX_SAFE_INTEGER;
}

export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 0:
      return (block[index >>> 3]! >>> (index & 7)) & 1;
    case 1:
      return (block[index >>> 2]! >>> ((index & 3) * 2)) & 3;
    case 2:
      return (block[index >>> 1]! >>> ((index & 1) * 4)) & 15;
    case 3:
      return block[index]!;
    case 4:
      return (block[index * 2]! << 8) | block[index * 2 + 1]!;
    case 5:
      return u32(block, index * 4);
    case 6: {
      const hi = u32(block, index * 8);
      if (hi > 0x1fffff) throw new QimgError('CORRUPT', `refcount entry ${index} is too large to represent`);
      return hi * 0x100000000 + u32(block, index * 8 + 4);
    }
    default:
      throw new QimgError('USAGE', `refcount_order ${refcountOrder} is out of range`);
  }
}

export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  if (!(value >= 0 && value <= (MAX_BY_ORDER[refcountOrder] ?? 0)) || !Number.isInteger(value)) {
    throw new QimgError('USAGE', `refcount ${value} does not fit in ${2 ** refcountOrder} bits`);
  }
  switch (refcountOrder) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << refcountOrder;
      const perByte = 8 / bits;
      const byte = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = (block[byte]! & ~mask) | (value << shift);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block[index * 2] = value >>> 8;
      block[index * 2 + 1] = value & 0xff;
      return;
    case 5:
      writeU32(block, index * 4, value);
      return;
    case 6:
      writeU32(block, index * 8, Math.floor(value / 0x100000000));
      writeU32(block, index * 8 + 4, value >>> 0);
      return;
    default:
      throw new QimgError('USAGE', `refcount_order ${refcountOrder} is out of range`);
  }
}

function writeU32(b: Uint8Array, off: number, v: number): void {
  b[off] = v >>> 24;
  b[off + 1] = (v >>> 16) & 0xff;
  b[off + 2] = (v >>> 8) & 0xff;
  b[off + 3] = v & 0xff;
}
