// Backing chains as a whole: describe every layer, find a layer by name, and revert an image to
// an older layer of its chain (a fresh overlay on it, the dropped layers kept unless asked).

import { closeSync, existsSync, fsyncSync, linkSync, openSync, realpathSync, renameSync, unlinkSync } from 'node:fs';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { QimgError } from '../errors.js';
import { create } from './create.js';
import type { Layer } from './layer.js';
import { openImage, openLayer, type BackingPolicy, type ImageFormat } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import { fsyncPath } from '../io/file.js';

export interface ChainLayerInfo {
  depth: number;
  filename: string;
  format: 'qcow2' | 'raw';
  virtualSize: number;
  /** Bytes the file occupies on the host. */
  allocatedBytes: number;
  backingFilename: string | null;
  backingFormat: string | null;
  snapshots: number;
}

export interface ChainOptions {
  format?: ImageFormat;
  forceShare?: boolean;
  backing?: BackingPolicy;
}

/** The layers below and including `top`, top first. */
export function layersOf(top: Layer): Layer[] {
  const out: Layer[] = [];
  for (let l: Layer | null = top; l; l = l instanceof Qcow2Image ? l.backing : null) out.push(l);
  return out;
}

function describe(l: Layer, depth: number): ChainLayerInfo {
  const file = (l as unknown as { file: { allocatedBytes(): number } }).file;
  const q = l instanceof Qcow2Image ? l : null;
  return {
    depth,
    filename: l.filename,
    format: l.format,
    virtualSize: l.virtualSize,
    allocatedBytes: file.allocatedBytes(),
    backingFilename: q?.header.backingFile ?? null,
    backingFormat: q?.header.backingFormat ?? null,
    snapshots: q?.snapshots.length ?? 0,
  };
}

/** Every layer of FILE's chain, top first. */
export async function describeChain(path: string, opts: ChainOptions = {}): Promise<ChainLayerInfo[]> {
  const top = await openImage(path, { format: opts.format, forceShare: opts.forceShare, backing: opts.backing });
  try {
    return layersOf(top).map(describe);
  } finally {
    await top.close();
  }
}

function realOrNull(p: string): string | null {
  try {
    return realpathSync(p);
  } catch {
    return null;
  }
}

/**
 * The index (>= 1) of the layer `name` names in the chain: the backing name exactly as stored,
 * the path qimg opened, or the same file by real path. Null when it is not in the chain.
 */
export function findInChain(layers: Layer[], name: string): number | null {
  const real = realOrNull(name);
  for (let i = 1; i < layers.length; i++) {
    const above = layers[i - 1]!;
    const stored = above instanceof Qcow2Image ? above.header.backingFile : null;
    if (stored === name || layers[i]!.filename === name) return i;
    if (real !== null && realOrNull(layers[i]!.filename) === real) return i;
  }
  return null;
}

export interface RevertOptions extends ChainOptions {
  /** The layer to revert to: a backing name, a path, or the layer's depth as `#N`. */
  to: string;
  /** Delete the old FILE and the layers between it and LAYER once the new overlay is in place. */
  delete?: boolean;
}

export interface RevertResult {
  /** The layer the new overlay is based on. */
  layer: string;
  /** Where the old FILE was kept (null with --delete). */
  keptAs: string | null;
  /** Files deleted (with --delete). */
  deleted: string[];
}

/** A free name beside `path`: `path.pre-revert`, then `.pre-revert.1`, ... */
function keepName(path: string): string {
  let name = `${path}.pre-revert`;
  for (let i = 1; existsSync(name); i++) name = `${path}.pre-revert.${i}`;
  return name;
}

function fsyncDir(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Reverts FILE to LAYER of its chain: a new empty qcow2 overlay whose backing file is LAYER
 * takes FILE's place. Nothing is destroyed without `delete`: the old FILE is kept as
 * `FILE.pre-revert` (hard link taken before the switch), the layers in between stay where they are.
 * The switch is one rename(2): FILE is always either the old image or the complete new overlay.
 * LAYER itself is never opened for writing.
 */
export async function revertChain(path: string, opts: RevertOptions): Promise<RevertResult> {
  // Read locks on every layer: refuses while another process writes any of them.
  const top = await openImage(path, { format: opts.format, backing: opts.backing });
  let layerPath: string;
  let layerFormat: 'qcow2' | 'raw';
  let dropped: string[];
  try {
    const layers = layersOf(top);
    const m = /^#(\d+)$/.exec(opts.to);
    const idx = m ? Number(m[1]) : findInChain(layers, opts.to);
    if (idx === null || idx < 1 || idx >= layers.length) {
      throw new QimgError('NOT_FOUND', `Did not find '${opts.to}' in the backing chain of '${path}'`);
    }
    layerPath = layers[idx]!.filename;
    layerFormat = layers[idx]!.format;
    dropped = layers.slice(1, idx).map((l) => l.filename);
  } finally {
    await top.close();
  }
  // FILE is about to be replaced: nobody may hold it at all (a write lock conflicts with any user).
  const held = await openLayer(path, { writable: true, format: opts.format });
  const heldDropped: Layer[] = [];
  try {
    if (opts.delete) for (const d of dropped) heldDropped.push(await openLayer(d, { writable: true }));
    const dir = dirname(path);
    const tmp = join(dir, `.${basename(path)}.revert-${process.pid}.tmp`);
    // The backing name is stored relative to the new image, as a user of `create -b` would.
    const name = relative(resolve(dir), resolve(layerPath)) || basename(layerPath);
    try {
      await create(tmp, { format: 'qcow2', backingFile: name, backingFormat: layerFormat });
      fsyncPath(tmp);
    } catch (err) {
      if (existsSync(tmp)) unlinkSync(tmp);
      throw err;
    }
    let keptAs: string | null = keepName(path);
    linkSync(path, keptAs);
    fsyncDir(dir);
    renameSync(tmp, path);
    fsyncDir(dir);
    const deleted: string[] = [];
    if (opts.delete) {
      unlinkSync(keptAs);
      deleted.push(path);
      keptAs = null;
      for (const d of dropped) {
        unlinkSync(d);
        deleted.push(d);
      }
      fsyncDir(dir);
    }
    return { layer: layerPath, keptAs, deleted };
  } finally {
    for (const l of heldDropped) await l.close();
    await held.close();
  }
}
