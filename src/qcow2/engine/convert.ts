// `convert`: guest bytes of an image (active layer or a snapshot, chain included) into a new sparse raw
// file or qcow2 image, with reads, writes and compression overlapped on libuv's threads.

import { QimgError } from '../errors.js';
import { fsyncPath, NodeFile, readAt, readRunsScan, type ReadRun } from '../io/file.js';
import type { ZeroScan } from '../io/native.js';
import type { Layer } from './layer.js';
import { closeFile, openImage, type BackingPolicy, type ImageFormat } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import { findSnapshot, parseSnapshotSelector } from './info.js';
import * as fs from 'node:fs';
import { openSync, closeSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { ioError, osReason } from '../errors.js';
import { COMPRESSION_ZSTD } from '../format/layout.js';
import type { CreateOptions } from './create.js';
import { ioBuffer } from '../io/buffers.js';
import { HoleCache } from './holes.js';

export interface ConvertOptions {
  format?: ImageFormat;
  outputFormat: 'raw' | 'qcow2';
  /**
   * `-o` for the target (its size comes from the source). A function is called once the source
   * is open, before the target is made, so that its errors come in qemu-img's order.
   */
  createOptions?: TargetOptions | (() => TargetOptions);
  /**
   * `-t`: the target's cache mode (QEMU's names). 'unsafe', the default, never flushes, as
   * qemu-img convert does; any other flushes the target once the copy is done.
   */
  cache?: string;
  /** `-c`: write every data cluster compressed (qcow2 targets). */
  compress?: boolean;
  /** `-B`/`-F`: the target's backing file; only what differs from it is written. */
  targetBacking?: { file: string; format?: string };
  /** `-l`: snapshot.name=N / snapshot.id=I / bare ID-or-name. */
  snapshot?: string;
  forceShare?: boolean;
  backing?: BackingPolicy;
  /** Called with (done, total) bytes as the copy advances. */
  progress?: (done: number, total: number) => void;
}

/** Zero runs shorter than this are written; longer aligned ones become holes (qemu-img's -S 4k). */
const SPARSE_GRANULARITY = 4096;
/** Guest bytes per read and per write (qemu-img's convert buffer is 2 MiB too). */
const CHUNK = 2 * 1024 * 1024;
/**
 * Chunk buffers: while one is being placed, the others are being read or written on libuv's
 * threads. Four keep both CPUs of a small machine busy; more only add memory.
 */
const BUFFERS = 4;
const ZERO_BLOCK = new Uint8Array(SPARSE_GRANULARITY);
/** Skips in a row (each up to SKIP_SPAN) between turns of the event loop. */
const SKIPS_PER_YIELD = 64;
/** Longest zero run one extent() call looks for (mapping is per cluster: keep each call short). */
const SKIP_SPAN = 64 * 1024 * 1024;

/**
 * Bytes from `off` (up to SKIP_SPAN) that `source` reads as zero, or 0 where it has data. The
 * first `probe` bytes are asked alone: extent() measures the whole run of its first kind, so a
 * long ask at data would walk every cluster of a 64 MiB data run only to learn "not zero" (it
 * did, once per 2 MiB chunk: 15x the per-cluster mapping a 1 GiB convert needs). With `holes`,
 * data over holes of its host file counts as zero too (see holeRun).
 */
function zeroRun(source: Layer, off: number, probe: number, holes: HoleCache | null): number {
  const left = source.virtualSize - off;
  const first = source.extent(off, Math.min(probe, left));
  if (first.kind !== 'zero') return holes ? holeRun(source, off, probe, Math.min(SKIP_SPAN, left), holes) : 0;
  if (first.length < Math.min(probe, left)) return first.length;
  return source.extent(off, Math.min(SKIP_SPAN, left)).length;
}

/**
 * Bytes from `off` (up to `span`) that read as zero without reading them: zero runs, and data
 * whose host bytes are a hole in their file or past its end, as qemu-img learns from the file
 * (SEEK_DATA) before it reads. A preallocation=metadata image is all such data: read instead,
 * a 256 GiB one took 45 s of the kernel making zeros (qemu-img: 0.4 s). The first `probe` bytes
 * are asked alone, as in zeroRun, so a data run costs one short mapping and a cached answer.
 */
function holeRun(source: Layer, off: number, probe: number, span: number, holes: HoleCache): number {
  let done = 0;
  while (done < span) {
    const loc = source.locate(off + done, done === 0 ? Math.min(probe, span) : span - done);
    let zero: number;
    if (loc.kind === 'zero') zero = loc.length;
    else if (loc.kind === 'host') {
      const p = holes.probe(loc.file, loc.host, loc.length);
      if (!p.zero) break;
      zero = p.length;
    } else break;
    done += zero;
    if (zero < loc.length) break;
  }
  return done;
}

/**
 * A HoleCache for the source's data files, or null for a raw source: its extents come from
 * SEEK_DATA already (asking again cost a 1 GiB raw source ~1100 more system calls).
 */
function sourceHoles(source: Layer): HoleCache | null {
  return source.format === 'raw' ? null : new HoleCache();
}

type TargetOptions = Omit<CreateOptions, 'format' | 'size'>;

/** QEMU's cache modes (bdrv_parse_cache_mode). */
export const CACHE_MODES = new Set(['none', 'off', 'writeback', 'unsafe', 'directsync', 'writethrough']);

/**
 * What qemu-img convert refuses once the source is open and before the target is made: the -o
 * list (given as a function), a target backing file without a format, the cache mode.
 */
function targetOptions(dst: string, opts: ConvertOptions): ConvertOptions {
  const createOptions = typeof opts.createOptions === 'function' ? opts.createOptions() : opts.createOptions;
  const backing = opts.targetBacking?.file ?? createOptions?.backingFile;
  const backingFormat = opts.targetBacking ? opts.targetBacking.format : createOptions?.backingFormat;
  if (backing !== undefined && backingFormat === undefined) throw new QimgError('USAGE', 'Use of backing file requires explicit backing format');
  if (opts.cache !== undefined && !CACHE_MODES.has(opts.cache)) throw new QimgError('USAGE', `Invalid cache option: ${opts.cache}`);
  if (createOptions?.dataFile !== undefined) {
    throw new QimgError('UNSUPPORTED', `'${dst}': writing guest data of an image with an external data file is not supported yet`);
  }
  return { ...opts, createOptions };
}

/** A target that cannot be made: qemu-img convert's words around the create error. */
function createError(err: unknown, dst: string, format: string): unknown {
  if (!(err instanceof QimgError)) return err;
  const inner = err.message.startsWith(`${dst}: `) ? err.message.slice(dst.length + 2) : err.message;
  return new QimgError(err.code, `${dst}: error while converting ${format}: ${inner}`, err.data);
}

function checkOptions(opts: ConvertOptions): void {
  if (opts.outputFormat === 'raw' && (opts.compress || opts.targetBacking)) {
    throw new QimgError('USAGE', opts.compress ? 'Compression not supported for this file format' : "Backing file not supported for file format 'raw'");
  }
}

export async function convert(src: string, dst: string, opts: ConvertOptions): Promise<void> {
  checkOptions(opts); // before the source is opened
  // The writer's modules compile while the source opens (its lock check waits on the kernel).
  if (opts.outputFormat === 'qcow2') Promise.all([import('./create.js'), import('./writer.js')]).catch(() => undefined);
  const top = await openImage(src, { format: opts.format, forceShare: opts.forceShare, backing: opts.backing });
  try {
    top.assertReadable(); // before the output file exists
    let source: Layer = top;
    if (opts.snapshot !== undefined) {
      if (!(top instanceof Qcow2Image)) {
        throw new QimgError('USAGE', `Failed to load snapshot: Block format '${top.format}' used by device '' does not support temporarily loading internal snapshots`);
      }
      const sn = findSnapshot(top, parseSnapshotSelector(opts.snapshot));
      if (!sn) throw new QimgError('NOT_FOUND', "Failed to load snapshot: Can't find snapshot");
      source = top.snapshotView(sn);
    }
    await convertFrom(source, dst, targetOptions(dst, opts));
  } finally {
    await top.close();
  }
}

/** convert() from a layer already open (and readable); `snapshot`, `format` and `backing` are not used. */
export async function convertFrom(source: Layer, dst: string, opts: ConvertOptions): Promise<void> {
  checkOptions(opts);
  const o = typeof opts.createOptions === 'function' ? targetOptions(dst, opts) : opts;
  if (o.outputFormat === 'raw') await writeRaw(source, dst, o.progress, (o.createOptions as TargetOptions | undefined)?.preallocation);
  else await writeQcow2(source, dst, o);
  if (o.cache !== undefined && o.cache !== 'unsafe') fsyncPath(dst);
}

/** A run of guest bytes [off, off + len) being copied; `buf` holds them (zero past len up to the plan's padTo). */
interface Chunk {
  off: number;
  len: number;
  buf: Uint8Array;
  /**
   * With a cluster size: 1 for each cluster (from off) the source maps as zero, which is then
   * left out of `buf` (neither filled nor scanned). Null: every byte is in `buf`.
   */
  zero: Uint8Array | null;
  /**
   * The blocks the read checks for all-zero bytes as it lands (native helper only): the clusters
   * of `zero`, or a raw target's aligned 4 KiB blocks. Null: none.
   */
  scan: ZeroScan | null;
  /** Whether the read did flag them (2: all zero); else the caller scans itself. */
  scanned: boolean;
}

/**
 * The overlapped copy both outputs use. Chunks are read ahead into a few buffers (async reads on
 * libuv's threads, or the layer's own read() where only it can produce the bytes) and prepared
 * (zero scan, compression) as they arrive; then, strictly in guest order and synchronously,
 * `place` makes the chunk's metadata decisions and starts its writes (pushing them on `writes`).
 * A buffer is reused once its writes are done. When `commitDue` says so, every write started so
 * far is awaited before `commit` runs: tables reach the file after the data they point at.
 * The first error stops the copy, but only once every read and write already started has
 * settled, so nothing touches a buffer or a descriptor after this returns.
 */
async function copyOverlapped<P>(
  source: Layer,
  plan: {
    /** Bytes from `off` to leave out (zeros that need no write), or 0. */
    skip(off: number): number;
    /** Length of the chunk starting at `off` (at most `step`). */
    length(off: number): number;
    step: number;
    /** Clusters (offsets aligned to it) that read as zero need not be in the buffer; 0: all bytes are. */
    zeroGrain: number;
    /** Without zeroGrain: blocks of this size, aligned to guest offsets, to check for zeros as they are read (0: none). */
    blockGrain?: number;
    /**
     * A chunk cut short (the image's cut last cluster) is zeroed past its length up to the next
     * multiple of this (0: not at all): what is placed or compressed whole must not carry a
     * reused buffer's old bytes. Zeroing the whole rest of the 2 MiB buffer instead cost a raw
     * target ~40 ms of memset, its chunks ending wherever the source's data does.
     */
    padTo: number;
    /** Host files' holes, asked before reading (see holeRun); null: every host byte is read. */
    holes: HoleCache | null;
    prepare(c: Chunk): P | Promise<P>;
    place(c: Chunk, prepared: P, writes: Array<Promise<void>>): void;
    commitDue?(): boolean;
    commit?(): void;
    progress?: (done: number, total: number) => void;
  },
): Promise<void> {
  const size = source.virtualSize;
  let buffers = 0;
  const ready: Array<{ c: Chunk; p: Promise<P> }> = [];
  const writing: Array<{ buf: Uint8Array; done: Promise<void> }> = [];
  const started = new Set<Promise<unknown>>();
  // Every promise is observed at once (no unhandled rejection while it waits its turn) and
  // remembered until it settles, so an error can wait for the others before giving up.
  const track = <T>(p: Promise<T>): Promise<T> => {
    started.add(p);
    p.then(
      () => started.delete(p),
      () => started.delete(p),
    );
    return p;
  };
  const takeBuffer = async (): Promise<Uint8Array> => {
    if (buffers < BUFFERS) {
      buffers++;
      return ioBuffer(plan.step);
    }
    // At most BUFFERS - 1 chunks are being read, so one is being written (or waits to be).
    const w = writing.shift()!;
    await w.done;
    return w.buf;
  };
  try {
    let off = 0;
    let skips = 0;
    while (off < size || ready.length > 0) {
      while (off < size && ready.length < BUFFERS - 1) {
        const skip = plan.skip(off);
        if (skip > 0) {
          off += skip;
          plan.progress?.(Math.min(off, size), size);
          // A long stretch of skips (a large sparse or preallocated image) is one synchronous
          // walk: let timers and signals in now and then, as every read does.
          if (++skips % SKIPS_PER_YIELD === 0) await new Promise<void>((resolve) => setImmediate(resolve));
          continue;
        }
        const len = plan.length(off);
        const c = newChunk(off, len, await takeBuffer(), plan.zeroGrain, plan.blockGrain ?? 0);
        ready.push({ c, p: track(readChunk(source, c, plan.zeroGrain, plan.padTo, plan.holes).then(() => plan.prepare(c))) });
        off += len;
      }
      const next = ready.shift();
      if (!next) break;
      const prepared = await next.p;
      const writes: Array<Promise<void>> = [];
      try {
        plan.place(next.c, prepared, writes);
      } finally {
        writing.push({ buf: next.c.buf, done: track(allDone(writes)) });
      }
      if (plan.commitDue?.()) {
        for (const w of writing) await w.done;
        plan.commit!();
      }
      plan.progress?.(Math.min(next.c.off + next.c.len, size), size);
    }
    for (const w of writing) await w.done;
  } catch (err) {
    await Promise.allSettled([...started]);
    throw err;
  }
}

/** A chunk, with the zero flags (and scan) its plan asks for. */
function newChunk(off: number, len: number, buf: Uint8Array, zeroGrain: number, blockGrain: number): Chunk {
  if (zeroGrain > 0) {
    const zero = new Uint8Array(Math.ceil(len / zeroGrain));
    return { off, len, buf, zero, scan: { zero, grain: zeroGrain, first: 0, end: len }, scanned: false };
  }
  if (blockGrain > 0) {
    // Whole blocks only: a cut one at either end is written whatever it holds.
    const first = Math.min(len, (blockGrain - (off % blockGrain)) % blockGrain);
    const end = first + Math.floor((len - first) / blockGrain) * blockGrain;
    return { off, len, buf, zero: null, scan: { zero: new Uint8Array((end - first) / blockGrain), grain: blockGrain, first, end }, scanned: false };
  }
  return { off, len, buf, zero: null, scan: null, scanned: false };
}

/** Resolves when every promise has settled; rejects with the first error, if any. */
async function allDone(ps: Array<Promise<unknown>>): Promise<void> {
  const results = await Promise.allSettled(ps);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/**
 * Fills c.buf with the chunk's guest bytes (zeros past c.len up to a multiple of `padTo`),
 * except whole `grain` clusters the source maps as zero: those are flagged in c.zero instead.
 * With the native helper the host reads are one job that also flags the all-zero clusters
 * (c.scanned); without it, one fs request per run.
 */
async function readChunk(source: Layer, c: Chunk, grain: number, padTo: number, holes: HoleCache | null): Promise<void> {
  const runs: ReadRun[] = [];
  fillChunk(source, c, grain, runs, holes); // starts nothing: a damaged entry throws before any read
  if (padTo > 0) c.buf.fill(0, c.len, Math.min(c.buf.length, Math.ceil(c.len / padTo) * padTo));
  if (runs.length === 0) return;
  const job = readRunsScan(c.buf, runs, c.scan);
  if (job) {
    await job;
    c.scanned = c.scan !== null;
    return;
  }
  const reads = runs.map(async (r) => {
    const part = c.buf.subarray(r.offset, r.offset + r.length);
    const n = await r.file.readAsync!(part, r.pos);
    if (n < part.length) part.fill(0, n); // past the host file's end reads as zeros
  });
  // All of them settle before this does: the buffer is not handed on with a read still landing.
  await allDone(reads);
}

/** readChunk's walk over the chunk: zeros and layer reads at once, host reads (to start) onto `runs`. */
function fillChunk(source: Layer, c: Chunk, grain: number, runs: ReadRun[], holes: HoleCache | null): void {
  for (let done = 0; done < c.len; ) {
    const loc = source.locate(c.off + done, c.len - done);
    if (loc.kind === 'zero') zeroPart(c, done, done + loc.length, grain);
    else if (loc.kind === 'read') source.read(c.buf.subarray(done, done + loc.length), c.off + done);
    else if (loc.file.readAsync) {
      // Holes of the host file (see holeRun) are zeros to note, not bytes to read.
      for (let at = 0; at < loc.length; ) {
        const p = holes ? holes.probe(loc.file, loc.host + at, loc.length - at) : { zero: false, length: loc.length - at };
        if (p.zero) zeroPart(c, done + at, done + at + p.length, grain);
        else runs.push({ file: loc.file, offset: done + at, length: p.length, pos: loc.host + at });
        at += p.length;
      }
    } else readAt(loc.file, c.buf.subarray(done, done + loc.length), loc.host);
    done += loc.length;
  }
}

/** Bytes [from, to) of the chunk read as zero: whole `grain` clusters flagged in c.zero, the rest zeroed in c.buf. */
function zeroPart(c: Chunk, from: number, to: number, grain: number): void {
  const first = c.zero ? Math.ceil(from / grain) : 0;
  const last = c.zero ? (to === c.len ? Math.ceil(to / grain) : Math.floor(to / grain)) : 0;
  if (first < last) {
    c.buf.fill(0, from, first * grain);
    c.zero!.fill(1, first, last);
    c.buf.fill(0, Math.min(last * grain, to), to);
  } else c.buf.fill(0, from, to);
}

async function writeRaw(source: Layer, dst: string, progress?: (done: number, total: number) => void, preallocation?: CreateOptions['preallocation']): Promise<void> {
  // Create/truncate like qemu-img does, then take the write lock on the new file. With
  // preallocation the file is made (allocated, zeros) as `create -f raw` makes it; the copy then
  // writes only the data.
  try {
    if (preallocation === undefined) closeSync(openSync(dst, 'w'));
    else {
      const { create } = await import('./create.js');
      await create(dst, { format: 'raw', size: source.virtualSize, preallocation, durable: false });
    }
  } catch (err) {
    throw createError(err instanceof QimgError ? err : ioError(err, dst, 'Could not create'), dst, 'raw');
  }
  const out = NodeFile.open(dst, true);
  try {
    const { lockImage } = await import('../io/lock.js');
    await lockImage(out.fd, dst, 'write');
    const size = source.virtualSize;
    // Full size first, as qemu-img's create step does: a write inside the file is cheaper than
    // one that extends it (no size update per write). A device keeps its length.
    sizeRawTarget(out, dst, size);
    // Each data run's blocks reserved as its write starts (see writeNonZero); not on a device, nor
    // where preallocation has allocated the whole file already.
    const allocate = preallocation === undefined && out.deviceLength() === null;
    const holes = sourceHoles(source);
    await copyOverlapped(source, {
      step: CHUNK,
      holes,
      skip: (off) => {
        const zero = zeroRun(source, off, SPARSE_GRANULARITY, holes);
        return zero > 0 ? Math.max(zero, 1) : 0;
      },
      length: (off) => dataSpan(source, off, Math.min(CHUNK, size - off)),
      zeroGrain: 0,
      blockGrain: SPARSE_GRANULARITY,
      padTo: 0, // writes take exactly c.len bytes
      prepare: () => undefined,
      place: (c, _, writes) => writeNonZero(out, c, writes, allocate),
      progress,
    });
    // No fsync: a new output, written the way qemu-img convert writes it (cache mode "unsafe").
  } finally {
    await closeFile(out);
  }
}

/** Zero runs shorter than this inside data are read over (as zeros, left as holes) instead of ending a chunk. */
const BRIDGE = 256 * 1024;

/**
 * A raw target's chunk from `off` (which is data): up to `max` bytes, across zero runs shorter
 * than BRIDGE. Chunks cut at every zero run took the 1 GiB bench image ~30 ms longer (smaller jobs,
 * more of them); long runs still end a chunk, so a sparse image is not read as 2 MiB of zeros per
 * data cluster.
 */
function dataSpan(source: Layer, off: number, max: number): number {
  let len = 0;
  while (len < max) {
    const e = source.extent(off + len, max - len);
    if (e.kind === 'zero' && len > 0 && e.length >= BRIDGE) break;
    len += e.length;
  }
  return Math.max(1, len);
}

/** qemu-img's create step for a raw target: its size set, in convert's words when that fails. */
function sizeRawTarget(out: NodeFile, dst: string, size: number): void {
  const device = out.deviceLength();
  if (device !== null) {
    if (size > device) throw createError(new QimgError('IO', 'Cannot grow device files', { path: dst }), dst, 'raw');
    return;
  }
  try {
    fs.ftruncateSync(out.fd, size);
  } catch (err) {
    throw createError(new QimgError('IO', `Could not resize file: ${osReason(err as NodeJS.ErrnoException)}`, { path: dst }), dst, 'raw');
  }
}

/** What happens to each cluster of a chunk, decided before it is placed. */
const Skip = 0;
const Zero = 1;
const Data = 2;
const EMPTY = new Uint8Array(0);

/**
 * A new qcow2 image with the source's guest data: zero clusters stay unallocated (or become
 * zero clusters over a backing file that is not zero there); with a target backing file, clusters
 * that already read the same from it are not written.
 */
async function writeQcow2(source: Layer, dst: string, opts: ConvertOptions): Promise<void> {
  const { create } = await import('./create.js');
  const { openWriter } = await import('./writer.js');
  const tb = opts.targetBacking;
  try {
    await create(dst, {
      ...(opts.createOptions as TargetOptions | undefined),
      format: 'qcow2',
      size: source.virtualSize,
      ...(tb ? { backingFile: tb.file, backingFormat: tb.format } : {}),
      durable: false, // like the copy: flushed at the end only when the cache mode asks
    });
  } catch (err) {
    throw createError(err, dst, 'qcow2');
  }
  // A new output nobody relies on yet: written in order but not fsynced, as qemu-img convert does.
  const w = await openWriter(dst, { backing: { follow: 'any' }, durable: false });
  try {
    const compress = opts.compress ? await compressorFor(w.header.compressionType) : null;
    const cs = w.clusterSize;
    const size = source.virtualSize;
    const backing = w.img.backing;
    const step = Math.max(cs, Math.floor(CHUNK / cs) * cs);
    const base = backing ? ioBuffer(step) : null;
    const outFile = w.img.file;
    const holes = sourceHoles(source);
    // The image grows at its end: reserve blocks ahead of the copy (see NodeFile.growAhead).
    outFile.growAhead?.();
    await copyOverlapped<{ kinds: Uint8Array; packed: Uint8Array[] | null }>(source, {
      step,
      // Whole target clusters the source reads as zero need nothing (off stays cluster aligned).
      skip: (off) => {
        if (backing) return 0;
        const zero = zeroRun(source, off, cs, holes);
        return zero >= cs ? Math.min(Math.floor(zero / cs) * cs, size - off) : 0;
      },
      length: (off) => Math.min(step, size - off),
      // Comparing with the backing file needs every byte; otherwise a zero cluster is just skipped.
      zeroGrain: backing ? 0 : cs,
      padTo: cs,
      holes,
      prepare: async (c) => {
        const n = Math.ceil(c.len / cs);
        const kinds = new Uint8Array(n);
        if (base) backing!.read(base.subarray(0, c.len), c.off);
        for (let k = 0; k < n; k++) {
          if (c.zero?.[k]) continue; // Skip (mapped as zero, or read as zeros: c.scanned)
          if (c.scanned) {
            kinds[k] = Data;
            continue;
          }
          const from = k * cs;
          const to = Math.min(c.len, from + cs);
          const data = c.buf.subarray(from, to);
          const zero = isZero(data);
          if (base) kinds[k] = Buffer.compare(data, base.subarray(from, to)) === 0 ? Skip : zero ? Zero : Data;
          else kinds[k] = zero ? Skip : Data;
        }
        if (!compress) return { kinds, packed: null };
        // The buffer is zero past c.len, so a cut last cluster is compressed whole.
        const jobs = Array.from(kinds, (kind, k) => (kind === Data ? compress(c.buf.subarray(k * cs, (k + 1) * cs)) : null));
        const packed: Uint8Array[] = [];
        await allDone(jobs.filter((j) => j !== null));
        for (const j of jobs) packed.push(j ? await j : EMPTY);
        return { kinds, packed };
      },
      place: (c, { kinds, packed }, writes) => {
        const runs: number[] = []; // [buffer offset, length, host offset]: one job per chunk
        for (let k = 0; k < kinds.length; ) {
          const gc = (c.off + k * cs) / cs;
          if (kinds[k] === Skip) {
            k++;
          } else if (kinds[k] === Zero) {
            w.writeZeroes(c.off + k * cs, Math.min(cs, c.len - k * cs));
            k++;
          } else if (packed) {
            w.writeCompressedPacked(gc, c.buf.subarray(k * cs, (k + 1) * cs), packed[k]!);
            k++;
          } else {
            let run = 1;
            while (k + run < kinds.length && kinds[k + run] === Data) run++;
            let placed = 0;
            if (outFile.writeRunsAsync) {
              for (const r of w.placeClusters(gc, run)) {
                runs.push((r.gc - gc + k) * cs, r.count * cs, r.host);
                placed += r.count;
              }
            }
            // What placeClusters left (extended L2, or no async writes): the writer's own path.
            if (placed < run) w.write(c.buf.subarray((k + placed) * cs, Math.min(c.len, (k + run) * cs)), c.off + (k + placed) * cs);
            k += run;
          }
        }
        if (runs.length > 0) writes.push(outFile.writeRunsAsync!(c.buf, runs));
      },
      commitDue: () => w.commitDue,
      commit: () => w.commit(),
      progress: opts.progress,
    });
    await w.close();
  } catch (err) {
    await w.abandon();
    throw err;
  }
}

const ZERO_CHECK = new Uint8Array(65536);
/** Whether every byte is zero: memcmp against a zero block (native), 64 KiB at a time. */
function isZero(data: Uint8Array): boolean {
  // Most data clusters fail on their first or last byte, without a call into C++.
  if (data.length > 0 && (data[0] !== 0 || data[data.length - 1] !== 0)) return false;
  for (let i = 0; i < data.length; i += ZERO_CHECK.length) {
    const part = data.subarray(i, Math.min(data.length, i + ZERO_CHECK.length));
    if (Buffer.compare(part, ZERO_CHECK.subarray(0, part.length)) !== 0) return false;
  }
  return true;
}

/**
 * The image's compression as an async call: zlib (raw deflate, QEMU's "zlib" type) on libuv's
 * threads, at most a few clusters at a time so reads still find a free thread; zstd from a
 * WebAssembly build on this thread (Node 20's zlib has no zstd).
 */
async function compressorFor(type: number): Promise<(data: Uint8Array) => Promise<Uint8Array>> {
  if (type === COMPRESSION_ZSTD) {
    const z = await import('@bokuweb/zstd-wasm');
    await z.init();
    return async (data) => z.compress(data, 3); // level 3, zstd's default
  }
  const { deflateRaw } = await import('node:zlib');
  const limit = limiter(COMPRESS_JOBS);
  return (data) => limit(() => new Promise((resolve, reject) => deflateRaw(data, (err, out) => (err ? reject(err) : resolve(out)))));
}

/** Deflate jobs at once: about one per CPU, leaving libuv's fourth thread for reads. */
const COMPRESS_JOBS = Math.max(1, Math.min(3, availableParallelism() + 1));

/** Runs at most `n` of the given async jobs at a time, in call order. */
function limiter(n: number): <T>(job: () => Promise<T>) => Promise<T> {
  let running = 0;
  const waiting: Array<() => void> = [];
  return async (job) => {
    if (running >= n) await new Promise<void>((resolve) => waiting.push(resolve));
    running++;
    try {
      return await job();
    } finally {
      running--;
      waiting.shift()?.();
    }
  };
}

/**
 * Starts the writes of chunk `c` (onto `writes`), leaving all-zero blocks aligned to the file
 * offset as holes, as qemu-img does: the ones its read flagged, or found here. With `allocate`
 * the write job reserves each run's blocks first (fallocate, see native.ts writeRuns).
 */
function writeNonZero(out: NodeFile, c: Chunk, writes: Array<Promise<void>>, allocate: boolean): void {
  const g = SPARSE_GRANULARITY;
  const chunk = c.buf.subarray(0, c.len);
  const pos = c.off;
  const runs: number[] = []; // [offset in chunk, length, file position]
  let runStart = -1;
  let i = 0;
  while (i < chunk.length) {
    const next = Math.min(chunk.length, i + (g - ((pos + i) % g)));
    let zero: boolean;
    if (c.scanned) zero = next - i === g && c.scan!.zero[(i - c.scan!.first) / g] === 2;
    // Most data blocks fail on their first or last byte, without a call into C++.
    else zero = next - i === g && chunk[i] === 0 && chunk[next - 1] === 0 && Buffer.compare(chunk.subarray(i, next), ZERO_BLOCK) === 0;
    if (!zero && runStart < 0) runStart = i;
    if (zero && runStart >= 0) {
      runs.push(runStart, i - runStart, pos + runStart);
      runStart = -1;
    }
    i = next;
  }
  if (runStart >= 0) runs.push(runStart, chunk.length - runStart, pos + runStart);
  if (runs.length > 0) writes.push(out.writeRunsAsync(chunk, runs, allocate));
}
