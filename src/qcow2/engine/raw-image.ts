// A raw image: guest byte N is host byte N; the virtual size is the file size.

import type { BlockFile } from '../io/file.js';
import type { Extent, Layer, Location } from './layer.js';

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

  /**
   * The last data or hole run the file system reported, [start, end), for a file open read-only
   * (held under a read lock, its map does not change): convert asks about each chunk several
   * times, and each answer cost an fstat and two lseeks.
   */
  private lastRun: { start: number; end: number; data: boolean } | null = null;

  extent(offset: number, maxLength: number): Extent {
    // Holes the file system reports (SEEK_HOLE) read as zero; zero bytes written out are found
    // by the caller's zero scan. The tail past the file's end (sector rounding) reads as zero.
    const max = Math.min(maxLength, this.virtualSize - offset);
    const known = this.lastRun;
    if (known && offset >= known.start && offset < known.end) return { kind: known.data ? 'data' : 'zero', length: Math.min(max, known.end - offset) };
    const run = this.file.dataRun?.(offset) ?? null;
    if (run !== null && !this.file.writable) this.lastRun = { start: offset, end: offset + run.length, data: run.data };
    if (run === null) {
      const fileSize = this.file.size();
      if (offset >= fileSize) return { kind: 'zero', length: max };
      return { kind: 'data', length: Math.min(max, fileSize - offset) };
    }
    return { kind: run.data ? 'data' : 'zero', length: Math.min(max, run.length) };
  }

  locate(offset: number, maxLength: number): Location {
    const e = this.extent(offset, maxLength);
    return e.kind === 'zero' ? e : { kind: 'host', length: e.length, file: this.file, host: offset };
  }

  async close(): Promise<void> {
    await this.file.settle?.(); // a background writeback must not outlive the descriptor
    this.file.close();
  }
}
