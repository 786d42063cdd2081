// `convert -O raw`: guest bytes of an image (active layer or a snapshot, chain included) into a sparse raw file.

import { QimgError } from '../errors.js';
import { NodeFile } from '../io/file.js';
import type { Layer } from './layer.js';
import { closeFile, openImage, type BackingPolicy, type ImageFormat } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import { findSnapshot, parseSnapshotSelector } from './info.js';
import { openSync, closeSync } from 'node:fs';
import { ioError } from '../errors.js';

export interface ConvertOptions {
  format?: ImageFormat;
  outputFormat: 'raw';
  /** `-l`: snapshot.name=N / snapshot.id=I / bare ID-or-name. */
  snapshot?: string;
  forceShare?: boolean;
  backing?: BackingPolicy;
  /** Called with (done, total) bytes as the copy advances. */
  progress?: (done: number, total: number) => void;
}

/** Zero runs shorter than this are written; longer aligned ones become holes (qemu-img's -S 4k). */
const SPARSE_GRANULARITY = 4096;
const CHUNK = 2 * 1024 * 1024;
const ZERO_BLOCK = new Uint8Array(SPARSE_GRANULARITY);

export async function convert(src: string, dst: string, opts: ConvertOptions): Promise<void> {
  if (opts.outputFormat !== 'raw') throw new QimgError('USAGE', `output format '${opts.outputFormat}' is not supported yet`);
  const top = await openImage(src, { format: opts.format, forceShare: opts.forceShare, backing: opts.backing });
  try {
    let source: Layer = top;
    if (opts.snapshot !== undefined) {
      if (!(top instanceof Qcow2Image)) {
        throw new QimgError('USAGE', `Failed to load snapshot: Block format '${top.format}' used by device '' does not support temporarily loading internal snapshots`);
      }
      const sn = findSnapshot(top, parseSnapshotSelector(opts.snapshot));
      if (!sn) throw new QimgError('NOT_FOUND', "Failed to load snapshot: Can't find snapshot");
      source = top.snapshotView(sn);
    }
    await writeRaw(source, dst, opts.progress);
  } finally {
    await top.close();
  }
}

async function writeRaw(source: Layer, dst: string, progress?: (done: number, total: number) => void): Promise<void> {
  // Create/truncate like qemu-img does, then take the write lock on the new file.
  try {
    closeSync(openSync(dst, 'w'));
  } catch (err) {
    throw ioError(err, dst, 'Could not create');
  }
  const out = NodeFile.open(dst, true);
  try {
    const { lockImage } = await import('../io/lock.js');
    await lockImage(out.fd, dst, 'write');
    const size = source.virtualSize;
    const buf = new Uint8Array(CHUNK);
    for (let off = 0; off < size; ) {
      const ext = source.extent(off, Math.min(CHUNK, size - off));
      const len = Math.max(ext.length, 1);
      if (ext.kind === 'data') {
        const chunk = buf.subarray(0, len);
        source.read(chunk, off);
        writeNonZero(out, chunk, off);
      }
      off += len;
      progress?.(Math.min(off, size), size);
    }
    out.truncate(size);
    out.flush();
  } finally {
    await closeFile(out);
  }
}

/** Writes `chunk` at `pos`, leaving aligned all-zero blocks as holes. */
function writeNonZero(out: NodeFile, chunk: Uint8Array, pos: number): void {
  const g = SPARSE_GRANULARITY;
  let runStart = -1;
  // Block boundaries are aligned to the file offset so holes match qemu-img's.
  let i = 0;
  while (i < chunk.length) {
    const next = Math.min(chunk.length, i + (g - ((pos + i) % g)));
    const block = chunk.subarray(i, next);
    const zero = block.length === g && Buffer.compare(block, ZERO_BLOCK) === 0;
    if (!zero && runStart < 0) runStart = i;
    if (zero && runStart >= 0) {
      out.write(chunk.subarray(runStart, i), pos + runStart);
      runStart = -1;
    }
    i = next;
  }
  if (runStart >= 0) out.write(chunk.subarray(runStart), pos + runStart);
}
