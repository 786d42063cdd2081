// `convert -O raw`: guest bytes of an image (active layer or a snapshot, chain included) into a sparse raw file.

import { QimgError } from '../errors.js';
import { NodeFile } from '../io/file.js';
import type { Layer } from './layer.js';
import { closeFile, openImage, type BackingPolicy, type ImageFormat } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import { findSnapshot, parseSnapshotSelector } from './info.js';
import { openSync, closeSync } from 'node:fs';
import { ioError } from '../errors.js';
import { COMPRESSION_ZSTD } from '../format/layout.js';
import type { CreateOptions } from './create.js';

export interface ConvertOptions {
  format?: ImageFormat;
  outputFormat: 'raw' | 'qcow2';
  /** `-o` for the target (its size comes from the source). */
  createOptions?: Omit<CreateOptions, 'format' | 'size'>;
  /** `-c`: write every data cluster compressed (qcow2 targets). */
  compress?: boolean;
  /** `-B`/`-F`: the target's backing file; only what differs from it is written. */
  targetBacking?: { file: string; format?: string };
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
  if (opts.outputFormat === 'raw' && (opts.compress || opts.targetBacking)) {
    throw new QimgError('USAGE', opts.compress ? 'Compression not supported for this file format' : "Backing file not supported for file format 'raw'");
  }
  const top = await openImage(src, { format: opts.format, forceShare: opts.forceShare, backing: opts.backing });
  try {
    top.assertReadable(); // before the output file exists
    let source: Layer = top;
    if (opts.snapshot !== undefined) {
      if (!(top instanceof Qcow2Image)) {
        throw new QimgError('USAGE', `Failed to load snapshot: Block format '${top.format}' used by device '' does not support temporarily loading internal snapshots`);
      }
      const sn = findSnapshot(top, parseSnapshotSelector(opts.snapshot));
      if (!sn) throw new QimgError('NOT_FOUND', "Failed to load snapshot: Can't find snapshot");
      source = top.snapshotView(sn);
    }
    if (opts.outputFormat === 'raw') await writeRaw(source, dst, opts.progress);
    else await writeQcow2(source, dst, opts);
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
    // No fsync: a new output, written the way qemu-img convert writes it (cache mode "unsafe").
  } finally {
    await closeFile(out);
  }
}

/**
 * A new qcow2 image with the source's guest data: zero clusters stay unallocated (or become
 * zero clusters over a backing file that is not zero there); with a target backing file, clusters
 * that already read the same from it are not written.
 */
async function writeQcow2(source: Layer, dst: string, opts: ConvertOptions): Promise<void> {
  const { create } = await import('./create.js');
  const { openWriter, deflateCompressor } = await import('./writer.js');
  const tb = opts.targetBacking;
  await create(dst, {
    ...opts.createOptions,
    format: 'qcow2',
    size: source.virtualSize,
    ...(tb ? { backingFile: tb.file, backingFormat: tb.format } : {}),
  });
  // A new output nobody relies on yet: written in order but not fsynced, as qemu-img convert does.
  const w = await openWriter(dst, { backing: { follow: 'any' }, durable: false });
  try {
    let compressor = deflateCompressor;
    if (opts.compress && w.header.compressionType === COMPRESSION_ZSTD) compressor = await zstdCompressor();
    const cs = w.clusterSize;
    const size = source.virtualSize;
    const backing = w.img.backing;
    const chunkBytes = Math.max(cs, Math.floor(CHUNK / cs) * cs);
    const buf = new Uint8Array(chunkBytes);
    const base = backing ? new Uint8Array(chunkBytes) : null;
    for (let off = 0; off < size; ) {
      const len = Math.min(chunkBytes, size - off);
      const ext = source.extent(off, len);
      // Skip whole target clusters the source reads as zero (off stays cluster aligned).
      if (ext.kind === 'zero' && !backing && ext.length >= cs) {
        off += Math.min(Math.floor(ext.length / cs) * cs, size - off);
        opts.progress?.(Math.min(off, size), size);
        continue;
      }
      const chunk = buf.subarray(0, len);
      source.read(chunk, off);
      if (base) backing!.read(base.subarray(0, len), off);
      for (let c = 0; c < len; c += cs) {
        const n = Math.min(cs, len - c);
        const data = chunk.subarray(c, c + n);
        const zero = isZero(data);
        if (base) {
          const under = base.subarray(c, c + n);
          if (Buffer.compare(data, under) === 0) continue;
          if (zero) {
            w.writeZeroes(off + c, n);
            continue;
          }
        } else if (zero) continue;
        if (opts.compress) w.writeCompressed((off + c) / cs, n === cs ? data : padded(data, cs), compressor);
        else w.write(data, off + c);
      }
      off += len;
      opts.progress?.(Math.min(off, size), size);
    }
    await w.close();
  } catch (err) {
    await w.abandon();
    throw err;
  }
}

function padded(data: Uint8Array, n: number): Uint8Array {
  const out = new Uint8Array(n);
  out.set(data);
  return out;
}

const ZERO_CHECK = new Uint8Array(65536);
function isZero(data: Uint8Array): boolean {
  for (let i = 0; i < data.length; i += ZERO_CHECK.length) {
    const part = data.subarray(i, Math.min(data.length, i + ZERO_CHECK.length));
    if (Buffer.compare(part, ZERO_CHECK.subarray(0, part.length)) !== 0) return false;
  }
  return true;
}

/** zstd compression (level 3, zstd's default) from a WebAssembly build: Node 20's zlib has no zstd. */
async function zstdCompressor(): Promise<(data: Uint8Array) => Uint8Array> {
  const z = await import('@bokuweb/zstd-wasm');
  await z.init();
  return (data) => z.compress(data, 3);
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
