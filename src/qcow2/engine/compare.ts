// `compare`: are two images' guest contents the same? qemu-img 7.2's walk, messages and results:
// block status of both chains side by side; equal zero ranges skipped; a range allocated on one
// side only must read as zeros on it; the first difference is reported at its 512-byte sector.
// Strict mode (-s) also fails on different sizes and on any difference in block status.

import { BS_ALLOCATED, BS_ZERO, chainStatus } from './map.js';
import type { Layer } from './layer.js';
import { openImage, type BackingPolicy, type ImageFormat } from './open.js';
import { ioBuffer } from '../io/buffers.js';

const IO_BUF = 2 * 1024 * 1024;
const SECTOR = 512;

export interface CompareOptions {
  format1?: ImageFormat;
  format2?: ImageFormat;
  strict?: boolean;
  forceShare?: boolean;
  backing?: BackingPolicy;
  progress?: (done: number, total: number) => void;
}

export interface CompareResult {
  identical: boolean;
  /** The lines qemu-img prints (each without its newline), in order. */
  lines: string[];
  /** Offset of the first difference, when there is one in content. */
  mismatchAt: number | null;
}

/** First byte offset (relative) of the first 512-byte sector where a and b differ, or -1. */
function firstDifferentSector(a: Uint8Array, b: Uint8Array): number {
  if (Buffer.compare(a, b) === 0) return -1;
  for (let pos = 0; pos < a.length; pos += SECTOR) {
    const end = Math.min(pos + SECTOR, a.length);
    if (Buffer.compare(a.subarray(pos, end), b.subarray(pos, end)) !== 0) return pos;
  }
  return -1;
}

function firstNonZeroSector(a: Uint8Array): number {
  let i = 0;
  // Fast skip of zero words, then round down to the sector.
  const n = a.length;
  while (i < n && a[i] === 0) i++;
  return i >= n ? -1 : Math.floor(i / SECTOR) * SECTOR;
}

/** Compares two opened images. */
export function compareLayers(a: Layer, b: Layer, opts: { strict?: boolean; progress?: (done: number, total: number) => void } = {}): CompareResult {
  a.assertReadable();
  b.assertReadable();
  const lines: string[] = [];
  const sizeA = a.virtualSize;
  const sizeB = b.virtualSize;
  if (opts.strict && sizeA !== sizeB) {
    return { identical: false, lines: ['Strict mode: Image size mismatch!'], mismatchAt: null };
  }
  const common = Math.min(sizeA, sizeB);
  const total = Math.max(sizeA, sizeB);
  const bufA = ioBuffer(IO_BUF);
  const bufB = ioBuffer(IO_BUF);
  const mismatch = (at: number): CompareResult => ({ identical: false, lines: [...lines, `Content mismatch at offset ${at}!`], mismatchAt: at });
  let offset = 0;
  while (offset < common) {
    const s1 = chainStatus(a, offset, sizeA - offset);
    const s2 = chainStatus(b, offset, sizeB - offset);
    let chunk = Math.min(s1.length, s2.length);
    if (opts.strict && s1.flags !== s2.flags) {
      return { identical: false, lines: [`Strict mode: Offset ${offset} block status mismatch!`], mismatchAt: null };
    }
    const al1 = (s1.flags & BS_ALLOCATED) !== 0;
    const al2 = (s2.flags & BS_ALLOCATED) !== 0;
    if ((s1.flags & BS_ZERO) && (s2.flags & BS_ZERO)) {
      // both read as zeros
    } else if (al1 === al2) {
      chunk = Math.min(chunk, IO_BUF);
      const x = bufA.subarray(0, chunk);
      const y = bufB.subarray(0, chunk);
      a.read(x, offset);
      b.read(y, offset);
      const d = firstDifferentSector(x, y);
      if (d >= 0) return mismatch(offset + d);
    } else {
      chunk = Math.min(chunk, IO_BUF);
      const x = bufA.subarray(0, chunk);
      (al1 ? a : b).read(x, offset);
      const d = firstNonZeroSector(x);
      if (d >= 0) return mismatch(offset + d);
    }
    offset += chunk;
    opts.progress?.(offset, total);
  }
  if (sizeA !== sizeB) {
    lines.push('Warning: Image size mismatch!');
    const over = sizeA > sizeB ? a : b;
    while (offset < total) {
      const s = chainStatus(over, offset, total - offset);
      let chunk = s.length;
      if (s.flags & BS_ALLOCATED && !(s.flags & BS_ZERO)) {
        chunk = Math.min(chunk, IO_BUF);
        const x = bufA.subarray(0, chunk);
        over.read(x, offset);
        const d = firstNonZeroSector(x);
        if (d >= 0) return mismatch(offset + d);
      }
      offset += chunk;
      opts.progress?.(offset, total);
    }
  }
  lines.push('Images are identical.');
  return { identical: true, lines, mismatchAt: null };
}

/** `qemu-img compare A B`: opens both read-only (shared locks, or none with forceShare). */
export async function compare(pathA: string, pathB: string, opts: CompareOptions = {}): Promise<CompareResult> {
  const a = await openImage(pathA, { format: opts.format1, forceShare: opts.forceShare, backing: opts.backing });
  let b: Layer;
  try {
    b = await openImage(pathB, { format: opts.format2, forceShare: opts.forceShare, backing: opts.backing });
  } catch (err) {
    await a.close();
    throw err;
  }
  try {
    return compareLayers(a, b, opts);
  } finally {
    await a.close();
    await b.close();
  }
}
