// `qimg snapshot -l|-c NAME|-a ID_OR_NAME|-d NAME [--id ID] [--output=human|json] [--size] [-q] [-U] FILE`

import { QimgError } from '../../qcow2/errors.js';
import { listSnapshots } from '../../qcow2/engine/info.js';
import { COMMON_READ_OPTIONS, flag, imageFormat, last, oneFile, outputFormat, parseArgs, usage } from '../args.js';
import { writeStderr, writeStdout } from '../output.js';
import { renderSnapshotsJson, renderSnapshotTable } from '../render.js';

const OPTIONS = [
  ...COMMON_READ_OPTIONS,
  { key: 'list', short: 'l', long: ['list'] },
  { key: 'create', short: 'c', long: ['create'], value: true },
  { key: 'apply', short: 'a', long: ['apply'], value: true },
  { key: 'delete', short: 'd', long: ['delete'], value: true },
  { key: 'id', long: ['id'], value: true },
  { key: 'quiet', short: 'q', long: ['quiet'] },
  { key: 'size', long: ['size'] },
  { key: 'output', long: ['output'], value: true },
];

export async function run(argv: string[]): Promise<number> {
  // `--delete --id ID` takes no name: let the parser see a value-less --delete.
  const args = argv.map((a, i) => (a === '--delete' && argv[i + 1] === '--id' ? '--delete=' : a));
  const p = parseArgs('snapshot', args, OPTIONS);
  const actions = ['list', 'create', 'apply', 'delete'].filter((k) => flag(p, k));
  if (actions.length > 1) throw new QimgError('USAGE', "Cannot mix '-l', '-a', '-c', '-d'");
  const file = oneFile('snapshot', p);
  const action = actions[0] ?? 'list';
  if (action === 'list') {
    const output = outputFormat('snapshot', p);
    const withSize = flag(p, 'size');
    const { snaps, freed } = await listSnapshots(file, { format: imageFormat(p, file), forceShare: flag(p, 'force-share'), freedBytes: withSize || output === 'json' });
    writeStdout(output === 'json' ? renderSnapshotsJson(snaps, freed ?? undefined) : renderSnapshotTable(snaps, withSize && freed ? { freed } : {}));
    return 0;
  }
  if (flag(p, 'force-share')) throw usage('snapshot', '-U/--force-share is only allowed with -l: changing an image needs its write lock');
  const s = await import('../../qcow2/engine/snapshots.js');
  const ops = { onRepair: (m: string[]) => writeStderr(m.map((x) => x + '\n').join('')) };
  if (action === 'create') {
    await s.createSnapshot(file, { name: last(p, 'create')! }, ops);
  } else if (action === 'apply') {
    await s.applySnapshot(file, { idOrName: last(p, 'apply')! }, ops);
  } else {
    const id = last(p, 'id');
    const name = last(p, 'delete')!;
    if (id !== undefined && name !== '') throw usage('snapshot', 'Give either a snapshot name or --id ID, not both');
    await s.deleteSnapshot(file, id !== undefined ? { id } : { name }, ops);
  }
  return 0;
}
