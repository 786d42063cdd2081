// `qimg convert [-f FMT] -O raw [-l SNAPSHOT] [-p] [-U] SRC DST`

import { QimgError } from '../../qcow2/errors.js';
import { convert } from '../../qcow2/engine/convert.js';
import { backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, last, parseArgs, usage } from '../args.js';
import { progressBar } from '../progress.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('convert', argv, [
    ...COMMON_READ_OPTIONS,
    { key: 'output-format', short: 'O', value: true },
    { key: 'snapshot', short: 'l', value: true },
    { key: 'progress', short: 'p' },
    { key: 'quiet', short: 'q' },
  ]);
  if (p.positionals.length !== 2) throw usage('convert', 'Expecting a source and a destination file name');
  const [src, dst] = p.positionals as [string, string];
  const out = last(p, 'output-format') ?? 'raw';
  if (out !== 'raw') throw new QimgError('UNSUPPORTED', `Unknown output format '${out}' (qimg convert writes raw)`);
  const showProgress = flag(p, 'progress') && !flag(p, 'quiet') && process.stdout.isTTY === true;
  await convert(src, dst, {
    format: imageFormat(p),
    outputFormat: 'raw',
    snapshot: last(p, 'snapshot'),
    forceShare: flag(p, 'force-share'),
    backing: backingPolicy(p),
    progress: showProgress ? (done, total) => process.stdout.write(progressBar(done, total)) : undefined,
  });
  if (showProgress) process.stdout.write('\n');
  return 0;
}
