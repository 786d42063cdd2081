// Human and JSON text for `info` and `snapshot -l`, byte for byte as qemu-img 7.2 prints it. Pure: no I/O.
import { Buffer } from 'node:buffer';
import type {
  BitmapInfo,
  ImageInfo,
  LuksInfo,
  Qcow2Specific,
  SnapshotInfo,
} from '../qcow2/engine/types.js';

// ---------------------------------------------------------------------------
// Sizes: qemu's size_to_str, "%0.3g <unit>B".

const SIZE_UNITS = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'] as const;
/** Significant digits of `%0.3g`. */
const SIZE_PRECISION = 3;

/**
 * A byte count as qemu-img prints it: `999 B`, `0.977 KiB`, `1 KiB`, `4.24 MiB`, `1e+03 KiB`.
 * qemu moves to the next unit once the value reaches 1000 of the current one (not 1024),
 * so a value can read 0.977 of a unit; and because `%g` rounds to 3 digits, a value just
 * under 1000 of a unit prints in exponent form (`1e+03 KiB`), exactly as qemu-img does.
 */
export function formatVmSize(bytes: number): string {
  // Unit i is the largest with bytes * 1024/1000 >= 1024^i. The product is taken in
  // floating point as qemu does; comparing with powers of two is then exact.
  const scaled = bytes / (1000 / 1024);
  let unit = 0;
  while (unit < SIZE_UNITS.length - 1 && scaled >= 2 ** (10 * (unit + 1))) unit++;
  return `${formatG(bytes / 2 ** (10 * unit), SIZE_PRECISION)} ${SIZE_UNITS[unit]}B`;
}

/**
 * C's `%.<precision>g` for a finite number >= 0, rounding the exact binary value to
 * nearest with ties to even as glibc does (JS toPrecision rounds ties up: 1.125 -> 1.13,
 * where qemu-img prints 1.12).
 */
export function formatG(value: number, precision: number): string {
  if (!Number.isFinite(value) || value < 0) throw new RangeError(`formatG: unsupported value ${value}`);
  const { digits, fractionDigits } = exactDecimal(value);
  const first = digits.search(/[1-9]/);
  if (first < 0) return '0';
  const significant = digits.slice(first);
  // Decimal exponent of the leading digit: value = 0.d1d2... * 10^(exponent + 1).
  let exponent = significant.length - 1 - fractionDigits;
  let kept = significant.slice(0, precision).padEnd(precision, '0');
  const rest = significant.slice(precision);
  const half = rest.length > 0 && rest[0] === '5' && /^50*$/.test(rest);
  const above = rest.length > 0 && (rest[0] > '5' || (rest[0] === '5' && !half));
  const lastOdd = Number(kept[kept.length - 1]) % 2 === 1;
  if (above || (half && lastOdd)) {
    const bumped = (BigInt(kept) + 1n).toString();
    if (bumped.length > precision) {
      exponent += 1;
      kept = bumped.slice(0, precision);
    } else {
      kept = bumped;
    }
  }
  if (exponent < -4 || exponent >= precision) {
    const mantissa = stripFraction(`${kept[0]}.${kept.slice(1)}`);
    const sign = exponent < 0 ? '-' : '+';
    return `${mantissa}e${sign}${String(Math.abs(exponent)).padStart(2, '0')}`;
  }
  // Fixed notation with precision - 1 - exponent decimals.
  let fixed: string;
  if (exponent >= 0) {
    fixed = `${kept.slice(0, exponent + 1)}.${kept.slice(exponent + 1)}`;
  } else {
    fixed = `0.${'0'.repeat(-exponent - 1)}${kept}`;
  }
  return stripFraction(fixed);
}

/** Without the `#` flag, %g drops trailing fraction zeros and a bare decimal point. */
function stripFraction(s: string): string {
  return s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s;
}

/** The exact decimal expansion of a double >= 0: value = digits / 10^fractionDigits. */
function exactDecimal(value: number): { digits: string; fractionDigits: number } {
  // Every finite double is m / 2^k; doubling is exact, so find k, then m/2^k = m*5^k / 10^k.
  let k = 0;
  let m = value;
  while (!Number.isInteger(m)) {
    m *= 2;
    k++;
  }
  return { digits: (BigInt(m) * 5n ** BigInt(k)).toString(), fractionDigits: k };
}

// ---------------------------------------------------------------------------
// printf-style padding. C counts bytes, not characters, so `%-16s` of "ünïcødé"
// (7 characters, 11 bytes in UTF-8) adds 5 spaces where padEnd would add 9.

function utf8Length(s: string): number {
  return Buffer.byteLength(s, 'utf8');
}

/** A subset of printf: `%s`, `%Ns` (right-aligned) and `%-Ns` (left-aligned), N in bytes. */
function cprintf(format: string, ...args: string[]): string {
  let next = 0;
  return format.replace(/%(-?)(\d*)s/g, (_spec, left: string, width: string) => {
    const arg = args[next++] ?? '';
    const fill = ' '.repeat(Math.max(0, Number(width || 0) - utf8Length(arg)));
    return left ? arg + fill : fill + arg;
  });
}

/** The first `maxBytes` bytes of the UTF-8 form of `s` (a split character decodes to U+FFFD). */
function cutUtf8(s: string, maxBytes: number): string {
  const bytes = Buffer.from(s, 'utf8');
  return bytes.length <= maxBytes ? s : bytes.subarray(0, maxBytes).toString('utf8');
}

// ---------------------------------------------------------------------------
// The snapshot table.

const SNAPSHOT_LIST_TITLE = 'Snapshot list:';
const SNAPSHOT_HEADER_FORMAT = '%-10s%-17s%8s%20s%13s%11s';
const SNAPSHOT_HEADER = ['ID', 'TAG', 'VM SIZE', 'DATE', 'VM CLOCK', 'ICOUNT'];
/** The row format is one byte narrower in the first two columns, plus a separating space. */
const SNAPSHOT_ROW_FORMAT = '%-9s %-16s %8s%20s%13s%11s';
/** qimg's own column (not in qemu-img): bytes a delete would free. */
const FREED_COLUMN_FORMAT = '%12s';
const FREED_TITLE = 'FREED';
/**
 * qemu keeps snapshot ids and names in fixed buffers of 128 and 256 bytes (NUL included)
 * when it lists them, so longer ones (possible only in hand-made images) are cut.
 */
const SNAPSHOT_ID_MAX_BYTES = 127;
const SNAPSHOT_NAME_MAX_BYTES = 255;

export interface SnapshotTableOptions {
  /** Adds a FREED column: bytes freed by deleting each snapshot, keyed by snapshot id. */
  freed?: Map<string, number>;
}

/**
 * The `Snapshot list:` block `qemu-img snapshot -l` prints ('' for no snapshots: qemu-img
 * prints nothing then). Dates use the local time zone, which Node takes from process.env.TZ.
 */
export function renderSnapshotTable(snaps: SnapshotInfo[], opts: SnapshotTableOptions = {}): string {
  if (snaps.length === 0) return '';
  const freed = opts.freed;
  const lines = [SNAPSHOT_LIST_TITLE];
  let header = cprintf(SNAPSHOT_HEADER_FORMAT, ...SNAPSHOT_HEADER);
  if (freed) header += cprintf(FREED_COLUMN_FORMAT, FREED_TITLE);
  lines.push(header);
  for (const sn of snaps) {
    let row = cprintf(
      SNAPSHOT_ROW_FORMAT,
      cutUtf8(sn.id, SNAPSHOT_ID_MAX_BYTES),
      cutUtf8(sn.name, SNAPSHOT_NAME_MAX_BYTES),
      formatVmSize(sn.vmStateSize),
      formatLocalDate(sn.dateSec),
      formatVmClock(sn.vmClockNsec),
      sn.icount === null ? '' : formatInt(sn.icount),
    );
    if (freed) {
      const bytes = freed.get(sn.id);
      row += cprintf(FREED_COLUMN_FORMAT, bytes === undefined ? '' : formatVmSize(bytes));
    }
    lines.push(row);
  }
  return lines.map((l) => `${l}\n`).join('');
}

/** strftime `%Y-%m-%d %H:%M:%S` in the local zone. */
function formatLocalDate(dateSec: number): string {
  const d = new Date(dateSec * 1000);
  const two = (n: number) => String(n).padStart(2, '0');
  return (
    `${String(d.getFullYear()).padStart(4, '0')}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
    `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`
  );
}

/** `%02d:%02d:%02d.%03d` of hours, minutes, seconds, milliseconds; hours are not capped. */
function formatVmClock(nsec: number): string {
  const secs = Math.floor(nsec / 1e9);
  const millis = Math.floor(nsec / 1e6) % 1000;
  const two = (n: number) => String(n).padStart(2, '0');
  return `${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(millis).padStart(3, '0')}`;
}

/** An integer in decimal, never in exponent form (JS switches at 1e21). */
function formatInt(n: number): string {
  return Number.isInteger(n) ? BigInt(n).toString() : String(n);
}

// ---------------------------------------------------------------------------
// qemu's JSON model. qemu-img builds a dictionary and prints it in the dictionary's
// iteration order, which is neither declaration nor alphabetical order but fixed per
// key name: each key keeps its place whichever others are present. So the builders
// below list every key once, in the order observed from qemu-img 7.2, and drop the
// absent ones. The human `Format specific information:` block walks the same tree.

type QScalar = string | number | bigint | boolean;
type QValue = QScalar | QValue[] | QDict;

/** An ordered dictionary; entries whose value is undefined are absent. */
class QDict {
  readonly entries: Array<[string, QValue]>;
  constructor(entries: Array<[string, QValue | undefined]>) {
    this.entries = entries.filter((e): e is [string, QValue] => e[1] !== undefined);
  }
}

const JSON_INDENT = '    ';

/** qemu's pretty JSON: 4-space indent; an empty list or object still breaks its line. */
function toJson(value: QValue, level: number): string {
  if (value instanceof QDict || Array.isArray(value)) {
    const [open, close] = value instanceof QDict ? ['{', '}'] : ['[', ']'];
    const inner = JSON_INDENT.repeat(level + 1);
    const items =
      value instanceof QDict
        ? value.entries.map(([k, v]) => `${inner}${jsonString(k)}: ${toJson(v, level + 1)}`)
        : value.map((v) => `${inner}${toJson(v, level + 1)}`);
    return items.length === 0
      ? `${open}\n${JSON_INDENT.repeat(level)}${close}`
      : `${open}\n${items.join(',\n')}\n${JSON_INDENT.repeat(level)}${close}`;
  }
  if (typeof value === 'string') return jsonString(value);
  if (typeof value === 'number' || typeof value === 'bigint') return formatJsonInt(value);
  return value ? 'true' : 'false';
}

const TWO_POW_63 = 2n ** 63n;
const TWO_POW_64 = 2n ** 64n;

/**
 * qemu's JSON integers are signed 64-bit, so an unsigned field at or past 2^63 (a huge
 * vm_state_size, say) prints negative there while the human table shows it unsigned.
 */
function formatJsonInt(n: number | bigint): string {
  if (typeof n === 'number' && !Number.isInteger(n)) return String(n);
  const v = BigInt(n);
  return (v >= TWO_POW_63 ? v - TWO_POW_64 : v).toString();
}

const JSON_SHORT_ESCAPES: Record<string, string> = {
  '"': '\\"',
  '\\': '\\\\',
  '\b': '\\b',
  '\f': '\\f',
  '\n': '\\n',
  '\r': '\\r',
  '\t': '\\t',
};

/**
 * qemu escapes everything outside printable ASCII as `\u` and four upper-case hex digits, code
 * points past the BMP as a surrogate pair, and does not escape `/`.
 */
function jsonString(s: string): string {
  let out = '"';
  for (const ch of s) {
    const short = JSON_SHORT_ESCAPES[ch];
    let cp = ch.codePointAt(0)!;
    if (short !== undefined) {
      out += short;
    } else if (cp >= 0x20 && cp < 0x7f) {
      out += ch;
    } else {
      // A lone surrogate would reach qemu as invalid UTF-8, which it shows as U+FFFD.
      if (cp >= 0xd800 && cp <= 0xdfff) cp = 0xfffd;
      if (cp > 0xffff) {
        const v = cp - 0x10000;
        out += hex4(0xd800 + (v >> 10)) + hex4(0xdc00 + (v & 0x3ff));
      } else {
        out += hex4(cp);
      }
    }
  }
  return `${out}"`;
}

function hex4(n: number): string {
  return `\\u${n.toString(16).toUpperCase().padStart(4, '0')}`;
}

/** Human dump of a dictionary: `key: value`, dashes in keys read as spaces, nesting by 4. */
function dumpHuman(dict: QDict, level: number, out: string[]): void {
  for (const [key, value] of dict.entries) dumpHumanItem(key.replace(/-/g, ' '), value, level, out);
}

function dumpHumanItem(label: string, value: QValue, level: number, out: string[]): void {
  const indent = JSON_INDENT.repeat(level);
  if (value instanceof QDict) {
    out.push(`${indent}${label}:\n`);
    dumpHuman(value, level + 1, out);
  } else if (Array.isArray(value)) {
    out.push(`${indent}${label}:\n`);
    value.forEach((item, i) => dumpHumanItem(`[${i}]`, item, level + 1, out));
  } else {
    out.push(`${indent}${label}: ${typeof value === 'number' ? formatInt(value) : String(value)}\n`);
  }
}

// Builders, one per object qemu-img prints.

function snapshotDict(sn: SnapshotInfo, freedBytes?: number): QDict {
  return new QDict([
    ['icount', sn.icount ?? undefined],
    ['vm-clock-nsec', sn.vmClockNsec % 1e9],
    ['name', cutUtf8(sn.name, SNAPSHOT_NAME_MAX_BYTES)],
    ['date-sec', sn.dateSec],
    ['date-nsec', sn.dateNsec],
    ['vm-clock-sec', Math.floor(sn.vmClockNsec / 1e9)],
    ['id', cutUtf8(sn.id, SNAPSHOT_ID_MAX_BYTES)],
    ['vm-state-size', sn.vmStateSizeExact ?? sn.vmStateSize],
    // qimg's own key, last.
    ['freed-bytes', freedBytes],
  ]);
}

function bitmapDict(b: BitmapInfo): QDict {
  return new QDict([
    ['flags', [...b.flags]],
    ['name', b.name],
    ['granularity', b.granularity],
  ]);
}

function luksDict(l: LuksInfo): QDict {
  // qemu-img 7.2 has no `detached-header`; it is left out to match it.
  return new QDict([
    ['ivgen-alg', l.ivgenAlg],
    ['hash-alg', l.hashAlg],
    ['cipher-alg', l.cipherAlg],
    ['uuid', l.uuid],
    ['ivgen-hash-alg', l.ivgenHashAlg],
    ['format', l.format],
    ['cipher-mode', l.cipherMode],
    [
      'slots',
      l.slots.map(
        (s) =>
          new QDict([
            ['active', s.active],
            ['iters', s.iters],
            ['key-offset', s.keyOffset],
            ['stripes', s.stripes],
          ]),
      ),
    ],
    ['payload-offset', l.payloadOffset],
    ['master-key-iters', l.masterKeyIters],
  ]);
}

function qcow2DataDict(q: Qcow2Specific): QDict {
  return new QDict([
    ['compat', q.compat],
    ['compression-type', q.compressionType],
    ['lazy-refcounts', q.lazyRefcounts],
    // qemu reports no bitmaps key rather than an empty list.
    ['bitmaps', q.bitmaps && q.bitmaps.length > 0 ? q.bitmaps.map(bitmapDict) : undefined],
    ['refcount-bits', q.refcountBits],
    ['data-file', q.dataFile],
    ['encrypt', q.encrypt && (q.encrypt.format === 'aes' ? new QDict([['format', 'aes']]) : luksDict(q.encrypt))],
    ['data-file-raw', q.dataFileRaw],
    ['corrupt', q.corrupt],
    ['extended-l2', q.extendedL2],
  ]);
}

function imageDict(info: ImageInfo): QDict {
  const formatSpecific =
    info.formatSpecific &&
    new QDict([
      ['type', info.format],
      ['data', qcow2DataDict(info.formatSpecific)],
    ]);
  return new QDict([
    ['backing-filename-format', info.backingFilenameFormat],
    ['snapshots', info.snapshots.length > 0 ? info.snapshots.map((s) => snapshotDict(s)) : undefined],
    ['virtual-size', info.virtualSize],
    ['filename', info.filename],
    ['cluster-size', info.clusterSize],
    ['format', info.format],
    // A negative actualSize stands for "unknown": qemu then leaves the key out.
    ['actual-size', info.actualSize >= 0 ? info.actualSize : undefined],
    ['format-specific', formatSpecific],
    ['full-backing-filename', info.fullBackingFilename],
    // Only ever `true`: qemu leaves the key out for unencrypted images.
    ['encrypted', info.encrypted ? true : undefined],
    ['backing-filename', info.backingFilename],
    // Present for every format qimg reads, raw included.
    ['dirty-flag', info.dirty],
  ]);
}

// ---------------------------------------------------------------------------
// `info` output.

/** `qemu-img info IMG` (human). */
export function renderInfoHuman(info: ImageInfo): string {
  const out: string[] = [
    `image: ${info.filename}\n`,
    `file format: ${info.format}\n`,
    `virtual size: ${formatVmSize(info.virtualSize)} (${formatInt(info.virtualSize)} bytes)\n`,
    `disk size: ${info.actualSize >= 0 ? formatVmSize(info.actualSize) : 'unavailable'}\n`,
  ];
  if (info.encrypted) out.push('encrypted: yes\n');
  if (info.clusterSize !== undefined) out.push(`cluster_size: ${formatInt(info.clusterSize)}\n`);
  if (info.dirty) out.push('cleanly shut down: no\n');
  if (info.backingFilename !== undefined) {
    let line = `backing file: ${info.backingFilename}`;
    if (info.fullBackingFilename === undefined) line += ' (cannot determine actual path)';
    else if (info.fullBackingFilename !== info.backingFilename) line += ` (actual path: ${info.fullBackingFilename})`;
    out.push(`${line}\n`);
    if (info.backingFilenameFormat !== undefined) out.push(`backing file format: ${info.backingFilenameFormat}\n`);
  }
  out.push(renderSnapshotTable(info.snapshots));
  if (info.formatSpecific) {
    out.push('Format specific information:\n');
    dumpHuman(qcow2DataDict(info.formatSpecific), 1, out);
  }
  return out.join('');
}

/** `qemu-img info --backing-chain IMG` (human): one block per image, a blank line between. */
export function renderInfoChainHuman(infos: ImageInfo[]): string {
  return infos.map(renderInfoHuman).join('\n');
}

/** `qemu-img info --output=json IMG`, trailing newline included. */
export function renderInfoJson(info: ImageInfo): string {
  return `${toJson(imageDict(info), 0)}\n`;
}

/** `qemu-img info --backing-chain --output=json IMG`: a JSON array of the images. */
export function renderInfoChainJson(infos: ImageInfo[]): string {
  return `${toJson(infos.map(imageDict), 0)}\n`;
}

/**
 * The snapshot objects of `info --output=json` as a standalone JSON array (same keys,
 * order and formatting). With `freed`, each object ends with qimg's `"freed-bytes"`.
 */
export function renderSnapshotsJson(snaps: SnapshotInfo[], freed?: Map<string, number>): string {
  return `${toJson(snaps.map((s) => snapshotDict(s, freed?.get(s.id))), 0)}\n`;
}

// ---------------------------------------------------------------------------
// map, compare, chain (qimg's chain tree is its own design; map is qemu-img's byte for byte).

import type { MapEntry } from '../qcow2/engine/map.js';
import type { ChainLayerInfo } from '../qcow2/engine/chain.js';

/** C's `%#-16x`: `0x` prefix except for zero, left-aligned in 16 columns. */
function hexCol(n: number): string {
  return (n === 0 ? '0' : `0x${n.toString(16)}`).padEnd(16);
}

export const MAP_HUMAN_HEADER = 'Offset          Length          Mapped to       File\n';

/**
 * `qemu-img map` human rows: only ranges holding data; a data range without a host offset
 * (compressed) ends the listing with qemu-img's error.
 */
export function renderMapHuman(entries: Iterable<MapEntry>): { text: string; error: string | null } {
  let text = MAP_HUMAN_HEADER;
  for (const e of entries) {
    if (e.data && e.offset === null) return { text, error: 'File contains external, encrypted or compressed clusters.' };
    if (e.data && !e.zero) text += `${hexCol(e.start)}${hexCol(e.length)}${hexCol(e.offset ?? 0)}${e.filename ?? ''}\n`;
  }
  return { text, error: null };
}

function mapEntryJson(e: MapEntry): string {
  let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  if (e.offset !== null) s += `, "offset": ${e.offset}`;
  return s + '}';
}

/** `qemu-img map --output=json`: `[` + one object per line joined by `,\n` + `]`. */
export function renderMapJson(entries: Iterable<MapEntry>): string {
  const rows: string[] = [];
  for (const e of entries) rows.push(mapEntryJson(e));
  return `[${rows.join(',\n')}]\n`;
}

/** `qimg chain`: the chain as a tree, top first, one line per layer. */
export function renderChainHuman(layers: ChainLayerInfo[]): string {
  let out = '';
  layers.forEach((l, i) => {
    const prefix = i === 0 ? '' : `${'    '.repeat(i - 1)}└── `;
    const snaps = l.snapshots > 0 ? `, ${l.snapshots} internal snapshot${l.snapshots === 1 ? '' : 's'}` : '';
    out += `${prefix}${l.filename} (${l.format}, ${formatVmSize(l.virtualSize)} virtual, ${formatVmSize(l.allocatedBytes)} allocated${snaps})\n`;
  });
  return out;
}

/** `qimg chain --output=json`: an array of layers, top first (4-space indent, as info's JSON). */
export function renderChainJson(layers: ChainLayerInfo[]): string {
  const objs = layers.map((l) => ({
    depth: l.depth,
    filename: l.filename,
    format: l.format,
    'virtual-size': l.virtualSize,
    'allocated-bytes': l.allocatedBytes,
    ...(l.backingFilename !== null ? { 'backing-filename': l.backingFilename } : {}),
    ...(l.backingFormat !== null ? { 'backing-filename-format': l.backingFormat } : {}),
    snapshots: l.snapshots,
  }));
  return `${JSON.stringify(objs, null, 4)}\n`;
}
