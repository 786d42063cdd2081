// A raw image: guest byte N is host byte N; the virtual size is the file size.

import type { BlockFile } from '../io/file.js';
import type { Extent, Layer } from './layer.js';

export class RawImage implements Layer {
  readonly format = 'raw' as const;
  readonly virtualSize: number;

  constructor(
    readonly file: BlockFile,
    readonly filename: string,
  ) {
    // QEMU counts in 512-byte sectors: a file's tail reads as zeros up to the next one.
    this.virtualSize = Math.ceil(file.size() / 512) * 512;
  }

  read(buf: Uint8Array, offset: number): void {
    const n = offset < this.virtualSize ? this.file.read(buf.subarray(0, Math.min(buf.length, this.virtualSize - offset)), offset) : 0;
    if (n < buf.length) buf.fill(0, n);
  }

  assertReadable(): void {}

  extent(offset: number, maxLength: number): Extent {
    // Holes are found by the zero scan of the caller; a raw file is all "data" to the mapper.
    return { kind: 'data', length: Math.min(maxLength, this.virtualSize - offset) };
  }

  async close(): Promise<void> {
    await this.file.settle?.(); // a background writeback must not outlive the descriptor
    this.file.close();
  }
}
