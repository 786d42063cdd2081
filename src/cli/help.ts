// --help and --version, rendered by yargs from one catalogue of the commands and their options.

import { readFileSync } from 'node:fs';
import yargs, { type Argv } from 'yargs';

interface Opt {
  flags: string;
  desc: string;
  type?: 'string' | 'boolean' | 'array';
  choices?: string[];
}

interface Cmd {
  usage: string;
  desc: string;
  options: Opt[];
  examples: Array<[string, string]>;
}

const READ: Opt[] = [
  { flags: 'f', desc: 'image format (qcow2 or raw); probed when omitted', type: 'string' },
  { flags: 'U', desc: 'force-share: open without locks, even while another process writes the image', type: 'boolean' },
  { flags: 'backing-root', desc: 'also follow backing files under DIR (repeatable; env QIMG_BACKING_ROOTS=dir1:dir2)', type: 'array' },
  { flags: 'allow-any-backing', desc: "follow backing files anywhere, as qemu-img does", type: 'boolean' },
  { flags: 'no-backing', desc: 'read the top layer alone; unallocated clusters read as zeros', type: 'boolean' },
];

export const CATALOGUE: Record<string, Cmd> = {
  info: {
    usage: 'info [--output=human|json] [--backing-chain] [-f FMT] [-U] FILE',
    desc: 'Describe an image as qemu-img info does',
    options: [...READ, { flags: 'output', desc: 'output format', choices: ['human', 'json'] }, { flags: 'backing-chain', desc: 'describe every image of the backing chain', type: 'boolean' }],
    examples: [['qimg info --output=json fixtures/demo.qcow2', 'JSON as qemu-img prints it']],
  },
  snapshot: {
    usage: 'snapshot -l|-c NAME|-a ID_OR_NAME|-d NAME|--delete --id ID [--output=human|json] [--size] [-q] [-U] FILE',
    desc: 'List, create, apply (revert to) or delete internal snapshots of a qcow2 image',
    options: [
      ...READ,
      { flags: 'l', desc: 'list snapshots (--list)', type: 'boolean' },
      { flags: 'c', desc: 'create a snapshot named NAME (--create)', type: 'string' },
      { flags: 'a', desc: 'apply (revert to) the snapshot with this ID, else this name (--apply)', type: 'string' },
      { flags: 'd', desc: 'delete the snapshot with this name (--delete); --delete --id ID deletes by ID', type: 'string' },
      { flags: 'id', desc: 'with --delete: the snapshot ID', type: 'string' },
      { flags: 'size', desc: 'with -l: add a FREED column, the bytes deleting each snapshot would free', type: 'boolean' },
      { flags: 'output', desc: 'with -l: human or json (json always carries freed-bytes)', choices: ['human', 'json'] },
      { flags: 'q', desc: 'quiet', type: 'boolean' },
    ],
    examples: [
      ['qimg snapshot -l fixtures/demo.qcow2', 'the snapshot table, as qemu-img prints it'],
      ['qimg snapshot -c before-upgrade disk.qcow2', 'take a snapshot of a stopped VM'],
      ['qimg snapshot -a before-upgrade disk.qcow2', 'revert to it'],
    ],
  },
  check: {
    usage: 'check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [-U] [-p] FILE...',
    desc: "Check an image's consistency as qemu-img check does (same findings, report, JSON and exit codes), and repair it",
    options: [
      ...READ,
      { flags: 'output', desc: 'output format', choices: ['human', 'json'] },
      { flags: 'r', desc: "repair: 'leaks' lowers refcounts that are too high; 'all' also rebuilds the refcount structures", choices: ['leaks', 'all'] },
      { flags: 'q', desc: 'quiet', type: 'boolean' },
      { flags: 'p', desc: 'progress on a terminal', type: 'boolean' },
    ],
    examples: [
      ['qimg check fixtures/demo.qcow2', 'No errors were found on the image.'],
      ['qimg check --output=json a.qcow2 b.qcow2', 'several images at once, on all cores: a JSON array'],
    ],
  },
  create: {
    usage: 'create [-f qcow2|raw] [-o OPTIONS] [-b BACKING -F FMT] [-u] [-q] FILE [SIZE]',
    desc: 'Create a new image exactly as qemu-img create does (same layout, same Formatting line)',
    options: [
      { flags: 'f', desc: 'image format (default raw)', choices: ['qcow2', 'raw'] },
      { flags: 'o', desc: 'cluster_size, compat, refcount_bits, lazy_refcounts, extended_l2, compression_type, preallocation, backing_file, backing_fmt, data_file, data_file_raw; -o help lists them', type: 'array' },
      { flags: 'b', desc: 'backing file (stored as given, opened relative to the new image)', type: 'string' },
      { flags: 'F', desc: 'backing file format (required with -b)', type: 'string' },
      { flags: 'u', desc: 'unsafe: do not open the backing file (SIZE is then required)', type: 'boolean' },
      { flags: 'q', desc: 'quiet: do not print the Formatting line', type: 'boolean' },
    ],
    examples: [
      ['qimg create -f qcow2 -o cluster_size=4k disk.qcow2 10G', 'a 10 GiB qcow2 image'],
      ['qimg create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2', 'an overlay, size from its backing file'],
    ],
  },
  resize: {
    usage: 'resize [--shrink] [-f FMT] [-q] [--backing-root DIR] [--allow-any-backing] [--no-backing] FILE [+|-]SIZE',
    desc: 'Change the virtual size of an image (shrinking needs --shrink and frees what lies past the end)',
    options: [
      ...READ.filter((o) => o.flags !== 'U'),
      { flags: 'shrink', desc: 'allow a smaller size (data past the new end is lost)', type: 'boolean' },
      { flags: 'q', desc: 'quiet', type: 'boolean' },
    ],
    examples: [['qimg resize disk.qcow2 +10G', 'grow by 10 GiB']],
  },
  convert: {
    usage: 'convert [-f FMT] -O raw|qcow2 [-c] [-o OPTIONS] [-B BACKING [-F FMT]] [-l SNAPSHOT] [-t CACHE] [-T SRC_CACHE] [-m N] [-W] [-p] [-U] SRC DST',
    desc: 'Copy the guest data of an image (or of one of its snapshots) into a new raw file or qcow2 image',
    options: [
      ...READ,
      { flags: 'O', desc: 'output format', choices: ['raw', 'qcow2'] },
      { flags: 'c', desc: 'compress every data cluster (qcow2 output)', type: 'boolean' },
      { flags: 'o', desc: "options for the new image, as create's -o", type: 'string' },
      { flags: 'B', desc: 'backing file of the new image (only what differs from it is written)', type: 'string' },
      { flags: 'F', desc: 'format of the -B backing file', type: 'string' },
      { flags: 'l', desc: 'snapshot.name=NAME, snapshot.id=ID, or an ID or name', type: 'string' },
      { flags: 't', desc: "target cache mode (none, writeback, unsafe, directsync, writethrough); anything but 'unsafe' flushes at the end", type: 'string' },
      { flags: 'T', desc: 'source cache mode (checked, no effect)', type: 'string' },
      { flags: 'm', desc: 'parallel requests, 1-16 (checked, no effect)', type: 'string' },
      { flags: 'W', desc: 'out-of-order writes (no effect)', type: 'boolean' },
      { flags: 'p', desc: 'show progress on a terminal', type: 'boolean' },
    ],
    examples: [
      ['qimg convert -O raw -l snapshot.name=base fixtures/demo.qcow2 base.raw', 'export a snapshot'],
      ['qimg convert -O qcow2 -c fixtures/raw.img small.qcow2', 'a compressed qcow2 image of a raw file'],
    ],
  },
  commit: {
    usage: 'commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE',
    desc: "Write an overlay's data into its backing file (or BASE further down), then empty the overlay",
    options: [
      ...READ.filter((o) => o.flags !== 'U'),
      { flags: 't', desc: 'cache mode (checked; writes are always flushed in order)', type: 'string' },
      { flags: 'b', desc: 'commit into this layer of the chain (implies -d)', type: 'string' },
      { flags: 'd', desc: 'do not empty FILE afterwards', type: 'boolean' },
      { flags: 'p', desc: 'show progress', type: 'boolean' },
      { flags: 'q', desc: 'quiet', type: 'boolean' },
    ],
    examples: [['qimg commit overlay.qcow2', 'merge an external snapshot into its base']],
  },
  rebase: {
    usage: 'rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-u] -b NEW_BACKING [-F FMT] [-p] [-q] FILE',
    desc: 'Change the backing file of an image, copying what differs so the guest sees the same data',
    options: [
      ...READ.filter((o) => o.flags !== 'U'),
      { flags: 't', desc: 'cache mode (checked; writes are always flushed in order)', type: 'string' },
      { flags: 'T', desc: 'source cache mode (checked, no effect)', type: 'string' },
      { flags: 'b', desc: "the new backing file ('' removes it: flatten)", type: 'string' },
      { flags: 'F', desc: 'the new backing file format (required unless -b "")', type: 'string' },
      { flags: 'u', desc: 'unsafe: rewrite the header only', type: 'boolean' },
      { flags: 'p', desc: 'show progress', type: 'boolean' },
      { flags: 'q', desc: 'quiet', type: 'boolean' },
    ],
    examples: [['qimg rebase -b base.qcow2 -F qcow2 top.qcow2', 'skip a middle layer safely']],
  },
  map: {
    usage: 'map [--output=human|json] [-f FMT] [-U] FILE',
    desc: 'Show where each guest range lives in the chain, as qemu-img map does',
    options: [...READ, { flags: 'output', desc: 'output format', choices: ['human', 'json'] }],
    examples: [['qimg map --output=json disk.qcow2', 'one JSON object per range']],
  },
  compare: {
    usage: 'compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] FILE1 FILE2',
    desc: 'Compare the guest contents of two images (exit 0 identical, 1 different, 2 error)',
    options: [
      ...READ,
      { flags: 'F', desc: 'format of FILE2', type: 'string' },
      { flags: 's', desc: 'strict: sizes and block status must match too', type: 'boolean' },
      { flags: 'p', desc: 'show progress', type: 'boolean' },
      { flags: 'q', desc: 'quiet', type: 'boolean' },
    ],
    examples: [['qimg compare a.qcow2 b.raw', 'same guest bytes?']],
  },
  chain: {
    usage: 'chain [--output=human|json] FILE | chain revert FILE --to LAYER [--delete] [-q]',
    desc: 'Show the backing chain as a tree, or revert FILE to a layer of its chain (a fresh overlay on it)',
    options: [
      ...READ,
      { flags: 'output', desc: 'output format', choices: ['human', 'json'] },
      { flags: 'to', desc: 'revert: the layer (backing name, path, or #DEPTH)', type: 'string' },
      { flags: 'delete', desc: 'revert: delete the old FILE and the layers above LAYER', type: 'boolean' },
      { flags: 'q', desc: 'quiet', type: 'boolean' },
    ],
    examples: [['qimg chain revert vm.qcow2 --to base.qcow2', 'back to the external snapshot base']],
  },
};

export function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

function build(): Argv {
  let y = yargs([]).scriptName('qimg').usage('qimg <command> [options]').strict(false).version(version()).help('help').alias('help', 'h').wrap(100);
  for (const [name, c] of Object.entries(CATALOGUE)) {
    y = y.command(name, c.desc, (sub) => describeCommand(sub, c));
  }
  return y.epilogue('Exit codes: 0 success, 1 error (qimg: <message> on stderr). See README.md.');
}

function describeCommand(sub: Argv, c: Cmd): Argv {
  let s = sub.usage(`qimg ${c.usage}\n\n${c.desc}`);
  for (const o of c.options) s = s.option(o.flags, { describe: o.desc, type: o.type, choices: o.choices });
  for (const [cmd, what] of c.examples) s = s.example(cmd, what);
  return s;
}

export async function showGlobal(argv: string[]): Promise<number> {
  if (argv[0] === '--version' || argv[0] === '-V') {
    process.stdout.write(`qimg version ${version()}\n`);
    return 0;
  }
  process.stdout.write((await build().getHelp()) + '\n');
  return argv.length === 0 ? 1 : 0;
}

export async function showCommand(cmd: string): Promise<number> {
  const c = CATALOGUE[cmd]!;
  const y = describeCommand(yargs([]).scriptName('qimg').help(false).version(false).wrap(100), c);
  process.stdout.write((await y.getHelp()) + '\n');
  return 0;
}
