// `rebase`: give an image a new backing file. Safe mode first copies into the image every range
// where the old chain and the new backing read differently (and the image has nothing of its own),
// so the guest sees the same bytes; `-u` only rewrites the header; an empty name flattens.
//
// Order (one ImageWriter.commit, after setBacking): the copied data goes into fresh clusters as it
// is found, unflushed; then refcount increases, flush (data and refcounts durable); L2/L1 tables,
// flush; the header naming the new backing file, in one write of the header region, flush. These
// three flushes are the only ordering points (the writeback hints issued while copying are not
// ordering points, they only let the disk start early). A crash before the header write leaves
// the old backing file in place and the copied clusters merely redundant; after it, the new
// backing file plus the copies give the same guest bytes. (qemu-img 7.2 writes the header before
// the L2 tables, with two flushes in all; qimg keeps the stricter order for one more flush, which
// costs well under a millisecond once the data is on disk.)

import { statSync } from 'node:fs';
import { dirname } from 'node:path';
import { QimgError } from '../errors.js';
import type { Layer } from './layer.js';
import { layersOf } from './chain.js';
import { BS_ALLOCATED, layerStatus } from './map.js';
import { openImage, resolveBackingPath, type BackingPolicy, type ImageFormat } from './open.js';
import type { Qcow2Image } from './qcow2-image.js';
import { openWriter, type ImageWriter } from './writer.js';
import { ioBufferB } from '../io/buffers.js';

/** Compare buffer (QEMU uses 2 MiB too). */
const CHUNK = 2 * 1024 * 1024;
const SECTOR = 512;

export interface RebaseOptions {
  format?: ImageFormat;
  /** The new backing file name, stored as given ('' removes the backing file: flatten). */
  backingFile: string;
  backingFormat?: string;
  /** -u: rewrite the header only; the guest then sees whatever the new backing holds. */
  unsafe?: boolean;
  backing?: BackingPolicy;
  progress?: (done: number, total: number) => void;
}

function checkFormat(name: string, fmt: string | undefined): void {
  if (name === '') return;
  if (fmt === undefined) throw new QimgError('USAGE', `Could not change the backing file to '${name}': backing format must be specified`);
  if (fmt !== 'qcow2' && fmt !== 'raw') throw new QimgError('UNSUPPORTED', `Unknown driver '${fmt}'`);
}

/**
 * Names a new backing file in the header after committing everything pending (the header write
 * comes last in that commit, after the copied data and its tables are durable).
 */
export function rewriteBacking(w: ImageWriter, name: string | null, format: string | null): void {
  w.setBacking(name, format);
  w.commit();
}

function sameFile(a: string, b: string): boolean {
  try {
    const x = statSync(a);
    const y = statSync(b);
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}

/**
 * Copies into the top every sector run where `oldTop` (the old chain; null = zeros) and `newTop`
 * (null = zeros) differ and the top has nothing allocated. `prefix` is the number of old layers
 * above the new backing when the new backing is itself in the old chain: ranges none of them
 * allocate are equal by construction and skipped without reading.
 */
export function copyDifferences(w: ImageWriter, oldTop: Layer | null, newTop: Layer | null, prefix: Layer[] | null, progress?: (done: number, total: number) => void): void {
  const top = w.img;
  const size = top.virtualSize;
  // Buffer views (for the native compare) over word-aligned memory (for the first-word test).
  const a = ioBufferB(CHUNK);
  const b = ioBufferB(CHUNK);
  let offset = 0;
  while (offset < size) {
    let len = Math.min(CHUNK, size - offset);
    const s = layerStatus(top, offset, len);
    len = s.length;
    let skip = (s.flags & BS_ALLOCATED) !== 0;
    if (!skip && prefix) {
      skip = true;
      for (const l of prefix) {
        if (offset >= l.virtualSize) {
          skip = false;
          break;
        }
        const ls = layerStatus(l, offset, len);
        len = ls.length;
        if (ls.flags & BS_ALLOCATED) {
          skip = false;
          break;
        }
      }
    }
    if (!skip) {
      // A side that reads as zeros is not read; both reading zeros needs no work at all.
      const oe = oldTop && offset < oldTop.virtualSize ? oldTop.extent(offset, len) : { kind: 'zero' as const, length: len };
      const ne = newTop && offset < newTop.virtualSize ? newTop.extent(offset, len) : { kind: 'zero' as const, length: len };
      if (oe.kind === 'zero' && ne.kind === 'zero') {
        len = Math.max(Math.min(oe.length, ne.length), 1);
      } else if (oe.kind === 'zero') {
        // The old chain reads zeros where the new one has data: those sectors get zeros written
        // (as data: writeZeroes skips what already reads as zero through the OLD backing).
        len = Math.max(Math.min(oe.length, len), 1);
        const x = a.subarray(0, len).fill(0);
        const y = b.subarray(0, len);
        newTop!.read(y, offset);
        differingRuns(y, null, (p, e) => w.write(x.subarray(p, e), offset + p));
      } else {
        // Stop where the old chain's data ends: what follows reads as zeros and is not read.
        len = Math.max(Math.min(oe.length, ne.kind === 'zero' ? ne.length : len, len), 1);
        const x = a.subarray(0, len);
        oldTop!.read(x, offset);
        let y: Buffer | null = null;
        if (ne.kind !== 'zero') {
          y = b.subarray(0, len);
          newTop!.read(y, offset);
        }
        differingRuns(x, y, (p, e) => w.write(x.subarray(p, e), offset + p));
      }
    }
    offset += len;
    progress?.(offset, size);
  }
}

/** Zeros to compare against (one block). */
const ZEROS = Buffer.alloc(64 * SECTOR);
/** Equal stretches are skipped this many bytes at a time by one native compare. */
const BLOCK = ZEROS.length;

/**
 * Calls `emit(start, end)` for each maximal run of 512-byte sectors (the last one may be short)
 * where x differs from y (null: zeros). x and y start word-aligned. A differing sector is nearly
 * always told by its first 32-bit word, so a run of changed data costs one integer compare per
 * sector; equal sectors are confirmed by Buffer.compare, whole blocks at a time while they last.
 */
function differingRuns(x: Buffer, y: Buffer | null, emit: (start: number, end: number) => void): void {
  const n = x.length;
  const x32 = new Int32Array(x.buffer, x.byteOffset, n >>> 2);
  const y32 = y ? new Int32Array(y.buffer, y.byteOffset, n >>> 2) : null;
  const same = (p: number, e: number): boolean => (y ? x.compare(y, p, e, p, e) : x.compare(ZEROS, 0, e - p, p, e)) === 0;
  const differs = (p: number): boolean => {
    if (p + 4 <= n && x32[p >>> 2] !== (y32 ? y32[p >>> 2] : 0)) return true;
    return !same(p, Math.min(p + SECTOR, n));
  };
  let p = 0;
  while (p < n) {
    if (differs(p)) {
      let e = p + SECTOR;
      while (e < n && differs(e)) e += SECTOR;
      e = Math.min(e, n);
      emit(p, e);
      p = e;
    } else {
      p += SECTOR;
      while (p + BLOCK <= n && same(p, p + BLOCK)) p += BLOCK;
    }
  }
}

/** `qemu-img rebase`. */
export async function rebase(path: string, opts: RebaseOptions): Promise<void> {
  const name = opts.backingFile;
  checkFormat(name, opts.backingFormat);
  const policy = opts.backing ?? { follow: 'within' };
  const fmt = name === '' ? null : opts.backingFormat!;
  if (opts.unsafe) {
    const w = await openWriter(path, { openBacking: false, rawError: `Could not change the backing file to '${name}': Operation not supported` });
    try {
      // No backing file to remove: qemu-img leaves the file as it is (no header rewrite).
      if (name !== '' || w.header.backingFile !== null) rewriteBacking(w, name === '' ? null : name, fmt);
    } catch (err) {
      await w.abandon();
      throw err;
    }
    await w.close();
    return;
  }

  let newTop: Layer | null = null;
  if (name !== '') {
    const newPath = resolveBackingPath(path, name);
    const newPolicy: BackingPolicy = policy.follow === 'within' ? { follow: 'within', roots: [...(policy.roots ?? []), dirname(path), dirname(newPath)] } : policy;
    // Without locks first: a new chain that contains FILE itself would turn our lock on FILE
    // into a read lock (POSIX locks are per process), so it is refused before anything is locked.
    try {
      const probe = await openImage(newPath, { format: fmt as ImageFormat, forceShare: true, backing: newPolicy });
      try {
        if (layersOf(probe).some((l) => sameFile(l.filename, path))) {
          throw new QimgError('BACKING', `Could not open new backing file '${name}': it is '${path}' itself or backed by it (a loop)`);
        }
      } finally {
        await probe.close();
      }
      newTop = await openImage(newPath, { format: fmt as ImageFormat, backing: newPolicy });
    } catch (err) {
      if (err instanceof QimgError && !err.message.startsWith('Could not open new backing file')) {
        throw new QimgError(err.code, `Could not open new backing file '${name}': ${err.message}`, err.data);
      }
      throw err;
    }
  }
  let w: ImageWriter;
  try {
    w = await openWriter(path, { backing: policy, rawError: `Could not change the backing file to '${name}': Operation not supported` });
  } catch (err) {
    await newTop?.close();
    throw err;
  }
  try {
    const top: Qcow2Image = w.img;
    top.assertReadable();
    newTop?.assertReadable();
    // The copy allocates clusters at the image's end: reserve blocks ahead (NodeFile.growAhead).
    top.file.growAhead?.();
    const old = layersOf(top).slice(1);
    let prefix: Layer[] | null = null;
    if (newTop) {
      const k = old.findIndex((l) => sameFile(l.filename, newTop!.filename));
      if (k >= 0 && old[k]!.format === newTop.format) prefix = old.slice(0, k);
    }
    copyDifferences(w, top.backing, newTop, prefix, opts.progress);
    // Flattening an image with no backing file changes nothing, the header included (as qemu-img).
    if (name !== '' || w.header.backingFile !== null) rewriteBacking(w, name === '' ? null : name, fmt);
  } catch (err) {
    await w.abandon();
    await newTop?.close();
    throw err;
  }
  await w.close();
  await newTop?.close();
}
