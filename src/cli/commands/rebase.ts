// `qimg rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-u] -b NEW_BACKING [-F FMT] [-p] [-q] FILE`

import { CACHE_MODES } from '../../qcow2/engine/convert.js';
import { rebase } from '../../qcow2/engine/rebase.js';
import { QimgError } from '../../qcow2/errors.js';
import { backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, last, oneFile, parseArgs } from '../args.js';
import { writeStdout } from '../output.js';
import { percentReporter } from '../progress.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('rebase', argv, [
    ...COMMON_READ_OPTIONS.filter((o) => o.key !== 'force-share'),
    { key: 'backing-file', short: 'b', value: true },
    { key: 'backing-format', short: 'F', value: true },
    { key: 'unsafe', short: 'u' },
    { key: 'progress', short: 'p' },
    { key: 'quiet', short: 'q' },
    // Cache modes: how qemu-img does its I/O, not what it writes; checked as qemu-img checks them.
    { key: 'cache', short: 't', value: true },
    { key: 'source-cache', short: 'T', value: true },
  ]);
  const file = oneFile('rebase', p);
  const name = last(p, 'backing-file');
  const unsafe = flag(p, 'unsafe');
  if (name === undefined && !unsafe) {
    throw new QimgError('USAGE', "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'qimg rebase --help' for more information");
  }
  for (const [key, what] of [['cache', 'cache'], ['source-cache', 'source cache']] as const) {
    const mode = last(p, key);
    if (mode !== undefined && !CACHE_MODES.has(mode)) throw new QimgError('USAGE', `Invalid ${what} option: ${mode}`);
  }
  const quiet = flag(p, 'quiet');
  const showProgress = flag(p, 'progress') && !quiet;
  await rebase(file, {
    format: imageFormat(p, file),
    backingFile: name ?? '',
    backingFormat: last(p, 'backing-format'),
    unsafe,
    backing: backingPolicy(p),
    progress: percentReporter(showProgress),
  });
  if (showProgress) writeStdout('\n');
  return 0;
}
