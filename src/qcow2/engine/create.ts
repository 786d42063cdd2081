// Creating qcow2 and raw images with the layout, refusals and `Formatting ...` line of qemu-img 7.2's create.
//
// Layout: QEMU formats a minimal image (header in cluster 0, one refcount-table cluster at 1,
// refcount block 0 at 2) and then grows it through its cluster allocator, which always takes
// the next cluster past the last one handed out and allocates a missing refcount block at
// that point as soon as a cluster it covers gets a refcount. planQcow2() replays that
// allocation sequence (arithmetically, never cluster by cluster), so a plan's bytes equal
// qemu-img's. Where QEMU would grow the refcount table (many refcount blocks: tiny clusters
// with preallocation, or huge images) qimg instead sizes the table up front: a valid, clean
// image, but not byte-identical (see planQcow2).

import * as fs from 'node:fs';
import { QimgError, ioError, osReason } from '../errors.js';
import { setU32, setU64 } from '../format/bytes.js';
import { buildExtensions, encodeHeader, l1EntriesFor, l2Entries, type Header } from '../format/header.js';
import * as L from '../format/layout.js';
import { refblockEntries, setRefcount } from '../format/refblock.js';
import { type BlockFile, NodeFile } from '../io/file.js';
import { lockImage, type ImageLock } from '../io/lock.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface CreateOptions {
  format: 'qcow2' | 'raw';
  /** Virtual size in bytes; rounded up to 512 as QEMU does. Omitted: the backing file's size. */
  size?: number;
  clusterSize?: number;
  /** '0.10'/'v2' make a version 2 image, '1.1'/'v3' (the default) version 3. */
  compat?: '0.10' | '1.1' | 'v2' | 'v3';
  refcountBits?: number;
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  preallocation?: Preallocation;
  /** Stored in the header exactly as given; opened relative to the new image's directory. */
  backingFile?: string;
  backingFormat?: string;
  /** Do not open the backing file (then `size` is required). */
  unsafe?: boolean;
  /** External data file, created (or truncated) at this path as given (relative to the working directory, as QEMU does). */
  dataFile?: string;
  dataFileRaw?: boolean;
  /**
   * The option values as the user typed them, by option name (`lazy_refcounts: 'yes'`,
   * `compat: 'v2'`), for the Formatting line only: qemu-img echoes the spelling.
   */
  spelling?: Readonly<Record<string, string>>;
  /**
   * false: no fsync (the target of a convert, which nothing relies on before convert returns and
   * which convert flushes at the end when its cache mode asks). Default true.
   */
  durable?: boolean;
}

export interface CreateResult {
  /** qemu-img's `Formatting 'FILE', fmt=...` line, without the newline. */
  formatting: string;
  /** The virtual size written (rounded up to 512). */
  size: number;
  /** The image file's size in bytes (sparse: most of a preallocated image may be holes). */
  fileSize: number;
}

/** Options qemu-img 7.2 knows for each format (what `-o help` lists), in its help order. */
export const CREATE_OPTION_HELP: Record<'qcow2' | 'raw', ReadonlyArray<[string, string, string]>> = {
  qcow2: [
    ['backing_file', 'str', 'File name of a base image'],
    ['backing_fmt', 'str', 'Image format of the base image'],
    ['cluster_size', 'size', 'qcow2 cluster size'],
    ['compat', 'str', 'Compatibility level (v2 [0.10] or v3 [1.1])'],
    ['compression_type', 'str', 'Compression method used for image cluster compression'],
    ['data_file', 'str', 'File name of an external data file'],
    ['data_file_raw', 'bool (on/off)', 'The external data file must stay valid as a raw image'],
    ['extended_l2', 'bool (on/off)', 'Extended L2 tables'],
    ['lazy_refcounts', 'bool (on/off)', 'Postpone refcount updates'],
    ['preallocation', 'str', 'Preallocation mode (allowed values: off, metadata, falloc, full)'],
    ['refcount_bits', 'num', 'Width of a reference count entry in bits'],
    ['size', 'size', 'Virtual disk size'],
  ],
  raw: [
    ['preallocation', 'str', 'Preallocation mode (allowed values: off, falloc, full)'],
    ['size', 'size', 'Virtual disk size'],
  ],
};

/** The order qemu-img prints create options in, and which it prints with a default when unset. */
const QCOW2_PRINT_ORDER: ReadonlyArray<[string, string | null]> = [
  ['cluster_size', '65536'],
  ['extended_l2', 'off'],
  ['preallocation', null],
  ['compression_type', 'zlib'],
  ['size', null],
  ['compat', null],
  ['backing_file', null],
  ['backing_fmt', null],
  ['data_file', null],
  ['data_file_raw', null],
  ['lazy_refcounts', 'off'],
  ['refcount_bits', '16'],
];
const RAW_PRINT_ORDER: ReadonlyArray<[string, string | null]> = [
  ['size', null],
  ['preallocation', null],
];

const SECTOR = 512;
const DEFAULT_CLUSTER_SIZE = 65536;
/** qemu-img's message when the virtual size needs an L1 table over QEMU's 32 MiB cap. */
const TOO_LARGE_QCOW2 = "The image size is too large for file format 'qcow2' (try using a larger cluster size)";
/** Zero-filling (preallocation=full/falloc) and big metadata writes go out in pieces of this size. */
const WRITE_CHUNK = 8 * 1024 * 1024;

/** The text of each option the user set (or that the Formatting line shows), by QEMU option name. */
function optionTexts(opts: CreateOptions, size: number | undefined): Map<string, string> {
  const t = new Map<string, string>();
  const onOff = (b: boolean) => (b ? 'on' : 'off');
  if (opts.clusterSize !== undefined) t.set('cluster_size', String(opts.clusterSize));
  if (opts.extendedL2 !== undefined) t.set('extended_l2', onOff(opts.extendedL2));
  if (opts.preallocation !== undefined) t.set('preallocation', opts.preallocation);
  if (opts.compressionType !== undefined) t.set('compression_type', opts.compressionType);
  if (size !== undefined) t.set('size', String(size));
  if (opts.compat !== undefined) t.set('compat', opts.compat);
  if (opts.backingFile !== undefined) t.set('backing_file', opts.backingFile.replace(/,/g, ',,'));
  if (opts.backingFormat !== undefined) t.set('backing_fmt', opts.backingFormat);
  if (opts.dataFile !== undefined) t.set('data_file', opts.dataFile.replace(/,/g, ',,'));
  if (opts.dataFileRaw !== undefined) t.set('data_file_raw', onOff(opts.dataFileRaw));
  if (opts.lazyRefcounts !== undefined) t.set('lazy_refcounts', onOff(opts.lazyRefcounts));
  if (opts.refcountBits !== undefined) t.set('refcount_bits', String(opts.refcountBits));
  for (const [k, v] of Object.entries(opts.spelling ?? {})) if (t.has(k)) t.set(k, v);
  return t;
}

/** qemu-img's `Formatting 'FILE', fmt=FMT k=v ...` line for these options (size as given, before rounding). */
export function formattingLine(path: string, opts: CreateOptions, size = opts.size): string {
  const texts = optionTexts(opts, size);
  const order = opts.format === 'raw' ? RAW_PRINT_ORDER : QCOW2_PRINT_ORDER;
  const fields = [`fmt=${opts.format}`];
  for (const [name, def] of order) {
    const v = texts.get(name) ?? def;
    if (v !== null) fields.push(`${name}=${v}`);
  }
  return `Formatting '${path}', ${fields.join(' ')}`;
}

/** An error about the image being created, worded and prefixed as qemu-img's are. */
function refuse(path: string, message: string, code: 'USAGE' | 'UNSUPPORTED' | 'IO' | 'NOT_FOUND' | 'BACKING' = 'USAGE'): QimgError {
  return new QimgError(code, `${path}: ${message}`, { path });
}

/** The path QEMU opens for a name stored in `imagePath` (backing or data file): relative to its directory. */
function besideImage(imagePath: string, name: string): string {
  if (name.startsWith('/')) return name;
  const slash = imagePath.lastIndexOf('/');
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}

export interface PreparedCreate {
  /** The Formatting line qemu-img prints at this point (before the format driver's own checks). */
  readonly formatting: string;
  /** Validates the format options (qemu-img's post-Formatting refusals) and writes the image. */
  execute(): Promise<CreateResult>;
}

/**
 * Everything qemu-img does before it prints the Formatting line: the refusals that come first,
 * and the size taken from the backing file. The CLI prints `formatting`, then calls execute(),
 * so refusals appear on the same side of the line as qemu-img's.
 */
export async function prepareCreate(path: string, opts: CreateOptions): Promise<PreparedCreate> {
  if (opts.format !== 'qcow2' && opts.format !== 'raw') {
    throw refuse(path, `Unknown file format '${String(opts.format)}'`, 'UNSUPPORTED');
  }
  let size = opts.size;
  if (opts.backingFile !== undefined) {
    if (opts.format === 'raw') throw refuse(path, "Backing file not supported for file format 'raw'", 'UNSUPPORTED');
    if (opts.backingFile === '') throw refuse(path, 'Expected backing file name, got empty string');
    if (opts.backingFile === path) {
      throw refuse(path, 'Error: Trying to create an image with the same filename as the backing file', 'BACKING');
    }
    if (opts.backingFormat === undefined) throw refuse(path, 'Backing file specified without backing format', 'BACKING');
    if (!opts.unsafe) {
      const backingSize = await backingVirtualSize(path, opts.backingFile, opts.backingFormat);
      size ??= backingSize;
    }
  }
  if (size === undefined) throw refuse(path, 'Image creation needs a size parameter');
  if (!Number.isSafeInteger(size) || size < 0) throw refuse(path, `Invalid image size ${size}`);
  const formatting = formattingLine(path, opts, size);
  const finalSize = size;
  return {
    formatting,
    execute: () => (opts.format === 'raw' ? createRaw(path, opts, finalSize, formatting) : createQcow2(path, opts, finalSize, formatting)),
  };
}

/** Creates an image; see CreateOptions. Throws QimgError with qemu-img's wording on refusal. */
export async function create(path: string, opts: CreateOptions): Promise<CreateResult> {
  return (await prepareCreate(path, opts)).execute();
}

async function backingVirtualSize(imagePath: string, name: string, format: string): Promise<number> {
  const target = besideImage(imagePath, name);
  const fail = (reason: string) => refuse(imagePath, `${reason}\nCould not open backing image.`, 'BACKING');
  if (format !== 'qcow2' && format !== 'raw') throw fail(`Unknown driver '${format}'`);
  const { openImage } = await import('./open.js');
  let layer;
  try {
    layer = await openImage(target, { format, forceShare: true, openBacking: false });
  } catch (err) {
    if (err instanceof QimgError) {
      // openImage says "Could not open 'PATH': reason"; for a wrong format QEMU gives the reason alone.
      const m = /^Could not open '.*?': (Image is not in qcow2 format)$/s.exec(err.message);
      throw fail(m ? m[1]! : err.message);
    }
    throw err;
  }
  try {
    return layer.virtualSize;
  } finally {
    await layer.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Option validation (qemu-img's refusals after the Formatting line)

export interface Qcow2Params {
  size: number;
  clusterBits: number;
  version: 2 | 3;
  refcountOrder: number;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  compressionType: number;
  preallocation: Preallocation;
  backingFile: string | null;
  backingFormat: string | null;
  dataFile: string | null;
  dataFileRaw: boolean;
}

const BACKING_FORMATS = new Set([
  'blkdebug', 'blklogwrites', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read', 'dmg',
  'file', 'ftp', 'ftps', 'gluster', 'host_cdrom', 'host_device', 'http', 'https', 'iscsi', 'luks', 'nbd', 'nfs',
  'null-aio', 'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qcow2', 'qed', 'quorum', 'raw', 'rbd',
  'replication', 'snapshot-access', 'ssh', 'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
]);

function roundUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** QEMU's checks on qcow2 creation options, in the order qemu-img reports them. */
export function validateQcow2(path: string, opts: CreateOptions, size: number): Qcow2Params {
  let version: 2 | 3 = 3;
  if (opts.compat !== undefined) {
    if (opts.compat === '0.10' || opts.compat === 'v2') version = 2;
    else if (opts.compat === '1.1' || opts.compat === 'v3') version = 3;
    else throw refuse(path, `Parameter 'version' does not accept value '${String(opts.compat)}'`);
  }
  if (opts.backingFormat !== undefined && !BACKING_FORMATS.has(opts.backingFormat)) {
    throw refuse(path, `Parameter 'backing-fmt' does not accept value '${opts.backingFormat}'`);
  }
  const prealloc = opts.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(prealloc)) {
    throw refuse(path, `Parameter 'preallocation' does not accept value '${prealloc}'`);
  }
  const ct = opts.compressionType ?? 'zlib';
  if (ct !== 'zlib' && ct !== 'zstd') throw refuse(path, `Parameter 'compression-type' does not accept value '${String(ct)}'`);

  // qcow2_co_create's own checks, in its order.
  const clusterSize = opts.clusterSize ?? DEFAULT_CLUSTER_SIZE;
  const clusterBits = Math.log2(clusterSize);
  const extendedL2 = opts.extendedL2 ?? false;
  if (extendedL2 && version < 3) {
    throw refuse(path, 'Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (!Number.isInteger(clusterBits) || clusterBits < L.MIN_CLUSTER_BITS || clusterBits > L.MAX_CLUSTER_BITS) {
    throw refuse(path, 'Cluster size must be a power of two between 512 and 2048k');
  }
  if (extendedL2 && clusterBits < L.MIN_EXTL2_CLUSTER_BITS) {
    throw refuse(path, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  const backingFile = opts.backingFile ?? null;
  if (backingFile !== null && prealloc !== 'off' && !extendedL2) {
    throw refuse(path, 'Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (opts.backingFormat !== undefined && backingFile === null) throw refuse(path, 'Backing format cannot be used without backing file');
  if (opts.lazyRefcounts && version < 3) {
    throw refuse(path, 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const refcountBits = opts.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > L.MAX_REFCOUNT_ORDER) {
    throw refuse(path, 'Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcountBits !== 16) {
    throw refuse(path, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
  const dataFile = opts.dataFile ?? null;
  const dataFileRaw = opts.dataFileRaw ?? false;
  if (dataFileRaw && dataFile === null) throw refuse(path, 'data-file-raw requires data-file');
  if (dataFileRaw && backingFile !== null) throw refuse(path, 'Backing file and data-file-raw cannot be used at the same time');
  if (dataFile !== null && version < 3) {
    throw refuse(path, 'External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (ct !== 'zlib' && version < 3) {
    throw refuse(path, 'Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }

  const rounded = roundUp(size, SECTOR);
  if (l1EntriesFor(rounded, clusterBits, extendedL2) > L.MAX_L1_ENTRIES) throw refuse(path, TOO_LARGE_QCOW2);
  return {
    size: rounded,
    clusterBits,
    version,
    refcountOrder,
    lazyRefcounts: opts.lazyRefcounts ?? false,
    extendedL2,
    compressionType: ct === 'zstd' ? L.COMPRESSION_ZSTD : L.COMPRESSION_ZLIB,
    // An external data file that must stay a valid raw image needs every cluster mapped from the start.
    preallocation: dataFileRaw && prealloc === 'off' ? 'metadata' : prealloc,
    backingFile,
    backingFormat: opts.backingFormat ?? null,
    dataFile,
    dataFileRaw,
  };
}

// ---------------------------------------------------------------------------------------------
// Layout plan (pure)

/** A run of L2-table-mapped data clusters: guest clusters [firstGuest, firstGuest+count) at host cluster `host`. */
export interface DataRun {
  l2Index: number;
  firstGuest: number;
  count: number;
  host: number;
}

/** Where everything goes, in clusters unless named otherwise. */
export interface Qcow2Plan {
  clusterBits: number;
  reftableCluster: number;
  reftableClusters: number;
  /** refblocks[i] = host cluster of refcount block i (block i covers clusters [i*E, (i+1)*E)). */
  refblocks: number[];
  /** Every host cluster below this has refcount 1 (the plan leaves no holes). */
  usedClusters: number;
  l1Cluster: number;
  l1Size: number;
  /** l2Tables[i] = host cluster of the L2 table for L1 entry i (preallocation only). */
  l2Tables: number[];
  dataRuns: DataRun[];
  /** Host clusters to fill with zeros (preallocation=full/falloc): [start, start+count). */
  zeroFill: { start: number; count: number } | null;
  /** Clusters below usedClusters that stay free (refcount 0): old refcount table clusters no L2 table reused. */
  freeClusters: number[];
  fileSize: number;
}

/**
 * Replays QEMU's allocations for a new image. `reftableClusters` > 1 is the fallback for images
 * whose refcount blocks outgrow one table cluster (QEMU would move and grow the table instead).
 */
export function planQcow2(p: Qcow2Params): Qcow2Plan {
  const cs = 2 ** p.clusterBits;
  for (let reftableClusters = 1; reftableClusters * cs <= L.MAX_REFTABLE_BYTES; reftableClusters *= 2) {
    const plan = tryPlan(p, reftableClusters);
    if (plan) return plan;
  }
  throw new QimgError('UNSUPPORTED', 'Reference count table too large');
}

function tryPlan(p: Qcow2Params, reftableClusters: number): Qcow2Plan | null {
  const cs = 2 ** p.clusterBits;
  const E = refblockEntries(p.clusterBits, p.refcountOrder);
  const capacity = (reftableClusters * cs) / 8;
  const refblocks: number[] = [];
  let next = 0;
  let overflow = false;

  // The cluster a refcount block for `block` goes to: the next free one. When that cluster
  // lies in another missing block's range, that block is allocated first (QEMU recurses the same way).
  const allocRefblock = (block: number): void => {
    if (block >= capacity) {
      overflow = true;
      return;
    }
    const c = next++;
    const own = Math.floor(c / E);
    if (own !== block && refblocks[own] === undefined) allocRefblock(own);
    refblocks[block] = c;
  };
  const ensureRefblocks = (start: number, count: number): void => {
    for (let b = Math.floor(start / E); b <= Math.floor((start + count - 1) / E); b++) {
      if (refblocks[b] === undefined) allocRefblock(b);
      if (overflow) return;
    }
  };
  const alloc = (count: number): number => {
    const start = next;
    next += count;
    ensureRefblocks(start, count);
    return start;
  };

  // The minimal image: header, refcount table, then the refcount block(s) describing them.
  next = 1 + reftableClusters;
  ensureRefblocks(0, next);
  if (overflow) return null;

  const guestClusters = Math.ceil(p.size / cs);
  const perL2 = l2Entries(p.clusterBits, p.extendedL2);
  const l1Size = l1EntriesFor(p.size, p.clusterBits, p.extendedL2);
  const l1Bytes = l1Size * 8;
  const l1Cluster = l1Size > 0 ? alloc(Math.ceil(l1Bytes / cs)) : 0;
  if (overflow) return null;

  const l2Tables: number[] = [];
  const dataRuns: DataRun[] = [];
  let zeroFill: Qcow2Plan['zeroFill'] = null;
  let reftableCluster = 1;
  let usedClusters: number;
  // The file ends at the end of the last structure written: whole clusters for the header and
  // refcount structures, the L1 table's exact length (QEMU does not pad it).
  let fileEnd = Math.max((1 + reftableClusters + 1) * cs, (refblocks.reduce((a, c) => Math.max(a, c), 0) + 1) * cs, l1Cluster * cs + l1Bytes);
  const freeClusters: number[] = [];
  const external = p.dataFile !== null;

  if (p.preallocation === 'off') {
    usedClusters = next;
  } else if (p.preallocation === 'metadata' || external) {
    // Per L2 table: the table, then its data clusters as one run (none with an external data file).
    for (let i = 0; i < l1Size; i++) {
      l2Tables.push(alloc(1));
      const firstGuest = i * perL2;
      const count = Math.min(perL2, guestClusters - firstGuest);
      if (external) dataRuns.push({ l2Index: i, firstGuest, count, host: firstGuest });
      else dataRuns.push({ l2Index: i, firstGuest, count, host: alloc(count) });
      if (overflow) return null;
    }
    usedClusters = next;
    fileEnd = Math.max(fileEnd, next * cs);
  } else {
    // falloc/full: QEMU puts a new refcount area (the missing refcount blocks, then a new
    // table sized exactly) after what exists, all data in one run after it, then frees the
    // old table and allocates the L2 tables: the first goes into the freed cluster(s).
    const start = next;
    const existing = refblocks.length;
    const additional = guestClusters + l1Size;
    let k = 0;
    let t = 0;
    for (;;) {
      t = Math.ceil(((existing + k) * 8) / cs);
      if ((existing + k) * E >= start + k + t + additional) break;
      k++;
    }
    for (let b = 0; b < k; b++) refblocks[existing + b] = start + b;
    reftableCluster = start + k;
    const dataStart = start + k + t;
    dataRuns.length = 0;
    next = dataStart + guestClusters;
    zeroFill = { start: dataStart, count: guestClusters };
    // Freed old table clusters 1..reftableClusters are handed out first, lowest first.
    const freed: number[] = [];
    for (let c = 1; c <= reftableClusters; c++) freed.push(c);
    for (let i = 0; i < l1Size; i++) {
      const l2 = freed.length ? freed.shift()! : next++;
      l2Tables.push(l2);
      const firstGuest = i * perL2;
      const count = Math.min(perL2, guestClusters - firstGuest);
      dataRuns.push({ l2Index: i, firstGuest, count, host: dataStart + firstGuest });
    }
    // Freed clusters no L2 table took stay free: refcount 0 inside the used range.
    freeClusters.push(...freed);
    usedClusters = next;
    fileEnd = Math.max(fileEnd, next * cs);
    return {
      clusterBits: p.clusterBits,
      reftableCluster,
      reftableClusters: t,
      refblocks,
      usedClusters,
      l1Cluster,
      l1Size,
      l2Tables,
      dataRuns,
      zeroFill,
      freeClusters,
      fileSize: fileEnd,
    };
  }
  return {
    clusterBits: p.clusterBits,
    reftableCluster,
    reftableClusters,
    refblocks,
    usedClusters,
    l1Cluster,
    l1Size,
    l2Tables,
    dataRuns,
    zeroFill,
    freeClusters,
    fileSize: fileEnd,
  };
}

// ---------------------------------------------------------------------------------------------
// Writing

/** Opens (creating if needed) and write-locks `path` BEFORE truncating, so an image in use is left untouched. */
async function openForCreate(path: string): Promise<{ file: NodeFile; lock: ImageLock }> {
  let created = false;
  try {
    const fd = fs.openSync(path, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
    fs.closeSync(fd);
    created = true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw refuse(path, `Could not create '${path}': ${osReason(err as NodeJS.ErrnoException)}`, 'IO');
  }
  let file: NodeFile;
  try {
    file = NodeFile.open(path, true);
  } catch (err) {
    if (created) fs.rmSync(path, { force: true });
    throw err;
  }
  try {
    const lock = await lockImage(file.fd, path, 'write');
    // A file this call created is still empty: no truncate, whose journal update can wait
    // for the commit of an earlier unlink, as open(O_TRUNC) skips it for a created file.
    // A device is never truncated (setSize checks its length).
    if ((!created || fs.fstatSync(file.fd).size > 0) && file.deviceLength() === null) file.truncate(0);
    return { file, lock };
  } catch (err) {
    file.close();
    if (created) fs.rmSync(path, { force: true });
    if (err instanceof QimgError && err.code === 'LOCKED') throw refuse(path, err.message, 'IO');
    throw err;
  }
}

async function closeLocked(o: { file: NodeFile; lock: ImageLock }): Promise<void> {
  await o.lock.release();
  o.file.close();
}

function setSize(file: NodeFile, path: string, size: number, format: string): void {
  const device = file.deviceLength();
  if (device !== null) {
    // A device keeps its length; QEMU refuses one too short for the image.
    if (size > device) throw refuse(path, 'Cannot grow device files');
    return;
  }
  try {
    fs.ftruncateSync(file.fd, size);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EFBIG') throw refuse(path, `The image size is too large for file format '${format}'`);
    throw ioError(err, path, 'Could not resize');
  }
}

/** Writes zeros over [offset, offset+length) in large pieces (what preallocation=full/falloc reserve). */
function zeroFill(file: BlockFile, offset: number, length: number): void {
  const buf = new Uint8Array(Math.min(WRITE_CHUNK, length));
  for (let done = 0; done < length; ) {
    const n = Math.min(buf.length, length - done);
    file.write(n === buf.length ? buf : buf.subarray(0, n), offset + done);
    done += n;
  }
}

async function createRaw(path: string, opts: CreateOptions, size: number, formatting: string): Promise<CreateResult> {
  const prealloc = opts.preallocation ?? 'off';
  if (prealloc !== 'off' && prealloc !== 'falloc' && prealloc !== 'full') {
    if (prealloc === 'metadata') throw refuse(path, 'Unsupported preallocation mode: metadata');
    // The file protocol's own parse of the mode (QAPI's words), not the format's.
    throw refuse(path, `invalid parameter value: ${String(prealloc)}`);
  }
  const rounded = roundUp(size, SECTOR);
  const o = await openForCreate(path);
  try {
    setSize(o.file, path, rounded, 'raw');
    if (prealloc !== 'off') zeroFill(o.file, 0, rounded);
    if (opts.durable !== false) o.file.flush();
  } finally {
    await closeLocked(o);
  }
  return { formatting, size: rounded, fileSize: rounded };
}

async function createQcow2(path: string, opts: CreateOptions, size: number, formatting: string): Promise<CreateResult> {
  const p = validateQcow2(path, opts, size);
  const plan = planQcow2(p);

  let data: { file: NodeFile; lock: ImageLock } | null = null;
  const o = await openForCreate(path);
  try {
    if (p.dataFile !== null) {
      // qemu-img creates (and QEMU later opens) the data file by its name as given: relative to
      // the working directory, not to the image.
      const dataPath = p.dataFile;
      data = await openForCreate(dataPath);
      setSize(data.file, dataPath, p.size, 'raw');
      if (p.preallocation === 'full' || p.preallocation === 'falloc') zeroFill(data.file, 0, p.size);
      if (opts.durable !== false) data.file.flush();
    }
    setSize(o.file, path, plan.fileSize, 'qcow2');
    writeQcow2Layout(o.file, p, plan, opts.durable !== false);
  } catch (err) {
    // A half-written image is worse than none: remove it, as QEMU does, and as QEMU only when it
    // is a regular file: never a device (qimg create on /dev/full once deleted /dev/full).
    try {
      if (fs.statSync(path).isFile()) fs.rmSync(path, { force: true });
    } catch {
      /* best effort */
    }
    throw err;
  } finally {
    if (data) await closeLocked(data);
    await closeLocked(o);
  }
  return { formatting, size: p.size, fileSize: plan.fileSize };
}

/**
 * Ordering: every table first, flushed, then the header that makes them reachable, flushed.
 * A crash before the header lands leaves a file without a valid qcow2 header (it reads as an
 * empty raw file), never one that points at unwritten tables.
 */
export function writeQcow2Layout(file: BlockFile, p: Qcow2Params, plan: Qcow2Plan, durable = true): void {
  const cs = 2 ** p.clusterBits;
  writeTables(file, p, plan);
  if (plan.zeroFill) zeroFill(file, plan.zeroFill.start * cs, plan.zeroFill.count * cs);
  if (durable) file.flush();
  file.write(encodeHeader(headerFor(p, plan)), 0);
  if (durable) file.flush();
}

export function headerFor(p: Qcow2Params, plan: Qcow2Plan): Header {
  const cs = 2 ** p.clusterBits;
  let incompat = 0n;
  if (p.dataFile !== null) incompat |= 1n << BigInt(L.INCOMPAT_DATA_FILE);
  if (p.compressionType !== L.COMPRESSION_ZLIB) incompat |= 1n << BigInt(L.INCOMPAT_COMPRESSION);
  if (p.extendedL2) incompat |= 1n << BigInt(L.INCOMPAT_EXTL2);
  const h: Header = {
    version: p.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: p.clusterBits,
    size: p.size,
    cryptMethod: L.CRYPT_NONE,
    l1Size: plan.l1Size,
    l1TableOffset: plan.l1Size > 0 ? plan.l1Cluster * cs : 0,
    refcountTableOffset: plan.reftableCluster * cs,
    refcountTableClusters: plan.reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompat,
    compatibleFeatures: p.lazyRefcounts ? 1n << BigInt(L.COMPAT_LAZY_REFCOUNTS) : 0n,
    autoclearFeatures: p.dataFileRaw ? 1n << BigInt(L.AUTOCLEAR_DATA_FILE_RAW) : 0n,
    refcountOrder: p.refcountOrder,
    headerLength: p.version >= 3 ? L.V3_HEADER_LENGTH : L.V2_HEADER_LENGTH,
    compressionType: p.compressionType,
    tailBytes: new Uint8Array(p.version >= 3 ? L.V3_HEADER_LENGTH - L.H_COMPRESSION_TYPE - 1 : 0),
    extensions: [],
    backingFile: p.backingFile,
    backingFormat: p.backingFormat,
    dataFile: p.dataFile,
    featureNames: [],
    bitmaps: null,
    crypto: null,
  };
  h.extensions = buildExtensions(h); // no feature name table at 4 KiB clusters or less, as QEMU
  return h;
}

/** Writes the refcount table and blocks, the L1 table and (preallocated) L2 tables in big buffers. */
/**
 * A refcount block with every entry 1: the first 8 bytes set entry by entry, then doubled with
 * native copies (an entry's width divides 64 bits). Per entry it was 32768 calls at 64 KiB.
 */
function onesBlock(cs: number, order: number): Uint8Array {
  const block = new Uint8Array(cs);
  for (let i = 0; i < Math.max(1, 64 >> order); i++) setRefcount(block, i, order, 1);
  for (let len = 8; len < cs; len *= 2) block.copyWithin(len, 0, Math.min(len, cs - len));
  return block;
}

function writeTables(file: BlockFile, p: Qcow2Params, plan: Qcow2Plan): void {
  const cs = 2 ** p.clusterBits;
  const E = refblockEntries(p.clusterBits, p.refcountOrder);

  // Refcount table.
  const reftable = new Uint8Array(plan.reftableClusters * cs);
  plan.refblocks.forEach((c, i) => setU64(reftable, i * 8, c * cs));
  file.write(reftable, plan.reftableCluster * cs);

  // Refcount blocks: every cluster below usedClusters has refcount 1, except the freed old
  // table clusters no L2 table took. A full block is the same bytes
  // each time, so it is built once.
  let full: Uint8Array | null = null;
  plan.refblocks.forEach((c, b) => {
    const first = b * E;
    const n = Math.max(0, Math.min(E, plan.usedClusters - first));
    const holes = plan.freeClusters.filter((f) => f >= first && f < first + E);
    let block: Uint8Array;
    if (n === E && !holes.length) block = full ??= onesBlock(cs, p.refcountOrder);
    else {
      block = new Uint8Array(cs);
      for (let i = 0; i < n; i++) setRefcount(block, i, p.refcountOrder, 1);
      for (const f of holes) setRefcount(block, f - first, p.refcountOrder, 0);
    }
    file.write(block, c * cs);
  });

  // L1 table (written to its exact length, as QEMU does: the file may end inside its last cluster).
  if (plan.l1Size > 0) {
    const l1 = new Uint8Array(plan.l1Size * 8);
    plan.l2Tables.forEach((c, i) => {
      setU32(l1, i * 8, (L.OFLAG_COPIED_HI | Math.floor((c * cs) / 0x100000000)) >>> 0);
      setU32(l1, i * 8 + 4, (c * cs) >>> 0);
    });
    writeChunked(file, l1, plan.l1Cluster * cs);
  }

  // L2 tables: each run's entries are consecutive host clusters with COPIED set (refcount 1).
  // Extended L2 entries leave both subcluster bitmaps 0, as QEMU does.
  const entryBytes = p.extendedL2 ? 16 : 8;
  const l2 = new Uint8Array(cs);
  for (const run of plan.dataRuns) {
    l2.fill(0);
    for (let j = 0; j < run.count; j++) {
      const off = (run.host + j) * cs;
      setU32(l2, j * entryBytes, (L.OFLAG_COPIED_HI | Math.floor(off / 0x100000000)) >>> 0);
      setU32(l2, j * entryBytes + 4, off >>> 0);
    }
    file.write(l2, plan.l2Tables[run.l2Index]! * cs);
  }
}

function writeChunked(file: BlockFile, buf: Uint8Array, pos: number): void {
  for (let done = 0; done < buf.length; done += WRITE_CHUNK) {
    file.write(buf.subarray(done, Math.min(buf.length, done + WRITE_CHUNK)), pos + done);
  }
}
