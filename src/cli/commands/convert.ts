// `qimg convert [-f FMT] -O raw|qcow2 [-c] [-o OPTIONS] [-B BACKING [-F FMT]] [-l SNAPSHOT] [-t CACHE] [-T SRC_CACHE] [-m N] [-W] [-p] [-U] SRC DST`

import { QimgError } from '../../qcow2/errors.js';
import { CACHE_MODES, convert } from '../../qcow2/engine/convert.js';
import { all, backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, last, parseArgs, usage } from '../args.js';
import { checkOptionList, parseCreateOptions, splitOptions } from '../create-options.js';
import { progressBar } from '../progress.js';
import { holdBackOptimizer, HOLD_BACK_MS, sizeThreadPool } from '../tuning.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('convert', argv, [
    ...COMMON_READ_OPTIONS,
    { key: 'output-format', short: 'O', value: true },
    { key: 'snapshot', short: 'l', value: true },
    { key: 'progress', short: 'p' },
    { key: 'quiet', short: 'q' },
    { key: 'compress', short: 'c' },
    { key: 'options', short: 'o', value: true, repeat: true },
    { key: 'target-backing', short: 'B', value: true },
    { key: 'target-backing-format', short: 'F', value: true },
    // qemu-img's tuning options: cache modes, parallel requests, write order. They change how
    // qemu-img does its I/O, not what it writes; qimg checks them as qemu-img does.
    { key: 'cache', short: 't', value: true },
    { key: 'source-cache', short: 'T', value: true },
    { key: 'coroutines', short: 'm', value: true },
    { key: 'out-of-order', short: 'W' },
  ]);
  const m = last(p, 'coroutines');
  if (m !== undefined && !((n) => n >= 1 && n <= 16)(strtol0(m))) {
    throw new QimgError('USAGE', 'Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
  }
  if (p.positionals.length < 2) throw usage('convert', 'Must specify image file name');
  // qemu-img concatenates several sources into the last name; qimg converts exactly one.
  if (p.positionals.length > 2) throw usage('convert', 'Expecting a source and a destination file name');
  const [src, dst] = p.positionals as [string, string];
  const srcCache = last(p, 'source-cache');
  if (srcCache !== undefined && !CACHE_MODES.has(srcCache)) throw new QimgError('USAGE', `Invalid source cache option: ${srcCache}`);
  const out = last(p, 'output-format') ?? 'raw';
  const list = all(p, 'options');
  const tb = last(p, 'target-backing');
  const showProgress = flag(p, 'progress') && !flag(p, 'quiet') && process.stdout.isTTY === true;
  holdBackOptimizer(HOLD_BACK_MS);
  if (!flag(p, 'compress')) sizeThreadPool();
  await convert(src, dst, {
    format: imageFormat(p, src),
    outputFormat: out as 'raw' | 'qcow2',
    // Checked once the source is open, as qemu-img checks them.
    createOptions: () => {
      if (out !== 'raw' && out !== 'qcow2') throw new QimgError('UNSUPPORTED', `Unknown file format '${out}'`);
      if (!list.length) return {};
      const joined = list.join(',');
      checkOptionList(joined);
      const { format: _f, size: _s, ...rest } = parseCreateOptions(null, out, splitOptions(joined));
      return rest;
    },
    cache: last(p, 'cache'),
    compress: flag(p, 'compress'),
    targetBacking: tb === undefined ? undefined : { file: tb, format: last(p, 'target-backing-format') },
    snapshot: last(p, 'snapshot'),
    forceShare: flag(p, 'force-share'),
    backing: backingPolicy(p),
    progress: showProgress ? (done, total) => process.stdout.write(progressBar(done, total)) : undefined,
  });
  if (showProgress) process.stdout.write('\n');
  return 0;
}

/** C strtol with base 0 over the whole string (0x hex, leading-0 octal); NaN where it would fail. */
function strtol0(text: string): number {
  const t = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!t) return NaN;
  const digits = t[2]!;
  const v = /^0[xX]/.test(digits) ? parseInt(digits.slice(2), 16) : digits.length > 1 && digits[0] === '0' ? parseInt(digits.slice(1), 8) : parseInt(digits, 10);
  return t[1] === '-' ? -v : v;
}
