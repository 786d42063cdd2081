// `resize`: a new virtual size for a qcow2 image (L1 growth or freeing past the end) or a raw file.

import { QimgError } from '../errors.js';
import { closeFile, openLayer, type ImageFormat } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import { writerFor } from './writer.js';

export interface ResizeOptions {
  format?: ImageFormat;
  /** Allow a smaller size: data past the new end is lost. */
  shrink?: boolean;
  /** Receives the repair log when a dirty image is repaired on open. */
  onRepair?: (messages: string[]) => void;
}

/** `size` is absolute, or relative when `relative` is +1/-1. Returns the new size. */
export async function resize(path: string, size: number, relative: 0 | 1 | -1, opts: ResizeOptions = {}): Promise<number> {
  const layer = await openLayer(path, { format: opts.format, writable: true });
  let done = false;
  try {
    const current = layer.virtualSize;
    // qemu-img works in 512-byte sectors: sizes round up to the next one.
    const target = Math.ceil((relative === 0 ? size : current + relative * size) / 512) * 512;
    if (target < 0) throw new QimgError('USAGE', 'New image size must be positive');
    if (target < current && !opts.shrink) {
      throw new QimgError(
        'USAGE',
        "Use the --shrink option to perform a shrink operation.\nqimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      );
    }
    if (layer instanceof Qcow2Image) {
      const w = await writerFor(layer, opts.onRepair);
      w.resize(target);
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
