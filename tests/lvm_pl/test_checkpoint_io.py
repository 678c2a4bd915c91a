import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lvm_pl.checkpoint_io import AtomicCheckpointIO


def test_roundtrip(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(3)}, tmp_path / "c.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "c.ckpt")["w"], torch.arange(3))


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    """A process killed (SIGKILL) in the middle of a save leaves the previous checkpoint loadable and whole."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from lvm_pl.checkpoint_io import AtomicCheckpointIO

        class Bomb:
            def __reduce__(self):  # runs while torch.save is writing the temp file
                os.kill(os.getpid(), signal.SIGKILL)

        AtomicCheckpointIO().save_checkpoint({{"big": torch.zeros(1_000_000), "bomb": Bomb()}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert AtomicCheckpointIO().load_checkpoint(path) == {"step": 1}
