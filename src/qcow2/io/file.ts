// Positional file I/O behind one small synchronous interface: the only code that opens image files.
//
// Synchronous on purpose: the engine issues many small metadata reads in a dependent order, and
// Node's async fs pays a thread-pool round trip for each. Bulk data copies (convert) use the
// optional async calls instead, so reads and writes of megabytes overlap on libuv's threads.

import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import { QimgError, ioError } from '../errors.js';
import { FALLOC_FL_KEEP_SIZE, fallocate, haveBulkIO, haveFallocate, readScan, writeRuns, type BulkIoError, type ZeroScan } from './native.js';

/** growAhead's first reservation past the end, and the most one reservation adds. */
const RESERVE_MIN = 16 * 1024 * 1024;
const RESERVE_MAX = 256 * 1024 * 1024;

export interface BlockFile {
  readonly path: string;
  readonly writable: boolean;
  /** Reads up to buf.length bytes at pos; returns bytes read (short only at end of file). */
  read(buf: Uint8Array, pos: number): number;
  write(buf: Uint8Array, pos: number): void;
  /** Makes every completed write durable (fsync): an ordering point. */
  flush(): void;
  /**
   * Optional: starts making completed writes durable WITHOUT waiting (an fdatasync on Node's
   * thread pool), so the disk works while the engine computes and the next flush() has less left
   * to push. Not an ordering point: only flush() is. A failure surfaces at the next flush().
   */
  startWriteback?(): void;
  /**
   * Optional: resolves once no startWriteback() is in flight. Whoever closes the file awaits it
   * first (Qcow2Image, RawImage and ImageWriter do), so no fdatasync outlives the descriptor.
   */
  settle?(): Promise<void>;
  size(): number;
  truncate(size: number): void;
  /** Bytes the file occupies on the host (allocated blocks). */
  allocatedBytes(): number;
  close(): void;
  /** The OS descriptor when there is one (locks need it). */
  readonly fd: number | null;
  /**
   * Async forms for bulk data, run on libuv's thread pool (absent: use the sync ones). The
   * caller keeps `buf` untouched until the promise settles, and orders overlapping requests.
   */
  readAsync?(buf: Uint8Array, pos: number): Promise<number>;
  writeAsync?(buf: Uint8Array, pos: number): Promise<void>;
  /**
   * Optional: writes the runs of `buf` given as [bufferOffset, length, position] triples, as ONE
   * job when the native helper is there (see native.ts writeRuns), else as writeAsync calls. The
   * same contract as writeAsync. `allocate`: reserve each run's blocks first (a hint, helper only).
   */
  writeRunsAsync?(buf: Uint8Array, runs: number[], allocate?: boolean): Promise<void>;
  /**
   * Whether the file holds data or a hole at `pos` (< size), and for how long, as
   * SEEK_DATA/SEEK_HOLE report it; absent or null: the file cannot tell (treat it as data).
   */
  dataRun?(pos: number): { data: boolean; length: number } | null;
  /**
   * Optional: from now on, a write reaching past what is reserved first reserves disk blocks for
   * a stretch beyond it (fallocate KEEP_SIZE: the size does not change), and close() gives back
   * what no write reached. Only for files that grow at their end, as a qcow2 image does when it
   * allocates clusters; never for a sparse raw file (its holes would become allocated).
   */
  growAhead?(): void;
}

const SEEK_END = 2;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
interface FsSeek {
  seekSync(fd: number, offset: number, whence: number): number;
}
let fsSeek: FsSeek | null = null;

/** fsync of a file by name (any descriptor's fsync flushes the file's data), e.g. one just closed. */
export function fsyncPath(path: string): void {
  try {
    const fd = fs.openSync(path, 'r');
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  } catch (err) {
    throw ioError(err, path, 'Could not flush');
  }
}

/** Reads exactly buf.length bytes, filling past end-of-file with zeros; returns bytes really read. */
export function readAt(file: BlockFile, buf: Uint8Array, pos: number): number {
  const n = file.read(buf, pos);
  if (n < buf.length) buf.fill(0, n);
  return n;
}

/** A run of a bulk read: buf[offset, offset + length) from `file` at `pos`. */
export interface ReadRun {
  file: BlockFile;
  offset: number;
  length: number;
  pos: number;
}

/**
 * Reads every run into `buf` as ONE job on libuv's threads (zeros past a file's end, and for a
 * position no file can reach), then, with `scan`, flags each all-zero block whose flag is still 0
 * by setting it to 2 (see native.ts readScan). Null without the native helper or when a run's
 * file has no descriptor: the caller reads run by run.
 */
export function readRunsScan(buf: Uint8Array, runs: ReadRun[], scan: ZeroScan | null): Promise<void> | null {
  if (!haveBulkIO() || runs.some((r) => r.file.fd === null)) return null;
  const segs = new Float64Array(runs.length * 4);
  let n = 0;
  for (const r of runs) {
    // A damaged table's offset past 2^53: no file is that long, it reads as zeros (as read() does).
    if (r.pos + r.length > Number.MAX_SAFE_INTEGER) {
      buf.fill(0, r.offset, r.offset + r.length);
      continue;
    }
    segs.set([r.file.fd!, r.offset, r.length, r.pos], 4 * n++);
  }
  const job = readScan(buf, segs.subarray(0, 4 * n), scan)!;
  return job.catch((err: BulkIoError) => {
    throw ioError(err, runs.filter((r) => r.pos + r.length <= Number.MAX_SAFE_INTEGER)[err.segment]?.file.path ?? '', 'Could not read');
  });
}

/** fs.read / fs.write as promises without fs.promises' FileHandle (the engine holds plain fds). */
function readP(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<{ bytesRead: number }> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (err, bytesRead) => (err ? reject(err) : resolve({ bytesRead }))));
}
function writeP(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<{ bytesWritten: number }> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, bytesWritten) => (err ? reject(err) : resolve({ bytesWritten }))));
}

export class NodeFile implements BlockFile {
  readonly fd: number;
  private closed = false;
  /** The fdatasyncs started by startWriteback() that have not called back yet. */
  private writebacks = new Set<Promise<void>>();
  /**
   * Its error, kept for the next flush(): Linux reports a writeback error once per open file,
   * so an error the background fdatasync consumed would otherwise never reach a flush().
   */
  private writebackError: unknown = null;
  /** growAhead(): blocks are reserved up to here (-1: not growing ahead). */
  private reservedEnd = -1;

  private constructor(
    readonly path: string,
    fd: number,
    readonly writable: boolean,
  ) {
    this.fd = fd;
  }

  static open(path: string, writable: boolean): NodeFile {
    let fd: number;
    try {
      fd = fs.openSync(path, writable ? 'r+' : 'r');
    } catch (err) {
      throw ioError(err, path, 'Could not open');
    }
    const st = fs.fstatSync(fd);
    if (st.isDirectory()) {
      fs.closeSync(fd);
      throw new QimgError('IO', `Could not open '${path}': 'file' driver requires '${path}' to be a regular file`, { path });
    }
    return new NodeFile(path, fd, writable);
  }

  read(buf: Uint8Array, pos: number): number {
    // A damaged table offset may lie past 2^53, where Node refuses the position: no file is that long.
    if (pos + buf.length > Number.MAX_SAFE_INTEGER) return 0;
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        n = fs.readSync(this.fd, buf, done, buf.length - done, pos + done);
      } catch (err) {
        throw ioError(err, this.path, 'Could not read');
      }
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  write(buf: Uint8Array, pos: number): void {
    if (!this.writable) throw new QimgError('READ_ONLY', `'${this.path}' is open read-only`);
    if (pos + buf.length > this.reservedEnd && this.reservedEnd >= 0) this.reserve(pos + buf.length);
    let done = 0;
    while (done < buf.length) {
      try {
        done += fs.writeSync(this.fd, buf, done, buf.length - done, pos + done);
      } catch (err) {
        throw ioError(err, this.path, 'Could not write to');
      }
    }
  }

  async readAsync(buf: Uint8Array, pos: number): Promise<number> {
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        ({ bytesRead: n } = await readP(this.fd, buf, done, buf.length - done, pos + done));
      } catch (err) {
        throw ioError(err, this.path, 'Could not read');
      }
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  async writeAsync(buf: Uint8Array, pos: number): Promise<void> {
    if (!this.writable) throw new QimgError('READ_ONLY', `'${this.path}' is open read-only`);
    if (pos + buf.length > this.reservedEnd && this.reservedEnd >= 0) this.reserve(pos + buf.length);
    let done = 0;
    while (done < buf.length) {
      try {
        done += (await writeP(this.fd, buf, done, buf.length - done, pos + done)).bytesWritten;
      } catch (err) {
        throw ioError(err, this.path, 'Could not write to');
      }
    }
  }

  writeRunsAsync(buf: Uint8Array, runs: number[], allocate = false): Promise<void> {
    if (!this.writable) return Promise.reject(new QimgError('READ_ONLY', `'${this.path}' is open read-only`));
    if (!haveBulkIO()) {
      const writes: Array<Promise<void>> = [];
      for (let i = 0; i < runs.length; i += 3) writes.push(this.writeAsync(buf.subarray(runs[i]!, runs[i]! + runs[i + 1]!), runs[i + 2]!));
      // Settled, all of them, before this settles: none is left writing from a buffer handed back.
      return Promise.allSettled(writes).then((results) => {
        for (const r of results) if (r.status === 'rejected') throw r.reason;
      });
    }
    const segs = new Float64Array((runs.length / 3) * 4);
    let end = 0;
    for (let i = 0, s = 0; i < runs.length; i += 3, s += 4) {
      segs[s] = this.fd;
      segs[s + 1] = runs[i]!;
      segs[s + 2] = runs[i + 1]!;
      segs[s + 3] = runs[i + 2]!;
      end = Math.max(end, runs[i + 1]! + runs[i + 2]!);
    }
    if (end > this.reservedEnd && this.reservedEnd >= 0) this.reserve(end);
    return writeRuns(buf, segs, allocate)!.catch((err: BulkIoError) => {
      throw ioError(err, this.path, 'Could not write to');
    });
  }

  dataRun(pos: number): { data: boolean; length: number } | null {
    const size = this.size();
    if (pos >= size) return null;
    try {
      fsSeek ??= createRequire(import.meta.url)('fs-ext') as FsSeek;
      const data = fsSeek.seekSync(this.fd, pos, SEEK_DATA);
      if (data > pos) return { data: false, length: Math.min(data, size) - pos };
      return { data: true, length: Math.min(fsSeek.seekSync(this.fd, pos, SEEK_HOLE), size) - pos };
    } catch (err) {
      // ENXIO: no data at or after pos, the rest is a hole. Anything else (EINVAL: no support): unknown.
      if ((err as NodeJS.ErrnoException).code === 'ENXIO') return { data: false, length: size - pos };
      return null;
    }
  }

  growAhead(): void {
    if (!this.writable || this.closed || !haveFallocate()) return;
    const st = fs.fstatSync(this.fd);
    if (st.isFile()) this.reservedEnd = Math.max(this.reservedEnd, st.size); // a device has no end to grow past
  }

  /**
   * Reserves from the reserved end to past `end`: as far again as the file is long (16 MiB at
   * least, 256 MiB at most), so a copy makes a handful of calls. Any failure (ENOSPC,
   * EOPNOTSUPP on a file system without it) ends growing ahead; the writes go on as before.
   */
  private reserve(end: number): void {
    const to = end + Math.min(RESERVE_MAX, Math.max(RESERVE_MIN, end));
    const rc = fallocate(this.fd, FALLOC_FL_KEEP_SIZE, this.reservedEnd, to - this.reservedEnd);
    this.reservedEnd = rc === 0 ? to : -1;
  }

  flush(): void {
    if (!this.writable) return;
    try {
      if (this.writebackError !== null) throw this.writebackError;
      fs.fsyncSync(this.fd);
    } catch (err) {
      throw ioError(err, this.path, 'Could not flush');
    }
  }

  startWriteback(): void {
    if (!this.writable || this.closed) return;
    // Not skipped while an earlier one runs: its callback cannot run before the synchronous
    // engine returns to the event loop, so "one at a time" would mean "once per operation".
    // Overlapping fdatasyncs are harmless, and the queue drains itself: one that starts after
    // the data is on disk finds nothing dirty and returns within a few milliseconds.
    const p = new Promise<void>((resolve) => {
      fs.fdatasync(this.fd, (err) => {
        if (err) this.writebackError ??= err;
        this.writebacks.delete(p);
        resolve();
      });
    });
    this.writebacks.add(p);
  }

  async settle(): Promise<void> {
    while (this.writebacks.size) await Promise.all(this.writebacks);
  }

  size(): number {
    return fs.fstatSync(this.fd).size;
  }

  truncate(size: number): void {
    if (this.reservedEnd >= 0) this.reservedEnd = size; // truncating gives back the blocks past `size`
    try {
      fs.ftruncateSync(this.fd, size);
    } catch (err) {
      throw ioError(err, this.path, 'Could not resize');
    }
  }

  allocatedBytes(): number {
    return fs.fstatSync(this.fd).blocks * 512;
  }

  /**
   * null for a regular file; for a device, the bytes it holds (a block device's length, 0 for
   * a character device such as /dev/null): what QEMU's file protocol sees as its size, which
   * it cannot grow ("Cannot grow device files").
   */
  deviceLength(): number | null {
    const st = fs.fstatSync(this.fd);
    if (st.isFile()) return null;
    if (!st.isBlockDevice()) return 0;
    try {
      fsSeek ??= createRequire(import.meta.url)('fs-ext') as FsSeek;
      return fsSeek.seekSync(this.fd, 0, SEEK_END);
    } catch {
      return 0;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.reservedEnd >= 0) {
      // Blocks reserved past the end and never written: truncating to the same size frees them.
      try {
        fs.ftruncateSync(this.fd, fs.fstatSync(this.fd).size);
      } catch {
        // They stay allocated past the end: invisible to every reader, space only.
      }
    }
    fs.closeSync(this.fd);
  }
}
