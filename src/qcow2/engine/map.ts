// Block status as QEMU reports it, per layer and down a backing chain, and `map`'s merged ranges.
//
// qemu-img's map and compare see an image through "block status" flags. Matching their output
// means modelling those flags and the extent lengths QEMU's drivers return: a qcow2 extent is a
// run of clusters of one kind (host-contiguous for allocated ones) that never crosses an L2 table
// and is at most INT_MAX bytes (rounded down to a sector); a raw extent is a data or hole run as
// SEEK_DATA/SEEK_HOLE report it.

import { createRequire } from 'node:module';
import { u32 } from '../format/bytes.js';
import { entryOffset, refcountTableEntryOffset } from '../format/entries.js';
import { getRefcount } from '../format/refblock.js';
import { readAt } from '../io/file.js';
import { OFLAG_COMPRESSED_HI } from '../format/layout.js';
import type { Layer } from './layer.js';
import { hostZero } from './holes.js';
import { Qcow2Image } from './qcow2-image.js';
import { RawImage } from './raw-image.js';

/** QEMU's BDRV_BLOCK_* bits (the ones qemu-img map/compare can observe). */
export const BS_DATA = 0x01;
export const BS_ZERO = 0x02;
export const BS_OFFSET_VALID = 0x04;
export const BS_ALLOCATED = 0x10;
export const BS_EOF = 0x20;
export const BS_COMPRESSED = 0x80;

/** A driver never reports more than INT_MAX bytes at once (aligned down to a sector). */
const MAX_EXTENT = 0x7fffffff - 511;
/** qemu-img map asks for at most 1 GiB at a time. */
const MAP_STEP = 1 << 30;

const SEEK_DATA = 3;
const SEEK_HOLE = 4;

export interface LayerStatus {
  flags: number;
  length: number;
  /** Host offset of the first byte (when BS_OFFSET_VALID). */
  host: number | null;
}

interface FsSeek {
  seekSync(fd: number, offset: number, whence: number): number;
}
let fsExt: FsSeek | null = null;
function seeker(): FsSeek {
  fsExt ??= createRequire(import.meta.url)('fs-ext') as FsSeek;
  return fsExt;
}

/** Status of ONE layer at `offset` (offset < virtualSize), as the block layer sees it with want_zero. */
export function layerStatus(layer: Layer, offset: number, maxLength: number): LayerStatus {
  const len = Math.min(maxLength, layer.virtualSize - offset, MAX_EXTENT);
  let st: LayerStatus;
  if (layer instanceof Qcow2Image) st = qcow2Status(layer, offset, len);
  else if (layer instanceof RawImage) st = rawStatus(layer, offset, len);
  else st = { flags: BS_DATA | BS_ALLOCATED, length: len, host: null };
  if (offset + st.length >= layer.virtualSize) st.flags |= BS_EOF;
  return st;
}

/**
 * Extended L2: an unallocated subcluster inside an allocated cluster still has a host offset,
 * which QEMU reports (OFFSET_VALID without DATA or ZERO).
 */
function unallocatedHost(img: Qcow2Image, offset: number): number | null {
  if (!img.extendedL2) return null;
  const gc = Math.floor(offset / img.clusterSize);
  const l1Index = Math.floor(gc / img.l2Entries);
  if (l1Index * 8 >= img.l1.length) return null;
  const l2 = entryOffset(u32(img.l1, l1Index * 8), u32(img.l1, l1Index * 8 + 4));
  if (l2 === 0) return null;
  const t = img.l2Table(l2);
  const idx = (gc % img.l2Entries) * 16;
  const hi = u32(t, idx);
  if (hi & OFLAG_COMPRESSED_HI) return null;
  const host = entryOffset(hi, u32(t, idx + 4));
  return host === 0 ? null : host + (offset - gc * img.clusterSize);
}

function mappingAt(img: Qcow2Image, offset: number, len: number): { kind: 'unallocated' | 'zero' | 'data' | 'compressed'; length: number; host: number | null } {
  const m = img.mapping(offset, len);
  if (m.kind === 'unallocated' && img.extendedL2) m.host = unallocatedHost(img, offset);
  return m;
}

function qcow2Status(img: Qcow2Image, offset: number, len: number): LayerStatus {
  const l2Span = img.l2Entries * img.clusterSize;
  const end = Math.min(offset + len, (Math.floor(offset / l2Span) + 1) * l2Span);
  const first = mappingAt(img, offset, end - offset);
  let length = first.length;
  while (offset + length < end) {
    const m = mappingAt(img, offset + length, end - offset - length);
    if (m.kind !== first.kind || (m.host === null) !== (first.host === null)) break;
    if (first.kind === 'compressed') break; // QEMU reports compressed clusters one at a time
    if (first.host !== null && m.host !== first.host + length) break;
    length += m.length;
  }
  let flags: number;
  switch (first.kind) {
    case 'data': {
      flags = BS_DATA | BS_OFFSET_VALID | BS_ALLOCATED;
      const z = first.host !== null && metadataPreallocated(img) ? hostZero(img.dataFile, first.host, length) : null;
      if (z) {
        length = z.length;
        if (z.zero) flags |= BS_ZERO;
      }
      break;
    }
    case 'compressed':
      flags = BS_DATA | BS_COMPRESSED | BS_ALLOCATED;
      break;
    case 'zero':
      flags = BS_ZERO | BS_ALLOCATED | (first.host !== null ? BS_OFFSET_VALID : 0);
      break;
    case 'unallocated':
      // Not allocated here: reads as zero when nothing lies below (or below's end).
      flags = (!img.backing || offset >= img.backing.virtualSize ? BS_ZERO : 0) | (first.host !== null ? BS_OFFSET_VALID : 0);
      break;
  }
  return { flags, length, host: first.host };
}

const preallocated = new WeakMap<Qcow2Image, boolean>();

/**
 * QEMU asks the file under a data extent about holes (below) only for an image it takes for
 * metadata-preallocated: one where at least max(10/9 x, 2 +) as many clusters have a refcount as
 * the file has clusters' worth of allocated blocks. Worked out once per open image, as QEMU does
 * on its first block-status call; a refcount block it cannot read (unaligned) makes it false.
 */
function metadataPreallocated(img: Qcow2Image): boolean {
  let v = preallocated.get(img);
  if (v === undefined) {
    v = detectPreallocation(img);
    preallocated.set(img, v);
  }
  return v;
}

function detectPreallocation(img: Qcow2Image): boolean {
  const h = img.header;
  const cs = img.clusterSize;
  const file = img.file;
  const size = file.size();
  const realClusters = Math.floor(file.allocatedBytes() / cs);
  const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
  const endCluster = Math.ceil(Math.ceil(size / 512) * 512 / cs);
  const per = 2 ** (img.clusterBits + 3 - h.refcountOrder);
  // Only the entries covering the file (the table itself was bounded when the image opened).
  const entries = Math.min((h.refcountTableClusters * cs) / 8, Math.ceil(endCluster / per));
  const table = new Uint8Array(entries * 8);
  readAt(file, table, h.refcountTableOffset);
  const block = new Uint8Array(cs);
  let count = 0;
  for (let t = 0; t < entries && count < threshold; t++) {
    const off = refcountTableEntryOffset(u32(table, t * 8), u32(table, t * 8 + 4));
    if (off === 0 || off >= size) continue; // no block, or one past the end (reads as zeros)
    if (off % cs !== 0) return false;
    readAt(file, block, off);
    const n = Math.min(per, endCluster - t * per);
    for (let i = 0; i < n && count < threshold; i++) if (getRefcount(block, i, h.refcountOrder) !== 0) count++;
  }
  return count >= threshold;
}

function rawStatus(raw: RawImage, offset: number, len: number): LayerStatus {
  const fd = raw.file.fd;
  const all = (flags: number): LayerStatus => ({ flags: flags | BS_OFFSET_VALID | BS_ALLOCATED, length: len, host: offset });
  if (fd === null) return all(BS_DATA);
  let data: number;
  try {
    data = seeker().seekSync(fd, offset, SEEK_DATA);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENXIO') return all(BS_ZERO); // trailing hole
    return all(BS_DATA);
  }
  if (data > offset) return { flags: BS_ZERO | BS_OFFSET_VALID | BS_ALLOCATED, length: Math.min(len, data - offset), host: offset };
  let hole: number;
  try {
    hole = seeker().seekSync(fd, offset, SEEK_HOLE);
  } catch {
    return all(BS_DATA);
  }
  // A partial sector of data counts as a whole sector.
  const n = Math.min(len, Math.ceil((hole - offset) / 512) * 512);
  return { flags: BS_DATA | BS_OFFSET_VALID | BS_ALLOCATED, length: Math.max(n, Math.min(len, 512)), host: offset };
}

/** The layers of a chain, top first. */
export function chainLayers(top: Layer): Layer[] {
  const out: Layer[] = [];
  for (let l: Layer | null = top; l; l = l instanceof Qcow2Image ? l.backing : null) out.push(l);
  return out;
}

export interface ChainStatus extends LayerStatus {
  /** Index in the chain of the layer that decided the status. */
  depth: number;
  layer: Layer;
}

/**
 * Status of the whole chain (QEMU's block status "above" no base): the first layer that has the
 * range allocated decides; beyond a shorter backing file the range reads as allocated zeros.
 */
export function chainStatus(top: Layer, offset: number, maxLength: number): ChainStatus {
  const s = layerStatus(top, offset, maxLength);
  const topEnd = top.virtualSize;
  if (s.flags & BS_ALLOCATED) return { ...s, depth: 0, layer: top };
  let cur: ChainStatus = { ...s, depth: 0, layer: top };
  let bytes = s.length;
  let depth = 0;
  for (let p = top instanceof Qcow2Image ? top.backing : null; p; p = p instanceof Qcow2Image ? p.backing : null) {
    depth++;
    if (offset >= p.virtualSize) {
      cur = { flags: BS_ZERO | BS_ALLOCATED, length: bytes, host: null, depth, layer: p };
      break;
    }
    const ps = layerStatus(p, offset, bytes);
    if (ps.flags & BS_ALLOCATED) {
      cur = { ...ps, flags: ps.flags & ~BS_EOF, depth, layer: p };
      break;
    }
    cur = { ...ps, depth, layer: p };
    bytes = ps.length;
  }
  if (offset + cur.length === topEnd) cur.flags |= BS_EOF;
  return cur;
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Host offset, when QEMU knows one (not for compressed clusters or unallocated ranges). */
  offset: number | null;
  /** The file holding the range (only with an offset). */
  filename: string | null;
}

/** One map step: dive down the chain while a layer says neither data nor zero (qemu-img map). */
function mapStatus(top: Layer, offset: number, len: number): MapEntry {
  let layer: Layer | null = top;
  let depth = 0;
  let bytes = len;
  let st: LayerStatus = { flags: 0, length: len, host: null };
  while (layer) {
    st = layerStatus(layer, offset, bytes);
    bytes = st.length;
    if (st.flags & (BS_DATA | BS_ZERO)) break;
    const next: Layer | null = layer instanceof Qcow2Image ? layer.backing : null;
    if (!next) {
      st = { flags: 0, length: bytes, host: null };
      break;
    }
    layer = next;
    depth++;
  }
  const hasOffset = (st.flags & BS_OFFSET_VALID) !== 0 && st.host !== null;
  const owner = layer as Layer;
  const file = owner instanceof Qcow2Image && owner.dataFile !== owner.file ? owner.dataFile.path : owner.filename;
  return {
    start: offset,
    length: bytes,
    depth,
    present: (st.flags & BS_ALLOCATED) !== 0,
    zero: (st.flags & BS_ZERO) !== 0,
    data: (st.flags & BS_DATA) !== 0,
    offset: hasOffset ? st.host : null,
    filename: hasOffset ? file : null,
  };
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.length === 0) return false;
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.filename === null) !== (b.filename === null) || (a.offset === null) !== (b.offset === null)) return false;
  if (a.filename !== null && a.filename !== b.filename) return false;
  if (a.offset !== null && a.offset + a.length !== b.offset) return false;
  return true;
}

/** qemu-img map's ranges for a whole image, adjacent compatible ranges merged. */
export function* mapImage(top: Layer): Generator<MapEntry> {
  top.assertReadable();
  const size = top.virtualSize;
  let cur: MapEntry | null = null;
  let offset = 0;
  while (offset < size) {
    const e = mapStatus(top, offset, Math.min(MAP_STEP, size - offset));
    offset += e.length;
    if (cur && mergeable(cur, e)) {
      cur.length += e.length;
      continue;
    }
    if (cur) yield cur;
    cur = e;
  }
  if (cur) yield cur;
}

/** `map` on a file: opens the chain read-only and returns its merged ranges. */
export async function mapFile(path: string, opts: { format?: 'qcow2' | 'raw'; forceShare?: boolean; backing?: import('./open.js').BackingPolicy } = {}): Promise<MapEntry[]> {
  const { openImage } = await import('./open.js');
  const top = await openImage(path, { format: opts.format, forceShare: opts.forceShare, backing: opts.backing });
  try {
    return [...mapImage(top)];
  } finally {
    await top.close();
  }
}
