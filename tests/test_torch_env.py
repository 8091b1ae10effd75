"""The worker sets the CUDA allocator, compile caches and CPU threads before torch touches the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, os, torch
from sam3_batch.contracts.settings import Settings
from sam3_batch.worker.torch_env import prepare_torch
prepare_torch(Settings())
print(json.dumps({name: os.environ.get(name) for name in
                  ("PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
                 | {"threads": torch.get_num_threads(), "cuda_initialised": torch.cuda.is_initialized()}))
"""


def _probe(tmp_path: Path, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR",
                          "TRITON_CACHE_DIR") and not k.startswith("SAM3_BATCH_")}
    done = subprocess.run([sys.executable, "-c", PROBE], env=clean | {"HF_HOME": str(tmp_path)} | env,
                          capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_allocator_caches_and_threads_are_set_before_cuda_is_touched(tmp_path: Path) -> None:
    found = _probe(tmp_path, SAM3_BATCH_DEVICE="cpu", SAM3_BATCH_TORCH_THREADS="3")

    assert found["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert found["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile" / "inductor")  # the model volume
    assert found["TRITON_CACHE_DIR"] == str(tmp_path / "torch-compile" / "triton")
    assert found["threads"] == 3
    assert found["cuda_initialised"] is False


def test_the_operators_allocator_config_and_cache_folder_win(tmp_path: Path) -> None:
    found = _probe(tmp_path, SAM3_BATCH_DEVICE="cpu", PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:512",
                   SAM3_BATCH_COMPILE_CACHE_DIR=str(tmp_path / "cache"))

    assert found["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    assert found["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
