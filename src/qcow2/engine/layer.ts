// What every readable image (qcow2, raw, a snapshot view) offers to the layers above it.

import type { BlockFile } from '../io/file.js';

/** One run of guest bytes with the same provenance. */
export type Extent =
  | { kind: 'zero'; length: number }
  /** Guest data that must be read (from this layer's host file, decompressed, or its backing). */
  | { kind: 'data'; length: number };

/**
 * Where a run of guest bytes comes from, for a caller doing its own (async) data I/O: zeros,
 * bytes at `host` in `file`, or bytes only read() can produce (compressed, in a layer that
 * cannot say). Never longer than asked, never empty.
 */
export type Location =
  | { kind: 'zero'; length: number }
  | { kind: 'host'; length: number; file: BlockFile; host: number }
  | { kind: 'read'; length: number };

export interface Layer {
  readonly format: 'qcow2' | 'raw';
  readonly filename: string;
  readonly virtualSize: number;
  /** Fills `buf` with guest bytes at `offset`; bytes past the virtual size read as zeros. */
  read(buf: Uint8Array, offset: number): void;
  /** The extent starting at `offset`, at most `maxLength` long (maxLength > 0, offset < virtualSize). */
  extent(offset: number, maxLength: number): Extent;
  /** The location of the run at `offset`, at most `maxLength` long (same bounds as extent). */
  locate(offset: number, maxLength: number): Location;
  close(): Promise<void>;
  /** Throws when guest data cannot be read (an encrypted layer anywhere in the chain). */
  assertReadable(): void;
}
