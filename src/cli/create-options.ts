// `-o name=value,...` lists for create and convert: qemu-img's syntax and its refusals.

import { QimgError } from '../qcow2/errors.js';
import { CREATE_OPTION_HELP, type CreateOptions } from '../qcow2/engine/create.js';
import { parseSizeOption } from './size.js';

const SIZE_OPTIONS = new Set(['cluster_size', 'size']);
const NUMBER_OPTIONS = new Set(['refcount_bits']);
const BOOL_OPTIONS = new Set(['lazy_refcounts', 'extended_l2', 'data_file_raw']);
const BOOL_TRUE = new Set(['on', 'yes', 'true', 'y']);
const BOOL_FALSE = new Set(['off', 'no', 'false', 'n']);

/** qemu-img refuses an empty list and a stray comma at either end (`,,` is an escaped comma). */
export function checkOptionList(list: string): void {
  const trailing = /(^|[^,])(,,)*,$/.test(list);
  if (list === '' || list.startsWith(',') || trailing) throw new QimgError('USAGE', `Invalid option list: ${list}`);
}

/** Splits `k=v,k=v` on single commas; `,,` stands for a comma inside a value. */
export function splitOptions(list: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let i = 0; i < list.length; i++) {
    const c = list[i]!;
    if (c === ',') {
      if (list[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      out.push(cur);
      cur = '';
      continue;
    }
    cur += c;
  }
  out.push(cur);
  return out;
}

/**
 * Turns `-o` items into CreateOptions; type errors are refused here, before the Formatting line,
 * as qemu-img does. `file` prefixes the messages (create's); null leaves them bare (convert's).
 */
export function parseCreateOptions(file: string | null, format: 'qcow2' | 'raw', items: string[]): CreateOptions {
  const at = file === null ? '' : `${file}: `;
  const known = new Set(CREATE_OPTION_HELP[format].map(([n]) => n));
  const values = new Map<string, string>();
  for (const item of items) {
    const eq = item.indexOf('=');
    let key = eq < 0 ? item : item.slice(0, eq);
    let value = eq < 0 ? 'on' : item.slice(eq + 1);
    // A bare `name` means name=on; a bare `noname` means name=off (QEMU's shorthand for flags).
    if (eq < 0 && !known.has(key) && key.startsWith('no') && known.has(key.slice(2))) {
      key = key.slice(2);
      value = 'off';
    }
    if (!known.has(key)) throw new QimgError('USAGE', `${at}Invalid parameter '${key}'`);
    values.delete(key); // the last value wins, and it is printed where QEMU prints that option
    values.set(key, value);
  }
  const opts: CreateOptions = { format };
  const spelling: Record<string, string> = {};
  for (const [key, value] of values) {
    if (SIZE_OPTIONS.has(key)) {
      const v = parseSizeOption(key, value);
      if (key === 'size') opts.size = checkedNumber(at, v);
      else opts.clusterSize = v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
      if (key === 'cluster_size') spelling[key] = v.toString();
      continue;
    }
    if (NUMBER_OPTIONS.has(key)) {
      const n = parseNumberOption(at, key, value);
      opts.refcountBits = Number(n);
      spelling[key] = n.toString();
      continue;
    }
    if (BOOL_OPTIONS.has(key)) {
      let b: boolean;
      if (BOOL_TRUE.has(value)) b = true;
      else if (BOOL_FALSE.has(value)) b = false;
      else throw new QimgError('USAGE', `${at}Parameter '${key}' expects 'on' or 'off'`);
      spelling[key] = value;
      if (key === 'lazy_refcounts') opts.lazyRefcounts = b;
      else if (key === 'extended_l2') opts.extendedL2 = b;
      else opts.dataFileRaw = b;
      continue;
    }
    // Strings: checked by the library after the Formatting line, as qemu-img does.
    switch (key) {
      case 'compat':
        opts.compat = value as CreateOptions['compat'];
        break;
      case 'compression_type':
        opts.compressionType = value as CreateOptions['compressionType'];
        break;
      case 'preallocation':
        opts.preallocation = value as CreateOptions['preallocation'];
        break;
      case 'backing_file':
        opts.backingFile = value;
        break;
      case 'backing_fmt':
        opts.backingFormat = value;
        break;
      case 'data_file':
        opts.dataFile = value;
        break;
    }
  }
  opts.spelling = spelling;
  return opts;
}

function checkedNumber(at: string, v: bigint): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new QimgError('UNSUPPORTED', `${at}Image size ${v} is too large for qimg (at most ${Number.MAX_SAFE_INTEGER} bytes)`);
  }
  return Number(v);
}

/** QEMU number options: C strtoull with base 0 (0x hex, leading-0 octal), shown as a signed 64-bit value. */
function parseNumberOption(at: string, key: string, text: string): bigint {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) throw new QimgError('USAGE', `${at}Parameter '${key}' expects a number`);
  let v = BigInt(m[2]!.length > 1 && m[2]!.startsWith('0') && !/^0[xX]/.test(m[2]!) ? '0o' + m[2]!.slice(1) : m[2]!);
  if (v >= 1n << 64n) throw new QimgError('USAGE', `${at}Parameter '${key}' expects a number`);
  if (m[1] === '-') v = ((1n << 64n) - v) % (1n << 64n);
  return BigInt.asIntN(64, v);
}

