"""The run directory on the recorder side: preparing it, and the manifest a Recorder or a stand-alone
capture pass writes (layout in :mod:`analyzer.trace.format`)."""

from __future__ import annotations

import os
import shutil
import socket
import time

import torch

from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.captures import CAPTURES_DIR, FEATURES_DIR
from .distributed import barrier, original_type

__all__ = ["VERSION", "prepare_run_dir", "ensure_run", "model_info", "new_manifest", "write_manifest"]

#: bbdecoder version written into every manifest
VERSION = "2.0.0.dev0"


def prepare_run_dir(d: str, rank: int, world_size: int, overwrite: bool) -> None:
    """Create the run directory ``d`` (rank 0; the other ranks wait at a barrier).

    An existing non-empty directory is refused unless ``overwrite`` and it is a bbdecoder run; then
    the old run's rank directories, captures, features, manifest, graph and temporary files go.

    Raises:
        FileExistsError: ``d`` is a file, holds files and ``overwrite`` is False, or is not a run.
    """
    if rank == 0:
        if os.path.exists(d) and not os.path.isdir(d):
            raise FileExistsError(f"{d} exists and is not a directory")
        if os.path.isdir(d) and os.listdir(d):
            if not overwrite:
                raise FileExistsError(f"{d} already holds a run or other files; pass overwrite=True "
                                      "to replace a run, or choose another directory")
            if not os.path.isfile(os.path.join(d, fmt.MANIFEST)):
                raise FileExistsError(f"{d} is not a bbdecoder run; refusing to overwrite it")
            for n in os.listdir(d):
                p = os.path.join(d, n)
                if (fmt.parse_rank_dirname(n) is not None or n in (CAPTURES_DIR, FEATURES_DIR)) \
                        and os.path.isdir(p):
                    shutil.rmtree(p)
                elif n in (fmt.MANIFEST, fmt.GRAPH_FILE) or n.startswith(".tmp-"):
                    os.unlink(p)
        os.makedirs(d, exist_ok=True)
    barrier(world_size)
    os.makedirs(d, exist_ok=True)


def model_info(model: torch.nn.Module) -> dict:
    """The manifest's ``model`` entry: class path and parameter count."""
    t = original_type(model)
    return {"class": f"{t.__module__}.{t.__qualname__}",
            "n_params": int(sum(p.numel() for p in model.parameters()))}


def new_manifest(model: torch.nn.Module, config: dict, table: list[dict], world_size: int) -> dict:
    """A Recorder's manifest at the start of recording (status "recording", no sites yet)."""
    return {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "bbdecoder_version": VERSION,
        "created": time.time(), "status": fmt.STATUS_RECORDING, "world_size": world_size,
        "host": socket.gethostname(), "torch_version": torch.__version__,
        "model": model_info(model), "config": config, "layers": table, "sites": [],
    }


def write_manifest(run_dir: str, manifest: dict) -> None:
    """Replace ``RUN/manifest.json`` atomically and durably."""
    files.write_json_atomic(os.path.join(run_dir, fmt.MANIFEST), manifest)


def ensure_run(model: torch.nn.Module, run_dir: str) -> None:
    """Make ``run_dir`` a (minimal) run if it is not one; refuse a non-run directory with files.

    Raises:
        FileExistsError: ``run_dir`` is a file, or a directory with files but no manifest.
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise FileExistsError(f"{run_dir} exists and is not a directory")
    if os.path.isfile(os.path.join(run_dir, fmt.MANIFEST)):
        return
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise FileExistsError(f"{run_dir} holds files but is not a bbdecoder run; refusing to write into it")
    os.makedirs(run_dir, exist_ok=True)
    now = time.time()
    write_manifest(run_dir, {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "bbdecoder_version": VERSION,
        "created": now, "ended": now, "status": fmt.STATUS_COMPLETE, "world_size": 1,
        "host": socket.gethostname(), "torch_version": torch.__version__,
        "model": model_info(model),
        "config": {"attention_capture_only": True}, "layers": [], "sites": [], "steps": 0, "epochs": 0,
    })
