// The one error type qimg throws: a stable `code` for programs, a one-line message for people.

export type ErrorCode =
  | 'BAD_IMAGE' // the file is not a valid image of the format (bad field, limit exceeded)
  | 'UNSUPPORTED' // valid, but uses something qimg refuses (unknown feature, encryption)
  | 'CORRUPT' // metadata points somewhere impossible while reading
  | 'IO' // the operating system refused a read, write or open
  | 'LOCKED' // another process holds the image
  | 'NOT_FOUND' // a named snapshot, file or backing file does not exist
  | 'BACKING' // a backing file is refused by policy or forms a loop
  | 'USAGE' // bad arguments to a library call or command
  | 'READ_ONLY'; // a write on an image opened or marked read-only

export class QimgError extends Error {
  readonly code: ErrorCode;
  readonly data: Readonly<Record<string, unknown>>;

  constructor(code: ErrorCode, message: string, data: Record<string, unknown> = {}) {
    super(message);
    this.name = 'QimgError';
    this.code = code;
    this.data = data;
  }
}

/** Hex form used in every message that names a file offset. */
export function hex(n: number): string {
  return '0x' + n.toString(16);
}

/** Wraps an OS error (ENOENT, EACCES, ...) into a QimgError naming the file. */
export function ioError(err: unknown, path: string, what: string): QimgError {
  const e = err as NodeJS.ErrnoException;
  const reason = osReason(e);
  return new QimgError(e?.code === 'ENOENT' ? 'NOT_FOUND' : 'IO', `${what} '${path}': ${reason}`, {
    path,
    errno: e?.code,
  });
}

/** The strerror() text QEMU would print for the common errno values. */
export function osReason(e: NodeJS.ErrnoException | undefined): string {
  switch (e?.code) {
    case 'ENOENT':
      return 'No such file or directory';
    case 'EACCES':
      return 'Permission denied';
    case 'EISDIR':
      return 'Is a directory';
    case 'EROFS':
      return 'Read-only file system';
    case 'ENOSPC':
      return 'No space left on device';
    case 'EFBIG':
      return 'File too large';
    case 'ELOOP':
      return 'Too many levels of symbolic links';
    case 'ENOTDIR':
      return 'Not a directory';
    case 'ENAMETOOLONG':
      return 'File name too long';
    case 'EIO':
      return 'Input/output error';
    default:
      return e?.message ?? String(e);
  }
}
