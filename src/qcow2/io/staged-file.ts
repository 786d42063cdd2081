// A BlockFile wrapper for writers: coalesces back-to-back writes into large ones, and skips
// fsyncs when nothing was written since the last one (or when the caller asked for no fsyncs
// at all, as qemu-img convert does for a new output). Write ORDER is preserved exactly: a
// staged run is written before any other write, read, flush or size query.

import type { BlockFile } from './file.js';

/** Largest run of contiguous writes merged into one. */
const STAGE_BYTES = 4 * 1024 * 1024;
/** Writes at least this large go out as they are: merging them would only add a copy. */
const DIRECT_BYTES = 64 * 1024;
/**
 * After this many bytes written since the last flush or hint, ask the OS to start writing them
 * back (inner.startWriteback). A bulk copy then overlaps its disk writes with its own reads and
 * compares instead of paying for all of them in the flush at the next ordering point. Measured
 * on the 1 GiB chain bench (one A/B of 7 rotated rounds each, loaded machine, so rough): commit
 * 0.84 -> 0.60 s, safe rebase 0.57 -> 0.48 s; 16 and 64 MiB did worse than 32.
 */
const WRITEBACK_BYTES = 32 * 1024 * 1024;

export class StagedFile implements BlockFile {
  private stage = new Uint8Array(0);
  private stagePos = 0;
  private stageLen = 0;
  private dirty = false;
  private sinceWriteback = 0;
  /** Called with every write before it is staged or made; throws to refuse it (see ImageWriter). */
  guard: ((pos: number, length: number) => void) | null = null;

  constructor(
    readonly inner: BlockFile,
    /** false: flush() never fsyncs (the data still reaches the OS in order). */
    readonly durable = true,
  ) {}

  get path(): string {
    return this.inner.path;
  }
  get writable(): boolean {
    return this.inner.writable;
  }
  get fd(): number | null {
    return this.inner.fd;
  }

  /** Writes out the staged run (keeps order with everything that follows). */
  drain(): void {
    if (this.stageLen === 0) return;
    const n = this.stageLen;
    this.stageLen = 0;
    this.inner.write(this.stage.subarray(0, n), this.stagePos);
  }

  write(buf: Uint8Array, pos: number): void {
    this.guard?.(pos, buf.length);
    this.dirty = true;
    this.sinceWriteback += buf.length;
    if (this.sinceWriteback >= WRITEBACK_BYTES && this.durable && this.inner.startWriteback) {
      this.drain();
      this.sinceWriteback = 0;
      this.inner.startWriteback();
    }
    if (this.stageLen > 0 && pos === this.stagePos + this.stageLen && this.stageLen + buf.length <= STAGE_BYTES) {
      this.stage.set(buf, this.stageLen);
      this.stageLen += buf.length;
      return;
    }
    this.drain();
    if (buf.length >= DIRECT_BYTES) {
      this.inner.write(buf, pos); // large enough already: no copy
      return;
    }
    if (this.stage.length < STAGE_BYTES) this.stage = new Uint8Array(STAGE_BYTES);
    this.stage.set(buf, 0);
    this.stagePos = pos;
    this.stageLen = buf.length;
  }

  read(buf: Uint8Array, pos: number): number {
    this.drain();
    return this.inner.read(buf, pos);
  }

  flush(): void {
    this.drain();
    if (!this.dirty) return;
    this.dirty = false;
    this.sinceWriteback = 0;
    if (this.durable) this.inner.flush();
  }

  /** Waits for a background writeback to finish: call before closing the inner file. */
  async settle(): Promise<void> {
    await this.inner.settle?.();
  }

  size(): number {
    this.drain();
    return this.inner.size();
  }

  truncate(size: number): void {
    this.drain();
    this.inner.truncate(size);
  }

  allocatedBytes(): number {
    this.drain();
    return this.inner.allocatedBytes();
  }

  close(): void {
    this.drain();
    this.inner.close();
  }
}
