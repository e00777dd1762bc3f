"""TensorBoard writer that never pulls TensorFlow into a torch process.

`torch.utils.tensorboard` imports TensorFlow when it is installed (the `export` extra installs
it), and TensorFlow and torch with triton crash in one process (docs/TOOLCHAIN.md). Training never
needs TensorFlow, so it is hidden from this process before TensorBoard is imported; TensorBoard
then uses its own TensorFlow-free stub.
"""
from __future__ import annotations

import sys
from pathlib import Path


def summary_writer(log_dir: Path, purge_step: int | None = None):
    if "tensorflow" not in sys.modules:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]  # import tensorflow -> ImportError
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step or None)
