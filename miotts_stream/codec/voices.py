"""Speaker voices: 128-d MioCodec global embeddings, by preset name or from a file.

Presets ship in `presets/` (see `presets/NOTICE.md`: not for commercial use). Files may be a bare
torch tensor (`.pt`, as upstream saves presets), a NumPy array (`.npy`) or a safetensors file
holding a single tensor (`.safetensors`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EMBEDDING_DIM = 128
BUILTIN_PRESETS_DIR = Path(__file__).with_name("presets")
VOICE_SUFFIXES = (".pt", ".npy", ".safetensors")
# Largest magnitude accepted for one embedding value. MioCodec's global encoder gives values
# within about +-8 (the presets); far larger ones overflow the decoder into NaN or silence.
EMBEDDING_MAX_ABS = 100.0


def check_embedding(embedding: object, dim: int, what: str = "global_embedding") -> torch.Tensor:
    """A speaker embedding as `dim` finite float32 values; ValueError naming `what` otherwise."""
    try:
        e = torch.as_tensor(
            embedding.detach().cpu()
            if isinstance(embedding, torch.Tensor)
            else np.asarray(embedding)
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: expected {dim} floats ({err})") from err
    if not (e.dtype.is_floating_point or e.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{what}: expected {dim} floats, got dtype {e.dtype}")
    e = e.float().reshape(-1) if e.dim() == 2 and e.shape[0] == 1 else e.float()
    if e.dim() != 1 or e.numel() != dim:
        raise ValueError(f"{what}: expected {dim} floats, got shape {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError(f"{what}: holds NaN or infinite values")
    if (peak := float(e.abs().max())) > EMBEDDING_MAX_ABS:
        raise ValueError(
            f"{what}: values must lie within +-{EMBEDDING_MAX_ABS:g} (speaker embeddings are "
            f"within about +-10), got {peak:g}"
        )
    return e


def load_voice_file(path: str | Path, dim: int = EMBEDDING_DIM) -> torch.Tensor:
    """Read one embedding file; ValueError naming the file and the problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise ValueError(f"holds {len(tensors)} tensors, expected exactly one")
            value = next(iter(tensors.values()))
        else:
            raise ValueError(f"unknown voice file type {suffix!r}; use one of {VOICE_SUFFIXES}")
    except ValueError as err:
        raise ValueError(f"voice file {path}: {err}") from err
    except Exception as err:  # unreadable, corrupt, pickled objects refused by weights_only
        raise ValueError(f"voice file {path}: cannot read it ({err})") from err
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"voice file {path}: holds a {type(value).__name__}, not a tensor")
    return check_embedding(value, dim, f"voice file {path}").contiguous()


class VoiceLibrary:
    """Named presets from one or more folders; later folders override earlier names."""

    def __init__(self, folders: list[str | Path] | None = None, dim: int = EMBEDDING_DIM):
        self.dim = dim
        self._paths: dict[str, Path] = {}
        self._cache: dict[str, torch.Tensor] = {}
        for folder in [BUILTIN_PRESETS_DIR, *(folders or [])]:
            self.add_folder(folder)

    def add_folder(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"presets folder {folder} does not exist")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in VOICE_SUFFIXES and path.is_file():
                self._paths[path.stem] = path
                self._cache.pop(path.stem, None)

    def names(self) -> list[str]:
        return sorted(self._paths)

    def path(self, name: str) -> Path:
        return self._paths[name]

    def __contains__(self, name: str) -> bool:
        return name in self._paths

    def get(self, name: str) -> torch.Tensor:
        """The embedding of a preset; KeyError if there is no such preset."""
        if name not in self._paths:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = load_voice_file(self._paths[name], self.dim)
        return self._cache[name]

    def resolve(self, name_or_path: str) -> torch.Tensor:
        """A preset name, or a path to an embedding file."""
        if name_or_path in self._paths:
            return self.get(name_or_path)
        path = Path(name_or_path)
        if path.suffix.lower() in VOICE_SUFFIXES and path.is_file():
            return load_voice_file(path, self.dim)
        raise KeyError(name_or_path)


def load_voice(name_or_path: str) -> torch.Tensor:
    """A built-in preset by name (`en_female`, ...) or an embedding file by path."""
    try:
        return VoiceLibrary().resolve(name_or_path)
    except KeyError:
        raise ValueError(
            f"voice: {name_or_path!r} is neither a preset ({', '.join(VoiceLibrary().names())}) "
            "nor an embedding file"
        ) from None
