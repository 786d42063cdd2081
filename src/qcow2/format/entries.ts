// L1, L2 (standard and extended) and refcount-table entry codecs, and the closed set of L2 entry kinds.
//
// Entries are 64-bit big-endian words handled as (hi, lo) uint32 halves so hot loops never
// touch BigInt. Bit layout (spec "Cluster mapping"):
//   L1:  bits 9-55 L2 table offset | 63 COPIED
//   L2:  standard: bit 0 ZERO (v3, not extended L2) | 9-55 host offset | 62 = 0 | 63 COPIED
//        compressed (bit 62 = 1): bits 0..x-1 host offset, x..61 extra 512-byte sectors,
//        with x = 62 - (cluster_bits - 8)
//   extended L2 adds a second word: bits 0-31 subcluster allocated, 32-63 subcluster reads zero.

import { QimgError, hex } from '../errors.js';
import { u32 } from './bytes.js';
import * as L from './layout.js';

/** The kinds an L2 entry can describe; every switch over them is exhaustive. */
export const ClusterKind = {
  /** Read from the backing file (or zeros without one). */
  Unallocated: 0,
  /** Reads as zeros; no host cluster. */
  ZeroPlain: 1,
  /** Reads as zeros; a host cluster is preallocated. */
  ZeroAlloc: 2,
  /** Data at a host cluster. */
  Normal: 3,
  /** Deflate/zstd data at an unaligned host offset. */
  Compressed: 4,
} as const;
export type ClusterKind = (typeof ClusterKind)[keyof typeof ClusterKind];

/** Bits 9-55 of a (hi, lo) word: the offset field of L1 and standard L2 entries. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & L.OFFSET_MASK_HI) * 0x100000000 + ((lo & L.OFFSET_MASK_LO) >>> 0);
}

/**
 * Bits 9-63 of a (hi, lo) word: the offset field of a refcount table entry (the spec reserves only
 * bits 0-8 there). Past 2^53 the value is not exact, but it is past the end of every file.
 */
export function refcountTableEntryOffset(hi: number, lo: number): number {
  return (hi >>> 0) * 0x100000000 + ((lo & L.OFFSET_MASK_LO) >>> 0);
}

export function isCopied(hi: number): boolean {
  return (hi & L.OFLAG_COPIED_HI) !== 0;
}

export function isCompressed(hi: number): boolean {
  return (hi & L.OFLAG_COMPRESSED_HI) !== 0;
}

/** Classifies a standard (non-extended) L2 entry. `zeroFlag` is false on v2 images. */
export function classifyL2(hi: number, lo: number, zeroFlag: boolean): ClusterKind {
  if (hi & L.OFLAG_COMPRESSED_HI) return ClusterKind.Compressed;
  const hasOffset = (hi & L.OFFSET_MASK_HI) !== 0 || (lo & L.OFFSET_MASK_LO) !== 0;
  if (zeroFlag && lo & L.OFLAG_ZERO_LO) return hasOffset ? ClusterKind.ZeroAlloc : ClusterKind.ZeroPlain;
  return hasOffset ? ClusterKind.Normal : ClusterKind.Unallocated;
}

/** Bit position where the compressed descriptor's sector count starts. */
export function compressedSizeShift(clusterBits: number): number {
  return 62 - (clusterBits - 8);
}

/** Host byte offset of compressed data. */
export function compressedOffset(hi: number, lo: number, clusterBits: number): number {
  const hiBits = compressedSizeShift(clusterBits) - 32;
  return (hi & ((1 << hiBits) - 1)) * 0x100000000 + lo;
}

/** Total 512-byte sectors (1 + the stored count of additional ones) a compressed cluster spans. */
export function compressedSectors(hi: number, clusterBits: number): number {
  const hiBits = compressedSizeShift(clusterBits) - 32;
  return ((hi >>> hiBits) & ((1 << (clusterBits - 8)) - 1)) + 1;
}

/** Bytes to read for a compressed cluster: its sectors, less the part of the first before the offset. */
export function compressedByteLength(hi: number, lo: number, clusterBits: number): number {
  const off = compressedOffset(hi, lo, clusterBits);
  return compressedSectors(hi, clusterBits) * L.COMPRESSED_SECTOR_SIZE - (off % L.COMPRESSED_SECTOR_SIZE);
}

/** Encodes a compressed descriptor (flags not included beyond bit 62). */
export function encodeCompressed(offset: number, sectors: number, clusterBits: number): [number, number] {
  const hiBits = compressedSizeShift(clusterBits) - 32;
  const hi = (Math.floor(offset / 0x100000000) | ((sectors - 1) << hiBits) | L.OFLAG_COMPRESSED_HI) >>> 0;
  return [hi, offset >>> 0];
}

/** Encodes a standard offset entry with optional COPIED and ZERO flags. */
export function encodeOffset(offset: number, copied: boolean, zero = false): [number, number] {
  const hi = (Math.floor(offset / 0x100000000) | (copied ? L.OFLAG_COPIED_HI : 0)) >>> 0;
  const lo = ((offset >>> 0) | (zero ? L.OFLAG_ZERO_LO : 0)) >>> 0;
  return [hi, lo];
}

/** Subcluster state in an extended L2 entry. */
export const SubclusterKind = { Unallocated: 0, Zero: 1, Allocated: 2 } as const;
export type SubclusterKind = (typeof SubclusterKind)[keyof typeof SubclusterKind];

/** State of subcluster `sc` (0..31) from the bitmap word pair (zeroBits = hi word, allocBits = lo word). */
export function subclusterKind(allocBits: number, zeroBits: number, sc: number): SubclusterKind {
  const bit = 1 << sc;
  if (allocBits & bit) return SubclusterKind.Allocated;
  if (zeroBits & bit) return SubclusterKind.Zero;
  return SubclusterKind.Unallocated;
}

/** Reads entry `index` of a table of 64-bit words as [hi, lo]. */
export function readEntry(table: Uint8Array, index: number): [number, number] {
  const off = index * 8;
  return [u32(table, off), u32(table, off + 4)];
}

/**
 * Checks a standard L2 entry's reserved bits and alignment the way a reader must before use;
 * returns a message (not a throw) so the checker can count it.
 */
export function l2EntryProblem(hi: number, lo: number, clusterSize: number, extendedL2: boolean): string | null {
  if (hi & L.OFLAG_COMPRESSED_HI) return null;
  const off = entryOffset(hi, lo);
  if (off % clusterSize !== 0) return `offset ${hex(off)} is not aligned to the cluster size`;
  if (extendedL2 && lo & L.OFLAG_ZERO_LO) return 'reserved bit 0 is set';
  return null;
}

export function corruptEntry(what: string, tableOffset: number, index: number, problem: string): QimgError {
  return new QimgError('CORRUPT', `${what} at ${hex(tableOffset)}: entry ${index} ${problem}`, { tableOffset, index });
}
