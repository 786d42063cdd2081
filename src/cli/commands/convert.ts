// `qimg convert [-f FMT] -O raw|qcow2 [-c] [-o OPTIONS] [-B BACKING [-F FMT]] [-l SNAPSHOT] [-p] [-U] SRC DST`

import { QimgError } from '../../qcow2/errors.js';
import { convert } from '../../qcow2/engine/convert.js';
import { all, backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, last, parseArgs, usage } from '../args.js';
import { checkOptionList, parseCreateOptions, splitOptions } from '../create-options.js';
import { progressBar } from '../progress.js';

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
  ]);
  if (p.positionals.length < 2) throw usage('convert', 'Must specify image file name');
  // qemu-img concatenates several sources into the last name; qimg converts exactly one.
  if (p.positionals.length > 2) throw usage('convert', 'Expecting a source and a destination file name');
  const [src, dst] = p.positionals as [string, string];
  const out = last(p, 'output-format') ?? 'raw';
  if (out !== 'raw' && out !== 'qcow2') throw new QimgError('UNSUPPORTED', `Unknown file format '${out}'`);
  const list = all(p, 'options');
  let createOptions = {};
  if (list.length) {
    const joined = list.join(',');
    checkOptionList(joined);
    const { format: _f, size: _s, ...rest } = parseCreateOptions(dst, out, splitOptions(joined));
    createOptions = rest;
  }
  const tb = last(p, 'target-backing');
  const showProgress = flag(p, 'progress') && !flag(p, 'quiet') && process.stdout.isTTY === true;
  await convert(src, dst, {
    format: imageFormat(p, src),
    outputFormat: out,
    createOptions,
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
