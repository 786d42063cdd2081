// `commit`: write what the layers above BASE hold into BASE, then (unless dropped) empty the top.
//
// Order, so that a crash at any point loses nothing the guest could see:
//   1. every range allocated above BASE (data, or zeros) is written into BASE through its writer,
//      whose commit() makes each batch durable (data before tables, tables before header);
//   2. BASE's last commit is flushed;
//   3. only then is the top emptied: its whole active L1 replaced by an empty one in one write,
//      then the references it held dropped (QEMU's make_empty discards every cluster; internal
//      snapshots keep theirs). Until 3 lands, the top still overrides BASE with the same bytes.
// Layers between the top and BASE are not changed (QEMU leaves them stale too; -b implies -d).

import { QimgError } from '../errors.js';
import type { Layer } from './layer.js';
import { BS_ALLOCATED, BS_DATA, BS_ZERO, layerStatus } from './map.js';
import { openImage, openLayer, admitBackingFile, type BackingPolicy, type ImageFormat } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import { RawImage } from './raw-image.js';
import { accumulateTree } from './tree.js';
import { ImageWriter, openWriter } from './writer.js';
import { findInChain, layersOf } from './chain.js';
import { dirname } from 'node:path';
import { ioBuffer } from '../io/buffers.js';

/** Copy buffer: large enough to stream, small enough to stay out of the way. */
const COPY_CHUNK = 4 * 1024 * 1024;
/** Background writeback of a raw target every this many bytes (see StagedFile's WRITEBACK_BYTES). */
const RAW_WRITEBACK_BYTES = 32 * 1024 * 1024;

/** Where committed data goes: a qcow2 writer, or a raw file written in place. */
export type CommitTarget = { kind: 'qcow2'; writer: ImageWriter } | { kind: 'raw'; image: RawImage };

export interface CommitOptions {
  format?: ImageFormat;
  /** The layer to commit into (a backing name or path in the chain); default: the backing file. */
  base?: string;
  /** Leave the top as it is (implied by `base`). */
  drop?: boolean;
  backing?: BackingPolicy;
  progress?: (done: number, total: number) => void;
}

/**
 * Copies every range that a layer of `above` (top first; BASE excluded) has allocated into the
 * target, reading guest data through `top` (whose chain ends in the target's image). Returns
 * the bytes written.
 */
export function copyAboveBase(top: Layer, above: Layer[], target: CommitTarget, progress?: (done: number, total: number) => void): number {
  const size = top.virtualSize;
  const buf = ioBuffer(COPY_CHUNK);
  let offset = 0;
  let written = 0;
  let sinceWriteback = 0;
  while (offset < size) {
    let len = Math.min(COPY_CHUNK, size - offset);
    let decided = 0;
    for (const l of above) {
      // Past the end of a shorter layer below the top the guest reads zeros (QEMU copies them).
      if (offset >= l.virtualSize) {
        decided = BS_ZERO;
        break;
      }
      const s = layerStatus(l, offset, len);
      len = s.length;
      if (s.flags & BS_ALLOCATED) {
        decided = s.flags & BS_DATA ? BS_DATA : s.flags & BS_ZERO ? BS_ZERO : BS_DATA;
        break;
      }
    }
    if (decided === BS_ZERO) {
      writeZeroes(target, offset, len);
      written += len;
    } else if (decided === BS_DATA) {
      const chunk = buf.subarray(0, len);
      top.read(chunk, offset);
      writeData(target, chunk, offset);
      written += len;
      // A raw target is written directly, so it gets here the writeback hints that a qcow2
      // writer's StagedFile gives on its own.
      sinceWriteback += len;
      if (target.kind === 'raw' && sinceWriteback >= RAW_WRITEBACK_BYTES) {
        target.image.file.startWriteback?.();
        sinceWriteback = 0;
      }
    }
    offset += len;
    progress?.(offset, size);
  }
  return written;
}

function writeData(t: CommitTarget, data: Uint8Array, offset: number): void {
  if (t.kind === 'qcow2') t.writer.write(data, offset);
  else t.image.file.write(data, offset);
}

function writeZeroes(t: CommitTarget, offset: number, len: number): void {
  if (t.kind === 'qcow2') {
    t.writer.writeZeroes(offset, len, false);
    return;
  }
  // A raw file: write zeros only where it does not read as zero already (keeps holes holes).
  const zero = new Uint8Array(Math.min(len, COPY_CHUNK));
  const cur = new Uint8Array(zero.length);
  for (let pos = offset; pos < offset + len; pos += zero.length) {
    const n = Math.min(zero.length, offset + len - pos);
    t.image.read(cur.subarray(0, n), pos);
    if (cur.subarray(0, n).some((b) => b !== 0)) t.image.file.write(zero.subarray(0, n), pos);
  }
}

function flushTarget(t: CommitTarget): void {
  if (t.kind === 'qcow2') t.writer.commit();
  else t.image.file.flush();
}

/**
 * Empties the active tree of a qcow2 image (every cluster becomes unallocated; snapshots keep
 * theirs): the empty L1 lands in one write, the references drop after it.
 */
export function makeEmpty(w: ImageWriter): void {
  const img = w.img;
  w.commit();
  const deltas = new Int32Array(Math.max(w.refs.endCluster, Math.ceil(img.fileSize / img.clusterSize)) + 1);
  accumulateTree(img, img.l1, deltas, -1);
  w.replaceL1(new Uint8Array(img.l1.length));
  w.refs.applyDeltas(deltas);
  img.dropCaches();
  w.commit();
}

/** Grows the target to at least `size` (QEMU grows a smaller base; it never shrinks one). */
function growTarget(t: CommitTarget, size: number): void {
  if (t.kind === 'qcow2') {
    if (t.writer.img.virtualSize < size) {
      t.writer.resize(size);
      t.writer.commit();
    }
  } else if (t.image.virtualSize < size) {
    t.image.file.truncate(size);
    (t.image as { virtualSize: number }).virtualSize = size;
    t.image.file.flush();
  }
}

/** Commits with already opened layers (the crash tests drive this directly). */
export function commitOpened(top: Qcow2Image, above: Layer[], target: CommitTarget, topWriter: ImageWriter | null, progress?: (done: number, total: number) => void): void {
  growTarget(target, top.virtualSize);
  copyAboveBase(top, above, target, progress);
  flushTarget(target);
  if (topWriter) makeEmpty(topWriter);
}

/**
 * `qemu-img commit`: opens FILE read-write (write lock), the layers in between read-only, and
 * BASE read-write (write lock); copies; empties FILE unless `drop` or `base` was given.
 */
export async function commit(path: string, opts: CommitOptions = {}): Promise<void> {
  const policy = opts.backing ?? { follow: 'within' };
  // Pass 1, without locks: find BASE's place in the chain.
  const probe = await openImage(path, { format: opts.format, forceShare: true, backing: policy });
  let baseIndex: number;
  try {
    const layers = layersOf(probe);
    if (layers.length < 2) throw new QimgError('USAGE', 'Image does not have a backing file');
    if (opts.base !== undefined) {
      const i = findInChain(layers, opts.base);
      if (i === null) throw new QimgError('NOT_FOUND', `Did not find '${opts.base}' in the backing chain of '${path}'`);
      baseIndex = i;
    } else baseIndex = 1;
    await refuseHeldBacking(path, layers);
  } finally {
    await probe.close();
  }
  const drop = !!opts.drop || opts.base !== undefined;

  // Pass 2: each file opened once, with the lock its role needs (POSIX locks are per process).
  const opened: Layer[] = [];
  let baseWriter: ImageWriter | null = null;
  let baseRaw: RawImage | null = null;
  let topWriter: ImageWriter | null = null;
  const closeAll = async (ok: boolean) => {
    for (const l of opened) if (l instanceof Qcow2Image) l.backing = null;
    if (topWriter) await (ok ? topWriter.close() : topWriter.abandon());
    else if (opened[0]) await opened[0].close();
    for (const l of opened.slice(1)) await l.close();
    if (baseWriter) await (ok ? baseWriter.close() : baseWriter.abandon());
    if (baseRaw) await baseRaw.close();
  };
  try {
    const top = await openLayer(path, { format: opts.format, writable: true });
    opened.push(top);
    if (!(top instanceof Qcow2Image)) throw new QimgError('USAGE', 'Image does not have a backing file');
    if (!drop) topWriter = new ImageWriter(top);
    let cur: Qcow2Image = top;
    for (let i = 1; i <= baseIndex; i++) {
      const name = cur.header.backingFile;
      if (name === null || name === '') throw new QimgError('BACKING', `'${cur.filename}': the backing chain changed while it was being opened`);
      const { path: p } = admitBackingFile(cur.filename, name, policy.follow === 'none' ? { follow: 'within' } : policy, path);
      const fmt = (cur.header.backingFormat ?? undefined) as ImageFormat | undefined;
      let next: Layer;
      if (i < baseIndex) {
        next = await openLayer(p, { format: fmt });
        opened.push(next);
      } else if (fmt === 'raw' || (fmt === undefined && !(await probeQcow2(p)))) {
        baseRaw = (await openLayer(p, { format: 'raw', writable: true })) as RawImage;
        next = baseRaw;
      } else {
        baseWriter = await openWriter(p, { backing: { ...policy, roots: [...(policy.roots ?? []), dirname(path)] } });
        // The commit allocates clusters at the base's end: reserve blocks ahead (NodeFile.growAhead).
        baseWriter.img.file.growAhead?.();
        next = baseWriter.img;
      }
      cur.backing = next;
      if (i < baseIndex) {
        if (!(next instanceof Qcow2Image)) throw new QimgError('BACKING', `'${p}' is raw and cannot have a backing file`);
        cur = next;
      }
    }
    top.assertReadable();
    const target: CommitTarget = baseWriter ? { kind: 'qcow2', writer: baseWriter } : { kind: 'raw', image: baseRaw! };
    commitOpened(top, opened, target, topWriter, opts.progress);
  } catch (err) {
    await closeAll(false);
    throw err;
  }
  await closeAll(true);
}

/**
 * qemu-img opens the whole chain read-only before anything else, each backing file with a shared
 * lock: a qcow2 layer another process holds for writing (a running VM on the base, say) stops it
 * there, in those words, before the lock for writing to the base is tried.
 */
async function refuseHeldBacking(path: string, layers: Layer[]): Promise<void> {
  const { heldForWritingSync } = await import('../io/lock.js');
  for (let i = 1; i < layers.length; i++) {
    const l = layers[i]!;
    const fd = l.format === 'qcow2' ? (l as Qcow2Image).file.fd : null;
    if (fd === null || !heldForWritingSync(fd)) continue;
    throw new QimgError(
      'LOCKED',
      `Could not open '${path}': ${'Could not open backing file: '.repeat(i)}Failed to get shared "write" lock\nIs another process using the image [${l.filename}]?`,
      { path: l.filename },
    );
  }
}

async function probeQcow2(path: string): Promise<boolean> {
  const l = await openLayer(path, { forceShare: true });
  try {
    return l.format === 'qcow2';
  } finally {
    await l.close();
  }
}
