// The public library API of qimg: re-exports only.

export { QimgError, type ErrorCode } from './errors.js';
export type { ImageInfo, SnapshotInfo, Qcow2Specific, BitmapInfo, LuksInfo } from './engine/types.js';
export { openImage, openLayer, resolveBackingPath, MAX_CHAIN_DEPTH, type OpenOptions, type BackingPolicy, type ImageFormat } from './engine/open.js';
export type { Layer, Extent } from './engine/layer.js';
export { Qcow2Image } from './engine/qcow2-image.js';
export { RawImage } from './engine/raw-image.js';
export { info, listSnapshots, findSnapshot, parseSnapshotSelector, type InfoOptions, type ReadOptions, type SnapshotSelector } from './engine/info.js';
export { convert, type ConvertOptions } from './engine/convert.js';
export { createSnapshot, applySnapshot, deleteSnapshot, snapshotFreedBytes, type SnapshotRef, type NewSnapshot } from './engine/snapshots.js';
export { create, type CreateOptions, type CreateResult } from './engine/create.js';
export { resize, type ResizeOptions } from './engine/resize.js';
export { ImageWriter, openWriter } from './engine/writer.js';
export { commit, commitOpened, copyAboveBase, makeEmpty, type CommitOptions, type CommitTarget } from './engine/commit.js';
export { rebase, rewriteBacking, copyDifferences, type RebaseOptions } from './engine/rebase.js';
export { mapImage, mapFile, layerStatus, chainStatus, type MapEntry, type LayerStatus } from './engine/map.js';
export { compare, compareLayers, type CompareOptions, type CompareResult } from './engine/compare.js';
export { describeChain, revertChain, findInChain, type ChainLayerInfo, type RevertOptions, type RevertResult } from './engine/chain.js';
export { check, checkFile, repairRefcounts, renderCheckHuman, renderCheckJson, renderCheckJsonArray, renderCheckStderr, type CheckOptions, type CheckReport } from './check/index.js';
export { checkMany, worstExitCode } from './check/many.js';
