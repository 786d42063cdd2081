// Opening images: format probing, locking, and backing chains under a backing-file policy.

import { realpathSync, statSync, type Stats } from 'node:fs';
import { dirname, isAbsolute, sep } from 'node:path';
import { QimgError, ioError } from '../errors.js';
import { isQcow2 } from '../format/header.js';
import { NodeFile, type BlockFile } from '../io/file.js';
import type { ImageLock } from '../io/lock.js';
import type { Layer } from './layer.js';
import { Qcow2Image } from './qcow2-image.js';
import { RawImage } from './raw-image.js';

export type ImageFormat = 'qcow2' | 'raw';

/**
 * Which backing files may be opened. Images are often untrusted and a backing name can point at
 * any host file, so the default follows only files whose real path lies under `roots`
 * (by default the directory of the image named by the user).
 */
export interface BackingPolicy {
  follow: 'any' | 'within' | 'none';
  /** Directories (for 'within'); the top image's own directory is always included. */
  roots?: string[];
}

export interface OpenOptions {
  format?: ImageFormat;
  writable?: boolean;
  /** -U: take no locks and ignore other processes' locks (read-only only). */
  forceShare?: boolean;
  backing?: BackingPolicy;
  /** Open backing files at all (info does not, unless asked for the chain). */
  openBacking?: boolean;
}

/** Deepest chain qimg follows; beyond it the chain is refused rather than exhausting descriptors. */
export const MAX_CHAIN_DEPTH = 256;

const PROTOCOL_NAME = /^[A-Za-z][A-Za-z0-9.+_-]*:/;

interface OpenedFile {
  file: NodeFile;
  lock: ImageLock | null;
}

/** Files whose lock this process holds, so closing one releases its lock first. */
const locks = new WeakMap<BlockFile, ImageLock>();

async function openLocked(path: string, writable: boolean, forceShare: boolean): Promise<OpenedFile> {
  const file = NodeFile.open(path, writable);
  if (forceShare) return { file, lock: null };
  try {
    const { lockImage } = await import('../io/lock.js');
    const lock = await lockImage(file.fd, path, writable ? 'write' : 'read');
    locks.set(file, lock);
    return { file, lock };
  } catch (err) {
    file.close();
    if (err instanceof QimgError) throw new QimgError(err.code, `Could not open '${path}': ${err.message}`, { ...err.data, path });
    throw err;
  }
}

/** Releases the lock (if any) and closes the file. */
export async function closeFile(file: BlockFile): Promise<void> {
  const lock = locks.get(file);
  if (lock) await lock.release();
  file.close();
}

function probeFormat(file: BlockFile): ImageFormat {
  const magic = new Uint8Array(4);
  const n = file.read(magic, 0);
  return n === 4 && isQcow2(magic) ? 'qcow2' : 'raw';
}

/** Wraps a format-layer error into qemu-img's "Could not open 'PATH': reason". */
function openError(err: unknown, path: string): unknown {
  if (err instanceof QimgError && !err.message.startsWith('Could not open')) {
    return new QimgError(err.code, `Could not open '${path}': ${err.message}`, { ...err.data, path });
  }
  return err;
}

/** Opens one file as an image layer, without its backing chain. */
export async function openLayer(path: string, opts: OpenOptions = {}): Promise<Layer> {
  const { file } = await openLocked(path, !!opts.writable, !!opts.forceShare);
  try {
    const format = opts.format ?? probeFormat(file);
    if (format === 'raw') return wrapClose(new RawImage(file, path), file);
    return wrapClose(Qcow2Image.open(file, path), file);
  } catch (err) {
    await closeFile(file);
    throw openError(err, path);
  }
}

function wrapClose<T extends Layer & { file: BlockFile }>(layer: T, file: BlockFile): T {
  const inner = layer.close.bind(layer);
  layer.close = async () => {
    const lock = locks.get(file);
    if (lock) await lock.release();
    await inner();
  };
  return layer;
}

/** The path QEMU uses for a backing name: relative names are taken from the image's directory. */
export function resolveBackingPath(imagePath: string, backingName: string): string {
  if (isAbsolute(backingName) || PROTOCOL_NAME.test(backingName)) return backingName;
  // QEMU keeps the image's directory prefix verbatim (no normalisation of "..").
  const slash = imagePath.lastIndexOf('/');
  return slash < 0 ? backingName : imagePath.slice(0, slash + 1) + backingName;
}

function within(real: string, root: string): boolean {
  return real === root || real.startsWith(root.endsWith(sep) ? root : root + sep);
}

function realRoot(dir: string): string | null {
  try {
    return realpathSync(dir);
  } catch {
    return null;
  }
}

/**
 * Checks a backing (or data) file name against the policy before anything opens it.
 * Returns the path to open. Device nodes, FIFOs, sockets and protocol names are never followed.
 */
export function admitBackingFile(imagePath: string, name: string, policy: BackingPolicy, topImage: string): { path: string; stat: Stats } {
  const path = resolveBackingPath(imagePath, name);
  if (PROTOCOL_NAME.test(name)) {
    throw new QimgError('BACKING', `Could not open backing file '${name}' of '${imagePath}': protocol and json: names are never followed`, { name });
  }
  let st: Stats;
  try {
    st = statSync(path);
  } catch (err) {
    throw ioError(err, path, 'Could not open');
  }
  if (!st.isFile()) {
    throw new QimgError('BACKING', `Could not open backing file '${path}' of '${imagePath}': not a regular file (device nodes, FIFOs and sockets are never followed)`, { path });
  }
  if (policy.follow === 'within') {
    const real = realpathSync(path);
    const roots = [dirname(realpathSync(topImage)), ...(policy.roots ?? [])].map(realRoot).filter((r): r is string => r !== null);
    if (!roots.some((r) => within(real, r))) {
      throw new QimgError(
        'BACKING',
        `Could not open backing file '${path}' of '${imagePath}': its real path '${real}' is outside the image's directory; ` +
          `allow it with --backing-root DIR or --allow-any-backing, or read the top layer alone with --no-backing`,
        { path, real },
      );
    }
  }
  return { path, stat: st };
}

/**
 * Opens an image and (unless told not to) its whole backing chain, read-only below the top.
 * Each layer is identified by device and inode before it is opened, so a loop is refused
 * without opening (and so unlocking) a file twice.
 */
export async function openImage(path: string, opts: OpenOptions = {}): Promise<Layer> {
  let st: Stats;
  try {
    st = statSync(path);
  } catch (err) {
    throw ioError(err, path, 'Could not open');
  }
  const top = await openLayer(path, opts);
  if (opts.openBacking === false) return top;
  const policy = opts.backing ?? { follow: 'within' };
  const seen = new Set<string>([`${st.dev}:${st.ino}`]);
  try {
    let layer: Layer = top;
    for (let depth = 1; layer instanceof Qcow2Image; depth++) {
      const img: Qcow2Image = layer;
      await attachDataFile(img, policy, path, opts.forceShare);
      const name = img.header.backingFile;
      if (name === null || name === '' || policy.follow === 'none') break;
      if (depth >= MAX_CHAIN_DEPTH) {
        throw new QimgError('BACKING', `Could not open '${path}': backing chain is deeper than ${MAX_CHAIN_DEPTH} images`);
      }
      let admitted: { path: string; stat: Stats };
      try {
        admitted = admitBackingFile(img.filename, name, policy, path);
      } catch (err) {
        throw backingError(err, img.filename);
      }
      const key = `${admitted.stat.dev}:${admitted.stat.ino}`;
      if (seen.has(key)) {
        throw new QimgError('BACKING', `Could not open '${img.filename}': backing file '${name}' forms a loop (it is already in the chain)`, { name });
      }
      seen.add(key);
      const fmt = img.header.backingFormat;
      if (fmt !== null && fmt !== 'qcow2' && fmt !== 'raw') {
        throw new QimgError('UNSUPPORTED', `Could not open '${img.filename}': backing format '${fmt}' is not supported`);
      }
      let next: Layer;
      try {
        next = await openLayer(admitted.path, { format: (fmt as ImageFormat | null) ?? undefined, forceShare: opts.forceShare });
      } catch (err) {
        throw backingError(err, img.filename);
      }
      img.backing = next;
      layer = next;
    }
  } catch (err) {
    await top.close();
    throw err;
  }
  return top;
}

function backingError(err: unknown, imagePath: string): unknown {
  if (err instanceof QimgError && err.code !== 'BACKING') {
    // A lock conflict names the backing file only in its second line, as QEMU words it: the
    // "Could not open 'F': " the top image's open would put first is not repeated for it.
    const inner = err.code === 'LOCKED' && typeof err.data.path === 'string' ? err.message.replace(`Could not open '${err.data.path}': `, '') : err.message;
    return new QimgError(err.code, `Could not open '${imagePath}': Could not open backing file: ${inner}`, { ...err.data, backingError: err.message });
  }
  return err;
}

async function attachDataFile(img: Qcow2Image, policy: BackingPolicy, top: string, forceShare?: boolean): Promise<void> {
  const { INCOMPAT_DATA_FILE } = await import('../format/layout.js');
  const { hasIncompat } = await import('../format/header.js');
  if (!hasIncompat(img.header, INCOMPAT_DATA_FILE)) return;
  const name = img.header.dataFile;
  if (name === null) {
    throw new QimgError('BAD_IMAGE', `Could not open '${img.filename}': Missing external data file name`);
  }
  const admitted = admitBackingFile(img.filename, name, policy.follow === 'none' ? { follow: 'within' } : policy, top);
  const { file } = await openLocked(admitted.path, false, !!forceShare);
  img.dataFile = file;
}
