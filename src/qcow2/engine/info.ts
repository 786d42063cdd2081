// The read-only queries: describe an image (or its chain) and list its snapshots.

import { QimgError } from '../errors.js';
import * as L from '../format/layout.js';
import { snapshotInfo } from './snapshot-info.js';
import type { Layer } from './layer.js';
import { openImage, type BackingPolicy, type ImageFormat } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import type { ImageInfo, SnapshotInfo } from './types.js';

export interface ReadOptions {
  format?: ImageFormat;
  /** -U / --force-share: no locks. */
  forceShare?: boolean;
  backing?: BackingPolicy;
}

export interface InfoOptions extends ReadOptions {
  /** Describe every layer of the backing chain (opens backing files). */
  backingChain?: boolean;
}

/** `qemu-img info`: one ImageInfo, or one per layer with backingChain. */
export async function info(path: string, opts: InfoOptions = {}): Promise<ImageInfo[]> {
  // describe.js (bitmaps, LUKS) is loaded here only: `snapshot -l` does not need it.
  const { describeLayer, loadLuksDecoder } = await import('./describe.js');
  let top;
  try {
    top = await openImage(path, { format: opts.format, forceShare: opts.forceShare, backing: opts.backing, openBacking: !!opts.backingChain });
  } catch (err) {
    // qemu-img info --backing-chain opens each layer on its own: a backing file that fails
    // reports as itself, not through the image above it.
    if (opts.backingChain && err instanceof QimgError && typeof err.data.backingError === 'string') throw new QimgError(err.code, err.data.backingError, err.data);
    throw err;
  }
  try {
    const out: ImageInfo[] = [];
    for (let layer: Layer | null = top; layer; layer = layer instanceof Qcow2Image ? layer.backing : null) {
      if (layer instanceof Qcow2Image && layer.header.cryptMethod === L.CRYPT_LUKS) await loadLuksDecoder();
      out.push(describeLayer(layer));
      if (!opts.backingChain) break;
    }
    return out;
  } finally {
    await top.close();
  }
}

export interface ListOptions extends ReadOptions {
  /** Also compute, per snapshot, the bytes deleting it would free (reads its whole tree). */
  freedBytes?: boolean;
}

/** `qemu-img snapshot -l`: the internal snapshots of a qcow2 image (none for raw). */
export async function listSnapshots(path: string, opts: ListOptions = {}): Promise<{ snaps: SnapshotInfo[]; freed: Map<string, number> | null }> {
  const img = await openImage(path, { format: opts.format, forceShare: opts.forceShare, openBacking: false });
  try {
    if (!(img instanceof Qcow2Image)) return { snaps: [], freed: null };
    let freed: Map<string, number> | null = null;
    if (opts.freedBytes && img.snapshots.length) {
      const { snapshotFreedBytes } = await import('./snapshots.js');
      freed = snapshotFreedBytes(img);
    }
    return { snaps: img.snapshots.map(snapshotInfo), freed };
  } finally {
    await img.close();
  }
}

/** How a snapshot is named: qemu-img's `-l` forms. */
export type SnapshotSelector = { id?: string; name?: string } | { idOrName: string };

/** Parses `snapshot.name=N`, `snapshot.id=I` (comma-joined) or a bare ID-or-name. */
export function parseSnapshotSelector(s: string): SnapshotSelector {
  if (!/^snapshot\.(id|name)=/.test(s)) return { idOrName: s };
  const sel: { id?: string; name?: string } = {};
  for (const part of s.split(',')) {
    const m = /^snapshot\.(id|name)=(.*)$/.exec(part);
    if (!m) throw new QimgError('USAGE', `Invalid snapshot option '${part}'`);
    sel[m[1] as 'id' | 'name'] = m[2];
  }
  return sel;
}

/** Finds a snapshot: ID first then name for a bare selector; both must match when both are given. */
export function findSnapshot(img: Qcow2Image, sel: SnapshotSelector) {
  if ('idOrName' in sel) {
    return img.snapshots.find((s) => s.id === sel.idOrName) ?? img.snapshots.find((s) => s.name === sel.idOrName) ?? null;
  }
  return img.snapshots.find((s) => (sel.id === undefined || s.id === sel.id) && (sel.name === undefined || s.name === sel.name)) ?? null;
}
