// `resize`: a new virtual size for a qcow2 image (L1 growth or freeing past the end) or a raw file.

import { QimgError } from '../errors.js';
import { closeFile, openImage, type BackingPolicy, type ImageFormat } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import { writerFor } from './writer.js';

export interface ResizeOptions {
  format?: ImageFormat;
  /** Allow a smaller size: data past the new end is lost. */
  shrink?: boolean;
  /** Receives the repair log when a dirty image is repaired on open. */
  onRepair?: (messages: string[]) => void;
  /** Which backing files may be opened (QEMU opens the chain: a grown area may need zeroing). */
  backing?: BackingPolicy;
}

/** `size` is absolute, or relative when `relative` is +1/-1. Returns the new size. */
export async function resize(path: string, size: number, relative: 0 | 1 | -1, opts: ResizeOptions = {}): Promise<number> {
  const layer = await openImage(path, { format: opts.format, writable: true, backing: opts.backing });
  let done = false;
  try {
    const current = layer.virtualSize;
    // Exact bytes, as qemu-img takes them: a raw file gets any length, qcow2 refuses below.
    const target = relative === 0 ? size : current + relative * size;
    if (target <= 0) throw new QimgError('USAGE', 'New image size must be positive');
    if (target < current && !opts.shrink) {
      throw new QimgError(
        'USAGE',
        "Use the --shrink option to perform a shrink operation.\nqimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      );
    }
    if (layer instanceof Qcow2Image) {
      if (target % 512 !== 0) throw new QimgError('USAGE', 'The new size must be a multiple of 512');
      // A v2 snapshot need not record its disk size: reverting to it after a resize would take
      // the new size for its own. QEMU refuses any resize of such an image (the same size too).
      if (layer.header.version < 3 && layer.snapshots.length > 0) throw new QimgError('UNSUPPORTED', "Can't resize a v2 image which has snapshots");
    }
    if (layer instanceof Qcow2Image) {
      // Growing over a backing file that reaches past the old end must not let its data show
      // through: QEMU zeroes the new area (zero clusters, explicit zeros for a partial head).
      // v2 has no zero clusters, and QEMU refuses before changing the size.
      const zeroNew = target > current && layer.backing !== null && layer.backing.virtualSize > current;
      if (zeroNew) {
        const sub = layer.extendedL2 ? layer.clusterSize / 32 : layer.clusterSize;
        const zeroStart = Math.ceil(current / sub) * sub;
        if (target > zeroStart && layer.header.version < 3) throw new QimgError('UNSUPPORTED', 'Failed to zero out new clusters: Operation not supported');
      }
      const w = await writerFor(layer, opts.onRepair);
      w.resize(target);
      if (zeroNew) w.writeZeroes(current, target - current);
      await w.close();
      done = true;
    } else {
      const file = (layer as unknown as { file: import('../io/file.js').BlockFile }).file;
      file.truncate(target);
      file.flush();
      await closeFile(file);
      done = true;
    }
    return target;
  } finally {
    if (!done) await layer.close();
  }
}
