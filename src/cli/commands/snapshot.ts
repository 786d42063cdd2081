// `qimg snapshot -l [--output=human|json] [-U] FILE`

import { listSnapshots } from '../../qcow2/engine/info.js';
import { COMMON_READ_OPTIONS, flag, imageFormat, oneFile, outputFormat, parseArgs, usage } from '../args.js';
import { renderSnapshotsJson, renderSnapshotTable } from '../render.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('snapshot', argv, [
    ...COMMON_READ_OPTIONS,
    { key: 'list', short: 'l', long: ['list'] },
    { key: 'quiet', short: 'q', long: ['quiet'] },
    { key: 'output', long: ['output'], value: true },
  ]);
  const file = oneFile('snapshot', p);
  if (!flag(p, 'list')) throw usage('snapshot', 'Expecting one of -l, -c, -a, -d');
  const output = outputFormat('snapshot', p);
  const snaps = await listSnapshots(file, { format: imageFormat(p), forceShare: flag(p, 'force-share') });
  process.stdout.write(output === 'json' ? renderSnapshotsJson(snaps) : renderSnapshotTable(snaps));
  return 0;
}
