// Walking L1 trees in file order: every distinct L2 table read once, in large sequential reads,
// and the per-cluster reference deltas a snapshot operation needs.

import { QimgError, hex } from '../errors.js';
import { be32, u32, words32 } from '../format/bytes.js';
import { compressedByteLength, compressedOffset, corruptEntry, entryOffset, l2EntryProblem } from '../format/entries.js';
import * as L from '../format/layout.js';
import { readAt } from '../io/file.js';
import type { Qcow2Image } from './qcow2-image.js';

/** Largest single read when L2 tables are adjacent on disk. */
const MAX_COALESCED_READ = 8 * 1024 * 1024;

/** Offsets of the L2 tables an L1 table references, in entry order (0 for unused entries skipped). */
export function l2Offsets(img: Qcow2Image, l1: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i * 8 < l1.length; i++) {
    const off = entryOffset(u32(l1, i * 8), u32(l1, i * 8 + 4));
    if (off === 0) continue;
    if (off % img.clusterSize !== 0) throw new QimgError('CORRUPT', `L1 table: entry ${i} points to unaligned L2 table offset ${hex(off)}`);
    out.push(off);
  }
  return out;
}

/** Throws unless every L2 table `l1` names lies inside the file (checked before a write starts). */
export function assertTreeInFile(img: Qcow2Image, l1: Uint8Array): void {
  for (const off of l2Offsets(img, l1)) {
    if (off + img.clusterSize > img.fileSize) throw new QimgError('CORRUPT', `L2 table at ${hex(off)} lies past the end of the file`);
  }
}

/**
 * Calls `visit` for each distinct L2 table in `offsets`, in file-offset order, reading runs of
 * adjacent tables with one read. Tables a writer holds uncommitted are taken from its cache.
 * The table handed to `visit` lives in a reused buffer: copy it to keep it.
 */
export function forEachL2(img: Qcow2Image, offsets: number[], visit: (offset: number, table: Uint8Array) => void): void {
  const cs = img.clusterSize;
  const sorted = [...new Set(offsets)].sort((a, b) => a - b);
  let scratch = new Uint8Array(0);
  let i = 0;
  while (i < sorted.length) {
    const start = sorted[i]!;
    const dirty = img.dirtyL2.get(start);
    if (dirty) {
      visit(start, dirty);
      i++;
      continue;
    }
    let j = i + 1;
    while (j < sorted.length && sorted[j] === start + (j - i) * cs && (j - i + 1) * cs <= MAX_COALESCED_READ && !img.dirtyL2.has(sorted[j]!)) j++;
    const n = j - i;
    if (start + n * cs > img.fileSize) throw new QimgError('CORRUPT', `L2 table at ${hex(start)} lies past the end of the file`);
    // One reused read buffer: visitors must copy a table they want to keep (they do: slice()).
    if (scratch.length < n * cs) scratch = new Uint8Array(Math.min(MAX_COALESCED_READ, Math.max(n * cs, scratch.length * 2)));
    const buf = scratch.subarray(0, n * cs);
    readAt(img.file, buf, start);
    for (let k = 0; k < n; k++) visit(start + k * cs, buf.subarray(k * cs, (k + 1) * cs));
    i = j;
  }
}

/**
 * Adds `d` to deltas[c] for every host cluster a tree reaches through `l1`: each L2 table once
 * per L1 entry naming it, each data cluster once per L2 entry, and every cluster a compressed
 * cluster's sectors touch.
 */
export function accumulateTree(img: Qcow2Image, l1: Uint8Array, deltas: Int32Array, d: number, strict = false): void {
  const cs = img.clusterSize;
  // Writers refuse trees they would copy or re-count with broken entries (QEMU refuses the
  // unaligned ones with EIO and marks the image corrupt); readers (freed-bytes) tolerate them.
  if (strict) {
    for (let i = 0; i * 8 < l1.length; i++) {
      const hi = u32(l1, i * 8);
      const lo = u32(l1, i * 8 + 4);
      if ((hi & L.L1E_RESERVED_HI) !== 0 || (lo & L.L1E_RESERVED_LO) !== 0) throw corruptEntry('L1 table', 0, i, 'has reserved bits set');
    }
  }
  const offsets = l2Offsets(img, l1);
  const uses = new Map<number, number>();
  for (const off of offsets) uses.set(off, (uses.get(off) ?? 0) + 1);
  const ew = img.extendedL2 ? 16 : 8;
  const extL2 = img.extendedL2;
  const cb = img.clusterBits;
  forEachL2(img, offsets, (off, table) => {
    const dd = d * uses.get(off)!;
    bump(deltas, off / cs, dd);
    accumulateTable(table, off, deltas, dd, cb, ew, strict, extL2);
  });
}

/**
 * The hot loop of every snapshot operation: one L2 table's references into `deltas`. Kept a
 * plain function of its arguments (no closure state) and on integer arithmetic so V8 keeps it
 * tight: host-order words, byte-swapped only when non-zero.
 */
function accumulateTable(table: Uint8Array, off: number, deltas: Int32Array, dd: number, cb: number, ew: number, strict: boolean, extL2: boolean): void {
  const cs = 2 ** cb;
  const hiScale = 0x100000000 / cs;
  const lowMask = cs - 1;
  // Module-namespace constants read into locals: the loop then compiles to plain immediates.
  const COMPRESSED = L.OFLAG_COMPRESSED_HI;
  const MASK_LO = L.OFFSET_MASK_LO;
  const MASK_HI = L.OFFSET_MASK_HI;
  const ZERO = L.OFLAG_ZERO_LO;
  const words = words32(table);
  const step = ew >>> 2;
  const nWords = table.length >>> 2;
  for (let w = 0; w < nWords; w += step) {
    let hi: number;
    let lo: number;
    if (words !== null) {
      const a = words[w]!;
      const b = words[w + 1]!;
      if (a === 0 && b === 0) continue;
      hi = be32(a);
      lo = be32(b);
    } else {
      hi = u32(table, w * 4);
      lo = u32(table, w * 4 + 4);
      if (hi === 0 && lo === 0) continue;
    }
    if (hi & COMPRESSED) {
      const co = compressedOffset(hi, lo, cb);
      const len = compressedByteLength(hi, lo, cb);
      const first = Math.floor(co / cs);
      const last = Math.floor((co + len - 1) / cs);
      for (let c = first; c <= last; c++) bump(deltas, c, dd);
      continue;
    }
    const offLo = (lo & MASK_LO) >>> 0;
    if (strict && ((offLo & lowMask) !== 0 || (extL2 && (lo & ZERO) !== 0))) {
      throw corruptEntry('L2 table', off, (w * 4) / ew, l2EntryProblem(hi, lo, cs, extL2) ?? 'is invalid');
    }
    const hiOff = hi & MASK_HI;
    if (hiOff === 0 && offLo === 0) continue;
    const ci = hiOff * hiScale + (offLo >>> cb);
    if (ci >= deltas.length) bump(deltas, ci, dd); // throws
    deltas[ci] = deltas[ci]! + dd;
  }
}

function bump(deltas: Int32Array, ci: number, d: number): void {
  if (ci >= deltas.length) throw new QimgError('CORRUPT', `cluster ${hex(ci)} referenced past the end of the image's refcount coverage`);
  deltas[ci] = deltas[ci]! + d;
}
