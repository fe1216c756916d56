"""Voice presets and embedding files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from miotts_stream.codec import VoiceLibrary, load_voice, load_voice_file
from miotts_stream.codec.voices import BUILTIN_PRESETS_DIR


def test_builtin_presets_ship_with_notice():
    library = VoiceLibrary()
    assert library.names() == ["en_female", "en_male", "jp_female", "jp_male"]
    notice = (BUILTIN_PRESETS_DIR / "NOTICE.md").read_text()
    assert "commercial" in notice
    for name in library.names():
        voice = library.get(name)
        assert voice.shape == (128,) and voice.dtype == torch.float32
        assert torch.isfinite(voice).all() and voice.abs().sum() > 0
    assert not torch.equal(library.get("en_female"), library.get("jp_male"))


def test_voice_files_in_every_format(tmp_path):
    voice = torch.randn(128)
    torch.save(voice, tmp_path / "a.pt")
    np.save(tmp_path / "b.npy", voice.numpy())
    save_file({"embedding": voice}, str(tmp_path / "c.safetensors"))
    for name in ("a.pt", "b.npy", "c.safetensors"):
        assert torch.equal(load_voice_file(tmp_path / name), voice)
        assert torch.equal(load_voice(str(tmp_path / name)), voice)
    library = VoiceLibrary([tmp_path])
    assert {"a", "b", "c", "en_female"} <= set(library.names())


def test_bad_voice_files(tmp_path):
    torch.save(torch.randn(64), tmp_path / "short.pt")
    torch.save({"x": 1}, tmp_path / "dict.pt")
    np.save(tmp_path / "nan.npy", np.full(128, np.nan, dtype=np.float32))
    save_file({"a": torch.zeros(128), "b": torch.zeros(128)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"short\.pt: expected 128 floats, got shape \(64,\)"):
        load_voice_file(tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"dict\.pt"):
        load_voice_file(tmp_path / "dict.pt")
    with pytest.raises(ValueError, match=r"nan\.npy: holds NaN"):
        load_voice_file(tmp_path / "nan.npy")
    with pytest.raises(ValueError, match=r"holds 2 tensors"):
        load_voice_file(tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"junk\.pt: cannot read it"):
        load_voice_file(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match=r"'nobody' is neither a preset"):
        load_voice("nobody")
