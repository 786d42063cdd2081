// `qimg commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE`

import { commit } from '../../qcow2/engine/commit.js';
import { backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, last, oneFile, parseArgs } from '../args.js';
import { writeStdout } from '../output.js';
import { percentReporter } from '../progress.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('commit', argv, [
    ...COMMON_READ_OPTIONS.filter((o) => o.key !== 'force-share'),
    { key: 'base', short: 'b', value: true },
    { key: 'drop', short: 'd' },
    { key: 'progress', short: 'p' },
    { key: 'quiet', short: 'q' },
  ]);
  const file = oneFile('commit', p);
  const quiet = flag(p, 'quiet');
  const showProgress = flag(p, 'progress') && !quiet;
  await commit(file, {
    format: imageFormat(p, file),
    base: last(p, 'base'),
    drop: flag(p, 'drop'),
    backing: backingPolicy(p),
    progress: percentReporter(showProgress),
  });
  if (showProgress) writeStdout('\n');
  if (!quiet) writeStdout('Image committed.\n');
  return 0;
}
